//! A session over a JSONL stream (`cascade run`): one output record per
//! input line, checkpoints that let a killed run resume and lose nothing.
//!
//! Checkpoints: every `checkpoint_every` lines and when `stop` is raised,
//! every call in flight is settled, the output is flushed and fsynced, then
//! the session, the input position and the output length are written
//! (temp file, fsync, rename). A resumed run cuts the output back to the
//! checkpoint's length (records written after it are recomputed,
//! identically) and continues from the next input line.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::checkpoint::Position;
use crate::error::{Result, RuntimeError};
use crate::input::{read_item, ItemId, LineReader};
use crate::live::Live;
use crate::pipeline::Pipeline;
use crate::progress::Progress;

/// A run's stream settings.
#[derive(Debug, Clone)]
pub struct JsonlRun {
    /// A file, or `-` for stdin.
    pub input: String,
    /// A file, or `-` for stdout.
    pub output: String,
    pub checkpoint_every: u64,
    pub max_line_bytes: usize,
    pub max_in_flight: usize,
    /// Records leave as settled instead of in input order.
    pub unordered: bool,
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The input is done.
    Complete,
    /// `stop` was raised; a checkpoint (if any state folder) was written after this line.
    Interrupted { after_line: u64 },
}

impl JsonlRun {
    /// What a checkpoint of this run must match beside the config.
    pub fn schedule(&self) -> String {
        format!(
            "run: {} in flight, checkpoint every {}",
            self.max_in_flight, self.checkpoint_every
        )
    }

    /// The input's line count, when it is a file (the stream's length).
    pub fn input_lines(&self) -> Result<Option<u64>> {
        match self.input.as_str() {
            "-" => Ok(None),
            path => count_lines(Path::new(path)).map(Some),
        }
    }

    /// Refuses settings that cannot work, before anything is loaded.
    pub fn check(&self, with_state: bool) -> Result<()> {
        if self.checkpoint_every == 0 {
            return Err(RuntimeError::setting(
                "--checkpoint-every",
                "must be at least 1",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(RuntimeError::setting(
                "--max-in-flight",
                "must be at least 1",
            ));
        }
        if with_state && (self.input == "-" || self.output == "-") {
            return Err(RuntimeError::setting("--state", "needs --input and --output files (a resumed run re-reads the input and cuts the output back)"));
        }
        Ok(())
    }

    pub fn run(&self, live: Live, stop: Arc<AtomicBool>) -> Result<(Ended, Live)> {
        self.check(live.state.is_some())?;
        let Live {
            task,
            config,
            session,
            expert,
            state,
            resumed,
        } = live;
        let position = resumed.clone().unwrap_or_default();
        if resumed.is_some() && session.counts().lines != position.lines_done {
            return Err(RuntimeError::Input(format!(
                "the checkpoint counts {} records for {} lines: it does not belong to this run",
                session.counts().lines,
                position.lines_done
            )));
        }
        let runtime = crate::async_runtime()?;
        let digest = Rc::new(RefCell::new(Sha256::new()));
        let reader: Box<dyn BufRead> = match self.input.as_str() {
            "-" => Box::new(std::io::stdin().lock()),
            path => Box::new(BufReader::new(
                File::open(path).map_err(RuntimeError::io(path))?,
            )),
        };
        let hashing = Hashing {
            inner: reader,
            digest: Rc::clone(&digest),
        };
        let mut input = LineReader::new(hashing, self.max_line_bytes);
        // Skip what the checkpoint covers, and check that it is the same
        // input before the output is touched.
        while input.lines < position.lines_done {
            let line = input.next_line().map_err(RuntimeError::io(&self.input))?;
            if line.is_none() {
                return Err(RuntimeError::Input(format!(
                    "it has fewer lines than the checkpoint's {}: is it the same input?",
                    position.lines_done
                )));
            }
        }
        if let Some(expected) = &position.input_sha256 {
            if hex(&digest.borrow()) != *expected {
                return Err(RuntimeError::Input(format!(
                    "its first {} lines are not the ones the checkpoint covers: was it edited?",
                    position.lines_done
                )));
            }
        }
        let mut progress = Progress::new(self.input_lines()?.unwrap_or(0), "lines");
        progress.inc(position.lines_done);
        let mut pipeline = Pipeline::new(
            session,
            expert.clone(),
            runtime.handle().clone(),
            self.max_in_flight,
            !self.unordered,
        )?
        .stop_on(Arc::clone(&stop));
        let levels = pipeline.session().level_names().to_vec();
        let mut sink = Sink {
            output: Output::open(&self.output, resumed.as_ref().map(|p| p.output_bytes))?,
            task: &task,
            levels: &levels,
            state: state.as_ref(),
            digest: &digest,
        };
        let mut ended = Ended::Complete;
        while let Some(raw) = input.next_line().map_err(RuntimeError::io(&self.input))? {
            let line = input.lines as usize;
            match read_item(line, raw, self.max_line_bytes) {
                Ok(item) => pipeline.push(line, item.id, Ok(&item.text))?,
                Err(reason) => pipeline.push(line, ItemId::null(), Err(reason))?,
            }
            sink.write_ready(&mut pipeline)?;
            progress.inc(1);
            if input.lines.is_multiple_of(256) {
                progress.set_message(pipeline.session().counts().status_line());
            }
            let stopping = stop.load(Ordering::Relaxed);
            if input.lines.is_multiple_of(self.checkpoint_every) || stopping {
                sink.checkpoint(&mut pipeline, input.lines)?;
            }
            if stopping {
                ended = Ended::Interrupted {
                    after_line: input.lines,
                };
                break;
            }
        }
        if ended == Ended::Complete {
            sink.checkpoint(&mut pipeline, input.lines)?;
        }
        progress.finish();
        sink.output.sync()?;
        Ok((
            ended,
            Live {
                task,
                config,
                session: pipeline.into_session(),
                expert,
                state,
                resumed,
            },
        ))
    }
}

/// Where settled items go: output records, and checkpoints of the session.
struct Sink<'a> {
    output: Output,
    task: &'a cascade_expert::Task,
    levels: &'a [String],
    state: Option<&'a crate::checkpoint::StateDir>,
    /// The running digest of the input bytes read so far.
    digest: &'a RefCell<Sha256>,
}

impl Sink<'_> {
    fn write_ready(&mut self, pipeline: &mut Pipeline) -> Result<()> {
        for done in pipeline.take_ready() {
            let record = done
                .settled
                .record(Some(done.line), &done.id, self.task, self.levels);
            self.output.write(&record)?;
        }
        Ok(())
    }

    /// A checkpoint holds no call in flight: they are all settled first.
    fn checkpoint(&mut self, pipeline: &mut Pipeline, lines_done: u64) -> Result<()> {
        pipeline.settle_all()?;
        self.write_ready(pipeline)?;
        let Some(state) = self.state else {
            return Ok(());
        };
        let output_bytes = self.output.sync()?;
        let position = Position {
            lines_done,
            output_bytes,
            input_sha256: Some(hex(&self.digest.borrow())),
        };
        state.write(pipeline.session(), position)
    }
}

/// A reader that feeds every byte it hands out into a digest.
struct Hashing<R> {
    inner: R,
    digest: Rc<RefCell<Sha256>>,
}

impl<R: BufRead> Read for Hashing<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(out)?;
        self.digest.borrow_mut().update(&out[..n]);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Hashing<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        if let Ok(buffer) = self.inner.fill_buf() {
            self.digest
                .borrow_mut()
                .update(&buffer[..n.min(buffer.len())]);
        }
        self.inner.consume(n);
    }
}

fn hex(digest: &Sha256) -> String {
    digest
        .clone()
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn count_lines(path: &Path) -> Result<u64> {
    let io = RuntimeError::io(path);
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let mut count = 0u64;
    loop {
        let buffer = reader.fill_buf().map_err(RuntimeError::io(path))?;
        if buffer.is_empty() {
            return Ok(count);
        }
        count += buffer.iter().filter(|&&b| b == b'\n').count() as u64;
        let n = buffer.len();
        reader.consume(n);
    }
}

/// The output stream: a file that can be synced and cut back, or stdout.
enum Output {
    File { writer: BufWriter<File>, bytes: u64 },
    Stdout(BufWriter<std::io::Stdout>),
}

impl Output {
    /// Opens `path`; on resume, cuts the file back to `resume_at` bytes.
    fn open(path: &str, resume_at: Option<u64>) -> Result<Self> {
        if path == "-" {
            return Ok(Self::Stdout(BufWriter::new(std::io::stdout())));
        }
        let io = RuntimeError::io(path);
        let file = match resume_at {
            Some(bytes) => {
                let mut file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io)?;
                let length = file.metadata().map_err(RuntimeError::Output)?.len();
                if length < bytes {
                    return Err(RuntimeError::Input(format!("{path} is shorter ({length} bytes) than the checkpoint says ({bytes}): was it replaced?")));
                }
                if bytes > 0 {
                    // The checkpoint's length must end a record.
                    let mut last = [0u8];
                    file.seek(SeekFrom::Start(bytes - 1))
                        .map_err(RuntimeError::Output)?;
                    file.read_exact(&mut last).map_err(RuntimeError::Output)?;
                    if last[0] != b'\n' {
                        return Err(RuntimeError::Input(format!(
                            "{path}: the checkpoint's length ({bytes} bytes) does not end a record: was the output edited?"
                        )));
                    }
                }
                file.set_len(bytes).map_err(RuntimeError::Output)?;
                file.seek(SeekFrom::End(0)).map_err(RuntimeError::Output)?;
                file
            }
            None => File::create(path).map_err(io)?,
        };
        Ok(Self::File {
            writer: BufWriter::new(file),
            bytes: resume_at.unwrap_or(0),
        })
    }

    fn write(&mut self, record: &impl serde::Serialize) -> Result<()> {
        let mut line = serde_json::to_vec(record).map_err(|e| RuntimeError::Output(e.into()))?;
        line.push(b'\n');
        match self {
            Self::File { writer, bytes } => {
                writer.write_all(&line).map_err(RuntimeError::Output)?;
                *bytes += line.len() as u64;
            }
            Self::Stdout(writer) => writer.write_all(&line).map_err(RuntimeError::Output)?,
        }
        Ok(())
    }

    /// Flushes to disk; returns the bytes written so far.
    fn sync(&mut self) -> Result<u64> {
        match self {
            Self::File { writer, bytes } => {
                writer.flush().map_err(RuntimeError::Output)?;
                writer.get_ref().sync_data().map_err(RuntimeError::Output)?;
                Ok(*bytes)
            }
            Self::Stdout(writer) => {
                writer.flush().map_err(RuntimeError::Output)?;
                Ok(0)
            }
        }
    }
}
