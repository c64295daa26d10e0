//! `cascade serve`: the cascade behind HTTP (axum).
//!
//! - `POST /v1/classify`: `{"text", "id"?}` or `{"items": [{"text", "id"?}, …]}`;
//!   answers `{"results": [record, …]}` (a single item: the record itself).
//! - `GET /healthz`, `GET /metrics` (Prometheus text format).
//!
//! Students answer under a short lock on the cascade; a deferred item's expert
//! call runs without it, so other requests keep being answered while LLM calls
//! are in flight, and the label is learned when it arrives. Requests beyond
//! `--max-pending` get 503 with Retry-After. SIGINT/SIGTERM stop accepting,
//! finish what is in flight and write a checkpoint.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use cascade_expert::Expert;
use cascade_expert::Task;
use cascade_runtime::{Live, Position, Session, StateDir};
use clap::Args;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::args::SessionArgs;

mod classify;
mod connections;
mod metrics;

use classify::classify;
use connections::Connections;
use metrics::{metrics, Latency};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    session: SessionArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Seconds between periodic checkpoints (with --state).
    #[arg(long, default_value_t = 60)]
    checkpoint_secs: u64,
    /// Environment variable holding a bearer token that requests must carry
    /// (all but /healthz). Unset: no authentication.
    #[arg(long)]
    token_env: Option<String>,
    /// Largest request body.
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Connections open at once; more are closed as soon as they are accepted.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers (idle keep-alive
    /// connections count too); then the connection is closed.
    #[arg(long, default_value_t = 10)]
    header_timeout_secs: u64,
    /// Seconds a client has to send a request's whole body; then 408.
    #[arg(long, default_value_t = 30)]
    body_timeout_secs: u64,
    /// On SIGINT/SIGTERM, seconds to let requests in progress finish; then
    /// the connections still open are dropped and the checkpoint is written.
    #[arg(long, default_value_t = 10)]
    shutdown_secs: u64,
    /// Requests in progress at once; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_pending: usize,
    /// Most items in one request.
    #[arg(long, default_value_t = 4096)]
    max_batch: usize,
}

struct Service {
    /// FIFO-fair: a request waiting for it is not overtaken by a batch
    /// coming back for its next slice.
    session: tokio::sync::Mutex<Session>,
    expert: Arc<dyn Expert>,
    task: Task,
    levels: Vec<String>,
    latency: Mutex<Latency>,
    pending: Semaphore,
    /// SHA-256 of the bearer token, compared in constant time.
    token: Option<[u8; 32]>,
    limits: Limits,
    requests: std::sync::atomic::AtomicU64,
}

/// What a client may send, and for how long.
struct Limits {
    max_batch: usize,
    max_body_bytes: usize,
    body_timeout: Duration,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    if args.max_pending == 0 || args.max_batch == 0 || args.max_connections == 0 {
        bail!("--max-pending, --max-batch and --max-connections must be at least 1");
    }
    let token = match &args.token_env {
        Some(name) => {
            let token = std::env::var(name)
                .with_context(|| format!("--token-env: environment variable {name} is not set"))?;
            if token.trim().is_empty() {
                bail!("--token-env: environment variable {name} is empty; every request would be refused");
            }
            Some(digest(&token))
        }
        None => None,
    };
    let runtime = cascade_runtime::async_runtime()?;
    let Live {
        task,
        session,
        expert,
        state,
        resumed,
        ..
    } = Live::start(&args.session.spec(None)?, "serve")?;
    let service = Arc::new(Service {
        levels: session.level_names().to_vec(),
        session: tokio::sync::Mutex::new(session),
        expert,
        task,
        latency: Mutex::new(Latency::default()),
        pending: Semaphore::new(args.max_pending),
        token,
        limits: Limits {
            max_batch: args.max_batch,
            max_body_bytes: args.max_body_bytes,
            body_timeout: Duration::from_secs(args.body_timeout_secs.max(1)),
        },
        requests: std::sync::atomic::AtomicU64::new(resumed.unwrap_or_default().lines_done),
    });
    let state: Option<Arc<StateDir>> = state.map(Arc::new);
    let save = {
        let service = Arc::clone(&service);
        move || -> Result<()> {
            let Some(state) = &state else {
                return Ok(());
            };
            let position = Position {
                lines_done: service.requests.load(std::sync::atomic::Ordering::Relaxed),
                output_bytes: 0,
                input_sha256: None,
            };
            state.write(&service.session.blocking_lock(), position)?;
            Ok(())
        }
    };
    let app = Router::new()
        .route("/v1/classify", post(classify))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        // classify reads its body itself, after the headers are checked.
        .layer(DefaultBodyLimit::disable())
        .with_state(Arc::clone(&service));
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        eprintln!(
            "cascade serve: listening on http://{}",
            listener.local_addr()?
        );
        let periodic = {
            let save = save.clone();
            let every = Duration::from_secs(args.checkpoint_secs.max(1));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let save = save.clone();
                    match tokio::task::spawn_blocking(save).await {
                        Ok(Err(e)) => eprintln!("checkpoint failed: {e:#}"),
                        Err(e) => eprintln!("checkpoint task failed: {e}"),
                        Ok(Ok(())) => {}
                    }
                }
            })
        };
        let connections = Connections {
            max: args.max_connections,
            header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
            shutdown: Duration::from_secs(args.shutdown_secs),
        };
        connections.serve(listener, app, shutdown_signal()).await;
        periodic.abort();
        anyhow::Ok(())
    })?;
    save()?;
    eprintln!("{}", service.session.blocking_lock().counts().status_line());
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
    eprintln!("cascade serve: shutting down");
}

/// A poisoned lock means a request panicked mid-update; the data is still
/// the best we have, so keep serving rather than fail every later request.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

fn authorized(service: &Service, headers: &HeaderMap) -> bool {
    let Some(token) = &service.token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Digests of equal length, compared without an early exit: the time
    // taken says nothing about how much of the token was right.
    let given = digest(given);
    given
        .iter()
        .zip(token)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}
