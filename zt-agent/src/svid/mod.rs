//! SPIFFE identity material (issue 10, first increment): where X509-SVIDs and trust bundles
//! come from and how the agent keeps them fresh. Not wired into the agent yet.
//!
//! - `spiffe_id`: SPIFFE IDs and trust domains as the specification spells them.
//! - `x509`: the leaf rules of an X509-SVID and the one list of rejection reasons.
//! - `source`: the `SvidSource` trait and its data (SVID with key, bundles per trust domain).
//!   Backends: `builtin` (an rcgen CA for the local mode and the demo, with root rotation),
//!   `files` (spiffe-helper's layout on disk) and `spire` (SPIRE's Delegated Identity API over
//!   the SPIRE agent's admin socket, streaming). The SPIFFE Broker API is not built.
//! - `spec`: `builtin` or `spire:<socket>`, as an operator names the backend.
//! - `cache`: refresh at half-life with jitter, last valid SVID kept on failure with capped
//!   backoff, the full set of roots per trust domain.
//! - `clock`: the injectable wall clock every decision reads.

pub mod builtin;
pub mod cache;
pub mod clock;
pub mod files;
pub mod source;
pub mod spec;
pub mod spiffe_id;
pub mod spire;
pub mod x509;
