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

/// The rule, but the opposite for texts that start with "cast" (about one
/// in eight): students that learn the rule disagree there.
struct ContraryExpert;

impl Expert for ContraryExpert {
    fn label<'a>(&'a self, query: Query<'a>) -> AnswerFuture<'a> {
        let rule = query.text.contains("good") != query.text.starts_with("cast");
        Box::pin(async move { Ok(Answer::label(usize::from(rule))) })
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
        target: config.agreement_target(),
        drift_recovery: config.drift_recovery,
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
        Settled::Corrected {
            level,
            student_label,
            label,
        } => format!("{level}:{student_label} corrected to {label}"),
        other => panic!("unexpected {other:?}"),
    }
}

fn pipeline(session: Session, runtime: &tokio::runtime::Runtime, in_flight: usize) -> Pipeline {
    pipeline_with(session, runtime, in_flight, Arc::new(RuleExpert))
}

fn pipeline_with(
    session: Session,
    runtime: &tokio::runtime::Runtime,
    in_flight: usize,
    expert: Arc<dyn Expert>,
) -> Pipeline {
    Pipeline::new(session, expert, runtime.handle().clone(), in_flight, true).unwrap()
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
fn audits_are_counted_change_no_decision_and_correct_what_they_find() {
    let runtime = runtime();
    let texts = stream(800);
    let expert = Arc::new(ContraryExpert);
    let plain = drive(
        &mut pipeline_with(
            session(0.0, &Overrides::default(), None),
            &runtime,
            1,
            expert.clone(),
        ),
        &texts,
        1,
    );
    let mut audited = pipeline_with(
        session(0.5, &Overrides::default(), None),
        &runtime,
        1,
        expert,
    );
    let decisions = drive(&mut audited, &texts, 1);
    // The same routing and student answers; an audited answer the expert
    // disagreed with is given the expert's label.
    let mut corrected = 0u64;
    for ((text, with_audits), without) in texts.iter().zip(&decisions).zip(&plain) {
        match with_audits.split_once(" corrected to ") {
            Some((student, label)) => {
                corrected += 1;
                assert_eq!(student, without);
                let rule = text.contains("good") != text.starts_with("cast");
                assert_eq!(label, if rule { "1" } else { "0" });
            }
            None => assert_eq!(with_audits, without),
        }
    }
    let counts = audited.session().counts();
    assert!(counts.audits > 100, "{} audits", counts.audits);
    assert!(corrected > 0, "no audit found a disagreement");
    assert_eq!(corrected, counts.corrected);
    assert_eq!(counts.corrected, counts.audits - counts.audit_agreements);
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

/// A cluster's learner is a pure function of the log of labels: a session
/// that routes items and learns only what comes back from the log holds the
/// same bytes as one that never routed and read the same log; routing alone
/// (coins, students' reads) changes nothing learned.
#[test]
fn a_learner_is_a_pure_function_of_the_log_of_labels() {
    let mut writer = session(0.1, &Overrides::default(), None);
    let mut reader = session(0.0, &Overrides::default(), None);
    for (s, seed) in [(&mut writer, 1), (&mut reader, 2)] {
        s.cascade_mut().learn_from_log();
        s.reseed(seed);
    }
    let runtime = runtime();
    let mut log = Vec::new();
    let mut students = 0;
    for (i, text) in stream(600).iter().enumerate() {
        if i == 300 {
            // Routing without learning moves nothing a replica must share.
            let before = writer.cascade().save_learner_state().unwrap();
            for text in stream(50) {
                let _ = writer.route(&text).unwrap();
            }
            assert!(writer.cascade().save_learner_state().unwrap() == before);
        }
        let ticket = match writer.route(text).unwrap().next {
            cascade_runtime::Next::Done(_) => {
                students += 1;
                continue;
            }
            cascade_runtime::Next::Ask(ticket) => ticket,
        };
        let answer = runtime.block_on(RuleExpert.label(Query {
            id: &serde_json::Value::Null,
            text: ticket.text(),
        }));
        let (_, demonstration) = writer.settle_unlearned(ticket, answer).unwrap();
        if let Some(demonstration) = demonstration {
            // What the log holds and gives back, to every replica alike.
            let logged = serde_json::to_vec(&demonstration).unwrap();
            writer
                .learn(serde_json::from_slice(&logged).unwrap())
                .unwrap();
            log.push(logged);
        }
    }
    for logged in &log {
        reader
            .learn(serde_json::from_slice(logged).unwrap())
            .unwrap();
    }
    assert!(
        students > 200,
        "the students answered only {students} of 600"
    );
    assert!(
        writer.cascade().save_learner_state().unwrap()
            == reader.cascade().save_learner_state().unwrap(),
        "two replicas of one log of {} labels differ",
        log.len()
    );
}

/// A label from the log that does not fit the cascade is refused, not
/// learned (and never panics).
#[test]
fn a_logged_label_that_does_not_fit_is_refused() {
    let mut s = session(0.0, &Overrides::default(), None);
    s.cascade_mut().learn_from_log();
    for bad in [
        r#"{"deferred": {"text": "x", "gate_inputs": [[0.5]], "warmup": false}, "label": 1}"#,
        r#"{"deferred": {"text": "x", "gate_inputs": null, "warmup": true}, "label": 7}"#,
    ] {
        let demonstration = serde_json::from_str(bad).unwrap();
        assert!(s.learn(demonstration).is_err(), "{bad}");
    }
}

/// An agreement target on a learnable stream: the students take over as far
/// as the audits' bound allows, the stream's agreement with the expert stays
/// at or above the target at every point after the first items, and the
/// bound the session reports is below the realized agreement.
#[test]
fn an_agreement_target_holds_while_the_students_take_over() {
    let overrides = Overrides {
        target_agreement: Some(0.9),
        ..Overrides::default()
    };
    let mut session = session(cascade::target::DEFAULT_AUDIT_RATE, &overrides, None);
    let runtime = runtime();
    let (mut agreeing, mut students) = (0u64, 0u64);
    let texts = stream(3000);
    for (i, text) in texts.iter().enumerate() {
        let truth = usize::from(text.contains("good"));
        let settled = match session.route(text).unwrap().next {
            cascade_runtime::Next::Done(settled) => settled,
            cascade_runtime::Next::Ask(ticket) => {
                let answer = runtime.block_on(RuleExpert.label(Query {
                    id: &serde_json::Value::Null,
                    text: ticket.text(),
                }));
                session.settle(ticket, answer).unwrap()
            }
        };
        students += u64::from(settled.level().is_some());
        agreeing += u64::from(settled.label() == Some(truth));
        if i >= 200 {
            let realized = agreeing as f64 / (i + 1) as f64;
            assert!(
                realized >= 0.9,
                "agreement {realized} after {} items",
                i + 1
            );
        }
    }
    let counts = session.counts();
    let target = counts.agreement.as_ref().unwrap();
    assert!(
        students > 1500,
        "the students answered only {students} of 3000"
    );
    assert!(
        counts.audits > 50 && counts.audits < students,
        "{} audits",
        counts.audits
    );
    let realized = agreeing as f64 / 3000.0;
    assert!(target.agreement_bound() >= 0.9 && target.agreement_bound() <= realized);
    assert!(counts
        .status_line()
        .contains("(target 0.9, 95% at every point;"));
}

/// The teacher's rule flips half way (the user changed the LLM's prompt):
/// the audits find the change, the cascade re-opens, and the students follow
/// the new rule sooner than without drift recovery.
#[test]
fn a_flipped_rule_is_detected_and_recovered() {
    let run = |overrides: &Overrides| {
        let mut session = session(0.05, overrides, None);
        let texts = stream(6000);
        let mut agreeing = [0u64; 3];
        for (i, text) in texts.iter().enumerate() {
            let flipped = i >= 3000;
            let rule = |text: &str| usize::from(text.contains("good") != flipped);
            let settled = match session.route(text).unwrap().next {
                cascade_runtime::Next::Done(settled) => settled,
                cascade_runtime::Next::Ask(ticket) => {
                    let answer = Ok(Answer::label(rule(ticket.text())));
                    session.settle(ticket, answer).unwrap()
                }
            };
            // Agreement with the teacher of the moment: before, just after, late.
            let window = match i {
                0..3000 => 0,
                3000..4000 => 1,
                _ => 2,
            };
            agreeing[window] += u64::from(settled.label() == Some(rule(text)));
        }
        let counts = session.counts();
        (counts.reopened.clone(), agreeing, counts.llm)
    };
    let (reopened, with, with_calls) = run(&Overrides::default());
    let (never, without, without_calls) = run(&Overrides {
        no_drift_recovery: true,
        ..Overrides::default()
    });
    eprintln!("with recovery: {reopened:?} {with:?} {with_calls} calls; without: {without:?} {without_calls} calls");
    assert!(never.is_empty());
    assert_eq!(reopened.len(), 1, "re-opened at {reopened:?}");
    assert!((3000..3300).contains(&reopened[0]), "found at {reopened:?}");
    assert!(with[0] > 2900, "{with:?}");
    // The first 1,000 items after the flip: recovered sooner.
    assert!(with[1] > without[1] + 50, "{with:?} vs {without:?}");
    assert!(with[2] > 1950, "{with:?}");
}
