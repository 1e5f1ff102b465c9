//! The Kubernetes source's state machine: watcher events in, `ClusterState` out.
//! Pure (no I/O), so the rules below are tested with typed objects and no network:
//!
//! - Nothing is compiled before every kind has been listed once (`synced`): until then
//!   the pinned maps keep enforcing what they held.
//! - A list (`Init` .. `InitDone`, the first one or a relist after 410 Gone / a
//!   restarted watch) is buffered and replaces that kind's objects at `InitDone`, all
//!   at once: objects deleted while the watch was down disappear then, not before.
//! - An object zt rejects keeps its previous good version (or stays absent); the rest
//!   proceeds. Every object passes `ClusterObject::normalize_and_validate`.
//! - Watch failures only mark the kind as down; the state is never flushed.

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::mpsc;

use crate::model::{ClusterObject, ClusterState, ObjectKind};

/// One event of one kind's watcher (objects not validated yet).
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// A list of `kind` starts: the first one, or a relist.
    Init(ObjectKind),
    /// An object of the list in progress.
    InitApply(ClusterObject),
    /// The list of `kind` is complete.
    InitDone(ObjectKind),
    /// An object was added or changed.
    Apply(ClusterObject),
    /// An object was deleted (its last state).
    Delete(ClusterObject),
    /// The watch of `kind` failed (`Some(error)`) or reaches the API server again (`None`).
    Health(ObjectKind, Option<String>),
}

type Key = (ObjectKind, String, String);

/// What the source holds; see the module comment for the rules.
#[derive(Debug, Default)]
pub struct WatchCache {
    state: ClusterState,
    /// Kinds listed at least once.
    listed: BTreeSet<ObjectKind>,
    /// Lists in progress: what will replace the kind at `InitDone`.
    listing: BTreeMap<ObjectKind, Listing>,
    /// Objects whose latest version was rejected, with the reason.
    rejected: BTreeMap<Key, String>,
    /// Kinds whose watch is failing, with the last error.
    down: BTreeMap<ObjectKind, String>,
    /// The agent's trust domain: policies naming another one are rejected per object.
    trust_domain: Option<String>,
    /// Counters for metrics: events by (kind, type), completed relists, watch errors.
    pub events: BTreeMap<(ObjectKind, &'static str), u64>,
    pub relists: BTreeMap<ObjectKind, u64>,
    pub errors: BTreeMap<ObjectKind, u64>,
}

/// A list in progress.
#[derive(Debug, Default)]
struct Listing {
    /// What the kind will hold (accepted objects, previous versions of rejected ones).
    objects: Vec<ClusterObject>,
    /// Every listed key, rejected or not.
    seen: BTreeSet<(String, String)>,
}

/// Result of one event: did the accepted state change, and was an object rejected
/// (the message names kind, namespace/name, field and problem).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changed: bool,
    pub rejected: Option<String>,
}

/// What a batch of events did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub events: usize,
    pub changed: bool,
    pub rejected: Vec<String>,
}

/// Upper bound of one batch, so that a never-ending stream still gets compiled.
pub const MAX_BATCH: usize = 100_000;

impl WatchCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also reject ZeroTrustPolicies whose SPIFFE IDs are of another trust domain
    /// (which would otherwise fail the whole compile).
    pub fn with_trust_domain(mut self, trust_domain: &str) -> Self {
        self.trust_domain = Some(trust_domain.to_string());
        self
    }

    /// Applies `first` and everything already queued behind it: the caller compiles
    /// once per batch, so a burst of events costs a few compiles, not one per event.
    pub fn apply_pending(&mut self, first: SourceEvent, rx: &mut mpsc::Receiver<SourceEvent>) -> Batch {
        let mut b = Batch::default();
        let mut next = Some(first);
        while let Some(ev) = next.take() {
            let a = self.apply(ev);
            b.events += 1;
            b.changed |= a.changed;
            b.rejected.extend(a.rejected);
            if b.events < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        b
    }

    /// The accepted objects.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Every kind has been listed once: the state is complete enough to enforce.
    pub fn synced(&self) -> bool {
        ObjectKind::ALL.iter().all(|k| self.listed.contains(k))
    }

    /// No watch is failing.
    pub fn up(&self) -> bool {
        self.down.is_empty()
    }

    pub fn down(&self) -> &BTreeMap<ObjectKind, String> {
        &self.down
    }

    /// Objects currently held at an older version (or absent) because their latest
    /// version was rejected.
    pub fn rejected(&self) -> &BTreeMap<Key, String> {
        &self.rejected
    }

    pub fn apply(&mut self, ev: SourceEvent) -> Applied {
        match ev {
            SourceEvent::Init(kind) => {
                // A list that failed halfway restarts with a new Init: start over.
                self.listing.insert(kind, Listing::default());
                Applied::default()
            }
            SourceEvent::InitApply(mut obj) => {
                let kind = obj.kind();
                obj.normalize();
                self.count(kind, "list");
                let key = obj.key();
                let (keep, rejected) = self.admit(obj);
                match self.listing.get_mut(&kind) {
                    Some(l) => {
                        l.seen.insert(key);
                        l.objects.extend(keep);
                    }
                    // No Init seen (cannot happen with kube-runtime): treat as an update.
                    None => {
                        let changed = keep.map(|o| self.upsert(o)).unwrap_or(false);
                        return Applied { changed, rejected };
                    }
                }
                Applied { changed: false, rejected }
            }
            SourceEvent::InitDone(kind) => {
                let Some(Listing { objects, seen }) = self.listing.remove(&kind) else {
                    return Applied::default();
                };
                if !self.listed.insert(kind) {
                    *self.relists.entry(kind).or_default() += 1;
                }
                // Objects no longer listed are gone, and no longer rejected either.
                self.rejected
                    .retain(|(k, ns, n), _| *k != kind || seen.contains(&(ns.clone(), n.clone())));
                let before = self.state.objects(kind);
                self.state.replace_kind(kind, objects);
                Applied {
                    changed: self.state.objects(kind) != before,
                    rejected: None,
                }
            }
            SourceEvent::Apply(obj) => {
                self.count(obj.kind(), "apply");
                let (keep, rejected) = self.admit(obj);
                let changed = keep.map(|o| self.upsert(o)).unwrap_or(false);
                Applied { changed, rejected }
            }
            SourceEvent::Delete(mut obj) => {
                let kind = obj.kind();
                self.count(kind, "delete");
                obj.normalize();
                let (ns, name) = obj.key();
                self.rejected.remove(&(kind, ns.clone(), name.clone()));
                Applied {
                    changed: self.state.remove(kind, &ns, &name),
                    rejected: None,
                }
            }
            SourceEvent::Health(kind, err) => {
                match err {
                    Some(e) => {
                        *self.errors.entry(kind).or_default() += 1;
                        self.down.insert(kind, e);
                    }
                    None => {
                        self.down.remove(&kind);
                    }
                }
                Applied::default()
            }
        }
    }

    fn count(&mut self, kind: ObjectKind, what: &'static str) {
        *self.events.entry((kind, what)).or_default() += 1;
    }

    /// Validates `obj`. Returns what to hold for its key (the object, or the previous
    /// good version when it is rejected, or nothing) and the rejection message.
    fn admit(&mut self, mut obj: ClusterObject) -> (Option<ClusterObject>, Option<String>) {
        let kind = obj.kind();
        let checked = obj.normalize_and_validate().and_then(|()| match (&obj, &self.trust_domain) {
            (ClusterObject::ZeroTrustPolicy(p), Some(td)) => crate::model::ztp::check_trust_domain(p, td),
            _ => Ok(()),
        });
        match checked {
            Ok(()) => {
                let (ns, name) = obj.key();
                self.rejected.remove(&(kind, ns, name));
                (Some(strip(obj)), None)
            }
            Err(e) => {
                let (ns, name) = obj.key();
                let previous = self.state.get(kind, &ns, &name);
                let what = if previous.is_some() {
                    "its previous version stays in force"
                } else {
                    "it is ignored"
                };
                let msg = format!("{}: {e} ({what})", obj.describe());
                self.rejected.insert((kind, ns, name), msg.clone());
                (previous, Some(msg))
            }
        }
    }

    /// Upsert unless identical; true if the state changed.
    fn upsert(&mut self, obj: ClusterObject) -> bool {
        let (ns, name) = obj.key();
        if self.state.get(obj.kind(), &ns, &name).as_ref() == Some(&obj) {
            return false;
        }
        self.state.upsert(obj);
        true
    }
}

/// Drops what the agent never reads and that changes on every write (managedFields is
/// also most of a Pod's size).
fn strip(mut obj: ClusterObject) -> ClusterObject {
    let meta = obj.metadata_mut();
    meta.managed_fields = None;
    meta.resource_version = None;
    obj
}

#[cfg(test)]
mod tests;
