//! `producer dashboard`: a web page and a JSON API over the namespace's jobs, results, dead
//! letters, queues and workers, served from this binary with its assets embedded.
//!
//! The page is one HTML file, one script and one style sheet (no build step, no CDN); it
//! polls the API every second for the view it shows. The API reads what the CLI reads:
//! jobs and results in Redis, dead letters in `{ns}.dead` (read without removing them),
//! queues from the management API, workers from the heartbeats workers record in Redis. The
//! dashboard samples the queues itself every `--sample-seconds` into a capped Redis list
//! (an hour of history that survives its restarts; one sampler per namespace at a time).

mod api;
mod serve;

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use axum::{
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use clap::Args;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use taskmill_common::{config::ConnArgs, now_ms, store::Store};

use taskmill_client::Client;

use crate::error::CliError;

/// Arguments of `dashboard`.
#[derive(Args, Debug, Clone)]
pub struct DashboardArgs {
    /// Address to listen on (port 0: any free port; the URL is printed on stdout).
    #[arg(
        long,
        env = "TASKMILL_DASHBOARD_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Every API request must carry `Authorization: Bearer TOKEN` (the page asks for it
    /// once). Required to listen on an address other than loopback.
    #[arg(long, env = "TASKMILL_DASHBOARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How often the queues are sampled for the throughput chart (an hour of samples is kept
    /// in Redis).
    #[arg(long, default_value_t = 10)]
    pub sample_seconds: u64,
    /// Largest request body `POST /api/jobs` accepts, in bytes (a declared longer one gets a
    /// 413 before anything is read).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Connections open at once; more are closed as they come.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers; also how long a kept-alive
    /// connection may idle.
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds a client has to send a request's body (then 408).
    #[arg(long, default_value_t = 30)]
    pub body_timeout: u64,
    /// Enqueues (`POST /api/jobs`) read and published at once; more wait their turn.
    #[arg(long, default_value_t = 2)]
    pub max_enqueues: usize,
}

/// What every handler shares.
pub(crate) struct AppState {
    pub conn: ConnArgs,
    pub store: Store,
    pub client: Client,
    pub token: Option<String>,
    pub sample_every: Duration,
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// The router: the page, its assets, and the API (behind the token, if there is one).
pub(crate) fn router(state: Arc<AppState>, limits: serve::Limits) -> Router {
    let api = Router::new()
        .route("/jobs", get(api::jobs).post(api::enqueue))
        .route("/jobs/{id}", get(api::job).delete(api::delete))
        .route("/jobs/{id}/results", get(api::results))
        .route("/jobs/{id}/cancel", post(api::cancel))
        .route("/jobs/{id}/replay", post(api::replay_job))
        .route("/dead", get(api::dead))
        .route("/dead/replay", post(api::replay_dead))
        .route("/dead/purge", post(api::purge_dead))
        .route("/dead/{id}", get(api::dead_letter))
        .route("/groups/{g}", get(api::group))
        .route("/groups/{g}/close", post(api::close_group))
        .route("/queues", get(api::queues))
        .route("/workers", get(api::workers))
        .route("/schedules", get(api::schedules).post(api::add_schedule))
        .route(
            "/schedules/{name}",
            axum::routing::delete(api::remove_schedule),
        )
        .route("/schedules/{name}/{action}", post(api::pause_schedule))
        .route("/tasks", get(api::tasks))
        .fallback(api::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body))
        // Outermost last: every answer is JSON; the token is checked before anything else,
        // on every path (an unknown one too); then the body is read, bounded.
        .layer(middleware::from_fn_with_state(
            limits.clone(),
            serve::bounded_body,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(middleware::from_fn(serve::json_errors))
        .with_state(state);
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .nest("/api", api)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// With a token, an API request without `Authorization: Bearer TOKEN` gets 401.
async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| same(g.as_bytes(), token.as_bytes()));
        if !ok {
            let msg = if given.is_some() {
                "wrong token"
            } else {
                "this dashboard needs a token: send Authorization: Bearer TOKEN"
            };
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(json!({ "error": msg })),
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Compares two secrets in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Samples the queues into Redis every `every`, keeping an hour, until `stop`. Only one
/// dashboard of a namespace samples in each period (a short Redis lock), so two dashboards
/// do not double the history.
async fn sample_queues(state: Arc<AppState>, stop: CancellationToken) {
    let keep = (3600 / state.sample_every.as_secs().max(1)) as usize;
    let key = state.store.keys().queue_history();
    loop {
        // The lock lapses a little before this dashboard's next tick.
        let hold = state
            .sample_every
            .saturating_sub(Duration::from_millis(250))
            .max(Duration::from_millis(100));
        if state.store.try_lock(&format!("{key}:lock"), hold).await {
            match crate::mgmt::queues(&state.conn.rabbitmq_api_url, &state.conn.namespace).await {
                Ok(queues) => {
                    let sample = json!({"t": now_ms(), "queues": queues
                        .iter()
                        .map(|q| json!({
                            "queue": q["queue"], "ready": q["ready"], "unacked": q["unacked"],
                            "publish_rate": q["publish_rate"], "ack_rate": q["ack_rate"],
                        }))
                        .collect::<Vec<_>>()});
                    if let Err(e) = state.store.push_sample(&key, &sample, keep).await {
                        warn!("recording a queue sample: {e}");
                    }
                }
                Err(e) => warn!("sampling the queues: {e:#}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(state.sample_every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The command: serves until SIGINT/SIGTERM.
pub async fn run(conn: &ConnArgs, args: &DashboardArgs) -> anyhow::Result<ExitCode> {
    if !args.listen.ip().is_loopback() && args.token.is_none() {
        return Err(CliError::Usage(format!(
            "--listen {}: not a loopback address; give --token (or TASKMILL_DASHBOARD_TOKEN) to serve other machines",
            args.listen
        ))
        .into());
    }
    if args.token.as_deref().is_some_and(str::is_empty) {
        return Err(CliError::Usage("--token must not be empty".into()).into());
    }
    // A browser sends header values as visible ASCII: any other token can never be entered.
    if args
        .token
        .as_deref()
        .is_some_and(|t| !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(CliError::Usage(
            "--token must be printable ASCII without spaces (it travels in an HTTP header)".into(),
        )
        .into());
    }
    if args.max_connections == 0 {
        return Err(CliError::Usage("--max-connections must be at least 1".into()).into());
    }
    taskmill_common::config::validate_name("namespace", &conn.namespace)
        .map_err(CliError::Usage)?;
    let client = crate::client(conn).await?;
    let state = Arc::new(AppState {
        conn: conn.clone(),
        store: Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?,
        client,
        token: args.token.clone(),
        sample_every: Duration::from_secs(args.sample_seconds.max(1)),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::Usage(format!("--listen {}: {e}", args.listen)))?;
    let addr = listener.local_addr()?;
    crate::out::line(&format!("http://{addr}/"));
    info!(%addr, namespace = %conn.namespace, token = args.token.is_some(), "dashboard listening");
    let stop = CancellationToken::new();
    let sampler = tokio::spawn(sample_queues(state.clone(), stop.clone()));
    let limits = serve::Limits {
        max_connections: args.max_connections,
        header_timeout: Duration::from_secs(args.header_timeout.max(1)),
        body_timeout: Duration::from_secs(args.body_timeout.max(1)),
        max_body: args.max_body_bytes,
        enqueues: Arc::new(tokio::sync::Semaphore::new(args.max_enqueues.max(1))),
    };
    let app = router(state, limits.clone());
    let shutdown = stop.clone();
    tokio::spawn(async move {
        crate::cmd::signalled().await;
        shutdown.cancel();
    });
    serve::serve(listener, app, limits, stop.clone()).await?;
    stop.cancel();
    let _ = sampler.await;
    Ok(ExitCode::SUCCESS)
}
