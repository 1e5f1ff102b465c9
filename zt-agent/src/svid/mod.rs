//! SPIFFE identity material (issue 10): where X509-SVIDs and trust bundles come from and how
//! the agent keeps them fresh. The agent's node channels get theirs through `provider`.
//!
//! - `spiffe_id`: SPIFFE IDs and trust domains as the specification spells them.
//! - `x509`: the leaf rules of an X509-SVID and the one list of rejection reasons.
//! - `source`: the `SvidSource` trait and its data (SVID with key, bundles per trust domain).
//!   Backends: `builtin` (an rcgen CA for the local mode and the demo, with root rotation),
//!   `files` (spiffe-helper's layout on disk) and `spire` (SPIRE's Delegated Identity API over
//!   the SPIRE agent's admin socket, streaming). The SPIFFE Broker API is not built.
//! - `spec`: `builtin`, `spire:<socket>` or `files:<dir>`, as an operator names the backend.
//! - `cache`: refresh at half-life with jitter, last valid SVID kept on failure with capped
//!   backoff, the full set of roots per trust domain.
//! - `clock`: the injectable wall clock every decision reads.
//! - `provider`: the agent's one seam (`--svid-source`): the backend, its cache, the node SVID,
//!   the local pods' identities (SPIRE: described by a live pod's selectors) and its health.

pub mod builtin;
pub mod cache;
pub mod clock;
pub mod files;
pub mod provider;
pub mod source;
pub mod spec;
pub mod spiffe_id;
pub mod spire;
pub mod x509;
