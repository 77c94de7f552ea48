//! Deterministic sample posts, and a local HTTP server that serves them.
//!
//! Posts look like JSONPlaceholder's (`userId`, `id`, `title`, `body`) and are about 320 bytes
//! each, so that 10 posts make a message of about 3.2 KB.

use std::net::SocketAddr;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const WORDS: &[&str] = &[
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
    "enim",
    "ad",
    "minim",
    "veniam",
    "quis",
    "nostrud",
    "exercitation",
    "ullamco",
    "laboris",
    "nisi",
    "aliquip",
    "ex",
    "ea",
    "commodo",
    "consequat",
    "duis",
    "aute",
    "irure",
    "in",
    "voluptate",
    "velit",
    "esse",
    "cillum",
    "fugiat",
    "nulla",
    "pariatur",
    "excepteur",
    "sint",
    "occaecat",
    "cupidatat",
    "non",
    "proident",
    "sunt",
    "culpa",
    "qui",
    "officia",
    "deserunt",
    "mollit",
    "anim",
    "id",
    "est",
    "laborum",
    "queue",
    "worker",
    "broker",
    "batch",
    "record",
];

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn words(seed: u64, n: usize) -> String {
    (0..n as u64)
        .map(|i| WORDS[(mix(seed ^ mix(i)) % WORDS.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Post number `id`: the same on every call and every machine.
pub fn post(id: u64) -> Value {
    let h = mix(id);
    let title_words = 3 + (h % 6) as usize;
    let body_words = 25 + (h >> 8) as usize % 25;
    json!({
        "userId": 1 + id % 10,
        "id": id,
        "title": words(h, title_words),
        "body": words(h.rotate_left(17), body_words),
    })
}

/// Posts `1..=n`.
pub fn posts(n: u64) -> impl Iterator<Item = Value> {
    (1..=n).map(post)
}

#[derive(Clone)]
struct Posts {
    count: u64,
}

async fn one(State(s): State<Posts>, Path(id): Path<String>) -> Result<Json<Value>, StatusCode> {
    let id: u64 = id.parse().map_err(|_| StatusCode::NOT_FOUND)?;
    if id == 0 || id > s.count {
        return Err(StatusCode::NOT_FOUND);
    }
    Ok(Json(post(id)))
}

async fn all(State(s): State<Posts>) -> Json<Value> {
    Json(Value::Array(posts(s.count).collect()))
}

/// The router: `/posts/{id}` for one post, `/posts` for all of them.
pub fn router(count: u64) -> Router {
    Router::new()
        .route("/posts", get(all))
        .route("/posts/{id}", get(one))
        .with_state(Posts { count })
}

/// Serves posts `1..=count` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, count: u64) -> std::io::Result<()> {
    axum::serve(listener, router(count)).await
}

/// Starts a server on a free local port in the background; returns its address.
pub async fn spawn(count: u64) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, count));
    Ok(addr)
}
