//! Requests of the chained CNI plugin `zt-cni`: hook a new pod's host interface before
//! its containers start. An attachment holds the pod's addresses as `init` endpoints
//! (local, on that interface: the datapath fails them closed) until the policy source
//! reports the pod, whose real identity then replaces `init`. Attachments are kept in
//! `<state-dir>/cni-attachments.json` so that a restarted agent keeps them, and are
//! merged into every map diff so that the reconcile loop never removes them.
//!
//! Wire format on the admin socket: the line `cni <CniRequest JSON>`, answered by one
//! JSON line (`CniReply`).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use zt_common::*;

use super::Agent;
use crate::{
    local_owners,
    net::{self, to_key},
    pins::link_dir,
    state::{Desired, PodRef},
    sync::Contents,
};

/// CNI spec error codes the agent answers with (the plugin passes them on).
pub const ERR_INVALID_CONFIG: u32 = 7;
pub const ERR_TRY_AGAIN_LATER: u32 = 11;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CniRequest {
    /// ADD, DEL or CHECK.
    pub command: String,
    pub container_id: String,
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default)]
    pub pod_uid: String,
    /// The pod's addresses (prevResult.ips).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// prevResult interfaces without a sandbox (host side).
    #[serde(default)]
    pub host_interfaces: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniReply {
    pub ok: bool,
    /// ADD/CHECK: the interface is hooked and the pod's addresses are in the maps.
    #[serde(default)]
    pub attached: bool,
    /// The policy source already knows the pod (its identity, not `init`, is enforced).
    #[serde(default)]
    pub known: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CniReply {
    fn err(code: u32, msg: impl Into<String>) -> Self {
        CniReply { ok: false, code: Some(code), error: Some(msg.into()), ..Default::default() }
    }
}

/// A request on its way to the agent's loop, with where the answer goes.
pub struct CniCall {
    pub req: CniRequest,
    pub reply: oneshot::Sender<CniReply>,
}

/// An ADD that is attached and waits for the peers to install the pod's identity proof
/// (`--auth-cni-wait-ms`): answered once every peer whose node channel is up (and that
/// acknowledges installs) has written the proof into its map, or at `deadline`.
pub struct WaitingAdd {
    pub container_id: String,
    pub pod: PodRef,
    pub ips: Vec<IpAddr>,
    pub reply: CniReply,
    pub answer: oneshot::Sender<CniReply>,
    pub started: std::time::Instant,
    pub deadline: std::time::Instant,
}

/// One pod sandbox the plugin asked to enforce.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub pod: PodRef,
    pub pod_uid: String,
    pub netns: Option<String>,
    pub ips: Vec<IpAddr>,
    /// Host-side interface and its index when attached (a new interface of the same
    /// name is another interface).
    pub ifname: String,
    pub ifindex: u32,
}

/// The attachments by container id, persisted in the state dir.
#[derive(Debug, Default)]
pub struct Attachments {
    path: PathBuf,
    pub by_container: BTreeMap<String, Attachment>,
}

impl Attachments {
    /// A file that cannot be parsed is set aside and the agent starts without
    /// attachments: that is still fail closed, since the hooks stay on every existing
    /// interface and an address missing from the maps is an unknown endpoint there.
    pub fn load(path: PathBuf) -> Result<Self> {
        let by_container = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(m) => m,
                Err(e) => {
                    let aside = path.with_extension("json.bad");
                    log::error!("cni: {} is unreadable ({e}); moved to {}, starting without attachments", path.display(), aside.display());
                    std::fs::rename(&path, &aside).with_context(|| format!("moving {} aside", path.display()))?;
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Attachments { path, by_container })
    }

    fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.by_container)?)?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("writing {}", self.path.display()))
    }

    /// Forgets attachments whose interface is gone (the pod's sandbox was torn down,
    /// with or without a DEL). Returns whether any went.
    pub fn prune_gone(&mut self) -> Result<bool> {
        let before = self.by_container.len();
        self.by_container.retain(|id, a| {
            let alive = net::ifindex(&a.ifname).is_ok_and(|i| i == a.ifindex);
            if !alive {
                log::info!("cni: forgetting container {id} ({}/{}): interface {} is gone", a.pod.namespace, a.pod.name, a.ifname);
            }
            alive
        });
        let changed = self.by_container.len() != before;
        if changed {
            self.save()?;
        }
        Ok(changed)
    }

    /// Adds the attachments to the map contents: the pod's own entry when the source
    /// knows the pod on this node (with the attachment's interface: the CNI result is
    /// authoritative for its own sandbox), else `init` on that interface. An address
    /// the source gives to another pod (a stale source after IP reuse) becomes `init`
    /// too: fail closed until the source catches up.
    pub fn overlay(&self, want: &mut Contents, desired: Option<&Desired>) {
        for a in self.by_container.values() {
            for ip in &a.ips {
                let key = to_key(*ip);
                if is_known(desired, a, ip) {
                    if let Some(v) = want.endpoints.get_mut(&key) {
                        v.ifindex = a.ifindex;
                        continue;
                    }
                }
                want.endpoints.insert(key, EndpointValue { identity: IDENTITY_INIT, flags: EP_LOCAL, ifindex: a.ifindex, cgroup: 0 });
            }
        }
    }
}

fn is_known(desired: Option<&Desired>, a: &Attachment, ip: &IpAddr) -> bool {
    desired.and_then(|d| d.endpoints.get(ip)).is_some_and(|e| e.flags & EP_LOCAL != 0 && e.pod.as_ref() == Some(&a.pod))
}

/// A host interface that carries more than one pod (a bridge) or the loopback is never
/// a pod's own.
fn is_pod_interface(name: &str) -> bool {
    name != "lo" && !Path::new("/sys/class/net").join(name).join("bridge").exists()
}

fn links_pinned(bpffs_root: &Path, ifindex: u32, ifname: &str) -> bool {
    let dir = link_dir(bpffs_root);
    ["from", "to"].iter().all(|side| dir.join(format!("{ifindex}-{ifname}-{side}")).exists())
}

impl Agent {
    /// Answers one plugin request; ADD answers only once the maps hold the pod's
    /// addresses and both links are attached.
    pub(super) fn handle_cni(&mut self, call: CniCall) {
        let CniCall { req, reply: answer } = call;
        let cmd = req.command.clone();
        let id = req.container_id.clone();
        let reply = match cmd.as_str() {
            "ADD" => self.cni_add(req),
            "DEL" => self.cni_del(&req),
            "CHECK" => Ok(self.cni_check(&req)),
            other => Ok(CniReply::err(ERR_INVALID_CONFIG, format!("unknown CNI command {other:?}"))),
        };
        let reply = reply.unwrap_or_else(|e| {
            log::error!("cni {cmd} {id}: {e:#}");
            CniReply::err(ERR_TRY_AGAIN_LATER, format!("{e:#}"))
        });
        let outcome = match (&reply, cmd.as_str()) {
            (r, _) if !r.ok => "error",
            (r, "CHECK") if !r.attached => "not_attached",
            _ => "ok",
        };
        let cmd_label = if matches!(cmd.as_str(), "ADD" | "DEL" | "CHECK") { cmd.clone() } else { "invalid".into() };
        *self.metrics.lock().unwrap().cni_requests.entry((cmd_label, outcome.into())).or_default() += 1;
        if cmd == "ADD" && reply.ok && reply.attached && self.links.is_some() && !self.opts.auth_cni_wait.is_zero() {
            let Some(a) = self.cni.by_container.get(&id) else {
                let _ = answer.send(reply);
                return;
            };
            let started = std::time::Instant::now();
            self.waiting_adds.push(WaitingAdd {
                container_id: id,
                pod: a.pod.clone(),
                ips: a.ips.clone(),
                reply,
                answer,
                started,
                deadline: started + self.opts.auth_cni_wait,
            });
            self.answer_waiting_adds();
            return;
        }
        let _ = answer.send(reply);
    }

    /// What a new local pod's proof still waits for (None: nothing): its identity (the Pod
    /// object not yet compiled: without it the pod is `init` and sends nothing), then the
    /// peers with an up channel that have not acknowledged installing its proof. Nothing
    /// while no peer's channel is up and acknowledges installs.
    fn proof_pending(&self, pod: &PodRef, ips: &[IpAddr]) -> Option<String> {
        let links = self.links.as_ref()?;
        if !links.any_acking_peer() {
            return None;
        }
        let d = self.desired.as_ref();
        // The pod's identity, once compiled and in this node's endpoints map.
        let id = ips.iter().find_map(|ip| {
            let e = d?.endpoints.get(ip).filter(|e| e.flags & EP_LOCAL != 0 && e.pod.as_ref() == Some(pod) && e.identity >= IDENTITY_FIRST_WORKLOAD)?;
            self.have.endpoints.get(&to_key(*ip)).filter(|v| v.identity == e.identity)?;
            d?.identities.get(&e.identity).map(|i| i.spiffe_id.clone())
        });
        let Some(id) = id else { return Some("the pod's identity (its Pod object is not enforced yet)".into()) };
        let peers = links.awaiting(&id);
        (!peers.is_empty()).then(|| format!("{id} at {}", peers.join(", ")))
    }

    /// Answers the waiting ADDs whose proofs are installed at every peer, or whose time
    /// is up (the pod starts anyway: its flows that need the proof drop until it lands).
    pub(super) fn answer_waiting_adds(&mut self) {
        if self.waiting_adds.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        for w in std::mem::take(&mut self.waiting_adds) {
            // A sandbox deleted while its ADD waits: nothing to wait for.
            let gone = !self.cni.by_container.contains_key(&w.container_id);
            let pending = if gone { None } else { self.proof_pending(&w.pod, &w.ips) };
            if pending.is_some() && now < w.deadline {
                self.waiting_adds.push(w);
                continue;
            }
            let waited = w.started.elapsed();
            let mut m = self.metrics.lock().unwrap();
            m.auth_cni_waits += 1;
            m.auth_cni_wait_seconds_sum += waited.as_secs_f64();
            m.auth_cni_wait_timeouts += pending.is_some() as u64;
            drop(m);
            match pending {
                Some(what) => log::warn!(
                    "cni: ADD {} {}/{} answered after {waited:?} still waiting for {what}: its flows under `authentication: required` drop there until the proof lands",
                    w.container_id,
                    w.pod.namespace,
                    w.pod.name
                ),
                None => log::debug!("cni: ADD {} {}/{}: proofs installed at every peer after {waited:?}", w.container_id, w.pod.namespace, w.pod.name),
            }
            let _ = w.answer.send(w.reply);
        }
    }

    /// The host interface of the request: the one non-bridge interface of prevResult
    /// without a sandbox, else the route to the pod's first address (as for pods the
    /// source reports).
    fn cni_interface(&self, req: &CniRequest) -> std::result::Result<(String, u32), CniReply> {
        let candidates: Vec<&String> = req.host_interfaces.iter().filter(|n| net::ifindex(n).is_ok() && is_pod_interface(n)).collect();
        let name = match candidates.as_slice() {
            [one] => (*one).clone(),
            [] => {
                let mut found = None;
                for ip in &req.ips {
                    if let Some(n) = net::route_interface(*ip).ok().flatten().filter(|n| is_pod_interface(n)) {
                        found = Some(n);
                        break;
                    }
                }
                found.ok_or_else(|| {
                    CniReply::err(
                        ERR_TRY_AGAIN_LATER,
                        format!("no host interface for {:?}: prevResult names none of this node's pod interfaces ({:?}) and no direct route leads to the pod", req.ips, req.host_interfaces),
                    )
                })?
            }
            many => {
                return Err(CniReply::err(ERR_INVALID_CONFIG, format!("prevResult has several host-side interfaces {many:?}: cannot tell the pod's own")))
            }
        };
        let idx = net::ifindex(&name).map_err(|e| CniReply::err(ERR_TRY_AGAIN_LATER, format!("{e:#}")))?;
        Ok((name, idx))
    }

    fn cni_add(&mut self, req: CniRequest) -> Result<CniReply> {
        if req.pod_namespace.is_empty() || req.pod_name.is_empty() {
            return Ok(CniReply::err(ERR_INVALID_CONFIG, "ADD needs the pod's namespace and name (K8S_POD_NAMESPACE, K8S_POD_NAME)"));
        }
        if req.ips.is_empty() {
            return Ok(CniReply::err(ERR_INVALID_CONFIG, "ADD needs the pod's addresses (prevResult.ips)"));
        }
        if let Some(ip) = req.ips.iter().find(|ip| self.host_ips.contains(ip) || ip.is_loopback() || ip.is_unspecified()) {
            return Ok(CniReply::err(ERR_INVALID_CONFIG, format!("{ip} is not a pod address (it is the node's or reserved)")));
        }
        let (ifname, ifindex) = match self.cni_interface(&req) {
            Ok(x) => x,
            Err(r) => return Ok(r),
        };
        let a = Attachment {
            container_id: req.container_id.clone(),
            pod: PodRef { namespace: req.pod_namespace.clone(), name: req.pod_name.clone() },
            pod_uid: req.pod_uid.clone(),
            netns: req.netns.clone(),
            ips: req.ips.clone(),
            ifname: ifname.clone(),
            ifindex,
        };
        // An address or interface belongs to one sandbox: an older attachment that claims
        // either is stale (its DEL was lost).
        self.cni.by_container.retain(|id, old| {
            let stale = id != &a.container_id && (old.ifindex == ifindex || old.ips.iter().any(|ip| a.ips.contains(ip)));
            if stale {
                log::warn!("cni: container {id} ({}/{}) loses {ifname}/{:?} to {}", old.pod.namespace, old.pod.name, a.ips, a.container_id);
            }
            !stale
        });
        self.cni.by_container.insert(a.container_id.clone(), a.clone());
        // Persisted first: a crash after the map write leaves nothing the next agent
        // would not know about.
        self.cni.save()?;
        self.apply_cni()?;
        let reply = self.cni_check(&req);
        if !reply.attached {
            self.cni.by_container.remove(&a.container_id);
            self.cni.save()?;
            let why = self.last_apply_error.clone().unwrap_or_else(|| "the maps or links do not hold the attachment".into());
            return Ok(CniReply::err(ERR_TRY_AGAIN_LATER, format!("attaching {ifname} failed: {why}")));
        }
        log::info!(
            "cni: ADD {} {}/{} on {ifname} ({:?}): {}",
            a.container_id,
            a.pod.namespace,
            a.pod.name,
            a.ips,
            if reply.known { "known pod" } else { "init until the source reports the pod" }
        );
        Ok(reply)
    }

    /// Idempotent: an unknown container is success (already gone).
    fn cni_del(&mut self, req: &CniRequest) -> Result<CniReply> {
        if let Some(a) = self.cni.by_container.remove(&req.container_id) {
            self.cni.save()?;
            log::info!("cni: DEL {} {}/{}", a.container_id, a.pod.namespace, a.pod.name);
            self.apply_cni()?;
        }
        Ok(CniReply { ok: true, ..Default::default() })
    }

    fn cni_check(&self, req: &CniRequest) -> CniReply {
        let Some(a) = self.cni.by_container.get(&req.container_id) else {
            return CniReply { ok: true, ..Default::default() };
        };
        let alive = net::ifindex(&a.ifname).is_ok_and(|i| i == a.ifindex);
        let in_maps = a.ips.iter().all(|ip| {
            self.have.endpoints.get(&to_key(*ip)).is_some_and(|v| v.flags & EP_LOCAL != 0 && v.ifindex == a.ifindex)
        });
        let known = a.ips.iter().all(|ip| is_known(self.desired.as_ref(), a, ip));
        let attached = alive && in_maps && links_pinned(&self.opts.bpffs_root, a.ifindex, &a.ifname);
        CniReply { ok: true, attached, known, ..Default::default() }
    }

    /// Brings the maps and links in line with the attachments now (not at the next poll).
    fn apply_cni(&mut self) -> Result<()> {
        self.dirty = true;
        if let Some(desired) = self.desired.take() {
            let r = self.enforce(&desired);
            self.desired = Some(desired);
            return r;
        }
        // No good state loaded yet: hook the interfaces, then write only the attachments'
        // entries (nothing else of the pinned state is touched). Hooks first: the cgroup
        // programs (still running from an earlier agent) leave an endpoint that names an
        // interface to that interface's hook.
        self.attach_cni()?;
        let mut want = Contents { endpoints: BTreeMap::new(), ..Default::default() };
        self.cni.overlay(&mut want, None);
        self.only_hooked(&mut want);
        let mut next = self.have.endpoints.clone();
        next.extend(want.endpoints.iter().map(|(k, v)| (*k, *v)));
        let owner_slots = local_owners::slots(&next);
        self.maps.local_owners.clear_changed(&owner_slots)?;
        for (k, v) in want.endpoints {
            if self.have.endpoints.get(&k) != Some(&v) {
                self.maps.endpoints.insert(EndpointKey { addr: k }, v, 0).with_context(|| format!("writing {MAP_ENDPOINTS}"))?;
                self.have.endpoints.insert(k, v);
            }
        }
        self.maps.local_owners.write_changed(&owner_slots)?;
        Ok(())
    }

    /// Hooks every attachment's interface (links are pinned; already hooked is a no-op).
    /// One failure (an interface removed a moment ago) does not keep the others
    /// unhooked; ADD checks its own link before answering.
    pub(super) fn attach_cni(&mut self) -> Result<()> {
        for a in self.cni.by_container.values() {
            if let Err(e) = self.datapath.ensure_attached(a.ifindex, &a.ifname) {
                log::error!("cni: hooking {} for {}/{}: {e:#}", a.ifname, a.pod.namespace, a.pod.name);
            }
        }
        Ok(())
    }
}

/// The admin socket's side: parses the request, hands it to the agent's loop and
/// returns the answer line. A malformed request is answered here and counted as
/// `invalid`.
pub async fn forward(json: &str, to_loop: &tokio::sync::mpsc::Sender<CniCall>, metrics: &crate::metrics::Shared) -> String {
    let reply = match serde_json::from_str::<CniRequest>(json) {
        Err(e) => {
            *metrics.lock().unwrap().cni_requests.entry(("invalid".into(), "error".into())).or_default() += 1;
            CniReply::err(ERR_INVALID_CONFIG, format!("malformed cni request: {e}"))
        }
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            if to_loop.send(CniCall { req, reply: tx }).await.is_err() {
                CniReply::err(ERR_TRY_AGAIN_LATER, "the agent is stopping")
            } else {
                rx.await.unwrap_or_else(|_| CniReply::err(ERR_TRY_AGAIN_LATER, "the agent dropped the request"))
            }
        }
    };
    let mut s = serde_json::to_string(&reply).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::EndpointEntry;

    fn att(ips: &[&str]) -> Attachments {
        let a = Attachment {
            container_id: "c1".into(),
            pod: PodRef { namespace: "default".into(), name: "d".into() },
            pod_uid: "u".into(),
            netns: None,
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ifname: "veth1".into(),
            ifindex: 42,
        };
        Attachments { path: PathBuf::new(), by_container: BTreeMap::from([("c1".into(), a)]) }
    }

    fn desired(ip: &str, pod: &str, identity: u32) -> Desired {
        let mut d = Desired::default();
        d.endpoints.insert(
            ip.parse().unwrap(),
            EndpointEntry { identity, flags: EP_LOCAL | EP_ENFORCE_INGRESS, pod: Some(PodRef { namespace: "default".into(), name: pod.into() }) },
        );
        d
    }

    #[test]
    fn unknown_pod_is_init_on_its_interface() {
        let a = att(&["10.0.0.4", "fd00::4"]);
        let mut want = Contents::default();
        a.overlay(&mut want, None);
        assert_eq!(want.endpoints.len(), 2);
        for v in want.endpoints.values() {
            assert_eq!((v.identity, v.flags, v.ifindex), (IDENTITY_INIT, EP_LOCAL, 42));
        }
    }

    #[test]
    fn known_pod_keeps_its_identity_with_the_attachment_ifindex() {
        let a = att(&["10.0.0.4"]);
        let d = desired("10.0.0.4", "d", 300);
        let mut want = Contents::from_desired(&d, &BTreeMap::new());
        a.overlay(&mut want, Some(&d));
        let v = want.endpoints[&to_key("10.0.0.4".parse().unwrap())];
        assert_eq!((v.identity, v.flags, v.ifindex), (300, EP_LOCAL | EP_ENFORCE_INGRESS, 42));
    }

    #[test]
    fn address_of_another_pod_fails_closed() {
        let a = att(&["10.0.0.4"]);
        let d = desired("10.0.0.4", "old", 300);
        let mut want = Contents::from_desired(&d, &BTreeMap::new());
        a.overlay(&mut want, Some(&d));
        assert_eq!(want.endpoints[&to_key("10.0.0.4".parse().unwrap())].identity, IDENTITY_INIT);
    }
}
