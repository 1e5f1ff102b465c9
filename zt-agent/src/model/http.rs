//! HTTP rules of a ZeroTrustPolicy rule (`http: [{method, path, pathPrefix}]`), the names
//! Istio's AuthorizationPolicy and Cilium's `rules.http` users know. A rule's TCP ports
//! then carry requests only through the agent's HTTP proxy, which allows a request only if
//! one of the HTTP rules matches it (l7/rules.rs). Exact path and prefix only, no regex.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::error::FieldError;

/// One allowed kind of request: every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRule {
    /// The request method, exactly (`GET`, `POST`, ...). Absent = any method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The normalised request path, exactly (`/headers`). At most one of path and pathPrefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A prefix of the normalised request path (`/api/` matches `/api/v1`, not `/api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
}

impl HttpRule {
    /// Whether a request (method, normalised path) matches.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && self.path.as_deref().is_none_or(|p| p == path)
            && self.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
    }
}

impl std::fmt::Display for HttpRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.method.as_deref().unwrap_or("*");
        match (&self.path, &self.path_prefix) {
            (Some(p), _) => write!(f, "{m} {p}"),
            (None, Some(p)) => write!(f, "{m} {p}*"),
            (None, None) => write!(f, "{m} *"),
        }
    }
}

/// Checks the HTTP rules of one policy rule (`path` is like `spec.ingress[0]`).
/// `action_allow`: only allow rules may carry HTTP rules; `tcp_ports`: whether the rule
/// has ports, all of them TCP.
pub fn validate(path: &str, rules: &[HttpRule], action_allow: bool, tcp_ports: Result<(), String>) -> Result<(), FieldError> {
    let at = format!("{path}.http");
    if !action_allow {
        return Err(FieldError::new(at, "http rules allow requests: use them in allow rules only (a deny rule denies the whole port)"));
    }
    if rules.is_empty() {
        return Err(FieldError::new(at, "empty: list at least one request to allow, or leave http out"));
    }
    tcp_ports.map_err(|m| FieldError::new(&at, m))?;
    for (i, r) in rules.iter().enumerate() {
        let at = format!("{at}[{i}]");
        if r.method.is_none() && r.path.is_none() && r.path_prefix.is_none() {
            return Err(FieldError::new(at, "set at least one of method, path, pathPrefix"));
        }
        if r.path.is_some() && r.path_prefix.is_some() {
            return Err(FieldError::new(at, "set at most one of path and pathPrefix"));
        }
        if let Some(m) = &r.method {
            // An HTTP token, upper case: methods are case-sensitive and all registered ones are.
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
                return Err(FieldError::new(format!("{at}.method"), format!("{m:?} is not an upper-case HTTP method (GET, POST, ...)")));
            }
        }
        for (field, p) in [("path", &r.path), ("pathPrefix", &r.path_prefix)] {
            let Some(p) = p else { continue };
            check_path(p).map_err(|m| FieldError::new(format!("{at}.{field}"), m))?;
        }
    }
    Ok(())
}

/// A rule path must be what normalisation yields (requests are judged normalised): a
/// rule that no normalised request could match would silently deny.
fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} must start with /"));
    }
    if p.contains(['?', '#', '%', '\\']) {
        return Err(format!("{p:?}: write the decoded path, without query, fragment, percent escapes or backslashes"));
    }
    match crate::l7::normalise::path_of(p) {
        Ok(n) if n == p => Ok(()),
        Ok(n) => Err(format!("{p:?} is not normalised (requests are judged as {n:?}): no dot segments or repeated slashes")),
        Err(e) => Err(format!("{p:?}: {}", e.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(method: Option<&str>, path: Option<&str>, prefix: Option<&str>) -> HttpRule {
        HttpRule { method: method.map(Into::into), path: path.map(Into::into), path_prefix: prefix.map(Into::into) }
    }

    #[test]
    fn matching() {
        let get_headers = rule(Some("GET"), Some("/headers"), None);
        assert!(get_headers.matches("GET", "/headers"));
        assert!(!get_headers.matches("POST", "/headers"));
        assert!(!get_headers.matches("GET", "/headers/"));
        assert!(!get_headers.matches("get", "/headers"));
        let api = rule(None, None, Some("/api/"));
        assert!(api.matches("DELETE", "/api/v1"));
        assert!(!api.matches("GET", "/api"));
        assert!(rule(Some("GET"), None, None).matches("GET", "/anything"));
    }

    #[test]
    fn bad_rules_name_the_field() {
        let ok = || Ok(());
        let cases = [
            (vec![rule(Some("get"), None, None)], "spec.ingress[0].http[0].method"),
            (vec![rule(None, Some("headers"), None)], "spec.ingress[0].http[0].path"),
            (vec![rule(None, Some("/a/../b"), None)], "spec.ingress[0].http[0].path"),
            (vec![rule(None, None, Some("/a//"))], "spec.ingress[0].http[0].pathPrefix"),
            (vec![rule(None, Some("/a%2fb"), None)], "spec.ingress[0].http[0].path"),
            (vec![rule(None, None, None)], "spec.ingress[0].http[0]"),
            (vec![rule(None, Some("/a"), Some("/a"))], "spec.ingress[0].http[0]"),
            (vec![], "spec.ingress[0].http"),
        ];
        for (rules, field) in cases {
            let e = validate("spec.ingress[0]", &rules, true, ok()).unwrap_err();
            assert_eq!(e.path, field, "{rules:?}: {e}");
        }
        let e = validate("spec.ingress[0]", &[rule(Some("GET"), None, None)], false, ok()).unwrap_err();
        assert_eq!(e.path, "spec.ingress[0].http");
        let e = validate("spec.egress[1]", &[rule(Some("GET"), None, None)], true, Err("UDP".into())).unwrap_err();
        assert_eq!(e.path, "spec.egress[1].http");
        validate("spec.ingress[0]", &[rule(Some("GET"), Some("/headers"), None), rule(None, None, Some("/api/"))], true, ok()).unwrap();
    }
}
