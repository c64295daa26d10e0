//! `POST /v1/classify`: a request's items through the runtime's session cycle.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use cascade_expert::Query;
use cascade_runtime::{Next, Settled};
use serde_json::{json, Value};

use super::{authorized, error, lock, Service};

pub(super) async fn classify(State(service): State<Arc<Service>>, request: Request) -> Response {
    // Everything the headers can refuse is refused before a byte of the body is read.
    let (parts, body) = request.into_parts();
    if !authorized(&service, &parts.headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > service.limits.max_body_bytes as u64) {
        return too_large(&service);
    }
    let Ok(_permit) = service.pending.try_acquire() else {
        let mut response = error(StatusCode::SERVICE_UNAVAILABLE, "queue full; retry shortly");
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    };
    let read = axum::body::to_bytes(body, service.limits.max_body_bytes);
    let body = match tokio::time::timeout(service.limits.body_timeout, read).await {
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {:?}",
                    service.limits.body_timeout
                ),
            )
        }
        Ok(Err(e)) if is_length_limit(&e) => return too_large(&service),
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
        Ok(Ok(body)) => body,
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
    if items.len() > service.limits.max_batch {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} items; at most {} per request",
                items.len(),
                service.limits.max_batch
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
        lock(&service.latency).record(seconds);
    }
    let body = if single {
        results.into_iter().next().unwrap_or(Value::Null)
    } else {
        json!({ "results": results })
    };
    axum::Json(body).into_response()
}

fn too_large(service: &Service) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the body is larger than {} bytes",
            service.limits.max_body_bytes
        ),
    )
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Items routed or settled per hold of the session lock: a large batch lets
/// other requests in between slices, so small requests stay fast.
const SLICE: usize = 8;

/// Routes the items (students answer at once), asks the expert for the
/// deferred and audited ones concurrently without the lock, and settles each
/// answer: the runtime's session cycle, under the lock a slice at a time.
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
    for slice in parsed.chunks(SLICE) {
        {
            let mut session = service.session.lock().await;
            for (_, text) in slice {
                routed.push(match text {
                    Err(reason) => Next::Done(session.bad_input(reason.clone())),
                    Ok(text) => session.route(text)?.next,
                });
            }
        }
        tokio::task::yield_now().await;
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
    let mut results = Vec::with_capacity(items.len());
    let mut settling = parsed.iter().zip(routed).zip(answers).peekable();
    while settling.peek().is_some() {
        {
            let mut session = service.session.lock().await;
            for (((id, _), next), answer) in settling.by_ref().take(SLICE) {
                let settled: Settled = match (next, answer) {
                    (Next::Done(settled), _) => settled,
                    (Next::Ask(ticket), Some(answer)) => session.settle(ticket, answer)?,
                    (Next::Ask(_), None) => bail!("an expert call was not made"),
                };
                results.push(settled.record(None, id, &service.task, &service.levels));
            }
        }
        tokio::task::yield_now().await;
    }
    Ok(results)
}
