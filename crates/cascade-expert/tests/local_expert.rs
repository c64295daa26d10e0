//! The local expert on the real Gemma 3 270M GGUF (`scripts/setup.sh` fetches
//! it): the decoder predicts what a language model should, and the expert
//! labels, caches and cuts texts as documented.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cascade_expert::gemma::{Gemma, GemmaError};
use cascade_expert::sentencepiece::SentencePiece;
use cascade_expert::Task;
use cascade_expert::{label_all, Expert, LocalConfig, LocalError, LocalExpert};

fn model_path() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf");
    assert!(path.is_file(), "{}: run scripts/setup.sh", path.display());
    path
}

fn task(name: &str) -> Task {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../tasks/{name}.toml"));
    Task::load(path.to_str().unwrap()).unwrap()
}

fn gemma() -> &'static (Gemma, SentencePiece) {
    static MODEL: OnceLock<(Gemma, SentencePiece)> = OnceLock::new();
    MODEL.get_or_init(|| Gemma::load(&model_path()).unwrap())
}

/// Logits of each candidate's first token after `prompt`.
fn next_token_logits(prompt: &str, candidates: &[&str]) -> Vec<f32> {
    let (model, tokenizer) = gemma();
    let mut ids = vec![model.config().bos];
    ids.extend(tokenizer.encode(prompt));
    let tokens: Vec<u32> = candidates.iter().map(|c| tokenizer.encode(c)[0]).collect();
    let hidden = model.last_hidden(&ids).unwrap();
    model.token_logits(&hidden, &tokens).unwrap()
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap()
}

#[test]
fn the_decoder_knows_facts_and_counts() {
    let (model, _) = gemma();
    let c = model.config();
    assert_eq!(
        (c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim),
        (18, 640, 4, 1, 256)
    );
    // A wrong norm, RoPE, mask or activation scrambles these.
    let capital = next_token_logits(
        "The capital of France is",
        &[" Paris", " London", " Berlin", " Rome", " Madrid"],
    );
    assert_eq!(argmax(&capital), 0, "{capital:?}");
    let count = next_token_logits(
        "One, two, three, four,",
        &[" five", " six", " three", " one"],
    );
    assert_eq!(argmax(&count), 0, "{count:?}");
}

#[test]
fn long_prompts_past_the_sliding_window_still_work() {
    // 600 tokens: the sliding layers see only the last 512 keys.
    let filler = "The quick brown fox jumps over the lazy dog. ".repeat(60);
    let logits = next_token_logits(
        &format!("{filler}\nThe capital of France is"),
        &[" Paris", " London", " Berlin"],
    );
    assert!(logits.iter().all(|l| l.is_finite()), "{logits:?}");
    assert_eq!(argmax(&logits), 0, "{logits:?}");
}

#[test]
fn the_expert_labels_clear_reviews_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let config = LocalConfig {
        model: model_path(),
        max_text_tokens: 64,
        cache: Some(dir.path().join("local.jsonl")),
        ..LocalConfig::default()
    };
    let expert = LocalExpert::load(&config, task("imdb")).unwrap();
    let good = "An absolute masterpiece. Brilliant acting, a moving story, and a score I still hum. I loved every minute.";
    let bad = "Terrible. The plot made no sense, the acting was wooden and I was bored to tears. Avoid this film.";
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let answers = runtime.block_on(label_all(&expert, &[good.into(), bad.into()]));
    let (pos, neg) = (answers[0].as_ref().unwrap(), answers[1].as_ref().unwrap());
    assert_eq!((pos.label, neg.label), (1, 0), "{answers:?}");
    assert_eq!(
        (pos.raw.as_str(), neg.raw.as_str()),
        ("positive", "negative")
    );
    for answer in [pos, neg] {
        let probs = answer.probs.as_ref().unwrap();
        assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{probs:?}");
        assert!(!answer.cached);
    }
    // The same text gives the same probabilities, bit for bit.
    let again = expert.label_now(good, false).unwrap();
    assert_eq!(again.probs, pos.probs);
    // A cached answer costs no forward pass; usage counts it.
    let prompts = expert.compute_time().prompts;
    let cached = expert.label_now(good, true).unwrap();
    assert!(cached.cached);
    assert_eq!(cached.probs, pos.probs);
    assert_eq!(expert.compute_time().prompts, prompts);
    assert_eq!(expert.usage().cache_hits, 1);
    // A fresh expert reads the cache file back.
    drop(expert);
    let reopened = LocalExpert::load(&config, task("imdb")).unwrap();
    assert!(reopened.label_now(bad, true).unwrap().cached);
}

#[test]
fn long_texts_are_cut_to_max_text_tokens() {
    let config = LocalConfig {
        model: model_path(),
        max_text_tokens: 50,
        cache: None,
        ..LocalConfig::default()
    };
    let expert = LocalExpert::load(&config, task("imdb")).unwrap();
    let short = expert.prompt_ids("Great film.").len();
    let long = expert
        .prompt_ids(&"A very long and rambling review. ".repeat(200))
        .len();
    // The prompt grows by at most the cut text's tokens (and a boundary token).
    assert!(long <= short + 51, "{short} vs {long}");
    assert!(long > short + 40, "{short} vs {long}");
}

#[test]
fn bad_models_and_tasks_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("model.gguf");
    std::fs::write(&not_gguf, b"not a gguf file").unwrap();
    let config = |model: PathBuf| LocalConfig {
        model,
        max_text_tokens: 64,
        cache: None,
        ..LocalConfig::default()
    };
    match LocalExpert::load(&config(not_gguf), task("imdb")) {
        Err(LocalError::Model(GemmaError::Format { message, .. })) => {
            assert!(message.contains("GGUF"), "{message}")
        }
        other => panic!("{:?}", other.err()),
    }
    match LocalExpert::load(&config(dir.path().join("missing.gguf")), task("imdb")) {
        Err(LocalError::Model(GemmaError::Io { .. })) => {}
        other => panic!("{:?}", other.err()),
    }
    let no_prompt = Task::preset("imdb").unwrap();
    let err = LocalExpert::load(&config(model_path()), no_prompt)
        .err()
        .unwrap();
    assert!(err.to_string().contains("few_shot"), "{err}");
    // Label words that share a first token cannot be told apart by logits.
    let clash = Task::from_toml(
        r#"
name = "clash"
labels = ["a", "b"]
label_words = ["very good", "very bad"]
system = "s"
user = "{text}"
[[rules]]
pattern = "good"
label = "a"
[[rules]]
pattern = "bad"
label = "b"
[few_shot]
template = "Text: {text}\nAnswer: {label_word}"
examples = []
"#,
    )
    .unwrap();
    let err = LocalExpert::load(&config(model_path()), clash)
        .err()
        .unwrap();
    assert!(err.to_string().contains("same token"), "{err}");
}
