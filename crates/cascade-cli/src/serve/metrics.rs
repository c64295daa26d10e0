//! `GET /metrics`: the service's counters in the Prometheus text format.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{authorized, error, lock, Service};

/// Request latency histogram bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Time to answer classify requests: a histogram.
#[derive(Default)]
pub(super) struct Latency {
    counts: [u64; BUCKETS.len()],
    total: u64,
    sum: f64,
}

impl Latency {
    pub(super) fn record(&mut self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.counts[i] += 1;
        }
        self.total += 1;
        self.sum += seconds;
    }
}

pub(super) async fn metrics(State(service): State<Arc<Service>>, headers: HeaderMap) -> Response {
    if !authorized(&service, &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let (counts, exploration) = {
        let session = service.session.lock().await;
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
    metric(
        "cascade_audited_agreement_lower_bound",
        "gauge",
        "Anytime-valid 95% lower bound on the audited agreement (a confidence sequence: it holds at every point of the stream at once).",
        vec![(String::new(), counts.audit_bound.lower().to_string())],
    );
    if let Some(target) = &counts.agreement {
        metric(
            "cascade_agreement_target",
            "gauge",
            "The agreement target: the share of items to answer as the LLM would, and its confidence.",
            vec![
                ("{stat=\"agreement\"}".into(), target.target().agreement.to_string()),
                ("{stat=\"confidence\"}".into(), target.target().confidence.to_string()),
            ],
        );
        metric(
            "cascade_agreement_lower_bound",
            "gauge",
            "Anytime-valid lower bound (at the target's confidence) on the share of items answered as the LLM would.",
            vec![(String::new(), target.agreement_bound().to_string())],
        );
    }
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
