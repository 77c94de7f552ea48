//! The next call of a Celery chain, published once the call before it succeeded (from the
//! namespace's outbox, by `crate::chains::sweep`), as Celery's own worker publishes it: the
//! result before it first in its args (unless the signature is immutable), its frozen task id
//! kept (or `get()` on the chain never returns), `parent_id` and `root_id` set, the rest of
//! the chain in its embed. JSON, to the signature's queue or the one the call came from,
//! confirmed before the outbox entry is settled.

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
    BasicProperties, Channel, Connection,
};
use serde_json::{json, Value};
use taskmill_common::{amqp, store::celery::CelerySettings};

/// A connection and a confirming channel for the chains' next calls, opened on first use.
#[derive(Default)]
pub(crate) struct NextCalls(tokio::sync::Mutex<Option<(Connection, Channel)>>);

impl NextCalls {
    /// Publishes the call after `job` (whose result was `retval`) in its chain; its task id.
    pub(crate) async fn publish(
        &self,
        amqp_url: &str,
        job: &str,
        settings: &CelerySettings,
        retval: Value,
    ) -> anyhow::Result<(String, String)> {
        let (queue, props, body, id, task) = next_message(job, settings, retval)?;
        let mut guard = self.0.lock().await;
        let usable = guard
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !usable {
            let conn = amqp::connect(amqp_url, "taskmill-celery-chains").await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            *guard = Some((conn, ch));
        }
        let Some((_, ch)) = guard.as_ref() else {
            anyhow::bail!("no channel");
        };
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                props,
            )
            .await?
            .await?;
        if confirm.is_nack() {
            anyhow::bail!("the broker refused the next call of the chain (queue {queue})");
        }
        if let Some(returned) = confirm.take_message() {
            anyhow::bail!(
                "the next call of the chain could not be routed to queue {queue}: {}",
                returned.reply_text
            );
        }
        Ok((id, task))
    }
}

fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// The next call's (queue, properties, body, task id, task name).
fn next_message(
    job: &str,
    settings: &CelerySettings,
    retval: Value,
) -> anyhow::Result<(String, BasicProperties, Vec<u8>, String, String)> {
    let mut chain = settings.chain.clone();
    let Some(next) = chain.pop() else {
        anyhow::bail!("no call left in the chain");
    };
    let Some(task) = next["task"].as_str().map(str::to_string) else {
        anyhow::bail!("the chain's next signature has no task name");
    };
    let options = &next["options"];
    let id = options["task_id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut args = next["args"].as_array().cloned().unwrap_or_default();
    if !next["immutable"].as_bool().unwrap_or(false) {
        args.insert(0, retval);
    }
    let kwargs = match &next["kwargs"] {
        Value::Object(m) => Value::Object(m.clone()),
        _ => json!({}),
    };
    let queue = options["queue"]
        .as_str()
        .or_else(|| options["queue"]["name"].as_str())
        .or(settings.queue.as_deref())
        .unwrap_or("celery")
        .to_string();
    let embed = json!({
        "callbacks": options.get("link").cloned().unwrap_or(Value::Null),
        "errbacks": options.get("link_error").cloned().unwrap_or(Value::Null),
        "chain": if chain.is_empty() { Value::Null } else { Value::Array(chain) },
        "chord": Value::Null,
    });
    let body = serde_json::to_vec(&json!([args, kwargs, embed]))?;
    let root = settings.root_id.clone().unwrap_or_else(|| job.to_string());
    let mut h = FieldTable::default();
    let mut put = |k: &str, v: AMQPValue| {
        h.insert(ShortString::from(k), v);
    };
    put("lang", text("py"));
    put("task", text(&task));
    put("id", text(&id));
    put("shadow", AMQPValue::Void);
    put("eta", AMQPValue::Void);
    put("expires", AMQPValue::Void);
    put(
        "group",
        options["group_id"].as_str().map_or(AMQPValue::Void, text),
    );
    put("group_index", AMQPValue::Void);
    put("retries", AMQPValue::LongLongInt(0));
    put(
        "timelimit",
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, AMQPValue::Void])),
    );
    put("root_id", text(&root));
    put("parent_id", text(job));
    put("argsrepr", text(&Value::Array(args).to_string()));
    put("kwargsrepr", text(&kwargs.to_string()));
    put(
        "origin",
        text(&format!("taskmill@{}", taskmill_common::amqp::hostname())),
    );
    put("ignore_result", AMQPValue::Boolean(false));
    let props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_content_encoding(ShortString::from("utf-8"))
        .with_delivery_mode(2)
        .with_priority(0)
        .with_correlation_id(ShortString::from(id.as_str()))
        .with_headers(h);
    Ok((queue, props, body, id, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(chain: Vec<Value>) -> CelerySettings {
        CelerySettings {
            key: "celery-task-meta-a".into(),
            expires: 60,
            parent_id: None,
            group_id: None,
            root_id: Some("root".into()),
            queue: Some("celery".into()),
            chain,
            msgpack: false,
        }
    }

    #[test]
    fn the_next_call_gets_the_result_first_unless_immutable_and_keeps_its_id() {
        let chain = vec![
            json!({"task": "c", "args": [], "kwargs": {}, "options": {"task_id": "id-c"}}),
            json!({"task": "b", "args": [7], "kwargs": {"k": 1}, "options": {"task_id": "id-b", "queue": "q2"}}),
        ];
        let (queue, props, body, id, task) =
            next_message("a", &settings(chain), json!({"r": 1})).unwrap();
        assert_eq!(
            (queue.as_str(), id.as_str(), task.as_str()),
            ("q2", "id-b", "b")
        );
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body[0], json!([{"r": 1}, 7]));
        assert_eq!(body[1], json!({"k": 1}));
        assert_eq!(body[2]["chain"][0]["task"], "c");
        let h = props.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("parent_id"), Some(&text("a")));
        assert_eq!(h.get("root_id"), Some(&text("root")));

        let immutable =
            vec![json!({"task": "b", "args": [1], "immutable": true, "options": {"task_id": "x"}})];
        let (queue, _, body, _, _) = next_message("a", &settings(immutable), json!(5)).unwrap();
        assert_eq!(queue, "celery");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body[0], json!([1]));
        assert_eq!(body[2]["chain"], Value::Null);
    }
}
