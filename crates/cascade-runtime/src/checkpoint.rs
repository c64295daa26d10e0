//! Checkpoints: a session's whole state with the stream position, written so
//! that a crash leaves the old checkpoint or the new one, never a torn one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use cascade::CascadeConfig;
use cascade_expert::Task;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, RuntimeError};
use crate::session::{Session, SessionOptions, SessionState};

pub const CHECKPOINT: &str = "checkpoint.cbor";

#[derive(Serialize, Deserialize)]
pub struct Checkpoint {
    /// Hash of the config, task, expert and schedule the state belongs to.
    pub fingerprint: String,
    /// Input lines fully handled (`run`), or requests served (`serve`).
    pub lines_done: u64,
    /// Output bytes after those lines' records (`run`).
    pub output_bytes: u64,
    /// SHA-256 (hex) of the input bytes those lines came from (`run`), so a
    /// resume refuses an input edited before the checkpoint's position.
    pub input_sha256: Option<String>,
    /// The session's state (not flattened: serde's flatten buffers values
    /// and cannot carry the RNGs' u128 through CBOR).
    pub session: SessionState,
}

/// When to continue from a checkpoint in the state folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Start fresh; a checkpoint left there is an error (nothing is overwritten).
    Never,
    /// Continue; no checkpoint is an error.
    Required,
    /// Continue when a checkpoint exists, start fresh when none does: one
    /// command line for the first start and every restart after a crash.
    Auto,
}

/// Where a restored session stands in its stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub lines_done: u64,
    pub output_bytes: u64,
    /// SHA-256 (hex) of the input bytes of those lines, when the input is a file.
    pub input_sha256: Option<String>,
}

/// The file as written: the checkpoint's bytes and their SHA-256, so that a
/// checkpoint edited or damaged in any byte is refused, even one that parses.
#[derive(Serialize, Deserialize)]
struct Sealed {
    #[serde(with = "serde_bytes")]
    sha256: Vec<u8>,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

/// What a checkpoint must match to be resumed: the checked config (with every
/// override), the task, the expert ([`ExpertSpec::fingerprint`](crate::ExpertSpec::fingerprint)),
/// the session's options and `schedule`
/// (whatever else decisions depend on, e.g. calls in flight).
pub fn fingerprint(
    config: &CascadeConfig,
    task: &Task,
    expert: &str,
    options: SessionOptions,
    schedule: &str,
) -> String {
    let mut hash = Sha256::new();
    hash.update(serde_json::to_string(config).unwrap_or_default());
    hash.update(format!(
        "|{}|{:?}|{}|{}|{:?}|{schedule}",
        task.name(),
        task.labels(),
        expert,
        options.audit_rate,
        options.on_failure,
    ));
    format!("{:x}", hash.finalize())
}

/// What a cluster's shared learner must match: the checked config (with every
/// override) and the task. Workers may differ in expert, audit rate and
/// failure policy; the learner depends on none of them.
pub fn learner_fingerprint(config: &CascadeConfig, task: &Task) -> String {
    let mut hash = Sha256::new();
    hash.update(serde_json::to_string(config).unwrap_or_default());
    hash.update(format!("|{}|{:?}", task.name(), task.labels()));
    format!("{:x}", hash.finalize())
}

/// A session's checkpoint file in a state folder.
pub struct StateDir {
    path: PathBuf,
    fingerprint: String,
}

impl StateDir {
    /// Opens `dir` for a session: refuses a checkpoint left there unless
    /// resuming (and `Required` without one), restores the session from it,
    /// and checks up front that this session can be checkpointed at all.
    pub fn open(
        dir: &Path,
        resume: Resume,
        fingerprint: String,
        session: &mut Session,
    ) -> Result<(Self, Option<Position>)> {
        let path = dir.join(CHECKPOINT);
        let state = Self { path, fingerprint };
        let refuse = |reason: &str| RuntimeError::Checkpoint {
            path: state.path.clone(),
            reason: reason.into(),
        };
        let restored = match (state.path.exists(), resume) {
            (true, Resume::Never) => {
                return Err(refuse(
                    "holds a checkpoint: pass --resume to continue it (or --resume auto), or remove it to start over",
                ))
            }
            (false, Resume::Required) => return Err(refuse("--resume: no checkpoint here")),
            (true, Resume::Required | Resume::Auto) => {
                let saved = state.read()?;
                session.load_state(saved.session).map_err(|e| RuntimeError::Checkpoint {
                    path: state.path.clone(),
                    reason: format!("restoring: {e}"),
                })?;
                Some(Position {
                    lines_done: saved.lines_done,
                    output_bytes: saved.output_bytes,
                    input_sha256: saved.input_sha256,
                })
            }
            (false, Resume::Never | Resume::Auto) => {
                std::fs::create_dir_all(dir).map_err(RuntimeError::io(dir))?;
                None
            }
        };
        // Fail now rather than at the first checkpoint.
        session.save_state().map_err(|e| RuntimeError::Checkpoint {
            path: state.path.clone(),
            reason: format!("this cascade cannot be checkpointed: {e}"),
        })?;
        Ok((state, restored))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the checkpoint and checks it belongs to this session.
    pub fn read(&self) -> Result<Checkpoint> {
        read_checkpoint(&self.path, &self.fingerprint)
    }

    /// Temp file, fsync, rename, fsync the folder.
    pub fn write(&self, session: &Session, position: Position) -> Result<()> {
        let checkpoint = Checkpoint {
            fingerprint: self.fingerprint.clone(),
            lines_done: position.lines_done,
            output_bytes: position.output_bytes,
            input_sha256: position.input_sha256,
            session: session.save_state()?,
        };
        write_checkpoint(&self.path, &checkpoint)
    }
}

/// Reads a checkpoint and checks it belongs to `fingerprint`.
pub fn read_checkpoint(path: &Path, fingerprint: &str) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(RuntimeError::io(path))?;
    decode_checkpoint(&bytes, fingerprint).map_err(|reason| RuntimeError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    })
}

/// A checkpoint's bytes as a file holds them: its CBOR encoding sealed by
/// the SHA-256 of that encoding (the same bytes `cascade run` writes).
pub fn encode_checkpoint(checkpoint: &Checkpoint) -> std::result::Result<Vec<u8>, String> {
    let encoding = |e: ciborium::ser::Error<std::io::Error>| format!("encoding: {e}");
    let mut body = Vec::new();
    ciborium::into_writer(checkpoint, &mut body).map_err(encoding)?;
    let sealed = Sealed {
        sha256: Sha256::digest(&body).to_vec(),
        body,
    };
    let mut bytes = Vec::new();
    ciborium::into_writer(&sealed, &mut bytes).map_err(encoding)?;
    Ok(bytes)
}

/// Reads sealed checkpoint bytes, checks their checksum and that they belong
/// to `fingerprint`; the error is the reason they were refused.
pub fn decode_checkpoint(
    bytes: &[u8],
    fingerprint: &str,
) -> std::result::Result<Checkpoint, String> {
    let sealed: Sealed =
        ciborium::from_reader(bytes).map_err(|e| format!("is not a readable checkpoint: {e}"))?;
    if Sha256::digest(&sealed.body).as_slice() != sealed.sha256.as_slice() {
        return Err(
            "is damaged: its checksum does not match its content (edited or corrupted); remove it to start over"
                .into(),
        );
    }
    let saved: Checkpoint = ciborium::from_reader(sealed.body.as_slice())
        .map_err(|e| format!("is not a readable checkpoint: {e}"))?;
    if saved.fingerprint != fingerprint {
        return Err("was written with another config, task or expert".into());
    }
    Ok(saved)
}

/// Temp file, fsync, rename, fsync the folder: a crash leaves the old
/// checkpoint or the new one, never a torn one.
pub fn write_checkpoint(path: &Path, checkpoint: &Checkpoint) -> Result<()> {
    let temp = path.with_extension("cbor.tmp");
    let io = |e| RuntimeError::Io {
        path: temp.clone(),
        source: e,
    };
    let bytes = encode_checkpoint(checkpoint).map_err(|reason| RuntimeError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    })?;
    let mut file = File::create(&temp).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temp, path).map_err(RuntimeError::io(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(RuntimeError::io(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Counts;

    #[test]
    fn a_torn_or_foreign_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT);
        std::fs::write(&path, b"\x00\x01torn").unwrap();
        let err = read_checkpoint(&path, "x").err().unwrap().to_string();
        assert!(err.contains("not a readable checkpoint"), "{err}");
        let checkpoint = Checkpoint {
            fingerprint: "a".into(),
            lines_done: 3,
            output_bytes: 10,
            input_sha256: None,
            session: SessionState {
                counts: Counts::new(1),
                audit_rng: rand::SeedableRng::seed_from_u64(1),
                cascade: vec![1, 2, 3],
            },
        };
        write_checkpoint(&path, &checkpoint).unwrap();
        assert_eq!(read_checkpoint(&path, "a").unwrap().lines_done, 3);
        let err = read_checkpoint(&path, "b").err().unwrap().to_string();
        assert!(err.contains("another config"), "{err}");
        // Any changed byte of the content is caught, even where it still parses.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 5;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_checkpoint(&path, "a").err().unwrap().to_string();
        assert!(err.contains("checksum"), "{err}");
    }
}
