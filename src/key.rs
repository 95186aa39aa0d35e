//! Store keys: what is left of a request path once the URL prefix is stripped.
//!
//! A [`Key`] can only be built through [`Key::parse`] (or [`Key::from_request_path`]), which
//! refuses everything that could step outside a store's root: `.` and `..` segments, empty
//! segments, backslashes, NUL and other control characters, absolute paths. Every store can
//! then join a key under its root without further checks (the fs store still checks symlinks).

use std::fmt;

use percent_encoding::percent_decode_str;

/// What is wrong with one `/`-separated segment of a key, if anything.
fn segment(seg: &[u8]) -> Option<&'static str> {
    match seg {
        b"" => Some("empty path segment"),
        b"." | b".." => Some("dot segment"),
        _ => None,
    }
}

/// Why a path is not a valid key (always answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key: {0}")]
pub struct KeyError(pub &'static str);

/// A validated, percent-decoded key such as `media_attachments/files/000/000/001/original/a.png`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// Validates an already decoded key.
    pub fn parse(s: &str) -> Result<Key, KeyError> {
        if s.is_empty() {
            return Err(KeyError("empty"));
        }
        if s.len() > 1024 {
            return Err(KeyError("longer than 1024 bytes"));
        }
        if s.starts_with('/') {
            return Err(KeyError("absolute path"));
        }
        // One pass over the bytes (this runs on every media request; `contains`, a `chars`
        // walk and a `split` were three): most bytes of a key (letters, digits, `_`) are
        // past `/` and below DEL and pass one comparison. Faults are reported in a fixed
        // order whatever their place in the key.
        let bytes = s.as_bytes();
        let (mut backslash, mut control, mut non_ascii) = (false, false, false);
        let mut segment_fault = None;
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if b > b'/' && b < 0x7f && b != b'\\' {
                continue;
            }
            match b {
                b'\\' => backslash = true,
                b'/' => {
                    segment_fault = segment_fault.or(segment(&bytes[start..i]));
                    start = i + 1;
                }
                0..=0x1f | 0x7f => control = true,
                0x80.. => non_ascii = true,
                _ => {}
            }
        }
        segment_fault = segment_fault.or(segment(&bytes[start..]));
        if backslash {
            return Err(KeyError("backslash"));
        }
        // Beyond ASCII, the C1 controls (U+0080 to U+009F) too.
        if control || (non_ascii && s.chars().any(|c| c.is_control())) {
            return Err(KeyError("control character"));
        }
        match segment_fault {
            Some(fault) => Err(KeyError(fault)),
            None => Ok(Key(s.to_owned())),
        }
    }

    /// Strips `prefix` from a raw request path (query already removed), percent-decodes the
    /// rest and validates it. `Ok(None)` when the path is not under the prefix.
    pub fn from_request_path(path: &str, prefix: &str) -> Result<Option<Key>, KeyError> {
        let Some(rest) = path.strip_prefix(prefix) else {
            return Ok(None);
        };
        if !rest.as_bytes().contains(&b'%') {
            // Nothing to decode, and a `str` already.
            return Key::parse(rest).map(Some);
        }
        let decoded = percent_decode_str(rest)
            .decode_utf8()
            .map_err(|_| KeyError("not UTF-8 after percent-decoding"))?;
        Key::parse(&decoded).map(Some)
    }

    /// The key as a `/`-separated relative path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Content-Type from the key's extension, for sources that give none.
    pub fn guess_content_type(&self) -> &'static str {
        mime_guess::from_path(&self.0)
            .first_raw()
            .unwrap_or("application/octet-stream")
    }

    /// The key percent-encoded for use in a URL path (slashes kept).
    pub fn url_encoded(&self) -> String {
        use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
        // Everything but unreserved characters and '/' (RFC 3986 path segments).
        const PATH: &AsciiSet = &CONTROLS
            .add(b' ')
            .add(b'"')
            .add(b'#')
            .add(b'%')
            .add(b'<')
            .add(b'>')
            .add(b'?')
            .add(b'[')
            .add(b']')
            .add(b'^')
            .add(b'`')
            .add(b'{')
            .add(b'|')
            .add(b'}')
            .add(b'+')
            .add(b'&')
            .add(b';')
            .add(b'=');
        utf8_percent_encode(&self.0, PATH).to_string()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_mastodon_keys() {
        let k = Key::from_request_path(
            "/system/cache/media_attachments/files/109/348/502/375/432/917/original/ab12.png",
            "/system/",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            k.as_str(),
            "cache/media_attachments/files/109/348/502/375/432/917/original/ab12.png"
        );
        assert_eq!(
            Key::parse("a b/ü.png").unwrap().url_encoded(),
            "a%20b/%C3%BC.png"
        );
    }

    #[test]
    fn refuses_escapes() {
        for bad in [
            "/system/../etc/passwd",
            "/system/a/%2e%2e/b",
            "/system/%2e%2e%2fetc",
            "/system/a/./b",
            "/system/a%5cb",
            "/system/a%00b",
            "/system/%2fetc/passwd",
            "/system/a//b",
            "/system/",
            "/system/%ff",
        ] {
            assert!(
                Key::from_request_path(bad, "/system/").is_err(),
                "{bad} was accepted"
            );
        }
        assert_eq!(Key::from_request_path("/other/a", "/system/"), Ok(None));
    }

    /// The checks as they were written first (one pass each), kept as the reference the
    /// one-pass `parse` must agree with.
    fn reference(s: &str) -> Result<(), KeyError> {
        if s.is_empty() {
            return Err(KeyError("empty"));
        }
        if s.len() > 1024 {
            return Err(KeyError("longer than 1024 bytes"));
        }
        if s.starts_with('/') {
            return Err(KeyError("absolute path"));
        }
        if s.contains('\\') {
            return Err(KeyError("backslash"));
        }
        if s.chars().any(|c| c.is_control()) {
            return Err(KeyError("control character"));
        }
        for segment in s.split('/') {
            match segment {
                "" => return Err(KeyError("empty path segment")),
                "." | ".." => return Err(KeyError("dot segment")),
                _ => {}
            }
        }
        Ok(())
    }

    /// Every string of up to four pieces from a set with each fault (and none), alone and
    /// together: `parse` answers as the reference does, error for error.
    #[test]
    fn parse_agrees_with_the_reference_checks() {
        let pieces = [
            "a", "b.png", "/", ".", "..", "\\", "\u{0}", "\u{1f}", "\u{7f}", "\u{85}", "ü", "-",
            "~", " ", "%",
        ];
        let mut n = 0;
        let mut walk = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for s in &walk {
                for p in pieces {
                    let t = format!("{s}{p}");
                    assert_eq!(
                        Key::parse(&t).map(|k| k.0),
                        reference(&t).map(|()| t.clone()),
                        "{t:?}"
                    );
                    n += 1;
                    next.push(t);
                }
            }
            walk = next;
        }
        assert_eq!(n, 15 + 15 * 15 + 15 * 15 * 15 + 15 * 15 * 15 * 15);
        assert!(Key::parse(&"a".repeat(1025)).is_err());
    }
}
