//! JSON text straight to MessagePack, in one pass over the text: what the producer does to
//! every record it reads.
//!
//! The bytes are those that serde_json read through serde-transcode into rmp-serde gives
//! (maps and arrays with their exact length, integers in their smallest encoding, other
//! numbers as 64-bit floats, text as is), and the same texts are accepted; the tests compare
//! the two on generated documents. Numbers other than plain integers and text with escapes
//! are handed to serde_json itself, so that they read exactly as it reads them.

use rmp::encode::{write_f64, write_sint, write_str, write_uint};

/// How deep arrays and objects may nest: serde_json's own limit (its 128th level fails).
pub const MAX_DEPTH: usize = 127;

/// The text is not one JSON value (the caller asks serde_json why, for its message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJson;

/// Appends the MessagePack encoding of the JSON value `text` (surrounding whitespace allowed)
/// to `out`. On error, `out` holds a partial value: the caller drops it.
pub fn json_to_msgpack(text: &str, out: &mut Vec<u8>) -> Result<(), NotJson> {
    let mut t = Transcoder {
        s: text.as_bytes(),
        text,
        pos: 0,
        out,
    };
    t.value(0)?;
    t.ws();
    if t.pos == t.s.len() {
        Ok(())
    } else {
        Err(NotJson)
    }
}

struct Transcoder<'a, 'o> {
    s: &'a [u8],
    text: &'a str,
    pos: usize,
    out: &'o mut Vec<u8>,
}

impl Transcoder<'_, '_> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Result<u8, NotJson> {
        self.ws();
        self.s.get(self.pos).copied().ok_or(NotJson)
    }

    fn literal(&mut self, word: &[u8], byte: u8) -> Result<(), NotJson> {
        if self.s[self.pos..].starts_with(word) {
            self.pos += word.len();
            self.out.push(byte);
            Ok(())
        } else {
            Err(NotJson)
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), NotJson> {
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string(),
            b'n' => self.literal(b"null", 0xc0),
            b't' => self.literal(b"true", 0xc3),
            b'f' => self.literal(b"false", 0xc2),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(NotJson),
        }
    }

    /// Writes a container's elements after a 5-byte gap, then its header (with the count
    /// now known) into the gap, closing it up.
    fn container(
        &mut self,
        depth: usize,
        close: u8,
        mut element: impl FnMut(&mut Self) -> Result<(), NotJson>,
    ) -> Result<usize, NotJson> {
        if depth > MAX_DEPTH {
            return Err(NotJson);
        }
        self.pos += 1; // the opening bracket
        let mut n = 0usize;
        if self.peek()? == close {
            self.pos += 1;
            return Ok(0);
        }
        loop {
            element(self)?;
            n += 1;
            match self.peek()? {
                b',' => self.pos += 1,
                b if b == close => {
                    self.pos += 1;
                    return Ok(n);
                }
                _ => return Err(NotJson),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), NotJson> {
        let start = self.gap();
        let n = self.container(depth, b']', |t| t.value(depth))?;
        self.close_gap(start, n, [0x90, 0xdc, 0xdd])
    }

    fn object(&mut self, depth: usize) -> Result<(), NotJson> {
        let start = self.gap();
        let n = self.container(depth, b'}', |t| {
            if t.peek()? != b'"' {
                return Err(NotJson);
            }
            t.string()?;
            if t.peek()? != b':' {
                return Err(NotJson);
            }
            t.pos += 1;
            t.value(depth)
        })?;
        self.close_gap(start, n, [0x80, 0xde, 0xdf])
    }

    fn gap(&mut self) -> usize {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; 5]);
        start
    }

    /// Writes the header of a container of `n` elements into the gap at `start` and closes it
    /// up. `markers`: the fix marker (its count in the low nibble), then those with a 16-bit
    /// and a 32-bit count.
    fn close_gap(&mut self, start: usize, n: usize, markers: [u8; 3]) -> Result<(), NotJson> {
        let mut head = [0u8; 5];
        let len = match n {
            0..=15 => {
                head[0] = markers[0] | n as u8;
                1
            }
            16..=0xffff => {
                head[0] = markers[1];
                head[1..3].copy_from_slice(&(n as u16).to_be_bytes());
                3
            }
            _ => {
                head[0] = markers[2];
                head[1..5].copy_from_slice(&u32::try_from(n).map_err(|_| NotJson)?.to_be_bytes());
                5
            }
        };
        let body = start + 5;
        let end = self.out.len();
        self.out.copy_within(body..end, start + len);
        self.out[start..start + len].copy_from_slice(&head[..len]);
        self.out.truncate(end - (5 - len));
        Ok(())
    }

    fn string(&mut self) -> Result<(), NotJson> {
        let open = self.pos;
        let body = open + 1;
        let rest = &self.s[body..];
        let Some(end) = memchr::memchr2(b'"', b'\\', rest) else {
            return Err(NotJson);
        };
        let plain = &rest[..end];
        // (A fold without an early exit: the compiler makes it a vector loop.)
        let control = plain.iter().fold(false, |any, &b| any | (b < 0x20));
        if rest[end] == b'"' && !control {
            // No escape: the text as it stands (the input is UTF-8 already).
            self.pos = body + end + 1;
            let _ = write_str(self.out, &self.text[body..body + end]);
            return Ok(());
        }
        // Escapes (or a control character, which serde_json refuses): find the closing
        // quote, then let serde_json read the string.
        let mut i = body + end;
        loop {
            match self.s.get(i) {
                None => return Err(NotJson),
                Some(b'\\') => i += 2,
                Some(b'"') => break,
                Some(_) => i += 1,
            }
        }
        let text: String = serde_json::from_str(&self.text[open..=i]).map_err(|_| NotJson)?;
        self.pos = i + 1;
        let _ = write_str(self.out, &text);
        Ok(())
    }

    fn number(&mut self) -> Result<(), NotJson> {
        let start = self.pos;
        let mut i = start;
        if self.s[i] == b'-' {
            i += 1;
        }
        let digits_start = i;
        while let Some(b'0'..=b'9') = self.s.get(i) {
            i += 1;
        }
        let digits = &self.s[digits_start..i];
        let plain = !matches!(self.s.get(i), Some(b'.' | b'e' | b'E'));
        let leading_zero = digits.len() > 1 && digits[0] == b'0';
        if plain && !digits.is_empty() && !leading_zero && digits.len() <= 18 {
            // Fits in an i64 either way: the common case, read here.
            let v = digits
                .iter()
                .fold(0i64, |acc, &d| acc * 10 + i64::from(d - b'0'));
            self.pos = i;
            if digits_start == start {
                let _ = write_uint(self.out, v as u64);
                return Ok(());
            }
            if v != 0 {
                let _ = write_sint(self.out, -v);
                return Ok(());
            }
        }
        // Anything else (fractions, exponents, big integers, `-0`, malformed): as serde_json
        // reads the number token.
        while let Some(b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') = self.s.get(i) {
            i += 1;
        }
        let n: serde_json::Number =
            serde_json::from_str(&self.text[start..i]).map_err(|_| NotJson)?;
        self.pos = i;
        if let Some(u) = n.as_u64() {
            let _ = write_uint(self.out, u);
        } else if let Some(s) = n.as_i64() {
            let _ = write_sint(self.out, s);
        } else {
            let _ = write_f64(self.out, n.as_f64().ok_or(NotJson)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// What serde_json through serde-transcode into rmp-serde makes of `text`.
    fn reference(text: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut de = serde_json::Deserializer::from_str(text);
        let ok = {
            let mut ser = rmp_serde::Serializer::new(&mut out);
            serde_transcode::transcode(&mut de, &mut ser).is_ok()
        };
        (ok && de.end().is_ok()).then_some(out)
    }

    fn ours(text: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        json_to_msgpack(text, &mut out).ok().map(|()| out)
    }

    #[test]
    fn the_same_bytes_as_serde_and_the_same_refusals() {
        let texts = [
            r#"{"id": 1, "title": "héllo \"you\"", "body": "x", "n": -3, "f": 1.5e3, "ok": true}"#,
            r#" {"nested": {"a": [1, 2, {"b": null}]}, "big": 18446744073709551615} "#,
            r#""just a string""#,
            "[1, 2, 3]",
            "[]",
            "{}",
            "0",
            "-0",
            "-1",
            "-32",
            "-33",
            "127",
            "128",
            "-9223372036854775808",
            "-9223372036854775809",
            "18446744073709551616",
            "999999999999999999",
            "1e400",
            "0.1",
            "1E2",
            "-1.5e-3",
            "\"\\u00e9\\ud83d\\ude00 \\n\\t\\\\ \\/\"",
            "\"\\ud83d\"",
            "\"a\u{1}b\"",
            "\"tab\there\"",
            "01",
            "1.",
            ".5",
            "+1",
            "-",
            "--1",
            "1e",
            "[1,]",
            "[1 2]",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "{1: 2}",
            "nul",
            "true false",
            "",
            "   ",
            "\"unterminated",
            "\"ends with backslash\\",
            "[\"a\\\"]\"]",
            "{\"k\": \"v\", \"k\": \"w\"}",
        ];
        for t in texts {
            assert_eq!(ours(t), reference(t), "{t:?}");
        }
        // Lengths past the one-byte headers.
        let long: Vec<Value> = (0..70_000).map(Value::from).collect();
        let text = serde_json::to_string(&long).unwrap();
        assert_eq!(ours(&text), reference(&text));
        let obj: serde_json::Map<String, Value> = (0..300)
            .map(|i| (format!("k{i}"), Value::from(i)))
            .collect();
        let text = serde_json::to_string(&obj).unwrap();
        assert_eq!(ours(&text), reference(&text));
        let text = format!("\"{}\"", "x".repeat(70_000));
        assert_eq!(ours(&text), reference(&text));
    }

    #[test]
    fn nesting_stops_where_serde_json_stops() {
        for depth in [126, 127, 128, 129, 130, 1000] {
            let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            assert_eq!(ours(&text).is_some(), reference(&text).is_some(), "{depth}");
            let text = format!(
                "{}1{}",
                "{\"a\":[".repeat(depth / 2),
                "]}".repeat(depth / 2)
            );
            assert_eq!(ours(&text).is_some(), reference(&text).is_some(), "{depth}");
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,20}".prop_map(Value::String),
            ".{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 64, 20, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..20).prop_map(Value::Array),
                prop::collection::btree_map("\\PC{0,8}", inner, 0..20)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn agrees_with_serde_on_generated_documents(v in json_value(), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            };
            prop_assert_eq!(ours(&text), reference(&text));
        }

        #[test]
        fn agrees_with_serde_on_damaged_documents(
            v in json_value(),
            cut in any::<prop::sample::Index>(),
            byte in prop::sample::select(vec![b'"', b'\\', b',', b']', b'}', b'{', b'-', b'e', b'0', b'x', b' ']),
        ) {
            let text = serde_json::to_string(&v).unwrap();
            let at = cut.index(text.len() + 1);
            if text.is_char_boundary(at) {
                let mut damaged = text.as_bytes().to_vec();
                damaged.insert(at, byte);
                let damaged = String::from_utf8(damaged).unwrap();
                prop_assert_eq!(ours(&damaged), reference(&damaged), "{:?}", damaged);
                prop_assert_eq!(ours(&text[..at]), reference(&text[..at]));
            }
        }
    }
}
