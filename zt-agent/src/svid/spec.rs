//! How an operator names the SVID backend: `builtin` (the rcgen CA of the local mode and the
//! demo), `spire:<admin socket>` (SPIRE's Delegated Identity API), with the selectors that
//! describe the node's own SVID to SPIRE (`k8s:ns:zt-system,k8s:sa:zt-agent` by default:
//! zt-agent's DaemonSet pod, as deploy/ installs it), or `files:<directory>` (SVIDs another
//! tool keeps on disk in spiffe-helper's layout, one directory per SPIFFE ID under it,
//! `svid::files`). The agent's flags parse into this.

use std::path::PathBuf;
use std::str::FromStr;

use super::spire::{Selector, SpireConfig};

/// The node selectors when none are given.
pub const DEFAULT_NODE_SELECTORS: &str = "k8s:ns:zt-system,k8s:sa:zt-agent";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SvidSourceSpec {
    Builtin,
    Spire { socket: PathBuf },
    /// `<dir>/<trust domain><path>/` holds each SPIFFE ID's files.
    Files { dir: PathBuf },
}

impl FromStr for SvidSourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<SvidSourceSpec, String> {
        match s.split_once(':') {
            None if s == "builtin" => Ok(SvidSourceSpec::Builtin),
            Some(("spire", path)) if path.starts_with('/') => Ok(SvidSourceSpec::Spire { socket: path.into() }),
            Some(("spire", path)) => Err(format!("SVID source {s:?}: the SPIRE admin socket must be an absolute path, not {path:?}")),
            Some(("files", path)) if path.starts_with('/') => Ok(SvidSourceSpec::Files { dir: path.into() }),
            Some(("files", path)) => Err(format!("SVID source {s:?}: the SVID directory must be an absolute path, not {path:?}")),
            _ => Err(format!(
                "SVID source {s:?}: expected `builtin`, `spire:<SPIRE agent admin socket>` (e.g. spire:/run/spire/admin.sock) or `files:<directory>` (e.g. files:/run/zt/svids)"
            )),
        }
    }
}

/// As the flag spells it.
impl std::fmt::Display for SvidSourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SvidSourceSpec::Builtin => f.write_str("builtin"),
            SvidSourceSpec::Spire { socket } => write!(f, "spire:{}", socket.display()),
            SvidSourceSpec::Files { dir } => write!(f, "files:{}", dir.display()),
        }
    }
}

/// Comma-separated `type:value` selectors.
pub fn parse_selectors(s: &str) -> Result<Vec<Selector>, String> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(Selector::parse).collect()
}

impl SvidSourceSpec {
    /// The SPIRE backend's configuration, for `spire:`.
    pub fn spire_config(&self, node_name: &str, node_selectors: &str) -> Result<Option<SpireConfig>, String> {
        let SvidSourceSpec::Spire { socket } = self else { return Ok(None) };
        let mut cfg = SpireConfig::new(socket.clone());
        cfg.node_name = Some(node_name.to_string());
        cfg.node_selectors = parse_selectors(node_selectors)?;
        if cfg.node_selectors.is_empty() {
            return Err("the SPIRE node selectors are empty: the node's own SVID could not be asked for".into());
        }
        Ok(Some(cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_names_what_is_wrong() {
        assert_eq!("builtin".parse(), Ok(SvidSourceSpec::Builtin));
        assert_eq!("files:/run/zt/svids".parse(), Ok(SvidSourceSpec::Files { dir: "/run/zt/svids".into() }));
        assert!("files:svids".parse::<SvidSourceSpec>().unwrap_err().contains("SVID directory must be an absolute path"));
        assert_eq!("spire:/run/spire/admin.sock".parse(), Ok(SvidSourceSpec::Spire { socket: "/run/spire/admin.sock".into() }));
        assert!("spire:admin.sock".parse::<SvidSourceSpec>().unwrap_err().contains("absolute path"));
        assert!("vault".parse::<SvidSourceSpec>().unwrap_err().contains("expected `builtin`, `spire:"));
        let cfg = SvidSourceSpec::Spire { socket: "/s".into() }.spire_config("n1", DEFAULT_NODE_SELECTORS).unwrap().unwrap();
        assert_eq!(cfg.node_selectors, vec![Selector::new("k8s", "ns:zt-system"), Selector::new("k8s", "sa:zt-agent")]);
        assert_eq!(cfg.node_name.as_deref(), Some("n1"));
        assert!(SvidSourceSpec::Spire { socket: "/s".into() }.spire_config("n1", " , ").unwrap_err().contains("empty"));
        assert!(SvidSourceSpec::Spire { socket: "/s".into() }.spire_config("n1", "k8s").unwrap_err().contains("type:value"));
        assert!(SvidSourceSpec::Builtin.spire_config("n1", "").unwrap().is_none());
    }
}
