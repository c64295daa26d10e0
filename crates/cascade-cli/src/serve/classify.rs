//! `POST /v1/classify`: a request's items through the runtime's session cycle.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cascade_expert::Query;
use cascade_runtime::{Next, Settled};
use serde_json::{json, Value};

use super::{authorized, error, lock, Service};

pub(super) async fn classify(
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
        lock(&service.latency).record(seconds);
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
