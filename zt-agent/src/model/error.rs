//! Errors of the policy sources: every message names where (file and document),
//! which object and which field, so an operator can fix the manifest directly.

use std::fmt;

/// A problem at one field of one object; `path` is like `spec.ingress[0].ports[1].port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// Why a source (manifest directory) could not be loaded. Displayed as
/// `<location>: <object>: <field>: <message>`, parts omitted when unknown, e.g.
/// `policies.yaml doc 2: NetworkPolicy default/allow-x: spec.ingress[0].ports[1].port: ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceError {
    /// File and document (`policies.yaml doc 2`, `list.yaml doc 1 items[3]`) or a path.
    pub location: String,
    /// `Kind namespace/name` (or `Namespace name`) when known.
    pub object: Option<String>,
    /// Field path inside the object when known.
    pub field: Option<String>,
    pub message: String,
}

impl SourceError {
    pub fn at(location: impl Into<String>, message: impl Into<String>) -> Self {
        SourceError {
            location: location.into(),
            object: None,
            field: None,
            message: message.into(),
        }
    }

    pub fn object(location: impl Into<String>, object: impl Into<String>, err: FieldError) -> Self {
        SourceError {
            location: location.into(),
            object: Some(object.into()),
            field: (!err.path.is_empty()).then_some(err.path),
            message: err.message,
        }
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.location)?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(p) = &self.field {
            write!(f, ": {p}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for SourceError {}
