//! Request paths as the proxy judges them: percent-decoded, dot segments removed, runs of
//! slashes merged. What could be read two ways by the server behind the proxy (an encoded
//! slash or backslash, an encoded percent, a bad escape, a NUL or control byte, a raw
//! backslash, a fragment, a target that is no origin-form path) is rejected: the proxy
//! answers 400 instead of guessing. The normalised path (re-encoded) is what goes upstream,
//! so the server sees exactly the path that was judged.

/// Why a request target was rejected (400).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ambiguous {
    /// Not origin-form (`http://host/p`, `*`, empty, no leading slash).
    NotOriginForm,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F`, `%5C`: an encoded separator the server may or may not split on.
    EncodedSeparator,
    /// `%25`: an encoded percent (a second decoding would change the path).
    EncodedPercent,
    /// NUL or another control byte, raw or encoded.
    ControlByte,
    /// A raw backslash (some servers take it for a slash).
    Backslash,
    /// `#` in a request target.
    Fragment,
    /// The decoded bytes are not UTF-8.
    NotUtf8,
}

impl Ambiguous {
    pub fn name(self) -> &'static str {
        match self {
            Ambiguous::NotOriginForm => "not an origin-form path",
            Ambiguous::BadEscape => "bad percent escape",
            Ambiguous::EncodedSeparator => "encoded slash or backslash",
            Ambiguous::EncodedPercent => "encoded percent sign",
            Ambiguous::ControlByte => "control byte",
            Ambiguous::Backslash => "backslash",
            Ambiguous::Fragment => "fragment",
            Ambiguous::NotUtf8 => "not UTF-8 once decoded",
        }
    }
}

/// A request target split into its normalised, decoded path and its query (as sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub path: String,
    pub query: Option<String>,
}

impl Target {
    /// The target to send upstream: the normalised path re-encoded, then the query.
    pub fn upstream(&self) -> String {
        let mut s = encode(&self.path);
        if let Some(q) = &self.query {
            s.push('?');
            s.push_str(q);
        }
        s
    }
}

/// Normalises an origin-form request target (`/a/b?q`).
pub fn target(raw: &str) -> Result<Target, Ambiguous> {
    if raw.contains('#') {
        return Err(Ambiguous::Fragment);
    }
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (raw, None),
    };
    Ok(Target { path: path_of(path)?, query })
}

/// Normalises a path (no query): decode, then merge slashes and remove dot segments.
pub fn path_of(raw: &str) -> Result<String, Ambiguous> {
    if !raw.starts_with('/') {
        return Err(Ambiguous::NotOriginForm);
    }
    let decoded = decode(raw.as_bytes())?;
    let decoded = String::from_utf8(decoded).map_err(|_| Ambiguous::NotUtf8)?;
    Ok(remove_dots(&decoded))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode(raw: &[u8]) -> Result<Vec<u8>, Ambiguous> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        let c = if b == b'%' {
            let (Some(h), Some(l)) = (raw.get(i + 1).copied().and_then(hex), raw.get(i + 2).copied().and_then(hex)) else {
                return Err(Ambiguous::BadEscape);
            };
            i += 3;
            let c = h << 4 | l;
            match c {
                b'/' | b'\\' => return Err(Ambiguous::EncodedSeparator),
                b'%' => return Err(Ambiguous::EncodedPercent),
                _ => c,
            }
        } else {
            if b == b'\\' {
                return Err(Ambiguous::Backslash);
            }
            i += 1;
            b
        };
        if c < 0x20 || c == 0x7f {
            return Err(Ambiguous::ControlByte);
        }
        out.push(c);
    }
    Ok(out)
}

/// RFC 3986 5.2.4 on a decoded absolute path, empty segments (`//`) dropped. `..` at the
/// root stays at the root. A trailing slash (or a trailing `.`/`..`) keeps a trailing slash.
fn remove_dots(path: &str) -> String {
    let mut segs: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let mut trailing = false;
    for (i, s) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *s {
            "" => trailing = last,
            "." => trailing = last,
            ".." => {
                segs.pop();
                trailing = last;
            }
            s => {
                segs.push(s);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

/// Percent-encodes what is not allowed raw in a path segment (RFC 3986 pchar) or is `%`.
fn encode(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        let raw = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b);
        if raw {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        target(raw).unwrap_or_else(|e| panic!("{raw}: {e:?}")).path
    }

    #[test]
    fn dot_segments_and_slashes() {
        assert_eq!(ok("/headers"), "/headers");
        assert_eq!(ok("/headers/../post"), "/post");
        assert_eq!(ok("/a/./b/../../c"), "/c");
        assert_eq!(ok("/../../etc"), "/etc");
        assert_eq!(ok("//post"), "/post");
        assert_eq!(ok("/a//b///c"), "/a/b/c");
        assert_eq!(ok("/a/b/"), "/a/b/");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/."), "/a/");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/.."), "/");
    }

    #[test]
    fn percent_decoding_before_dots() {
        assert_eq!(ok("/headers/%2e%2e/post"), "/post");
        assert_eq!(ok("/headers/%2E./post"), "/post");
        assert_eq!(ok("/%70ost"), "/post");
        assert_eq!(ok("/a%20b"), "/a b");
    }

    #[test]
    fn query_is_kept_and_not_judged() {
        let t = target("/get/../headers?x=/post&y=%2F").unwrap();
        assert_eq!(t.path, "/headers");
        assert_eq!(t.query.as_deref(), Some("x=/post&y=%2F"));
        assert_eq!(t.upstream(), "/headers?x=/post&y=%2F");
    }

    #[test]
    fn upstream_is_reencoded() {
        assert_eq!(target("/a%20b/%7e").unwrap().upstream(), "/a%20b/~");
        assert_eq!(target("/%c3%a9").unwrap().upstream(), "/%C3%A9");
    }

    #[test]
    fn ambiguous_targets_are_rejected() {
        for (raw, why) in [
            ("/a%2fb", Ambiguous::EncodedSeparator),
            ("/a%2Fb", Ambiguous::EncodedSeparator),
            ("/a%5cb", Ambiguous::EncodedSeparator),
            ("/a%252e%252e/post", Ambiguous::EncodedPercent),
            ("/a%zz", Ambiguous::BadEscape),
            ("/a%2", Ambiguous::BadEscape),
            ("/a%00b", Ambiguous::ControlByte),
            ("/a\\..\\post", Ambiguous::Backslash),
            ("/a#b", Ambiguous::Fragment),
            ("http://x/post", Ambiguous::NotOriginForm),
            ("*", Ambiguous::NotOriginForm),
            ("", Ambiguous::NotOriginForm),
            ("/%ff", Ambiguous::NotUtf8),
        ] {
            assert_eq!(target(raw), Err(why), "{raw}");
        }
    }
}
