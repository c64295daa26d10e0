//! A persistent response cache: a re-run never pays twice for the same
//! (model, prompt template, text).
//!
//! The file is append-only JSONL, one `{"key", "raw", "probs"}` per answer,
//! flushed per write; a torn last line (a crash mid-write) is skipped on load.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    pub raw: String,
    #[serde(default)]
    pub probs: Option<Vec<f32>>,
}

#[derive(Serialize, Deserialize)]
struct Record {
    key: String,
    #[serde(flatten)]
    answer: CachedAnswer,
}

#[derive(Debug, Default)]
pub struct ResponseCache {
    entries: HashMap<String, CachedAnswer>,
    file: Option<File>,
}

impl ResponseCache {
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Opens (or creates) the cache file and loads every complete record.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let entries = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Record>(line).ok())
            .map(|record| (record.key, record.answer))
            .collect();
        let mut file = OpenOptions::new().create(true).append(true).open(path)?;
        // End a torn last line, so the next record starts on its own line.
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n")?;
        }
        Ok(Self {
            entries,
            file: Some(file),
        })
    }

    /// The cache key of a text under a model and a prompt fingerprint.
    pub fn key(model: &str, prompt_fingerprint: &str, text: &str) -> String {
        let mut hash = Sha256::new();
        for part in [model, prompt_fingerprint, text] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
        format!("{:x}", hash.finalize())
    }

    pub fn get(&self, key: &str) -> Option<&CachedAnswer> {
        self.entries.get(key)
    }

    pub fn insert(&mut self, key: String, answer: CachedAnswer) -> std::io::Result<()> {
        if let Some(file) = &mut self.file {
            let record = Record {
                key: key.clone(),
                answer: answer.clone(),
            };
            let mut line = serde_json::to_string(&record).map_err(std::io::Error::other)?;
            line.push('\n');
            file.write_all(line.as_bytes())?;
            file.flush()?;
        }
        self.entries.insert(key, answer);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The cache an expert shares between its concurrent calls.
#[derive(Debug, Default)]
pub struct SharedCache(Mutex<ResponseCache>);

impl SharedCache {
    /// The file's cache, or one in memory only when there is no file.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let cache = match path {
            Some(path) => ResponseCache::open(path)?,
            None => ResponseCache::in_memory(),
        };
        Ok(Self(Mutex::new(cache)))
    }

    pub fn get(&self, key: &str) -> Option<CachedAnswer> {
        self.lock().get(key).cloned()
    }

    /// Stores an answer. A cache that cannot be written costs a re-run, not
    /// this answer, so the error is dropped.
    pub fn insert(&self, key: String, answer: CachedAnswer) {
        let _ = self.lock().insert(key, answer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ResponseCache> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_survive_reopening_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let key = ResponseCache::key("m", "p", "text");
        {
            let mut cache = ResponseCache::open(&path).unwrap();
            let answer = CachedAnswer {
                raw: "positive".into(),
                probs: Some(vec![0.1, 0.9]),
            };
            cache.insert(key.clone(), answer).unwrap();
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"key\": \"torn")
            .unwrap();
        let mut cache = ResponseCache::open(&path).unwrap();
        assert_eq!(cache.len(), 1);
        let later = ResponseCache::key("m", "p", "later");
        let answer = CachedAnswer {
            raw: "negative".into(),
            probs: None,
        };
        cache.insert(later.clone(), answer).unwrap();
        drop(cache);
        let cache = ResponseCache::open(&path).unwrap();
        assert_eq!(
            cache.len(),
            2,
            "a record written after a torn line survives"
        );
        assert_eq!(cache.get(&later).unwrap().raw, "negative");
        assert_eq!(cache.get(&key).unwrap().raw, "positive");
        assert_ne!(key, ResponseCache::key("m", "p", "other text"));
        assert_ne!(key, ResponseCache::key("m2", "p", "text"));
    }
}
