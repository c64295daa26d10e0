//! `POST /v1/classify`: a request's items through the runtime's session cycle.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use cascade_expert::Query;
use cascade_runtime::input::{check_text, ItemId, Record};
use cascade_runtime::{Next, Settled};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

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
    let request = match parse_items(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if request.items.len() > service.limits.max_batch {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} items; at most {} per request",
                request.items.len(),
                service.limits.max_batch
            ),
        );
    }
    let results = match settle_all(&service, &request.items).await {
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
    if request.single && results.len() == 1 {
        return axum::Json(&results[0]).into_response();
    }
    axum::Json(Results { results }).into_response()
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

/// A request's items: `{"items": [...]}`, or one item `{"id", "text"}`.
struct Items {
    single: bool,
    items: Vec<Item>,
}

/// An item's id exactly as the client wrote it, and its text or why it has none.
type Item = (ItemId, std::result::Result<String, String>);

#[derive(Serialize)]
struct Results<'a> {
    results: Vec<Record<'a>>,
}

/// The request body's `items`, if it has that field (even as `null`).
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    items: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// One item's fields; the id is kept as written (a `Value` would round ids
/// beyond 64 bits, and two distinct ids could come back equal).
#[derive(Deserialize)]
struct ItemFields {
    #[serde(default)]
    id: Option<ItemId>,
    #[serde(default)]
    text: Option<Value>,
}

fn parse_items(body: &[u8]) -> std::result::Result<Items, String> {
    let request: &RawValue =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let envelope: Option<Envelope> = serde_json::from_str(request.get()).ok();
    let Some(items) = envelope.and_then(|e| e.items) else {
        return Ok(Items {
            single: true,
            items: vec![parse_item(request)],
        });
    };
    let items: Vec<&RawValue> =
        serde_json::from_str(items.get()).map_err(|_| "`items` must be an array".to_string())?;
    Ok(Items {
        single: false,
        items: items.into_iter().map(parse_item).collect(),
    })
}

fn parse_item(raw: &RawValue) -> Item {
    let fields: Option<ItemFields> = serde_json::from_str(raw.get()).ok();
    let (id, text) = match fields {
        Some(ItemFields { id, text }) => (id, text),
        None => (None, None),
    };
    let text = match text {
        Some(Value::String(t)) => check_text(t),
        _ => Err("no string field `text`".to_string()),
    };
    (id.unwrap_or_else(ItemId::null), text)
}

/// Items routed or settled per hold of the session lock: a large batch lets
/// other requests in between slices, so small requests stay fast.
const SLICE: usize = 8;

/// Routes the items (students answer at once), asks the expert for the
/// deferred and audited ones concurrently without the lock, and settles each
/// answer: the runtime's session cycle, under the lock a slice at a time.
async fn settle_all<'a>(service: &Service, parsed: &'a [Item]) -> Result<Vec<Record<'a>>> {
    let mut routed = Vec::with_capacity(parsed.len());
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
                            id: &id.to_value(),
                            text: ticket.text(),
                        })
                        .await,
                ),
                Next::Done(_) => None,
            }
        });
    let answers = futures::future::join_all(asks).await;
    let mut results = Vec::with_capacity(parsed.len());
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
