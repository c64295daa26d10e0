//! The two transformer students on the real MiniLM that `scripts/setup.sh`
//! fetches: both must learn a clearly separable labelling online, and the
//! fine-tuned one must be bit-for-bit reproducible from its seed.

use std::path::PathBuf;

use cascade::config::{EmbeddingHeadConfig, TransformerConfig};
use cascade::student::transformer::{EmbeddingHead, FineTuned};
use cascade::{Demonstration, Student};

fn minilm() -> String {
    let models = std::env::var_os("CASCADE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let dir = models.join("all-minilm-l6-v2");
    assert!(
        dir.join(".complete").exists(),
        "MiniLM weights missing at {}: run scripts/setup.sh",
        dir.display()
    );
    dir.to_string_lossy().into_owned()
}

const POSITIVE: [&str; 4] = [
    "a wonderful, moving film with a brilliant cast",
    "I loved every minute, a delightful and beautiful story",
    "excellent acting and a superb, heartfelt script",
    "one of the best movies I have seen, truly great",
];
const NEGATIVE: [&str; 4] = [
    "a boring, dreadful film with a terrible cast",
    "I hated every minute, an awful and tedious mess",
    "horrible acting and a stupid, lifeless script",
    "one of the worst movies I have seen, truly bad",
];
const HELD_OUT: [(&str, usize); 2] = [
    ("a lovely, charming and brilliant picture", 1),
    ("a dull, awful and painful picture", 0),
];

fn demonstrations() -> Vec<Demonstration<'static>> {
    POSITIVE
        .iter()
        .map(|text| Demonstration { text, label: 1 })
        .chain(NEGATIVE.iter().map(|text| Demonstration { text, label: 0 }))
        .collect()
}

/// Probability of the right label on the held-out texts.
fn held_out_confidence(student: &mut dyn Student) -> Vec<f32> {
    let texts: Vec<&str> = HELD_OUT.iter().map(|(t, _)| *t).collect();
    let probs = student.predict_proba(&texts).unwrap();
    probs
        .iter()
        .zip(HELD_OUT)
        .map(|(p, (_, label))| p[label])
        .collect()
}

fn fine_tuned(seed: u64) -> FineTuned {
    let config = TransformerConfig {
        model: minilm(),
        max_len: 32,
        lr: 1e-4,
        ..TransformerConfig::default()
    };
    FineTuned::new("minilm", 1182.0, 2, &config, seed).unwrap()
}

#[test]
fn fine_tuned_student_learns_a_separable_labelling() {
    let mut student = fine_tuned(7);
    let demos = demonstrations();
    for _ in 0..4 {
        for batch in demos.chunks(4) {
            student.learn(batch).unwrap();
        }
    }
    for p in held_out_confidence(&mut student) {
        assert!(p > 0.6, "held-out confidence {p}");
    }
}

#[test]
fn fine_tuned_student_is_reproducible_from_its_seed() {
    let run = || {
        let mut student = fine_tuned(3);
        let demos = demonstrations();
        student.learn(&demos[..4]).unwrap();
        student.learn(&demos[4..]).unwrap();
        held_out_confidence(&mut student)
            .iter()
            .map(|p| p.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn embedding_head_learns_a_separable_labelling() {
    let config = EmbeddingHeadConfig {
        model: minilm(),
        max_len: 32,
        ..EmbeddingHeadConfig::default()
    };
    let mut student = EmbeddingHead::new("embed", 3.0, 2, &config).unwrap();
    let demos = demonstrations();
    for _ in 0..10 {
        student.learn(&demos).unwrap();
    }
    for p in held_out_confidence(&mut student) {
        assert!(p > 0.6, "held-out confidence {p}");
    }
}
