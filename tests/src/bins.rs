//! Finds the project's binaries for the demo and tests: `$ZT_AGENT_BIN`-style variables
//! (set by `cargo xtask`), else next to the running executable in the cargo target dir.
use std::path::PathBuf;

use anyhow::{bail, Result};

pub fn find(name: &str) -> Result<PathBuf> {
    let var = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        if p.exists() {
            return Ok(p);
        }
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("cannot find the {name} binary: build it (cargo build -p zt-agent -p zt-tests --bins) or set ${var}")
}
