//! Serving the dashboard's router with bounds a public server needs, which `axum::serve`
//! does not set: a connection cap, a deadline for a request's headers (which is also the idle
//! timeout of a kept-alive connection), and a deadline for its body.
//!
//! Each accepted connection takes a permit of a semaphore of `--max-connections`; a
//! connection over the cap is closed at once (the client sees a reset at once rather than a
//! timeout from a full accept backlog). hyper's HTTP/1 connection closes one that has not sent
//! a whole request head within `--header-timeout`, counted from the connection's start or the
//! end of its last response; so 500 clients that stop half-way through their headers hold 500
//! sockets for at most that long. Bodies are bounded by [`bounded_body`].

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Json, Router,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The bounds of the server.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// A request head must arrive within this (and a kept-alive connection idles this long).
    pub header_timeout: Duration,
    /// A request body must arrive within this.
    pub body_timeout: Duration,
    /// Largest request body.
    pub max_body: usize,
    /// Enqueues (`POST /api/jobs`) read and published at once; more wait their turn (up to
    /// the body timeout) before their bodies are read.
    pub enqueues: Arc<Semaphore>,
}

/// How long connections get to finish when the server stops.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `stop`, then lets open connections finish their request
/// (at most [`DRAIN`]).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                warn!(
                    max = limits.max_connections,
                    refused, "connection cap reached (--max-connections): closing new connections"
                );
            }
            drop(stream);
            continue;
        };
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let app = app.clone();
                async move {
                    let resp = tower::ServiceExt::oneshot(app, req.map(Body::new)).await;
                    Ok::<_, Infallible>(resp.unwrap_or_else(|e| match e {}))
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                res = conn.as_mut() => res,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(DRAIN, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = ended {
                debug!(%peer, "connection ended: {e}");
            }
            drop(permit);
        });
    }
    // Every connection gives its permit back when it ends.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN + Duration::from_secs(1), permits.acquire_many(all)).await;
    Ok(())
}

/// An error answer of the API's shape.
fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

/// Bounds a request's body: a declared length over the limit is a 413 before anything is
/// read; the body must arrive within the body timeout (else 408) and within the limit (else
/// 413); then the handler gets it whole. An enqueue first waits for its turn (at most
/// `--max-enqueues` bodies are held and published at once).
pub(crate) async fn bounded_body(
    State(limits): State<Limits>,
    req: Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let max = limits.max_body;
    // An enqueue's body is held while it is published: so many at once, the rest wait.
    let is_enqueue =
        req.method() == axum::http::Method::POST && req.uri().path().ends_with("/jobs");
    let _turn = if is_enqueue {
        match tokio::time::timeout(limits.body_timeout, limits.enqueues.clone().acquire_owned())
            .await
        {
            Ok(Ok(permit)) => Some(permit),
            _ => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "busy: other enqueues ran for all of {} s (--max-enqueues); try again",
                        limits.body_timeout.as_secs()
                    ),
                )
            }
        }
    } else {
        None
    };
    if let Some(n) = declared.filter(|n| *n > max as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body ({n} bytes) is larger than this dashboard takes ({max} bytes, --max-body-bytes)"),
        );
    }
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(limits.body_timeout, collect(body, declared, max)).await;
    let bytes = match read {
        Ok(Some(b)) => b,
        Ok(None) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than this dashboard takes ({max} bytes, --max-body-bytes), or it was cut off"),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s (--body-timeout)",
                    limits.body_timeout.as_secs()
                ),
            )
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A body into one buffer sized once from its declared length (collecting chunks and joining
/// them would hold it twice); None when it is longer than `max` or breaks off.
async fn collect(body: Body, declared: Option<u64>, max: usize) -> Option<axum::body::Bytes> {
    use futures::StreamExt;
    let size = declared.map_or(0, |n| usize::try_from(n).unwrap_or(max).min(max));
    let mut buf = Vec::with_capacity(size);
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.ok()?;
        if buf.len() + chunk.len() > max {
            return None;
        }
        buf.extend_from_slice(&chunk);
    }
    Some(buf.into())
}

/// Every API error answer is JSON `{"error": ...}`: those made outside the handlers (an
/// extractor's rejection, a method not allowed) come as plain text or empty, and are
/// rewritten here.
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let msg = if text.is_empty() {
        match status {
            StatusCode::METHOD_NOT_ALLOWED => {
                match parts
                    .headers
                    .get(header::ALLOW)
                    .and_then(|v| v.to_str().ok())
                {
                    Some(allowed) if !allowed.is_empty() => {
                        format!("method not allowed on this path (allowed: {allowed})")
                    }
                    _ => "method not allowed on this path (see the README's API table)".into(),
                }
            }
            s => s.canonical_reason().unwrap_or("error").to_string(),
        }
    } else {
        text
    };
    let mut out = error(status, msg);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
