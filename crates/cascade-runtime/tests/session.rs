//! The session engine on a synthetic stream with a rule-following expert and
//! LR students: it runs with the runtime's default features off too (no
//! candle), which CI checks with `--no-default-features`.

use std::path::Path;
use std::sync::Arc;

use cascade::Routing;
use cascade_expert::{Answer, AnswerFuture, Expert, Query, Usage};
use cascade_runtime::{
    build, config_from_toml, OnExpertFailure, Overrides, Pipeline, RuntimeError, Session,
    SessionOptions, Settled,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CONFIG: &str = r#"
mu = 1e-4
seed = 7
[[levels]]
kind = "logreg"
cost = 1
cache_size = 8
[levels.gate]
decaying_factor = 0.9
calibration = 0.3
"#;

/// Says 1 when the text holds "good", else 0.
struct RuleExpert;

impl Expert for RuleExpert {
    fn label<'a>(&'a self, query: Query<'a>) -> AnswerFuture<'a> {
        Box::pin(async move { Ok(Answer::label(usize::from(query.text.contains("good")))) })
    }

    fn usage(&self) -> Usage {
        Usage::default()
    }
}

fn stream(n: usize) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let fillers = ["film", "plot", "actor", "scene", "story", "music", "cast"];
    (0..n)
        .map(|_| {
            let cue = ["bad", "good"][rng.random_range(0..2)];
            let mut words: Vec<&str> = (0..6)
                .map(|_| fillers[rng.random_range(0..fillers.len())])
                .collect();
            words.insert(rng.random_range(0..words.len()), cue);
            words.join(" ")
        })
        .collect()
}

fn session(audit_rate: f64, overrides: &Overrides, length: Option<u64>) -> Session {
    let config = config_from_toml(CONFIG, overrides, Path::new("models")).unwrap();
    let cascade = build(&config, 2, Routing::Gated, length).unwrap();
    let options = SessionOptions {
        audit_rate,
        on_failure: OnExpertFailure::Student,
    };
    Session::new(cascade, config.seed, options)
}

/// Who answered each item ("llm" or the level), through a pipeline with
/// `in_flight` calls at once.
fn drive(pipeline: &mut Pipeline, texts: &[String], first_line: usize) -> Vec<String> {
    let mut decisions = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        pipeline
            .push(first_line + i, (i as u64).into(), Ok(text))
            .unwrap();
        decisions.extend(
            pipeline
                .take_ready()
                .into_iter()
                .map(|f| describe(&f.settled)),
        );
    }
    pipeline.settle_all().unwrap();
    decisions.extend(
        pipeline
            .take_ready()
            .into_iter()
            .map(|f| describe(&f.settled)),
    );
    decisions
}

fn describe(settled: &Settled) -> String {
    match settled {
        Settled::Student { level, label, .. } => format!("{level}:{label}"),
        Settled::Llm { label } => format!("llm:{label}"),
        other => panic!("unexpected {other:?}"),
    }
}

fn pipeline(session: Session, runtime: &tokio::runtime::Runtime, in_flight: usize) -> Pipeline {
    Pipeline::new(
        session,
        Arc::new(RuleExpert),
        runtime.handle().clone(),
        in_flight,
        true,
    )
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_students_take_over_a_learnable_stream() {
    let runtime = runtime();
    let texts = stream(2000);
    let mut p = pipeline(session(0.0, &Overrides::default(), None), &runtime, 1);
    let decisions = drive(&mut p, &texts, 1);
    let llm = |range: &[String]| range.iter().filter(|d| d.starts_with("llm")).count();
    let (early, late) = (llm(&decisions[..500]), llm(&decisions[1500..]));
    assert!(
        late * 4 < early,
        "LLM calls: {early} in the first 500, {late} in the last 500"
    );
    let counts = p.session().counts();
    assert_eq!(counts.lines, 2000);
    assert_eq!(counts.llm + counts.answered.iter().sum::<u64>(), 2000);
    // The students answer like the expert.
    let wrong = texts
        .iter()
        .zip(&decisions)
        .filter(|(t, d)| d.ends_with(if t.contains("good") { ":0" } else { ":1" }))
        .count();
    assert!(wrong < 40, "{wrong} answers disagree with the expert");
}

#[test]
fn audits_are_counted_and_change_no_decision() {
    let runtime = runtime();
    let texts = stream(800);
    let plain = drive(
        &mut pipeline(session(0.0, &Overrides::default(), None), &runtime, 1),
        &texts,
        1,
    );
    let mut audited = pipeline(session(0.5, &Overrides::default(), None), &runtime, 1);
    assert_eq!(drive(&mut audited, &texts, 1), plain);
    let counts = audited.session().counts();
    assert!(counts.audits > 100, "{} audits", counts.audits);
    // The anytime-valid bound saw every audit and sits under the observed
    // agreement, but says something (the students agree often here).
    let observed = counts.audit_agreements as f64 / counts.audits as f64;
    assert_eq!(counts.audit_bound.observations(), counts.audits);
    let lower = counts.audit_bound.lower();
    assert!(lower > 0.3 && lower < observed, "{lower} vs {observed}");
    assert!(counts.status_line().contains("at every point"));
}

#[test]
fn a_restored_session_continues_as_if_never_stopped() {
    let runtime = runtime();
    let texts = stream(1000);
    let overrides = Overrides {
        llm_budget: Some(300),
        ..Overrides::default()
    };
    let length = Some(texts.len() as u64);
    let whole = drive(
        &mut pipeline(session(0.1, &overrides, length), &runtime, 3),
        &texts,
        1,
    );
    let mut first = pipeline(session(0.1, &overrides, length), &runtime, 3);
    let mut resumed = drive(&mut first, &texts[..400], 1);
    let state = first.session().save_state().unwrap();
    let mut second = session(0.1, &overrides, length);
    second.load_state(state).unwrap();
    resumed.extend(drive(
        &mut pipeline(second, &runtime, 3),
        &texts[400..],
        401,
    ));
    assert_eq!(resumed, whole);
    let calls = whole.iter().filter(|d| d.starts_with("llm")).count();
    assert!(
        (294..=306).contains(&calls),
        "{calls} LLM calls for a budget of 300"
    );
}

#[test]
fn a_budget_needs_a_stream_of_known_length() {
    let overrides = Overrides {
        llm_budget: Some(10),
        ..Overrides::default()
    };
    let config = config_from_toml(CONFIG, &overrides, Path::new("models")).unwrap();
    let err = build(&config, 2, Routing::Gated, None).err().unwrap();
    assert!(
        matches!(&err, RuntimeError::Setting { field, .. } if field == "llm_budget"),
        "{err}"
    );
}
