//! Input streams: JSONL items `{"id", "text", …}` or plain text lines, read
//! line by line with a bound on line length, so one bad line is one error
//! record and never the end of the stream.
//!
//! A UTF-8 byte-order mark before a line is skipped (editors on Windows write
//! one at the start of a file). A line holding a NUL byte is bad input: UTF-8
//! text never does, and UTF-16 input (every ASCII character followed or
//! preceded by a NUL) would otherwise pass for text.

use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// The line limit `cascade run` and `cascade label` use unless told otherwise.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// An item's id exactly as the input wrote it: its JSON text, so a number
/// keeps every digit (an id beyond 64 bits would be a rounded float in a
/// `serde_json::Value`, and two distinct ids could come back equal).
/// Serialized as that text; deserialized from any JSON value (as an
/// `Option<ItemId>` field, `null` reads as `None`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ItemId(Box<RawValue>);

impl ItemId {
    /// The id of a line that gave none: its line number.
    pub fn line(line: usize) -> Self {
        Self::from_json(line.to_string())
    }

    /// No id (a line that is not an item).
    pub fn null() -> Self {
        Self::from_json("null".to_string())
    }

    /// An id from its JSON text (`42`, `"a-7"`, a 30-digit number), if it is
    /// valid JSON.
    pub fn parse(json: &str) -> Option<Self> {
        RawValue::from_string(json.trim().to_string())
            .ok()
            .map(Self)
    }

    /// JSON text known to be valid.
    fn from_json(json: String) -> Self {
        Self(RawValue::from_string(json).unwrap_or_else(|_| RawValue::NULL.to_owned()))
    }

    /// The id's JSON text, as the input wrote it.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }

    /// The id as a `serde_json::Value`, for code that holds ids as values:
    /// exact for strings, booleans, null, 64-bit integers and numbers whose
    /// text a `Value` writes back unchanged; any other number (beyond 64
    /// bits, more digits than an f64 holds, out of range, written with an
    /// exponent) becomes a string of its exact text, so distinct ids stay
    /// distinct. Numbers inside an array or object id are parsed as usual.
    pub fn to_value(&self) -> Value {
        let text = self.as_json();
        let is_number = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
        match serde_json::from_str::<Value>(text) {
            // (The text written back, not `value == text`: that compares a string value.)
            Ok(value)
                if !is_number || serde_json::to_string(&value).ok().as_deref() == Some(text) =>
            {
                value
            }
            _ => Value::String(text.to_string()),
        }
    }
}

impl From<u64> for ItemId {
    fn from(id: u64) -> Self {
        Self::from_json(id.to_string())
    }
}

impl PartialEq for ItemId {
    fn eq(&self, other: &Self) -> bool {
        self.as_json() == other.as_json()
    }
}

impl Eq for ItemId {}

impl std::fmt::Display for ItemId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_json())
    }
}

/// An output record whose id is written exactly as the input gave it:
/// `{"line", "id", …fields}` (`line` omitted when `None`; `fields`, a JSON
/// object without an `id`, follows in its own order). A `serde_json::Value`
/// cannot hold such an id, so the record is this struct, not a value.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub id: &'a ItemId,
    #[serde(flatten)]
    pub fields: Value,
}

/// One input line, parsed.
pub struct InputItem {
    pub line: usize,
    /// The id exactly as the input wrote it (the line number when it gave none).
    pub id: ItemId,
    pub text: String,
}

/// The fields of a JSON line that matter; the id is kept as written.
#[derive(Deserialize)]
struct JsonLine<'a> {
    /// `Some("null")` for `"id": null`, `None` when there is no `id`.
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
}

/// A field that is present, even as `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// An item's text, or why it is bad input: one rule for every front end.
pub fn check_text(text: String) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("empty `text`".into());
    }
    Ok(text)
}

const NUL_REASON: &str =
    "the line holds NUL bytes: is the input UTF-16? cascade reads UTF-8 (or a NUL-only line)";

/// JSON with a non-empty `text` (and any `id`), or a plain text line.
pub fn parse_line(line: usize, raw: &str) -> Result<InputItem, String> {
    let raw = raw.strip_prefix('\u{feff}').unwrap_or(raw);
    if raw.contains('\0') {
        return Err(NUL_REASON.into());
    }
    let trimmed = raw.trim_end_matches(['\r', '\n']);
    if trimmed.trim_start().starts_with('{') {
        let fields: JsonLine =
            serde_json::from_str(trimmed).map_err(|e| format!("invalid JSON: {e}"))?;
        let text: String = fields
            .text
            .and_then(|t| serde_json::from_str(t.get()).ok())
            .ok_or("no string field `text`")?;
        let text = check_text(text)?;
        let id = fields
            .id
            .map_or_else(|| ItemId::line(line), |id| ItemId(id.to_owned()));
        Ok(InputItem { line, id, text })
    } else if trimmed.trim().is_empty() {
        Err("empty line".into())
    } else {
        let id = ItemId::line(line);
        Ok(InputItem {
            line,
            id,
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
        RawLine::Bytes(bytes) => {
            let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            // Before the UTF-8 check: UTF-16 input is NUL-interleaved, and
            // that is the more useful reason.
            if bytes.contains(&0) {
                return Err(NUL_REASON.into());
            }
            match std::str::from_utf8(bytes) {
                Ok(text) => parse_line(line, text),
                Err(e) => Err(format!("invalid UTF-8 ({e})")),
            }
        }
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
    use serde_json::json;

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
            (item.line, item.id.to_value(), item.text.as_str()),
            (3, json!(3), "plain words")
        );
    }

    fn item(raw: &[u8]) -> Result<InputItem, String> {
        read_item(1, RawLine::Bytes(raw.to_vec()), 1 << 20)
    }

    #[test]
    fn a_byte_order_mark_before_a_line_is_skipped() {
        let item = item(b"\xEF\xBB\xBF{\"id\": \"a\", \"text\": \"hi\"}").unwrap();
        assert_eq!((item.id.to_value(), item.text.as_str()), (json!("a"), "hi"));
        let item = self::item(b"\xEF\xBB\xBFplain").unwrap();
        assert_eq!(item.text, "plain");
        assert_eq!(
            parse_line(1, "\u{feff}{\"text\": \"hi\"}").unwrap().text,
            "hi"
        );
    }

    #[test]
    fn lines_holding_nul_bytes_are_bad_input() {
        // "{"text": "ok"}" in UTF-16, little- and big-endian, and NULs alone.
        let utf16 = |big: bool| -> Vec<u8> {
            let mut bytes = if big {
                vec![0xFE, 0xFF]
            } else {
                vec![0xFF, 0xFE]
            };
            for unit in "{\"text\": \"ok\"}".encode_utf16() {
                let pair = if big {
                    unit.to_be_bytes()
                } else {
                    unit.to_le_bytes()
                };
                bytes.extend_from_slice(&pair);
            }
            bytes
        };
        for raw in [
            utf16(false),
            utf16(true),
            b"\0".to_vec(),
            b"\0\0\0".to_vec(),
            b"ok\0".to_vec(),
        ] {
            let reason = item(&raw).err().unwrap();
            assert!(
                reason.contains("NUL") && reason.contains("UTF-16"),
                "{reason}"
            );
        }
        assert!(parse_line(1, "a\0b").is_err());
        // An escaped NUL inside a JSON string is text, not a NUL byte.
        assert!(item(br#"{"text": "a\u0000b"}"#).is_ok());
    }

    #[test]
    fn ids_are_kept_exactly_as_written() {
        let raw_id = |line: &str| item(line.as_bytes()).unwrap().id.to_string();
        for id in [
            "18446744073709551617",
            "-18446744073709551617",
            "0.10000000000000000001",
            "1e400",
            "\"x\"",
            "[1, 2]",
            "null",
        ] {
            assert_eq!(raw_id(&format!("{{\"id\": {id}, \"text\": \"t\"}}")), id);
        }
        assert_eq!(raw_id("{\"text\": \"t\"}"), "1", "no id: the line number");
        assert_eq!(raw_id("plain"), "1");

        // As a Value: exact where a Value can be, else the exact text.
        let id = |id: &str| {
            item(format!("{{\"id\": {id}, \"text\": \"t\"}}").as_bytes())
                .unwrap()
                .id
                .to_value()
        };
        assert_eq!(id("7"), json!(7));
        assert_eq!(id("-7"), json!(-7));
        assert_eq!(id("18446744073709551615"), json!(u64::MAX));
        assert_eq!(id("1.5"), json!(1.5));
        assert_eq!(id("\"s\""), json!("s"));
        assert_eq!(id("null"), Value::Null);
        assert_eq!(id("18446744073709551617"), json!("18446744073709551617"));
        assert_ne!(id("18446744073709551617"), id("18446744073709551618"));
        assert_eq!(id("1e400"), json!("1e400"));
    }

    #[test]
    fn a_record_writes_its_id_as_the_input_did() {
        let item = item(br#"{"id": 18446744073709551617, "text": "t"}"#).unwrap();
        let record = Record {
            line: Some(1),
            id: &item.id,
            fields: json!({"status": "ok", "label": "pos"}),
        };
        assert_eq!(
            serde_json::to_string(&record).unwrap(),
            r#"{"line":1,"id":18446744073709551617,"label":"pos","status":"ok"}"#
        );
        let record = Record {
            line: None,
            id: &ItemId::null(),
            fields: json!({}),
        };
        assert_eq!(serde_json::to_string(&record).unwrap(), r#"{"id":null}"#);
        let back: ItemId = serde_json::from_str(" 1.50 ").unwrap();
        assert_eq!(back.as_json(), "1.50");
    }
}
