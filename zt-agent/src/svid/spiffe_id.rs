//! SPIFFE IDs as the SPIFFE ID specification defines them (`spiffe://<trust-domain><path>`).
//!
//! Stricter than a URI parser on purpose: a SPIFFE ID has one spelling, so two IDs are the same
//! workload exactly when their strings are equal. zt's own workload shape
//! (`/ns/<ns>/sa/<sa>`) is one path among many here; `model::ztp::SpiffePattern` judges that shape.

use std::fmt;

/// Longest SPIFFE ID the specification allows (bytes).
const MAX_LEN: usize = 2048;

/// A trust domain name: `[a-z0-9._-]+`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(s: &str) -> Result<TrustDomain, String> {
        if s.is_empty() {
            return Err("empty trust domain".into());
        }
        if let Some(c) = s.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')) {
            return Err(format!("trust domain {s:?} has the character {c:?} (allowed: a-z 0-9 . - _)"));
        }
        Ok(TrustDomain(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A workload's SPIFFE ID. The path is never empty: an ID without a path names the trust
/// domain itself, which no X509-SVID leaf may carry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Starts with `/`, segments `[A-Za-z0-9._-]+`, never `.` or `..`, no trailing `/`.
    path: String,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, String> {
        let bad = |why: String| format!("invalid SPIFFE ID {s:?}: {why}");
        if s.len() > MAX_LEN {
            return Err(bad(format!("longer than {MAX_LEN} bytes")));
        }
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| bad("the scheme is not spiffe://".into()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::parse(td).map_err(bad)?;
        if path.is_empty() {
            return Err(bad("no path (a trust domain ID names no workload)".into()));
        }
        for seg in path[1..].split('/') {
            if seg.is_empty() {
                return Err(bad("empty path segment (// or a trailing /)".into()));
            }
            if seg == "." || seg == ".." {
                return Err(bad(format!("path segment {seg:?}")));
            }
            if let Some(c) = seg.chars().find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_')) {
                return Err(bad(format!("path has the character {c:?} (allowed: A-Z a-z 0-9 . - _ and / between segments)")));
            }
        }
        Ok(SpiffeId { trust_domain, path: path.to_string() })
    }

    pub fn new(trust_domain: &TrustDomain, path: &str) -> Result<SpiffeId, String> {
        SpiffeId::parse(&format!("spiffe://{trust_domain}{path}"))
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_round_trip() {
        for s in ["spiffe://cluster.local/ns/default/sa/httpbin", "spiffe://a-b_c.d/x", "spiffe://td/zt/node/node-1"] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/a/sa/b");
    }

    #[test]
    fn invalid_ids_name_what_is_wrong() {
        for (s, why) in [
            ("https://td/x", "scheme"),
            ("SPIFFE://td/x", "scheme"),
            ("spiffe://td", "no path"),
            ("spiffe://td/", "empty path segment"),
            ("spiffe://td/x/", "empty path segment"),
            ("spiffe://td//x", "empty path segment"),
            ("spiffe://td/./x", "\".\""),
            ("spiffe://td/x/..", "\"..\""),
            ("spiffe://TD/x", "'T'"),
            ("spiffe:///x", "empty trust domain"),
            ("spiffe://td:443/x", "':'"),
            ("spiffe://user@td/x", "'@'"),
            ("spiffe://td/x?q=1", "'?'"),
            ("spiffe://td/x#f", "'#'"),
            ("spiffe://td/x%20", "'%'"),
        ] {
            let e = SpiffeId::parse(s).unwrap_err();
            assert!(e.contains(why), "{s}: {e} (want {why})");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_LEN));
        assert!(SpiffeId::parse(&long).unwrap_err().contains("longer than"));
    }
}
