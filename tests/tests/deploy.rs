//! The deployment files: docker-compose.yml, the Dockerfile, the Kubernetes manifests and the
//! Grafana dashboard agree with the workspace and with each other. (`make test` also runs
//! `docker-compose config` on the compose file.)
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde_yaml::Value as Yaml;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// The workspace's binary names, from the members' Cargo.toml files.
fn workspace_bins() -> Vec<String> {
    let mut bins = Vec::new();
    for member in [
        "producer",
        "worker",
        "tests",
        "tests/sample-server",
        "tests/bench",
    ] {
        let text = std::fs::read_to_string(root().join(member).join("Cargo.toml")).unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap();
        for b in doc
            .get("bin")
            .and_then(|b| b.as_array())
            .into_iter()
            .flatten()
        {
            bins.push(b["name"].as_str().unwrap().to_string());
        }
    }
    bins
}

#[test]
fn compose_file_has_the_services_and_their_order() {
    let doc = &yaml_docs(&root().join("docker-compose.yml"))[0];
    let services = &doc["services"];
    for s in ["rabbitmq", "redis", "worker", "sample-data", "producer"] {
        assert!(services.get(s).is_some(), "service {s} missing");
    }
    assert!(services["rabbitmq"]["healthcheck"].is_mapping());
    assert!(services["redis"]["healthcheck"].is_mapping());
    // Workers start only when the broker and Redis are healthy, and never pin a container
    // name or a host port (so that --scale works).
    let worker = &services["worker"];
    assert_eq!(
        worker["depends_on"]["rabbitmq"]["condition"],
        "service_healthy"
    );
    assert_eq!(
        worker["depends_on"]["redis"]["condition"],
        "service_healthy"
    );
    assert!(worker.get("container_name").is_none() && worker.get("ports").is_none());
    assert_eq!(worker["build"]["dockerfile"], "deploy/Dockerfile");
    // The producer is a one-shot behind a profile.
    assert_eq!(services["producer"]["profiles"][0], "enqueue");
    // The dashboard listens on every address in its container, so it has a token, and is
    // published on the host's loopback only.
    let dash = &services["dashboard"];
    assert_eq!(dash["command"][0], "dashboard");
    assert!(dash["environment"]["TASKMILL_DASHBOARD_TOKEN"]
        .as_str()
        .is_some());
    assert!(dash["ports"][0].as_str().unwrap().starts_with("127.0.0.1:"));
    // Every mounted file exists.
    for v in services["rabbitmq"]["volumes"].as_sequence().unwrap() {
        let src = v.as_str().unwrap().split(':').next().unwrap();
        assert!(root().join(src).exists(), "{src} missing");
    }
    // The user the services log in with is defined for the broker.
    let defs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/rabbitmq/definitions.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(defs["users"][0]["name"], "taskmill");
    // The `producer queues` / `workers` views in the image need the management API.
    assert!(default_of(&worker["environment"]["RABBITMQ_API_URL"]).contains("@rabbitmq:15672/api"));
    let url = default_of(&worker["environment"]["AMQP_URL"]);
    assert!(
        url.starts_with("amqp://taskmill:taskmill@rabbitmq:5672/"),
        "{url}"
    );

    // The cluster profile: two nodes joining rabbit@rabbitmq with its cookie, a Redis replica
    // and three sentinels; its env file gives every process the nodes and the sentinels.
    let node_name = |s: &str| services[s]["hostname"].as_str().unwrap().to_string();
    assert_eq!(node_name("rabbitmq"), "rabbitmq");
    let cookie = services["rabbitmq"]["environment"]["RABBITMQ_ERLANG_COOKIE"].clone();
    for s in ["rabbitmq-2", "redis-replica", "sentinel-1"] {
        assert_eq!(services[s]["profiles"][0], "cluster", "{s}");
    }
    assert_eq!(
        services["rabbitmq-2"]["environment"]["RABBITMQ_ERLANG_COOKIE"],
        cookie
    );
    let conf = std::fs::read_to_string(root().join("deploy/rabbitmq/cluster-node.conf")).unwrap();
    assert!(
        conf.contains("classic_config.nodes.1 = rabbit@rabbitmq\n"),
        "{conf}"
    );
    let env = std::fs::read_to_string(root().join("deploy/compose-cluster.env")).unwrap();
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} not in compose-cluster.env"))
            .to_string()
    };
    let amqp = var("TASKMILL_AMQP_URL");
    let hosts: Vec<&str> = taskmill_common::url_list(&amqp)
        .iter()
        .map(|u| u.split('@').nth(1).unwrap().split(':').next().unwrap())
        .collect();
    assert_eq!(hosts, ["rabbitmq", "rabbitmq-2", "rabbitmq-3"]);
    assert!(worker["environment"]["AMQP_URL"]
        .as_str()
        .unwrap()
        .starts_with("${TASKMILL_AMQP_URL:-"));
    let redis = var("TASKMILL_REDIS_URL");
    let spec = taskmill_common::redis_url::parse(&redis).unwrap();
    let taskmill_common::redis_url::RedisTarget::Sentinel(s) = spec.target else {
        panic!("{redis}")
    };
    for (host, _) in &s.sentinels {
        assert!(
            services[host.as_str()]["hostname"] == host.as_str(),
            "{host}"
        );
    }
    let sentinel_cmd = services["sentinel-1"]["command"][0].as_str().unwrap();
    assert!(
        sentinel_cmd.contains(&format!("sentinel monitor {} redis 6379 2", s.master)),
        "{sentinel_cmd}"
    );
}

/// The default of a compose value `${VAR:-default}` (the value itself when it is plain).
fn default_of(v: &Yaml) -> String {
    let v = v.as_str().unwrap();
    match v.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        Some(inner) => inner.split_once(":-").map_or("", |(_, d)| d).to_string(),
        None => v.to_string(),
    }
}

#[test]
fn dockerfile_builds_and_ships_the_workspace_binaries() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(text.contains("cargo chef cook --release --workspace"));
    assert!(text.contains("cargo build --release --workspace --bins"));
    let bins = workspace_bins();
    for name in ["producer", "worker", "sample-server"] {
        assert!(
            bins.iter().any(|b| b == name),
            "no binary {name} in the workspace"
        );
        assert!(
            text.contains(&format!("target/release/{name}")),
            "the Dockerfile does not copy {name}"
        );
    }
    // The runtime image ships the two binaries only; the sample server has its own target.
    let runtime = text.split("AS runtime").nth(1).unwrap();
    assert!(runtime.contains("/usr/local/bin/producer /usr/local/bin/worker /usr/local/bin/"));
    assert!(!runtime.contains("sample-server") && !runtime.contains("bench"));
    let sample = text.split("AS sample").nth(1).unwrap();
    assert!(sample.contains("sample-server"));
    assert!(
        text.contains("USER taskmill"),
        "the runtime image must not run as root"
    );
}

#[test]
fn kubernetes_manifests_hang_together() {
    // The workers' objects by kind; the dashboard's by kind apart.
    let mut kinds = std::collections::BTreeMap::new();
    let mut dashboard = std::collections::BTreeMap::new();
    for f in std::fs::read_dir(root().join("deploy/k8s")).unwrap() {
        for doc in yaml_docs(&f.unwrap().path()) {
            let kind = doc["kind"].as_str().unwrap().to_string();
            let component = &doc["metadata"]["labels"]["app.kubernetes.io/component"];
            if component.as_str() == Some("dashboard") {
                assert!(
                    dashboard.insert(kind, doc).is_none(),
                    "two dashboard objects of a kind"
                );
            } else {
                kinds.insert(kind, doc);
            }
        }
    }
    dashboard_manifest_hangs_together(&dashboard);
    for k in [
        "Deployment",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
        "ConfigMap",
        "Secret",
    ] {
        assert!(kinds.contains_key(k), "no {k}");
    }
    let config = &kinds["ConfigMap"]["data"];
    let shutdown: u64 = config["TASKMILL_SHUTDOWN_TIMEOUT"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let pod = &kinds["Deployment"]["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > shutdown,
        "grace {grace} must exceed the shutdown timeout {shutdown}"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["cpu"].is_string());
    let metrics_port = config["TASKMILL_METRICS_ADDR"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        c["ports"][0]["containerPort"].as_u64().unwrap().to_string(),
        metrics_port
    );
    // KEDA scales the Deployment on the namespace's work queue.
    let so = &kinds["ScaledObject"]["spec"];
    assert_eq!(
        so["scaleTargetRef"]["name"],
        kinds["Deployment"]["metadata"]["name"]
    );
    let ns = config["TASKMILL_NAMESPACE"].as_str().unwrap();
    let queue = config["TASKMILL_QUEUES"].as_str().unwrap();
    assert_eq!(
        so["triggers"][0]["metadata"]["queueName"],
        format!("{ns}.{queue}").as_str()
    );
    // The secret holds every URL the pods and the scaler read.
    let secret = &kinds["Secret"]["stringData"];
    for key in ["AMQP_URL", "REDIS_URL", "RABBITMQ_HOST"] {
        assert!(secret[key].is_string(), "secret lacks {key}");
    }
}

/// The dashboard's Deployment runs `producer dashboard` on its container port with a token
/// and the management API's URL from its Secret, and its Service selects its pods.
fn dashboard_manifest_hangs_together(objs: &std::collections::BTreeMap<String, Yaml>) {
    for k in ["Deployment", "Service", "Secret"] {
        assert!(objs.contains_key(k), "no dashboard {k}");
    }
    let pod = &objs["Deployment"]["spec"]["template"];
    let c = &pod["spec"]["containers"][0];
    let command: Vec<&str> = c["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(&command[..2], ["producer", "dashboard"]);
    let listen = command
        .iter()
        .position(|a| *a == "--listen")
        .map(|i| command[i + 1])
        .expect("the dashboard listens beyond loopback");
    let port = c["ports"][0]["containerPort"].as_i64().unwrap();
    assert_eq!(listen, format!("0.0.0.0:{port}"));
    // Beyond loopback the dashboard needs a token: the pod gets it, and the API URL, from
    // the dashboard's Secret (under the names the README's flag table gives).
    let secret_name = objs["Secret"]["metadata"]["name"].as_str().unwrap();
    let from: Vec<&str> = c["envFrom"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| e["secretRef"]["name"].as_str())
        .collect();
    assert!(from.contains(&secret_name), "{from:?}");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for key in ["TASKMILL_DASHBOARD_TOKEN", "RABBITMQ_API_URL"] {
        assert!(
            objs["Secret"]["stringData"][key].is_string(),
            "secret lacks {key}"
        );
        assert!(
            readme.contains(&format!("`{key}`")),
            "the README has no {key}"
        );
    }
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/", "{probe}");
    }
    // The Service selects the Deployment's pods and sends to its named port.
    let svc = &objs["Service"]["spec"];
    for (k, v) in svc["selector"].as_mapping().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][k.as_str().unwrap()], v);
    }
    assert_eq!(svc["ports"][0]["targetPort"], c["ports"][0]["name"]);
}

#[test]
fn the_dashboard_shows_every_metric() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/taskmill.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    for metric in [
        "taskmill_batches_total",
        "taskmill_records_total",
        "taskmill_task_duration_seconds_bucket",
        "taskmill_batch_latency_seconds_bucket",
        "taskmill_batches_in_flight",
        "taskmill_worker_threads",
        "taskmill_connected",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel shows {metric}"
        );
    }
}

#[test]
fn the_example_config_file_is_valid() {
    let path = root().join("deploy/taskmill.toml");
    use clap::CommandFactory;
    for (binary, cmd) in [
        ("worker", taskmill_worker::WorkerArgs::command()),
        ("producer", taskmill_producer::command()),
    ] {
        let settings = taskmill_common::config::settings_of(&cmd);
        let got = taskmill_common::config::read_config(&path, binary, &settings).unwrap();
        assert!(got.iter().any(|(env, _)| *env == "AMQP_URL"), "{binary}");
    }
}

/// The cluster manifests (`deploy/k8s-cluster/`): a RabbitmqCluster of three and a Sentinel set
/// of three Redis pods and three sentinels, and taskmill's URLs naming each RabbitMQ pod and
/// each sentinel, under the name the sentinels monitor; the URLs parse as taskmill parses them.
#[test]
fn cluster_manifests_hang_together() {
    let mut objs = std::collections::BTreeMap::new();
    for f in std::fs::read_dir(root().join("deploy/k8s-cluster")).unwrap() {
        for doc in yaml_docs(&f.unwrap().path()) {
            let key = format!(
                "{}/{}",
                doc["kind"].as_str().unwrap(),
                doc["metadata"]["name"].as_str().unwrap()
            );
            assert!(objs.insert(key.clone(), doc).is_none(), "two {key}");
        }
    }
    let rabbit = &objs["RabbitmqCluster/rabbitmq"]["spec"];
    assert_eq!(rabbit["replicas"], 3);
    let conf = rabbit["rabbitmq"]["additionalConfig"].as_str().unwrap();
    assert!(
        conf.contains("quorum_queue.initial_cluster_size = 3"),
        "{conf}"
    );
    let urls = &objs["Secret/taskmill-urls"]["stringData"];
    let amqp = urls["AMQP_URL"].as_str().unwrap();
    let nodes = taskmill_common::url_list(amqp);
    assert_eq!(nodes.len(), 3, "{amqp}");
    for (i, url) in nodes.iter().enumerate() {
        assert!(
            url.contains(&format!("@rabbitmq-server-{i}.rabbitmq-nodes.")),
            "{url}"
        );
    }
    let api = urls["RABBITMQ_API_URL"].as_str().unwrap();
    assert_eq!(taskmill_common::url_list(api).len(), 3, "{api}");
    // The Sentinel set: the URL's sentinels are the StatefulSet's pods, its name the monitored one.
    let redis = urls["REDIS_URL"].as_str().unwrap();
    let spec = taskmill_common::redis_url::parse(redis).unwrap();
    let taskmill_common::redis_url::RedisTarget::Sentinel(s) = spec.target else {
        panic!("REDIS_URL is not in the Sentinel form: {redis}")
    };
    assert_eq!(spec.wait.replicas, 1);
    let sentinels = &objs["StatefulSet/redis-sentinel"]["spec"];
    assert_eq!(
        s.sentinels.len() as u64,
        sentinels["replicas"].as_u64().unwrap()
    );
    for (i, (host, port)) in s.sentinels.iter().enumerate() {
        assert!(
            host.starts_with(&format!("redis-sentinel-{i}.redis-sentinel.")),
            "{host}"
        );
        assert_eq!(*port, 26379);
    }
    let config = &objs["ConfigMap/redis-sentinel"]["data"];
    let sentinel_conf = config["sentinel.conf"].as_str().unwrap();
    assert!(
        sentinel_conf.contains(&format!("sentinel monitor {} ", s.master)),
        "{sentinel_conf}"
    );
    assert_eq!(objs["StatefulSet/redis"]["spec"]["replicas"], 3);
    // The start scripts the pods run are in the ConfigMap they mount.
    for (set, script) in [
        ("redis", "start-redis.sh"),
        ("redis-sentinel", "start-sentinel.sh"),
    ] {
        let c = &objs[&format!("StatefulSet/{set}")]["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["command"][1], format!("/config/{script}").as_str());
        assert!(config[script].is_string(), "no {script}");
    }
}
