//! End to end on a small synthetic stream: a learnable three-label task whose
//! "LLM" is the gold label with 10% noise.

use cascade::student::LogReg;
use cascade::{AnsweredBy, Budget, Cascade, CascadeConfig, Metrics, Outcome, Routing, Student};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Item {
    text: String,
    gold: usize,
    expert: Option<usize>,
}

const LABELS: usize = 3;

/// Texts of neutral filler words plus one to three cue words of their class;
/// the expert is right 90% of the time and gives no label 1% of the time.
fn synthetic_stream(len: usize, seed: u64) -> Vec<Item> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            let gold = rng.random_range(0..LABELS);
            let mut words: Vec<String> = (0..12)
                .map(|_| format!("filler{}", rng.random_range(0..300)))
                .collect();
            for _ in 0..rng.random_range(1..=3) {
                words.push(format!("cue{gold}x{}", rng.random_range(0..8)));
            }
            let expert = match rng.random::<f64>() {
                x if x < 0.01 => None,
                x if x < 0.10 => Some((gold + rng.random_range(1..LABELS)) % LABELS),
                _ => Some(gold),
            };
            let (at, last) = (rng.random_range(0..words.len()), words.len() - 1);
            words.swap(at, last);
            Item {
                text: words.join(" "),
                gold,
                expert,
            }
        })
        .collect()
}

/// LR students for every level of a config.
fn new_cascade(config: &CascadeConfig, routing: Routing) -> Cascade {
    let students = config
        .levels
        .iter()
        .map(|l| Box::new(LogReg::new(LABELS, &l.logreg)) as Box<dyn Student>)
        .collect();
    Cascade::with_students(config, students, LABELS, routing).unwrap()
}

fn config(seed: u64) -> CascadeConfig {
    CascadeConfig::from_toml(&format!(
        r#"
        mu = 5e-4
        seed = {seed}
        [[levels]]
        kind = "logreg"
        cost = 1182
        cache_size = 8
        [levels.gate]
        decaying_factor = 0.95
        calibration = 0.3
        [levels.logreg]
        buckets = 16384
        "#
    ))
    .unwrap()
}

/// Replays the stream; returns the metrics and one decision string per item.
fn replay(cascade: &mut Cascade, stream: &[Item]) -> (Metrics, Vec<String>) {
    let names = cascade
        .level_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let mut metrics = Metrics::new(names, LABELS);
    let mut trace = Vec::new();
    for item in stream {
        let routed = cascade.route(&item.text).unwrap();
        let gates = format!("{:?}", routed.gate_outputs);
        let (by, prediction) = match routed.outcome {
            Outcome::Answered { level, label } => (AnsweredBy::Level(level), Some(label)),
            Outcome::Deferred(deferred) => {
                cascade.learn(deferred, item.expert).unwrap();
                (AnsweredBy::Llm, item.expert)
            }
        };
        metrics.record(by, prediction, Some(item.gold), Some(item.expert));
        trace.push(format!("{by:?} {prediction:?} {gates}"));
    }
    (metrics, trace)
}

#[test]
fn students_take_over_a_learnable_stream() {
    let stream = synthetic_stream(4000, 1);
    let mut cascade = new_cascade(&config(42), Routing::Gated);
    let (metrics, _) = replay(&mut cascade, &stream);
    let s = metrics.summary();
    let expert_accuracy = s.llm_accuracy.unwrap();
    let accuracy = s.accuracy.unwrap();
    assert!(
        s.llm_fraction < 0.5,
        "LLM calls should fall well below 100%: {:.3}",
        s.llm_fraction
    );
    assert!(
        accuracy > expert_accuracy - 0.03,
        "accuracy {accuracy:.4} should stay near the expert's {expert_accuracy:.4}"
    );
    // The student, trained on noisy labels, is more accurate than its teacher here.
    assert!(s.per_level[0].accuracy.unwrap() > expert_accuracy);
}

#[test]
fn same_seed_same_decisions_bit_for_bit() {
    let stream = synthetic_stream(1500, 2);
    let run = |seed| {
        let mut cascade = new_cascade(&config(seed), Routing::Gated);
        replay(&mut cascade, &stream).1
    };
    let first = run(7);
    assert_eq!(first, run(7));
    assert_ne!(
        first,
        run(8),
        "a different seed should change some decision"
    );
}

#[test]
fn online_ensemble_answers_at_its_fixed_rate() {
    let stream = synthetic_stream(3000, 3);
    let routing = Routing::Fixed(vec![0.7]);
    let mut cascade = new_cascade(&config(42), routing);
    let (metrics, _) = replay(&mut cascade, &stream);
    let s = metrics.summary();
    // 80 warm-up items, then the student answers about 70% of the rest.
    let expected = (80.0 + 0.3 * 2920.0) / 3000.0;
    assert!(
        (s.llm_fraction - expected).abs() < 0.03,
        "{} vs {expected}",
        s.llm_fraction
    );
}

#[test]
fn a_call_budget_is_met_whatever_mu_says() {
    let stream = synthetic_stream(3000, 4);
    // mu 0 alone would defer nearly everything; mu 1 nearly nothing. The
    // last field: whether the price itself meets the budget (≤ 1% of items
    // forced by the guards), as measured; a controller fixed for the other
    // two flips them. Not at mu 1: its gates put nearly every item far under
    // any threshold the price reaches at step 0.01 in 3,000 items, so the
    // guards send the last 228 items to the LLM. Not at a tight budget (300
    // of 3,000): exploration defers early items whatever the price, the
    // budget is gone by item ~900 and 2,099 items are answered by force.
    // Issue 20 keeps both open.
    for (mu, budget, priced) in [(0.0, 900, true), (1.0, 900, false), (5e-4, 300, false)] {
        let mut config = config(42);
        config.mu = mu;
        let mut cascade = new_cascade(&config, Routing::Gated);
        let stream_length = stream.len() as u64;
        cascade.set_budget(
            Budget::Calls {
                calls: budget,
                stream_length,
            },
            0.01,
            0.7,
        );
        let (metrics, _) = replay(&mut cascade, &stream);
        let calls = metrics.llm_calls();
        assert!(
            calls.abs_diff(budget) as f64 <= 0.02 * budget as f64,
            "mu {mu}: {calls} calls for a budget of {budget}"
        );
        // The guards would meet the budget alone; the price must do it.
        let forced = forced(&cascade);
        assert_eq!(
            forced as f64 <= 0.01 * stream_length as f64,
            priced,
            "mu {mu}: {forced} items forced by the budget's guards"
        );
    }
}

/// Items the budget's guards decided instead of the price.
fn forced(cascade: &Cascade) -> u64 {
    let budget = cascade.budget().expect("a budget is set");
    budget.forced_answers() + budget.forced_deferrals()
}

#[test]
fn a_controller_that_does_not_price_is_caught_by_the_forced_count() {
    // The control for the bound above: with a price that never moves (step
    // 0), mu 0 defers everything until the budget is gone and the guards
    // force the rest, so the call count alone would still look right.
    let stream = synthetic_stream(3000, 4);
    let mut config = config(42);
    config.mu = 0.0;
    let mut cascade = new_cascade(&config, Routing::Gated);
    cascade.set_budget(
        Budget::Calls {
            calls: 900,
            stream_length: 3000,
        },
        0.0,
        0.7,
    );
    let (metrics, _) = replay(&mut cascade, &stream);
    assert!(metrics.llm_calls().abs_diff(900) <= 18);
    assert!(forced(&cascade) > 30, "{} forced", forced(&cascade));
}

#[test]
fn a_rate_budget_holds_its_share() {
    let stream = synthetic_stream(3000, 5);
    let mut cascade = new_cascade(&config(42), Routing::Gated);
    cascade.set_budget(Budget::Rate(0.25), 0.01, 0.7);
    let (metrics, _) = replay(&mut cascade, &stream);
    let share = metrics.summary().llm_fraction;
    assert!((share - 0.25).abs() < 0.03, "LLM share {share}");
}

#[test]
fn budgeted_runs_are_deterministic() {
    let stream = synthetic_stream(1500, 6);
    let run = || {
        let mut cascade = new_cascade(&config(3), Routing::Gated);
        cascade.set_budget(
            Budget::Calls {
                calls: 400,
                stream_length: 1500,
            },
            0.01,
            0.7,
        );
        replay(&mut cascade, &stream).1
    };
    assert_eq!(run(), run());
}

#[test]
fn pricing_the_last_level_still_reaches_a_large_budget() {
    // Two levels whose first answers most items at the paper's 0.5 on this
    // learnable stream; the budget asks the LLM for 70% of them. Under
    // `budget_prices = "last"` the first level must answer less too: held at
    // 0.5 it left the last level's price at its floor and the guards forced
    // the remaining calls (ISEAR's 3-level cascade at 2,700 calls).
    let stream = synthetic_stream(3000, 7);
    let mut config = stateful_config(42);
    config.budget_prices = cascade::config::PricedLevels::Last;
    let mut cascade = new_cascade(&config, Routing::Gated);
    cascade.set_budget(
        Budget::Calls {
            calls: 2100,
            stream_length: 3000,
        },
        0.01,
        0.7,
    );
    let (metrics, _) = replay(&mut cascade, &stream);
    let calls = metrics.llm_calls();
    let forced = forced(&cascade);
    assert!(calls.abs_diff(2100) <= 42, "{calls} calls");
    // Measured: 13 forced (1,690 with the first level held at 0.5).
    assert!(forced <= 30, "{forced} items forced by the budget's guards");
}

/// Two levels with replay, under a budget: every kind of state a checkpoint holds.
fn stateful_config(seed: u64) -> CascadeConfig {
    CascadeConfig::from_toml(&format!(
        r#"
        mu = 5e-4
        seed = {seed}
        warmup_updates = 5
        combine_levels = true
        [[levels]]
        name = "small"
        kind = "logreg"
        cost = 10
        cache_size = 4
        replay = 8
        [levels.gate]
        decaying_factor = 0.95
        calibration = 0.3
        [levels.logreg]
        buckets = 4096
        ngrams = 1
        [[levels]]
        name = "big"
        kind = "logreg"
        cost = 1182
        cache_size = 8
        replay = 16
        [levels.gate]
        decaying_factor = 0.95
        calibration = 0.3
        [levels.logreg]
        buckets = 16384
        optimizer = "adam"
        lr = 0.05
        "#
    ))
    .unwrap()
}

#[test]
fn save_restore_continue_equals_never_stopping() {
    // Property over random streams and random checkpoint points.
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    for case in 0..6 {
        let len = rng.random_range(200..900);
        let stream = synthetic_stream(len, 100 + case);
        let seed = rng.random_range(0..1000);
        let build = || {
            let mut cascade = new_cascade(&stateful_config(seed), Routing::Gated);
            if case % 2 == 0 {
                let calls = len as u64 / 3;
                cascade.set_budget(
                    Budget::Calls {
                        calls,
                        stream_length: len as u64,
                    },
                    0.01,
                    0.7,
                );
            }
            cascade
        };
        let (_, uninterrupted) = replay(&mut build(), &stream);
        let mut stops: Vec<usize> = (0..3).map(|_| rng.random_range(0..len)).collect();
        stops.sort();
        let mut trace = Vec::new();
        let mut state: Option<Vec<u8>> = None;
        let mut start = 0;
        for &stop in stops.iter().chain([&len]) {
            // A fresh cascade from the config, then the saved state: as after a restart.
            let mut cascade = build();
            if let Some(bytes) = &state {
                cascade.load_state(bytes).unwrap();
            }
            trace.extend(replay(&mut cascade, &stream[start..stop]).1);
            state = Some(cascade.save_state().unwrap());
            start = stop;
        }
        assert_eq!(trace, uninterrupted, "case {case}: stops at {stops:?}");
        // And the state itself: saving the restored cascade gives the same bytes.
        let mut restored = build();
        restored.load_state(state.as_ref().unwrap()).unwrap();
        assert_eq!(&restored.save_state().unwrap(), state.as_ref().unwrap());
    }
}

#[test]
fn a_state_from_another_config_is_refused() {
    let cascade = new_cascade(&stateful_config(1), Routing::Gated);
    let state = cascade.save_state().unwrap();
    let mut other = new_cascade(&config(1), Routing::Gated);
    let err = other.load_state(&state).unwrap_err().to_string();
    assert!(err.contains("levels"), "{err}");
    let err = other.load_state(b"not a state").unwrap_err().to_string();
    assert!(err.contains("unreadable"), "{err}");
}
