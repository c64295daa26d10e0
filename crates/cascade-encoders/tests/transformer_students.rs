//! The two transformer students on the real MiniLM that `scripts/setup.sh`
//! fetches: both must learn a clearly separable labelling online, and the
//! fine-tuned one must be bit-for-bit reproducible from its seed and from a
//! checkpoint (on MiniLM, and inside a cascade on a tiny random BERT).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use cascade::config::{EmbeddingHeadConfig, Quantization, StudentKind, TransformerConfig};
use cascade::student::LogReg;
use cascade::{Cascade, CascadeConfig, Demonstration, Outcome, Routing, Student};
use cascade_encoders::bert::WeightSource;
use cascade_encoders::embedding_head::fill_caches;
use cascade_encoders::{BertConfig, BertEncoder, EmbeddingHead, FineTuned, Trainable};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn minilm() -> String {
    common::model_dir("all-minilm-l6-v2")
        .to_string_lossy()
        .into_owned()
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
        .map(|text| Demonstration {
            text,
            label: 1,
            probs: None,
        })
        .chain(NEGATIVE.iter().map(|text| Demonstration {
            text,
            label: 0,
            probs: None,
        }))
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
    FineTuned::new(2, &config, seed).unwrap()
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
    let mut student = EmbeddingHead::new(2, &config).unwrap();
    let demos = demonstrations();
    for _ in 0..10 {
        student.learn(&demos).unwrap();
    }
    for p in held_out_confidence(&mut student) {
        assert!(p > 0.6, "held-out confidence {p}");
    }
}

#[test]
fn int8_embeddings_stay_close_to_f32_and_keep_their_own_cache() {
    let cache = tempfile::tempdir().unwrap();
    let config = |quantize| EmbeddingHeadConfig {
        model: minilm(),
        max_len: 64,
        cache_dir: Some(cache.path().to_string_lossy().into_owned()),
        quantize,
        ..EmbeddingHeadConfig::default()
    };
    let texts: Vec<&str> = POSITIVE
        .iter()
        .chain(&NEGATIVE)
        .copied()
        .chain(HELD_OUT.iter().map(|(t, _)| *t))
        .collect();
    let f32s = EmbeddingHead::new(2, &config(None))
        .unwrap()
        .embeddings(&texts)
        .unwrap();
    let mut int8_head = EmbeddingHead::new(2, &config(Some(Quantization::Int8))).unwrap();
    let int8s = int8_head.embeddings(&texts).unwrap();
    for ((a, b), text) in f32s.iter().zip(&int8s).zip(&texts) {
        assert_ne!(
            a, b,
            "int8 gave the f32 embedding of {text:?}: not quantized"
        );
        let cosine: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(cosine > 0.99, "cosine {cosine} for {text:?}");
    }
    // Two files: the int8 embeddings never answer for the f32 ones.
    let names: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().any(|n| n.contains("-int8-")), "{names:?}");
    // And the int8 head learns as the f32 one does.
    let demos = demonstrations();
    for _ in 0..10 {
        int8_head.learn(&demos).unwrap();
    }
    for p in held_out_confidence(&mut int8_head) {
        assert!(p > 0.6, "held-out confidence {p}");
    }
}

#[test]
fn fine_tuned_student_resumes_exactly_from_its_state() {
    let demos = demonstrations();
    let mut original = fine_tuned(3);
    original.learn(&demos[..4]).unwrap();
    let state = original.save_state().unwrap();
    // Another seed: every weight the head was initialised with must come from the state.
    let mut restored = fine_tuned(11);
    restored.load_state(&state).unwrap();
    let bits = |s: &mut FineTuned| {
        held_out_confidence(s)
            .iter()
            .map(|p| p.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&mut original), bits(&mut restored));
    // The optimiser's moments and step count came along: the next step agrees too.
    original.learn(&demos[4..]).unwrap();
    restored.learn(&demos[4..]).unwrap();
    assert_eq!(bits(&mut original), bits(&mut restored));
    assert_eq!(
        original.save_state().unwrap(),
        restored.save_state().unwrap()
    );

    // A student with other trainable layers refuses the state and stays as it was.
    let config = TransformerConfig {
        model: minilm(),
        max_len: 32,
        lr: 1e-4,
        frozen_layers: 2,
        ..TransformerConfig::default()
    };
    let mut other = FineTuned::new(2, &config, 3).unwrap();
    let before = bits(&mut other);
    let err = other.load_state(&state).unwrap_err().to_string();
    assert!(err.contains("trainable tensors"), "{err}");
    assert_eq!(bits(&mut other), before);
    let err = other.load_state(b"junk").unwrap_err().to_string();
    assert!(err.contains("unreadable"), "{err}");
}

/// A model folder holding a tiny randomly initialised BERT with MiniLM's
/// tokenizer, so that a cascade can fine-tune it in milliseconds.
fn tiny_bert_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let minilm = PathBuf::from(minilm());
    std::fs::copy(
        minilm.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(minilm.join("config.json")).unwrap()).unwrap();
    for (key, value) in [
        ("hidden_size", 16),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 4),
        ("intermediate_size", 32),
        ("max_position_embeddings", 64),
    ] {
        config[key] = value.into();
    }
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut init = |shape: &[usize]| -> Vec<f32> {
        let n: usize = shape.iter().product();
        let centre = if shape.len() == 1 { 1.0 } else { 0.0 };
        (0..n)
            .map(|_| centre + rng.random_range(-0.1..0.1))
            .collect()
    };
    let encoder = BertEncoder::build(
        BertConfig::from_file(&config_path).unwrap(),
        Trainable::ALL,
        WeightSource::Random(&mut init),
        &Device::Cpu,
    )
    .unwrap();
    let tensors: HashMap<String, Tensor> = encoder
        .vars()
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn tiny_cascade_config(model: &Path, seed: u64) -> CascadeConfig {
    CascadeConfig::from_toml(&format!(
        r#"
        mu = 5e-4
        seed = {seed}
        warmup_updates = 4
        combine_levels = true
        [[levels]]
        name = "lr"
        kind = "logreg"
        cost = 1
        cache_size = 4
        replay = 8
        [levels.gate]
        decaying_factor = 0.95
        calibration = 0.3
        [levels.logreg]
        buckets = 4096
        [[levels]]
        name = "bert"
        kind = "transformer"
        cost = 1182
        cache_size = 4
        batch = 4
        [levels.gate]
        decaying_factor = 0.9
        calibration = 0.3
        [levels.transformer]
        model = "{}"
        max_len = 24
        lr = 1e-3
        freeze_embeddings = false
        "#,
        model.display()
    ))
    .unwrap()
}

/// The students a config names (the runtime's `build` does this for real).
fn build_cascade(config: &CascadeConfig) -> Cascade {
    let students: Vec<Box<dyn Student>> = config
        .levels
        .iter()
        .enumerate()
        .map(|(j, l)| -> Box<dyn Student> {
            let seed = config.seed.wrapping_add(j as u64);
            match l.kind {
                StudentKind::Logreg => Box::new(LogReg::new(2, &l.logreg)),
                StudentKind::Transformer => {
                    Box::new(FineTuned::new(2, &l.transformer, seed).unwrap())
                }
                StudentKind::EmbeddingHead => {
                    Box::new(EmbeddingHead::new(2, &l.embedding_head).unwrap())
                }
            }
        })
        .collect();
    Cascade::with_students(config, students, 2, Routing::Gated).unwrap()
}

/// Routes a labelled stream; one line per item naming who answered, what, and the gates' outputs.
fn replay(cascade: &mut Cascade, stream: &[(String, usize)]) -> Vec<String> {
    stream
        .iter()
        .map(|(text, label)| {
            let routed = cascade.route(text).unwrap();
            let gates = format!("{:?}", routed.gate_outputs);
            match routed.outcome {
                Outcome::Answered { level, label } => format!("{level} {label} {gates}"),
                Outcome::Deferred(deferred) => {
                    cascade.learn(deferred, Some(*label)).unwrap();
                    format!("llm {label} {gates}")
                }
            }
        })
        .collect()
}

#[test]
fn a_cascade_with_a_fine_tuned_level_resumes_exactly() {
    let model = tiny_bert_folder();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let stream: Vec<(String, usize)> = (0..240)
        .map(|_| {
            let label = rng.random_range(0..2);
            let cue = ["awful", "great"][label];
            let fillers = ["film", "plot", "actor", "scene", "the", "a", "was", "story"];
            let mut words: Vec<&str> = (0..8)
                .map(|_| fillers[rng.random_range(0..fillers.len())])
                .collect();
            words.insert(rng.random_range(0..words.len()), cue);
            (words.join(" "), label)
        })
        .collect();
    let build = || build_cascade(&tiny_cascade_config(model.path(), 4));
    let uninterrupted = replay(&mut build(), &stream);
    assert!(
        uninterrupted.iter().any(|line| line.starts_with("1 ")),
        "the fine-tuned level never answered, so the test would prove little"
    );
    let mut trace = Vec::new();
    let mut state: Option<Vec<u8>> = None;
    let mut start = 0;
    for stop in [37, 150, stream.len()] {
        let mut cascade = build();
        if let Some(bytes) = &state {
            cascade.load_state(bytes).unwrap();
        }
        trace.extend(replay(&mut cascade, &stream[start..stop]));
        state = Some(cascade.save_state().unwrap());
        start = stop;
    }
    assert_eq!(trace, uninterrupted);
    let mut restored = build();
    restored.load_state(state.as_ref().unwrap()).unwrap();
    assert_eq!(&restored.save_state().unwrap(), state.as_ref().unwrap());
}

#[test]
fn embedding_head_windows_read_past_max_len() {
    // The same 20-word opening for every text; the verdict comes after it,
    // past the 16 tokens that one window reads.
    let opening = "the film runs two hours and was shown at the festival in the city last year to a full hall";
    let long = |text: &str| format!("{opening} {text}");
    let demos: Vec<(String, usize)> = POSITIVE
        .iter()
        .map(|t| (long(t), 1))
        .chain(NEGATIVE.iter().map(|t| (long(t), 0)))
        .collect();
    let held_out: Vec<String> = HELD_OUT.iter().map(|(t, _)| long(t)).collect();
    let train = |windows: usize| {
        let config = EmbeddingHeadConfig {
            model: minilm(),
            max_len: 16,
            windows,
            ..EmbeddingHeadConfig::default()
        };
        let mut student = EmbeddingHead::new(2, &config).unwrap();
        let batch: Vec<Demonstration> = demos
            .iter()
            .map(|(text, label)| Demonstration {
                text,
                label: *label,
                probs: None,
            })
            .collect();
        for _ in 0..10 {
            student.learn(&batch).unwrap();
        }
        let texts: Vec<&str> = held_out.iter().map(String::as_str).collect();
        student.predict_proba(&texts).unwrap()
    };
    // One window sees the opening only: every text looks the same.
    let blind = train(1);
    assert_eq!(blind[0], blind[1]);
    // Four windows reach the verdict.
    let reading = train(4);
    for (p, (_, label)) in reading.iter().zip(HELD_OUT) {
        assert!(p[label] > 0.6, "held-out confidence {}", p[label]);
    }
}

#[test]
fn embedding_head_pools_the_asked_layers() {
    let model = tiny_bert_folder();
    let cache = tempfile::tempdir().unwrap();
    let demos = demonstrations();
    let texts: Vec<&str> = HELD_OUT.iter().map(|(t, _)| *t).collect();
    let train = |layers: Vec<usize>| {
        let config = EmbeddingHeadConfig {
            model: model.path().to_string_lossy().into_owned(),
            max_len: 32,
            layers,
            cache_dir: Some(cache.path().to_string_lossy().into_owned()),
            ..EmbeddingHeadConfig::default()
        };
        let mut student = EmbeddingHead::new(2, &config)?;
        for _ in 0..5 {
            student.learn(&demos).unwrap();
        }
        Ok::<_, cascade_encoders::EncoderError>(student.predict_proba(&texts).unwrap())
    };
    // The last layer by name is the default, bit for bit, and shares its cache.
    let last = train(Vec::new()).unwrap();
    assert_eq!(train(vec![2]).unwrap(), last);
    // A middle layer reads other features.
    assert_ne!(train(vec![1]).unwrap(), last);
    // Two layers: one cache record per text of twice the hidden size (16).
    train(vec![1, 2]).unwrap();
    let files: Vec<(String, u64)> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    let (_, size) = files
        .iter()
        .find(|(name, _)| name.contains("-l1_2-"))
        .unwrap_or_else(|| panic!("no two-layer cache among {files:?}"));
    let texts_seen = (demos.len() + HELD_OUT.len()) as u64;
    assert_eq!(*size, texts_seen * (16 + 4 * 32));
    assert_eq!(files.len(), 3, "{files:?}");
    // A layer the model does not have is named in the error.
    let err = train(vec![3]).unwrap_err().to_string();
    assert!(err.contains("layer 3") && err.contains("2 layers"), "{err}");
}

#[test]
fn one_pass_fills_each_layer_choice_as_its_own_head_would() {
    let model = tiny_bert_folder();
    let texts: Vec<&str> = HELD_OUT
        .iter()
        .map(|(t, _)| *t)
        .chain(POSITIVE.iter().copied())
        .collect();
    let config = |cache: &Path| EmbeddingHeadConfig {
        model: model.path().to_string_lossy().into_owned(),
        max_len: 32,
        cache_dir: Some(cache.to_string_lossy().into_owned()),
        ..EmbeddingHeadConfig::default()
    };
    let choices = [Vec::new(), vec![1]];
    // Apart: each choice's head encodes the texts itself.
    let apart = tempfile::tempdir().unwrap();
    for layers in &choices {
        let config = EmbeddingHeadConfig {
            layers: layers.clone(),
            ..config(apart.path())
        };
        EmbeddingHead::new(2, &config)
            .unwrap()
            .precompute(&texts)
            .unwrap();
    }
    // Together: one encoder pass to the deepest layer fills both caches.
    let together = tempfile::tempdir().unwrap();
    fill_caches(&config(together.path()), &choices, &texts).unwrap();
    let files = |dir: &Path| {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&path).unwrap())
            })
            .collect();
        files.sort();
        files
    };
    let (apart, together) = (files(apart.path()), files(together.path()));
    assert_eq!(together.len(), 2);
    assert_eq!(apart, together);
    assert!(together
        .iter()
        .all(|(_, bytes)| bytes.len() == texts.len() * (16 + 4 * 16)));
}
