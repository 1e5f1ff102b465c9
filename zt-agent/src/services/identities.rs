//! Service identity numbers (`IDENTITY_SERVICE_FLAG | n`), one per Service and address
//! family (a dual-stack Service's IPv4 and IPv6 backends differ, and so may what policy
//! allows of them; the kernel keys the judgement by identity and port), written into
//! each of its frontends (`SvcFrontendValue::identity`) and named by the policy entries
//! of the untranslated judgement (judge.rs).
//!
//! Numbers are stable: a Service keeps its number while it exists, a restarted agent
//! takes back the numbers its frontends hold in the pinned map, and a released number
//! is not handed out again until every other number of the 24-bit range has been (the
//! allocator only moves forward): a frontend entry and a policy entry written in
//! different steps of an apply can never name two different Services by one number.
use std::collections::{BTreeMap, BTreeSet};

use zt_common::{SvcFrontendKey, IDENTITY_SERVICE_FLAG};

use super::ServiceTable;
use crate::net::to_key;

/// Numbers below the flag bit.
const NUMBER_MASK: u32 = IDENTITY_SERVICE_FLAG - 1;

/// (namespace, name)
pub type ServiceName = (String, String);
/// A Service's identity key: its name and whether it is the IPv6 half.
type Key = (ServiceName, bool);

#[derive(Clone, Debug, Default)]
pub struct ServiceIdentities {
    by_service: BTreeMap<Key, u32>,
    /// What the pinned frontends held at start, consulted once per Service.
    held: BTreeMap<SvcFrontendKey, u32>,
    next: u32,
}

impl ServiceIdentities {
    /// Starts from what an earlier agent wrote to the frontends map.
    pub fn from_held(held: BTreeMap<SvcFrontendKey, u32>) -> Self {
        let held: BTreeMap<SvcFrontendKey, u32> = held.into_iter().filter(|(_, id)| id & IDENTITY_SERVICE_FLAG != 0).collect();
        let next = held.values().map(|id| id & NUMBER_MASK).max().map_or(1, |m| m + 1);
        ServiceIdentities { by_service: BTreeMap::new(), held, next }
    }

    /// Gives every Service of `table` a number (keeping the ones it has) and forgets
    /// Services that are gone.
    pub fn assign(&mut self, table: &ServiceTable) {
        let mut services: BTreeMap<Key, Vec<SvcFrontendKey>> = BTreeMap::new();
        for (f, e) in &table.frontends {
            services.entry((e.service.clone(), f.addr.is_ipv6())).or_default().push(SvcFrontendKey { addr: to_key(f.addr), port: f.port, proto: f.proto, _pad: 0 });
        }
        self.by_service.retain(|s, _| services.contains_key(s));
        let mut taken: BTreeSet<u32> = self.by_service.values().copied().collect();
        // A restarted agent: the number the Service's frontends already carry.
        for (svc, keys) in &services {
            if self.by_service.contains_key(svc) {
                continue;
            }
            if let Some(id) = keys.iter().filter_map(|k| self.held.get(k)).find(|id| !taken.contains(id)) {
                self.by_service.insert(svc.clone(), *id);
                taken.insert(*id);
            }
        }
        self.held.clear();
        for svc in services.keys() {
            if !self.by_service.contains_key(svc) {
                let id = self.fresh(&taken);
                self.by_service.insert(svc.clone(), id);
                taken.insert(id);
            }
        }
    }

    fn fresh(&mut self, taken: &BTreeSet<u32>) -> u32 {
        loop {
            let n = self.next & NUMBER_MASK;
            self.next = if n == NUMBER_MASK { 1 } else { n + 1 };
            let id = IDENTITY_SERVICE_FLAG | n;
            if n != 0 && !taken.contains(&id) {
                return id;
            }
        }
    }

    /// The identity of the Service's IPv6 (`v6`) or IPv4 half.
    pub fn get(&self, service: &ServiceName, v6: bool) -> Option<u32> {
        self.by_service.get(&(service.clone(), v6)).copied()
    }

    /// (name, IPv6 half, identity)
    pub fn iter(&self) -> impl Iterator<Item = (&ServiceName, bool, u32)> {
        self.by_service.iter().map(|((s, v6), id)| (s, *v6, *id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{Frontend, FrontendEntry, FrontendKind};

    fn table(names: &[(&str, &str)]) -> ServiceTable {
        let mut t = ServiceTable::default();
        for (i, (ns, name)) in names.iter().enumerate() {
            let f = Frontend { addr: format!("10.96.0.{}", i + 1).parse().unwrap(), port: 80, proto: 6 };
            let e = FrontendEntry {
                service: (ns.to_string(), name.to_string()),
                port_name: String::new(),
                kind: FrontendKind::ClusterIp,
                backends: vec![],
                affinity_timeout_s: 0,
                terminating: false,
            };
            t.frontends.insert(f, e);
        }
        t
    }

    fn name(ns: &str, n: &str) -> ServiceName {
        (ns.into(), n.into())
    }

    #[test]
    fn numbers_are_stable_and_never_reused_at_once() {
        let mut ids = ServiceIdentities::from_held(BTreeMap::new());
        ids.assign(&table(&[("a", "x"), ("a", "y")]));
        let (x, y) = (ids.get(&name("a", "x"), false).unwrap(), ids.get(&name("a", "y"), false).unwrap());
        assert_ne!(x, y);
        assert!(x & IDENTITY_SERVICE_FLAG != 0 && y & IDENTITY_SERVICE_FLAG != 0);
        // x goes, z comes: y keeps its number, z does not get x's.
        ids.assign(&table(&[("a", "y"), ("a", "z")]));
        assert_eq!(ids.get(&name("a", "y"), false), Some(y));
        assert_eq!(ids.get(&name("a", "x"), false), None);
        let z = ids.get(&name("a", "z"), false).unwrap();
        assert!(z != x && z != y);
    }

    #[test]
    fn a_restarted_agent_takes_back_the_numbers_its_frontends_hold() {
        let t = table(&[("a", "x"), ("b", "y")]);
        let key = |i: u8| SvcFrontendKey { addr: to_key(format!("10.96.0.{i}").parse().unwrap()), port: 80, proto: 6, _pad: 0 };
        let held = BTreeMap::from([(key(1), IDENTITY_SERVICE_FLAG | 7), (key(2), IDENTITY_SERVICE_FLAG | 3)]);
        let mut ids = ServiceIdentities::from_held(held);
        ids.assign(&t);
        assert_eq!(ids.get(&name("a", "x"), false), Some(IDENTITY_SERVICE_FLAG | 7));
        assert_eq!(ids.get(&name("b", "y"), false), Some(IDENTITY_SERVICE_FLAG | 3));
        // New Services start above what was held.
        ids.assign(&table(&[("a", "x"), ("b", "y"), ("c", "z")]));
        assert_eq!(ids.get(&name("c", "z"), false), Some(IDENTITY_SERVICE_FLAG | 8));
    }
}
