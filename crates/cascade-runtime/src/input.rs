//! Input streams: JSONL items `{"id", "text", …}` or plain text lines, read
//! line by line with a bound on line length, so one bad line is one error
//! record and never the end of the stream.

use std::io::BufRead;
use std::path::Path;

use serde_json::{json, Value};

/// The line limit `cascade run` and `cascade label` use unless told otherwise.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// One input line, parsed.
pub struct InputItem {
    pub line: usize,
    pub id: Value,
    pub text: String,
}

/// JSON with a non-empty `text` (and any `id`), or a plain text line.
pub fn parse_line(line: usize, raw: &str) -> Result<InputItem, String> {
    let trimmed = raw.trim_end_matches(['\r', '\n']);
    if trimmed.trim_start().starts_with('{') {
        let value: Value =
            serde_json::from_str(trimmed).map_err(|e| format!("invalid JSON: {e}"))?;
        let text = value
            .get("text")
            .and_then(Value::as_str)
            .ok_or("no string field `text`")?;
        if text.trim().is_empty() {
            return Err("empty `text`".into());
        }
        let id = value.get("id").cloned().unwrap_or(json!(line));
        Ok(InputItem {
            line,
            id,
            text: text.to_string(),
        })
    } else if trimmed.trim().is_empty() {
        Err("empty line".into())
    } else {
        Ok(InputItem {
            line,
            id: json!(line),
            text: trimmed.to_string(),
        })
    }
}

/// A line of input: its bytes, or why it was not read whole.
pub enum RawLine {
    Bytes(Vec<u8>),
    /// Longer than the limit; the rest of it was skipped.
    TooLong(usize),
}

/// Reads lines (split on b'\n') holding at most `max_bytes` each in memory.
pub struct LineReader<R> {
    reader: R,
    max_bytes: usize,
    /// Lines returned so far.
    pub lines: u64,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(reader: R, max_bytes: usize) -> Self {
        Self {
            reader,
            max_bytes,
            lines: 0,
        }
    }

    /// The next line without its newline; `None` at the end of the input.
    pub fn next_line(&mut self) -> std::io::Result<Option<RawLine>> {
        let mut line = Vec::new();
        let mut length = 0usize;
        let mut saw_any = false;
        loop {
            let buffer = self.reader.fill_buf()?;
            if buffer.is_empty() {
                if !saw_any {
                    return Ok(None);
                }
                break;
            }
            saw_any = true;
            let (chunk, found_newline) = match buffer.iter().position(|&b| b == b'\n') {
                Some(i) => (&buffer[..i], true),
                None => (buffer, false),
            };
            length += chunk.len();
            if length <= self.max_bytes {
                line.extend_from_slice(chunk);
            } else {
                line = Vec::new();
            }
            let consumed = chunk.len() + usize::from(found_newline);
            self.reader.consume(consumed);
            if found_newline {
                break;
            }
        }
        self.lines += 1;
        Ok(Some(if length > self.max_bytes {
            RawLine::TooLong(length)
        } else {
            RawLine::Bytes(line)
        }))
    }
}

/// Parses one raw line: its item, or why it is bad input.
pub fn read_item(line: usize, raw: RawLine, max_bytes: usize) -> Result<InputItem, String> {
    match raw {
        RawLine::TooLong(length) => Err(format!(
            "line of {length} bytes is over --max-line-bytes {max_bytes}"
        )),
        RawLine::Bytes(bytes) => match std::str::from_utf8(&bytes) {
            Ok(text) => parse_line(line, text),
            Err(e) => Err(format!("invalid UTF-8 ({e})")),
        },
    }
}

/// The number of newline-ended lines in a file (a stream's length), read in
/// pieces.
pub fn count_lines(path: &Path) -> std::io::Result<u64> {
    let mut reader = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut count = 0u64;
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(count);
        }
        count += buffer.iter().filter(|&&b| b == b'\n').count() as u64;
        let n = buffer.len();
        reader.consume(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Result<String, usize>> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().unwrap() {
            out.push(match line {
                RawLine::Bytes(b) => Ok(String::from_utf8(b).unwrap()),
                RawLine::TooLong(n) => Err(n),
            });
        }
        out
    }

    #[test]
    fn long_lines_are_skipped_whole_and_the_rest_read() {
        let input = b"short\nthis line is too long\n\nlast without newline";
        assert_eq!(
            lines(input, 10),
            vec![Ok("short".into()), Err(21), Ok("".into()), Err(20),]
        );
        assert_eq!(lines(b"a\nb\n", 10), vec![Ok("a".into()), Ok("b".into())]);
        assert!(lines(b"", 10).is_empty());
    }

    #[test]
    fn every_kind_of_bad_line_has_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"id\": 1, \"text\": ", "invalid JSON"),
            (b"{\"id\": 1}", "no string field `text`"),
            (b"{\"id\": 1, \"text\": \"  \"}", "empty `text`"),
            (b"{\"id\": 1, \"text\": 5}", "no string field `text`"),
            (b"   ", "empty line"),
            (b"\xff\xfe", "invalid UTF-8"),
        ];
        for (raw, reason) in cases {
            let err = read_item(1, RawLine::Bytes(raw.to_vec()), 100)
                .err()
                .unwrap();
            assert!(err.contains(reason), "{err}");
        }
        let err = read_item(1, RawLine::TooLong(200), 100).err().unwrap();
        assert!(err.contains("max-line-bytes"), "{err}");
        let item = read_item(3, RawLine::Bytes(b"plain words".to_vec()), 100).unwrap();
        assert_eq!(
            (item.line, item.id.clone(), item.text.as_str()),
            (3, json!(3), "plain words")
        );
    }
}
