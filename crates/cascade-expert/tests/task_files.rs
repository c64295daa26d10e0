//! The shipped task files (`tasks/*.toml`): they load, their parsers are the
//! authors' (odd cases included), and on the real streams they turn every
//! recorded raw GPT-3.5 line into exactly the recorded label.

use std::path::{Path, PathBuf};

use cascade_expert::Task;
use cascade_expert::{read_labels, Dataset};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn task_file(name: &str) -> Task {
    let path = repo_root().join("tasks").join(format!("{name}.toml"));
    Task::load(path.to_str().unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_task_file_loads_with_the_datasets_labels_and_a_prompt() {
    for name in ["imdb", "hatespeech", "isear", "fever"] {
        let task = task_file(name);
        let labels = read_labels(&repo_root().join("../shared/data").join(name)).unwrap();
        assert_eq!(task.labels(), labels.as_slice(), "{name}");
        let prompt = task.prompt().expect("task files carry a prompt");
        assert!(prompt.user_message("ITEM").contains("ITEM"));
        let few = prompt
            .few_shot_prompt(task.labels(), "ITEM")
            .expect("a few-shot block");
        assert!(few.ends_with(':'), "{name}: {few:?}");
        assert!(few.contains("ITEM"));
    }
}

#[test]
fn task_files_parse_like_the_authors_code() {
    // (task, raw answer, expected label name or None)
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("imdb", " Positive.\n", Some("pos")),
        ("imdb", "NEGATIVE", Some("neg")),
        ("imdb", "not positive but negative", Some("pos")),
        ("imdb", "mixed", None),
        ("imdb", "1", Some("pos")),
        ("hatespeech", "Yes", Some("hate")),
        ("hatespeech", "yes, not hate... no", Some("noHate")),
        ("hatespeech", "I cannot say, yes", Some("noHate")),
        ("hatespeech", "-1", None),
        ("isear", "sadnessjoy", Some("joy")),
        ("isear", "Disgust", Some("disgust")),
        ("isear", "surprise", None),
        ("isear", "7", None),
        ("fever", "True", Some("SUPPORTS")),
        ("fever", "false.", Some("REFUTES")),
        ("fever", "unknown", None),
    ];
    for &(name, raw, expected) in cases {
        let task = task_file(name);
        let got = task.parse_answer(raw).map(|i| task.labels()[i].as_str());
        assert_eq!(got, expected, "{name}: {raw:?}");
        let preset = Task::preset(name).unwrap();
        assert_eq!(
            task.parse_answer(raw),
            preset.parse_answer(raw),
            "{name}: {raw:?}"
        );
    }
}

#[test]
fn raw_gpt35_lines_parse_to_the_recorded_labels() {
    for name in ["imdb", "hatespeech", "isear"] {
        let dir = repo_root().join("../shared/data").join(name);
        let task = task_file(name);
        let parsed = Dataset::load(&dir, &task, "gpt35_raw").unwrap();
        let recorded = Dataset::load(&dir, &task, "gpt35").unwrap();
        assert_eq!(parsed.len(), recorded.len());
        let all = cascade_expert::StreamOrder::All;
        let (a, b) = (parsed.stream(&all).unwrap(), recorded.stream(&all).unwrap());
        let differ = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.expert != y.expert)
            .count();
        assert_eq!(differ, 0, "{name}: {differ} raw answers parse differently");
    }
}

#[test]
fn bad_task_files_name_the_field() {
    let base = r#"
        name = "t"
        labels = ["a", "b"]
        user = "Text: {text}"
    "#;
    assert!(Task::from_toml(base).is_ok());
    let cases = [
        (base.replace("{text}", "x"), "`{text}`"),
        (format!("{base}\nlabel_words = [\"x\"]"), "label_words"),
        (
            format!("{base}\n[[rules]]\npattern = \"x\"\nlabel = \"c\""),
            "rules.label",
        ),
        (format!("{base}\ncolour = 1"), "colour"),
        (
            format!("{base}\n[few_shot]\ntemplate = \"{{text}}\"\nexamples = []"),
            "few_shot.template",
        ),
    ];
    for (text, needle) in cases {
        let err = Task::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let err = Task::load("no/such/task.toml").unwrap_err().to_string();
    assert!(err.contains("not a preset"), "{err}");
}
