//! A small MessagePack reader over a byte slice: walks values without decoding them, so that
//! a batch's records can be found (and a field read out of one) with no allocation.
//!
//! Every read checks the bounds of the slice; a truncated or forged value reads as `None`,
//! never as a panic. Nothing here validates UTF-8: that is done where text is taken out
//! ([`Reader::str`]).

/// A cursor over MessagePack bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes read so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Whether every byte was read.
    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn byte(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    /// A big-endian unsigned number of `n` bytes (1, 2, 4 or 8).
    fn be(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        )
    }

    /// The length that follows a marker whose length field has `n` bytes.
    fn len(&mut self, n: usize) -> Option<usize> {
        usize::try_from(self.be(n)?).ok()
    }

    /// A map's length (entries), or None (nothing read) when the next value is no map.
    pub fn map_len(&mut self) -> Option<usize> {
        self.container_len([0x80, 0xde, 0xdf])
    }

    /// An array's length, or None (nothing read) when the next value is no array.
    pub fn array_len(&mut self) -> Option<usize> {
        self.container_len([0x90, 0xdc, 0xdd])
    }

    /// The length after a container marker: `markers` are the fix marker (the length in its low
    /// nibble), then those with a 16-bit and a 32-bit length. None (nothing read) otherwise.
    fn container_len(&mut self, markers: [u8; 3]) -> Option<usize> {
        let start = self.pos;
        let b = self.byte()?;
        let n = if b & 0xf0 == markers[0] {
            Some(usize::from(b & 0x0f))
        } else if b == markers[1] {
            self.len(2)
        } else if b == markers[2] {
            self.len(4)
        } else {
            None
        };
        if n.is_none() {
            self.pos = start;
        }
        n
    }

    /// The bytes of a string (or of binary data), unchecked; None (nothing read) when the
    /// next value is neither.
    pub fn raw_str(&mut self) -> Option<&'a [u8]> {
        let start = self.pos;
        let n = match self.byte()? {
            b @ 0xa0..=0xbf => Some(usize::from(b & 0x1f)),
            0xd9 | 0xc4 => self.len(1),
            0xda | 0xc5 => self.len(2),
            0xdb | 0xc6 => self.len(4),
            _ => None,
        };
        let s = n.and_then(|n| self.take(n));
        if s.is_none() {
            self.pos = start;
        }
        s
    }

    /// A string: None (nothing read) when the next value is no string or not UTF-8.
    pub fn str(&mut self) -> Option<&'a str> {
        let start = self.pos;
        let s = self.raw_str().and_then(|b| std::str::from_utf8(b).ok());
        if s.is_none() {
            self.pos = start;
        }
        s
    }

    /// A whole number that is not negative, in any of the integer encodings; None (nothing
    /// read) otherwise.
    pub fn uint(&mut self) -> Option<u64> {
        let start = self.pos;
        let signed = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        let v = match self.byte()? {
            b @ 0x00..=0x7f => Some(u64::from(b)),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
            0xd0 => signed(self.be(1).map(|v| i64::from(v as u8 as i8))),
            0xd1 => signed(self.be(2).map(|v| i64::from(v as u16 as i16))),
            0xd2 => signed(self.be(4).map(|v| i64::from(v as u32 as i32))),
            0xd3 => signed(self.be(8).map(|v| v as i64)),
            _ => None,
        };
        if v.is_none() {
            self.pos = start;
        }
        v
    }

    /// Skips one value (with everything inside it). None when the bytes end first or hold
    /// the one marker MessagePack never uses.
    pub fn skip(&mut self) -> Option<()> {
        // Values still to skip; each takes at least one byte, so more than the bytes left
        // cannot be real (this bounds the loop on forged lengths).
        let mut pending: usize = 1;
        while pending > 0 {
            pending -= 1;
            let extra = match self.byte()? {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
                b @ 0x80..=0x8f => {
                    pending += 2 * usize::from(b & 0x0f);
                    0
                }
                b @ 0x90..=0x9f => {
                    pending += usize::from(b & 0x0f);
                    0
                }
                b @ 0xa0..=0xbf => usize::from(b & 0x1f),
                0xc1 => return None,
                0xc4 | 0xd9 => self.len(1)?,
                0xc5 | 0xda => self.len(2)?,
                0xc6 | 0xdb => self.len(4)?,
                0xc7 => self.len(1)? + 1,
                0xc8 => self.len(2)? + 1,
                0xc9 => self.len(4)? + 1,
                0xca => 4,
                0xcb => 8,
                0xcc | 0xd0 => 1,
                0xcd | 0xd1 => 2,
                0xce | 0xd2 => 4,
                0xcf | 0xd3 => 8,
                0xd4 => 2,
                0xd5 => 3,
                0xd6 => 5,
                0xd7 => 9,
                0xd8 => 17,
                0xdc => {
                    pending = pending.checked_add(self.len(2)?)?;
                    0
                }
                0xdd => {
                    pending = pending.checked_add(self.len(4)?)?;
                    0
                }
                0xde => {
                    pending = pending.checked_add(self.len(2)?.checked_mul(2)?)?;
                    0
                }
                0xdf => {
                    pending = pending.checked_add(self.len(4)?.checked_mul(2)?)?;
                    0
                }
            };
            self.take(extra)?;
            if pending > self.buf.len() - self.pos {
                return None;
            }
        }
        Some(())
    }

    /// The bytes of the next value, skipped.
    pub fn value(&mut self) -> Option<&'a [u8]> {
        let start = self.pos;
        match self.skip() {
            Some(()) => Some(&self.buf[start..self.pos]),
            None => {
                self.pos = start;
                None
            }
        }
    }
}

/// The values under keys `names` of a MessagePack map, as their bytes, in one walk over the
/// map (the last one, should a key repeat, as a JSON object keeps it). All None when `record`
/// is no map or ends early.
pub fn fields<'a, const N: usize>(record: &'a [u8], names: [&str; N]) -> [Option<&'a [u8]>; N] {
    let walk = || {
        let mut found = [None; N];
        let mut r = Reader::new(record);
        let n = r.map_len()?;
        for _ in 0..n {
            match r.raw_str() {
                Some(k) => match names.iter().position(|name| name.as_bytes() == k) {
                    Some(at) => found[at] = Some(r.value()?),
                    None => r.skip()?,
                },
                // A key that is not text (no JSON record has one): skip it and its value.
                None => {
                    r.skip()?;
                    r.skip()?;
                }
            }
        }
        Some(found)
    };
    walk().unwrap_or([None; N])
}

/// The texts under keys `names` of a MessagePack map, in one walk: None for a key the map
/// lacks or whose value is no UTF-8 text.
pub fn str_fields<'a, const N: usize>(record: &'a [u8], names: [&str; N]) -> [Option<&'a str>; N] {
    fields(record, names).map(|v| v.and_then(|v| Reader::new(v).str()))
}

/// The value under key `name` of a MessagePack map, as its bytes (the last one, should the key
/// repeat, as a JSON object keeps it). None when `record` is no map or lacks the key.
pub fn field<'a>(record: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let [value] = fields(record, [name]);
    value
}

/// The text under key `name` of a MessagePack map: None when `record` is no map, lacks the
/// key, or holds no UTF-8 text there.
pub fn str_field<'a>(record: &'a [u8], name: &str) -> Option<&'a str> {
    let [text] = str_fields(record, [name]);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn mp(v: &Value) -> Vec<u8> {
        rmp_serde::to_vec(v).unwrap()
    }

    #[test]
    fn skips_every_kind_of_value_to_its_end() {
        let values = [
            json!(null),
            json!(true),
            json!(-1),
            json!(-200),
            json!(70_000),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1.5),
            json!("x".repeat(40)),
            json!("y".repeat(300)),
            json!("z".repeat(70_000)),
            json!([1, [2, [3, {"a": [4]}]], "s"]),
            json!((0..20).collect::<Vec<_>>()),
            json!((0..70_000).collect::<Vec<_>>()),
            json!({"title": "t", "body": "b", "n": {"deep": [1, 2.5, null]}}),
            Value::Object((0..20).map(|i| (format!("k{i}"), json!(i))).collect()),
        ];
        for v in &values {
            let mut bytes = mp(v);
            bytes.push(0xc0);
            let mut r = Reader::new(&bytes);
            assert_eq!(r.value().map(<[u8]>::len), Some(bytes.len() - 1), "{v}");
            r.skip().unwrap();
            assert!(r.at_end());
            // Cut short anywhere, it reads as nothing, never out of bounds.
            let len = bytes.len() - 1;
            let cuts: Vec<usize> = if len < 512 {
                (0..len).collect()
            } else {
                vec![0, 1, 2, 3, 5, 9, len / 2, len - 1]
            };
            for cut in cuts {
                let mut r = Reader::new(&bytes[..cut]);
                assert_eq!(r.value(), None, "{v} cut at {cut}");
                assert_eq!(r.pos(), 0);
            }
        }
    }

    #[test]
    fn forged_lengths_and_the_unused_marker_read_as_nothing() {
        // An array claiming 4 billion elements, a map claiming 2 billion entries.
        for bytes in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01][..],
            &[0xdf, 0x7f, 0xff, 0xff, 0xff, 0x01, 0x02],
            &[0xdb, 0xff, 0xff, 0xff, 0xff, b'a'],
            &[0xc1],
            &[0x91, 0xc1],
        ] {
            assert_eq!(Reader::new(bytes).skip(), None, "{bytes:?}");
        }
    }

    #[test]
    fn reads_numbers_strings_and_lengths() {
        for n in [
            0u64,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64,
            u64::MAX,
        ] {
            assert_eq!(Reader::new(&mp(&json!(n))).uint(), Some(n));
        }
        assert_eq!(Reader::new(&mp(&json!(-3))).uint(), None);
        // A signed encoding of a number that is not negative reads too.
        assert_eq!(Reader::new(&[0xd0, 0x05]).uint(), Some(5));
        assert_eq!(Reader::new(&mp(&json!("héllo"))).str(), Some("héllo"));
        assert_eq!(Reader::new(&[0xa2, 0xff, 0xfe]).str(), None);
        assert_eq!(Reader::new(&mp(&json!([1, 2, 3]))).array_len(), Some(3));
        assert_eq!(Reader::new(&mp(&json!({"a": 1}))).map_len(), Some(1));
        assert_eq!(Reader::new(&mp(&json!({"a": 1}))).array_len(), None);
    }

    #[test]
    fn a_field_reads_as_a_json_object_would_give_it() {
        let records = [
            json!({"title": "t", "body": "b"}),
            json!({"id": 3, "title": 5, "body": {"title": "inner"}}),
            json!({"x": [1, {"title": "no"}]}),
            json!(["title", "body"]),
            json!("title"),
            json!(null),
            json!({"title": "héllo \"you\"", "tags": ["a"], "body": ""}),
        ];
        for r in &records {
            let bytes = mp(r);
            for field in ["title", "body", "id", "x"] {
                assert_eq!(
                    str_field(&bytes, field),
                    r.get(field).and_then(Value::as_str),
                    "{r} {field}"
                );
            }
        }
        for r in &records {
            let bytes = mp(r);
            let names = ["title", "body", "id", "x"];
            assert_eq!(
                str_fields(&bytes, names),
                names.map(|f| str_field(&bytes, f)),
                "{r}"
            );
            assert_eq!(
                fields(&bytes, names),
                names.map(|f| field(&bytes, f)),
                "{r}"
            );
        }
        // Cut short, a record gives nothing, as `field` does.
        let whole = mp(&records[0]);
        for cut in 0..whole.len() {
            let part = &whole[..cut];
            assert_eq!(
                fields(part, ["title", "body"]),
                [field(part, "title"), field(part, "body")],
                "cut at {cut}"
            );
        }
        // A repeated key: the last one counts, as in a JSON object.
        let twice = [0x82, 0xa1, b'a', 0xa1, b'1', 0xa1, b'a', 0xa1, b'2'];
        assert_eq!(str_field(&twice, "a"), Some("2"));
        assert_eq!(str_fields(&twice, ["a", "b"]), [Some("2"), None]);
        assert_eq!(
            field(&mp(&json!({"id": [1]})), "id"),
            Some(&mp(&json!([1]))[..])
        );
        assert_eq!(field(&mp(&json!({"id": [1]})), "di"), None);
        // A value that is not UTF-8 is no string.
        let bad = [0x81, 0xa1, b'a', 0xa2, 0xff, 0xfe];
        assert_eq!(str_field(&bad, "a"), None);
    }
}
