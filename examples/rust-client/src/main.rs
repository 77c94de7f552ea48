//! Enqueue a job from Rust code, wait for it and read its results (the README's example).

use std::time::Duration;

use futures::TryStreamExt as _;
use serde::Serialize;
use taskmill_client::{Client, JobSpec, Settings};

#[derive(Serialize)]
struct Post {
    id: u64,
    title: String,
    body: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // AMQP_URL, REDIS_URL and TASKMILL_NAMESPACE, with the command line's defaults.
    let client = Client::connect(Settings::from_env()?).await?;
    let posts = (1..=100).map(|id| Post {
        id,
        title: format!("post number {id}"),
        body: "lorem ipsum dolor sit amet ".repeat(id as usize % 5 + 1),
    });
    let job = client
        .enqueue(&JobSpec::new("post-stats").batch_size(10), posts)
        .await?;
    println!("job {}", job.id());

    let status = job.wait(Duration::from_secs(60)).await?;
    println!("{}: {} records done", status.state(), status.records_done);
    if let Some(summary) = &status.summary {
        println!("summary: {summary}");
    }
    let mut results = job.results();
    while let Some((batch, result)) = results.try_next().await? {
        println!("batch {batch}: {result}");
    }
    Ok(())
}
