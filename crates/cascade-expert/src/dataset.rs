//! Dataset folders: a recorded stream with gold labels and the answers an LLM
//! gave (which [`crate::RecordedExpert`] plays back).
//!
//! A dataset folder holds
//! - `stream.jsonl.zst` (or `stream.jsonl`): one JSON object per line with an
//!   integer `id`, a `text`, an optional gold `label` (a label name) and one or
//!   more recorded answer fields (a label name, a raw LLM output, or `null`);
//! - `labels.txt`: one label name per line, line k is label k;
//! - optionally `split_test_ids.txt` and other id lists: the stream orders.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::task::Task;
use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DatasetError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{dir}: no stream.jsonl.zst or stream.jsonl")]
    NoStream { dir: PathBuf },
}

/// One item of a recorded stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: u64,
    pub text: String,
    /// The gold label, when the data has one.
    pub gold: Option<usize>,
    /// The recorded LLM's label; `None` when its answer held no label.
    pub expert: Option<usize>,
}

/// Which items to stream, in which order.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamOrder {
    /// The ids in `split_test_ids.txt`, in that order (the paper's evaluation stream).
    Test,
    /// Every item, in file order.
    All,
    /// The ids in a file, one per line.
    Ids(PathBuf),
}

impl StreamOrder {
    /// `test`, `all`, or a path to an ids file.
    pub fn parse(spec: &str) -> Self {
        match spec {
            "test" => Self::Test,
            "all" => Self::All,
            path => Self::Ids(PathBuf::from(path)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    dir: PathBuf,
    items: Vec<Item>,
    by_id: HashMap<u64, usize>,
}

/// Reads `labels.txt`: one non-empty label name per line.
pub fn read_labels(dir: &Path) -> Result<Vec<String>, DatasetError> {
    let path = dir.join("labels.txt");
    let text = read_to_string(&path)?;
    let labels: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if labels.len() < 2 {
        return Err(DatasetError::Invalid {
            path,
            line: 1,
            reason: format!("needs at least 2 labels, found {}", labels.len()),
        });
    }
    Ok(labels)
}

impl Dataset {
    /// Loads the stream, reading recorded answers from `expert_field`. Answers
    /// that are not a label name are parsed with the task's rules.
    pub fn load(dir: &Path, task: &Task, expert_field: &str) -> Result<Self, DatasetError> {
        let (path, text) = read_stream(dir)?;
        let mut items = Vec::new();
        let mut by_id = HashMap::new();
        // Split on '\n' only: texts may hold other Unicode line breaks.
        for (index, line) in text.split('\n').enumerate() {
            let line_no = index + 1;
            if line.trim().is_empty() {
                continue;
            }
            let invalid = |reason: String| DatasetError::Invalid {
                path: path.clone(),
                line: line_no,
                reason,
            };
            let item = parse_item(line, task, expert_field).map_err(invalid)?;
            if by_id.insert(item.id, items.len()).is_some() {
                return Err(invalid(format!("id {} appears twice", item.id)));
            }
            items.push(item);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            items,
            by_id,
        })
    }

    /// Every item, in file order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The recorded item with this id.
    pub fn get(&self, id: u64) -> Option<&Item> {
        self.by_id.get(&id).map(|&i| &self.items[i])
    }

    /// The recorded answers of `ids` replaced by `other`'s (another field of
    /// the same data): a teacher that changes mid-stream.
    pub fn take_expert_from(&mut self, other: &Dataset, ids: &[u64]) {
        for id in ids {
            if let (Some(&i), Some(item)) = (self.by_id.get(id), other.get(*id)) {
                self.items[i].expert = item.expert;
            }
        }
    }

    /// The items in the requested order.
    pub fn stream(&self, order: &StreamOrder) -> Result<Vec<&Item>, DatasetError> {
        let ids_path = match order {
            StreamOrder::All => return Ok(self.items.iter().collect()),
            StreamOrder::Test => self.dir.join("split_test_ids.txt"),
            StreamOrder::Ids(path) => path.clone(),
        };
        let text = read_to_string(&ids_path)?;
        let mut stream = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let invalid = |reason: String| DatasetError::Invalid {
                path: ids_path.clone(),
                line: index + 1,
                reason,
            };
            let id: u64 = line
                .parse()
                .map_err(|_| invalid(format!("`{line}` is not an item id")))?;
            let item = self
                .get(id)
                .ok_or_else(|| invalid(format!("id {id} is not in the dataset")))?;
            stream.push(item);
        }
        Ok(stream)
    }
}

fn parse_item(line: &str, task: &Task, expert_field: &str) -> Result<Item, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let object = value.as_object().ok_or("expected a JSON object")?;
    let id = object
        .get("id")
        .and_then(Value::as_u64)
        .ok_or("missing or non-integer `id`")?;
    let text = object
        .get("text")
        .and_then(Value::as_str)
        .ok_or("missing or non-string `text`")?
        .to_string();
    let gold = match object.get("label") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(
            task.label_index(name)
                .ok_or_else(|| format!("gold label `{name}` is not one of {:?}", task.labels()))?,
        ),
        Some(other) => return Err(format!("`label` must be a label name, got {other}")),
    };
    let expert = match object.get(expert_field) {
        None => {
            return Err(format!(
                "no field `{expert_field}` (choose it with --expert-field)"
            ))
        }
        Some(Value::Null) => None,
        Some(Value::String(answer)) => task
            .label_index(answer)
            .or_else(|| task.parse_answer(answer)),
        Some(Value::Number(n)) => task.parse_answer(&n.to_string()),
        Some(other) => {
            return Err(format!(
                "`{expert_field}` must be a string or null, got {other}"
            ))
        }
    };
    Ok(Item {
        id,
        text,
        gold,
        expert,
    })
}

fn read_stream(dir: &Path) -> Result<(PathBuf, String), DatasetError> {
    let compressed = dir.join("stream.jsonl.zst");
    if compressed.exists() {
        let file = std::fs::File::open(&compressed).map_err(|source| DatasetError::Io {
            path: compressed.clone(),
            source,
        })?;
        let mut text = String::new();
        zstd::stream::read::Decoder::new(file)
            .and_then(|mut decoder| decoder.read_to_string(&mut text))
            .map_err(|source| DatasetError::Io {
                path: compressed.clone(),
                source,
            })?;
        return Ok((compressed, text));
    }
    let plain = dir.join("stream.jsonl");
    if plain.exists() {
        let text = read_to_string(&plain)?;
        return Ok((plain, text));
    }
    Err(DatasetError::NoStream {
        dir: dir.to_path_buf(),
    })
}

fn read_to_string(path: &Path) -> Result<String, DatasetError> {
    std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_dataset(dir: &Path, lines: &[&str]) {
        std::fs::write(dir.join("labels.txt"), "neg\npos\n").unwrap();
        std::fs::write(dir.join("stream.jsonl"), lines.join("\n")).unwrap();
    }

    fn task() -> Task {
        Task::preset("imdb").unwrap()
    }

    #[test]
    fn loads_labels_names_raw_answers_and_nulls() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(
            dir.path(),
            &[
                r#"{"id": 3, "text": "good", "label": "pos", "gpt": "pos", "raw": "Positive"}"#,
                r#"{"id": 1, "text": "bad\u2028still one line", "label": "neg", "gpt": null, "raw": "hmm"}"#,
            ],
        );
        std::fs::write(dir.path().join("split_test_ids.txt"), "1\n3\n").unwrap();
        assert_eq!(read_labels(dir.path()).unwrap(), vec!["neg", "pos"]);
        let data = Dataset::load(dir.path(), &task(), "gpt").unwrap();
        let stream = data.stream(&StreamOrder::Test).unwrap();
        assert_eq!(stream.iter().map(|i| i.id).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(stream[0].expert, None);
        assert_eq!(stream[0].text, "bad\u{2028}still one line");
        assert_eq!(stream[1].gold, Some(1));
        let raw = Dataset::load(dir.path(), &task(), "raw").unwrap();
        assert_eq!(raw.get(3).unwrap().expert, Some(1));
        assert_eq!(raw.get(1).unwrap().expert, None);
        assert_eq!(raw.stream(&StreamOrder::All).unwrap().len(), 2);
    }

    #[test]
    fn errors_say_where_and_what() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), &[r#"{"id": 1, "text": "x", "gpt": "pos"}"#]);
        let err = Dataset::load(dir.path(), &task(), "llama").unwrap_err();
        assert!(
            err.to_string().contains("stream.jsonl:1: no field `llama`"),
            "{err}"
        );

        write_dataset(
            dir.path(),
            &[r#"{"id": 1, "text": "x", "label": "meh", "gpt": "pos"}"#],
        );
        let err = Dataset::load(dir.path(), &task(), "gpt").unwrap_err();
        assert!(err.to_string().contains("gold label `meh`"), "{err}");

        write_dataset(
            dir.path(),
            &["{\"id\": 1, \"text\": \"x\", \"gpt\": \"pos\"}", "{oops"],
        );
        let err = Dataset::load(dir.path(), &task(), "gpt").unwrap_err();
        assert!(err.to_string().contains(":2: invalid JSON"), "{err}");

        write_dataset(dir.path(), &[r#"{"id": 1, "text": "x", "gpt": "pos"}"#]);
        let data = Dataset::load(dir.path(), &task(), "gpt").unwrap();
        let err = data.stream(&StreamOrder::Test).unwrap_err();
        assert!(err.to_string().contains("split_test_ids.txt"), "{err}");
        let ids = dir.path().join("ids.txt");
        std::fs::write(&ids, "1\n9\n").unwrap();
        let err = data.stream(&StreamOrder::Ids(ids)).unwrap_err();
        assert!(
            err.to_string()
                .contains("ids.txt:2: id 9 is not in the dataset"),
            "{err}"
        );
    }

    #[test]
    fn missing_stream_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = Dataset::load(dir.path(), &task(), "gpt").unwrap_err();
        assert!(matches!(err, DatasetError::NoStream { .. }));
    }
}
