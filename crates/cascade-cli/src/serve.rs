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
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use cascade_expert::Task;
use cascade_expert::{Expert, Query};
use cascade_runtime::{Live, Next, Position, Session, Settled, StateDir};
use clap::Args;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::args::SessionArgs;

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
    /// Requests in progress at once; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_pending: usize,
    /// Most items in one request.
    #[arg(long, default_value_t = 4096)]
    max_batch: usize,
}

/// Request latency histogram bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

struct Service {
    session: Mutex<Session>,
    expert: Arc<dyn Expert>,
    task: Task,
    levels: Vec<String>,
    latency: Mutex<Latency>,
    pending: Semaphore,
    token: Option<String>,
    max_batch: usize,
    requests: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Latency {
    counts: [u64; BUCKETS.len()],
    total: u64,
    sum: f64,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    if args.max_pending == 0 || args.max_batch == 0 {
        bail!("--max-pending and --max-batch must be at least 1");
    }
    let token = match &args.token_env {
        Some(name) => Some(
            std::env::var(name)
                .with_context(|| format!("--token-env: environment variable {name} is not set"))?,
        ),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let Live {
        task,
        session,
        expert,
        state,
        resumed,
    } = Live::start(&args.session.spec(None)?, "serve")?;
    let service = Arc::new(Service {
        levels: session.level_names().to_vec(),
        session: Mutex::new(session),
        expert,
        task,
        latency: Mutex::new(Latency::default()),
        pending: Semaphore::new(args.max_pending),
        token,
        max_batch: args.max_batch,
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
            };
            state.write(&lock(&service.session), position)?;
            Ok(())
        }
    };
    let app = Router::new()
        .route("/v1/classify", post(classify))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(args.max_body_bytes))
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
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving")?;
        periodic.abort();
        anyhow::Ok(())
    })?;
    save()?;
    eprintln!("{}", lock(&service.session).counts().status_line());
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
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| given == token)
}

async fn classify(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&service, &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let Ok(_permit) = service.pending.try_acquire() else {
        let mut response = error(StatusCode::SERVICE_UNAVAILABLE, "queue full; retry shortly");
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    };
    let started = Instant::now();
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    let (items, single) = match request.get("items") {
        Some(Value::Array(items)) => (items.clone(), false),
        Some(_) => return error(StatusCode::BAD_REQUEST, "`items` must be an array"),
        None => (vec![request], true),
    };
    if items.len() > service.max_batch {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} items; at most {} per request",
                items.len(),
                service.max_batch
            ),
        );
    }
    let results = match settle_all(&service, &items).await {
        Ok(results) => results,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    service
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    {
        let seconds = started.elapsed().as_secs_f64();
        let mut latency = lock(&service.latency);
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            latency.counts[i] += 1;
        }
        latency.total += 1;
        latency.sum += seconds;
    }
    let body = if single {
        results.into_iter().next().unwrap_or(Value::Null)
    } else {
        json!({ "results": results })
    };
    axum::Json(body).into_response()
}

/// Routes every item under one short lock (students answer at once), asks
/// the expert for the deferred and audited ones concurrently without the
/// lock, and settles each answer under the lock: the runtime's session cycle.
async fn settle_all(service: &Service, items: &[Value]) -> Result<Vec<Value>> {
    let parsed: Vec<(Value, std::result::Result<String, String>)> = items
        .iter()
        .map(|item| {
            let id = item.get("id").cloned().unwrap_or(Value::Null);
            let text = match item.get("text").and_then(Value::as_str) {
                Some(t) if !t.trim().is_empty() => Ok(t.to_string()),
                Some(_) => Err("empty `text`".to_string()),
                None => Err("no string field `text`".to_string()),
            };
            (id, text)
        })
        .collect();
    let mut routed = Vec::with_capacity(items.len());
    {
        let mut session = lock(&service.session);
        for (_, text) in &parsed {
            routed.push(match text {
                Err(reason) => Next::Done(session.bad_input(reason.clone())),
                Ok(text) => session.route(text)?.next,
            });
        }
    }
    let asks = parsed
        .iter()
        .zip(&routed)
        .map(|((id, _), next)| async move {
            match next {
                Next::Ask(ticket) => Some(
                    service
                        .expert
                        .label(Query {
                            id,
                            text: ticket.text(),
                        })
                        .await,
                ),
                Next::Done(_) => None,
            }
        });
    let answers = futures::future::join_all(asks).await;
    let mut session = lock(&service.session);
    let mut results = Vec::with_capacity(items.len());
    for (((id, _), next), answer) in parsed.iter().zip(routed).zip(answers) {
        let settled: Settled = match (next, answer) {
            (Next::Done(settled), _) => settled,
            (Next::Ask(ticket), Some(answer)) => session.settle(ticket, answer)?,
            (Next::Ask(_), None) => bail!("an expert call was not made"),
        };
        results.push(settled.record(None, id, &service.task, &service.levels));
    }
    Ok(results)
}

async fn metrics(State(service): State<Arc<Service>>, headers: HeaderMap) -> Response {
    if !authorized(&service, &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let (counts, exploration) = {
        let session = lock(&service.session);
        let exploration: Vec<f64> = (0..service.levels.len())
            .map(|j| session.cascade().exploration_probability(j))
            .collect();
        (session.counts().clone(), exploration)
    };
    let usage = service.expert.usage();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
        out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for (labels, value) in lines {
            out += &format!("{name}{labels} {value}\n");
        }
    };
    let deepest = service.levels.last().cloned().unwrap_or_default();
    let mut items: Vec<(String, String)> = service
        .levels
        .iter()
        .zip(&counts.answered)
        .map(|(level, n)| {
            (
                format!("{{answered_by=\"{level}\",status=\"ok\"}}"),
                n.to_string(),
            )
        })
        .collect();
    items.push((
        "{answered_by=\"llm\",status=\"ok\"}".into(),
        counts.llm.to_string(),
    ));
    items.push((
        format!("{{answered_by=\"{deepest}\",status=\"expert_unavailable\"}}"),
        counts.expert_unavailable.to_string(),
    ));
    items.push((
        "{answered_by=\"\",status=\"error\"}".into(),
        counts.errors.to_string(),
    ));
    items.push((
        "{answered_by=\"\",status=\"bad_input\"}".into(),
        counts.bad_input.to_string(),
    ));
    metric(
        "cascade_items_total",
        "counter",
        "Items by who answered and status.",
        items,
    );
    metric(
        "cascade_llm_calls_total",
        "counter",
        "Deferred items the expert answered.",
        vec![(String::new(), counts.llm.to_string())],
    );
    metric(
        "cascade_expert_requests_total",
        "counter",
        "Requests sent to the expert, retries included.",
        vec![(String::new(), usage.requests.to_string())],
    );
    metric(
        "cascade_expert_tokens_total",
        "counter",
        "Expert tokens.",
        vec![
            ("{kind=\"prompt\"}".into(), usage.prompt_tokens.to_string()),
            (
                "{kind=\"completion\"}".into(),
                usage.completion_tokens.to_string(),
            ),
        ],
    );
    metric(
        "cascade_exploration_probability",
        "gauge",
        "Probability that a level may answer (grows with its updates).",
        service
            .levels
            .iter()
            .zip(exploration)
            .map(|(level, p)| (format!("{{level=\"{level}\"}}"), p.to_string()))
            .collect(),
    );
    let (agreement, half) = counts.audited_agreement().unwrap_or((f64::NAN, f64::NAN));
    metric(
        "cascade_audits_total",
        "counter",
        "Student answers also sent to the expert.",
        vec![(String::new(), counts.audits.to_string())],
    );
    metric(
        "cascade_audited_agreement",
        "gauge",
        "Agreement of audited student answers with the expert (Wilson 95% centre, and half-width).",
        vec![
            ("{stat=\"centre\"}".into(), agreement.to_string()),
            ("{stat=\"half_width\"}".into(), half.to_string()),
        ],
    );
    {
        let latency = lock(&service.latency);
        out += "# HELP cascade_request_duration_seconds Time to answer a classify request.\n# TYPE cascade_request_duration_seconds histogram\n";
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(latency.counts) {
            cumulative += n;
            out += &format!(
                "cascade_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}\n"
            );
        }
        out += &format!(
            "cascade_request_duration_seconds_bucket{{le=\"+Inf\"}} {}\ncascade_request_duration_seconds_sum {}\ncascade_request_duration_seconds_count {}\n",
            latency.total, latency.sum, latency.total
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
