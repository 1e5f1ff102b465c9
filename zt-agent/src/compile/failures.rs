//! Failure isolation: a policy that does not compile (a bad field, a selector on a key
//! identities leave out, more FQDN rules than an identity has slots) fails closed for
//! its own subjects only. Those local identities are quarantined: isolated in both
//! directions and given no allow from any policy, which is the one fail-closed choice
//! that cannot open anything (dropping only the failed policy could drop a deny it
//! held). Every other identity compiles as if the object were not there, so one
//! namespace's mistake never holds back another's new pod.

use std::collections::BTreeSet;

use zt_common::{DIR_EGRESS, DIR_INGRESS};

use super::{CompileError, Rules};
use crate::identity::LabelFilter;
use crate::model::k8s::LabelSelector;
use crate::state::{Action, Failure};

/// Where `Rules` stood before a policy, to take the policy back out if it fails.
pub(crate) struct Mark {
    rules: usize,
    infos: usize,
    fqdn: usize,
    isolated: std::collections::BTreeMap<u32, u32>,
}

impl Rules {
    pub fn mark(&self) -> Mark {
        Mark { rules: self.rules.len(), infos: self.infos.len(), fqdn: self.fqdn.len(), isolated: self.isolated.clone() }
    }

    /// Removes everything added since `m` (rule ids are numbered from `infos.len()`).
    pub fn rollback(&mut self, m: Mark) {
        self.rules.truncate(m.rules);
        self.fqdn.truncate(m.fqdn);
        let first_gone = self.id_base + m.infos as u32 + 1;
        self.infos.retain(|id, _| *id < first_gone);
        self.isolated = m.isolated;
    }
}

/// Compiles one object with `f`; if it fails, takes back what it added and records
/// the failure with the local identities that pay for it (`subjects`).
pub(crate) fn isolate_errors(
    out: &mut Rules,
    failures: &mut Vec<Failure>,
    object: &str,
    subjects: impl FnOnce() -> BTreeSet<u32>,
    f: impl FnOnce(&mut Rules) -> Result<(), CompileError>,
) {
    let mark = out.mark();
    if let Err(e) = f(out) {
        out.rollback(mark);
        failures.push(Failure { object: object.to_string(), error: e.to_string(), identities: subjects() });
    }
}

/// Quarantines `ids`: every allow rule loses them as subjects (denies stay: they only
/// take away), and they are isolated both ways.
pub(crate) fn quarantine(out: &mut Rules, ids: &BTreeSet<u32>) {
    if ids.is_empty() {
        return;
    }
    for r in out.rules.iter_mut().filter(|r| r.action == Action::Allow) {
        r.subjects.retain(|s| !ids.contains(s));
    }
    for r in &mut out.fqdn {
        r.subjects.retain(|s| !ids.contains(s));
    }
    out.isolate(ids, DIR_INGRESS);
    out.isolate(ids, DIR_EGRESS);
}

/// The first key of a pod selector that identities leave out. Such a requirement is
/// evaluated against labels no identity carries, so it would silently select nothing
/// (or everything, for NotIn/DoesNotExist): a policy naming one fails closed instead.
pub(crate) fn excluded_key<'s>(filter: &LabelFilter, sel: &'s LabelSelector) -> Option<&'s str> {
    let labels = sel.match_labels.iter().flatten().map(|(k, _)| k.as_str());
    let exprs = sel.match_expressions.iter().flatten().map(|r| r.key.as_str());
    labels.chain(exprs).find(|k| filter.excludes(k))
}

/// `sel` without its requirements on excluded keys: it selects at least the pods the
/// full selector meant, so quarantining what it selects covers the intended subjects.
pub(crate) fn without_excluded(filter: &LabelFilter, sel: &LabelSelector) -> LabelSelector {
    LabelSelector {
        match_labels: sel.match_labels.as_ref().map(|m| m.iter().filter(|(k, _)| !filter.excludes(k)).map(|(k, v)| (k.clone(), v.clone())).collect()),
        match_expressions: sel.match_expressions.as_ref().map(|v| v.iter().filter(|r| !filter.excludes(&r.key)).cloned().collect()),
    }
}

/// The error for a selector naming an excluded key.
pub(crate) fn excluded_key_error(source: &str, path: &str, key: &str) -> CompileError {
    CompileError::at(
        source,
        path,
        format!("selects on label {key:?}, which identities leave out (--identity-exclude-labels): no identity can match it, so the policy fails closed for its subjects (select on a label that identifies the workload, or take {key:?} out of --identity-exclude-labels)"),
    )
}
