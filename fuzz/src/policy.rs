//! `policy_compile`: a small cluster decoded from the input bytes (namespaces, labels,
//! pod and node addresses, CIDRs, ports, FQDN names, SPIFFE IDs drawn from vocabularies,
//! so that most inputs are valid and reach the compiler; now and then a free string, to
//! reach the validation too). The cluster is written out as YAML documents and goes
//! through the manifest parser into the compiler and the map contents, as a manifest
//! directory would. The decoder reads zeros past the end: every input is a cluster.
use serde_json::{json, Map, Value};
use zt_agent::compile::EnforcementMode;
use zt_agent::model::source_dir::parse_manifests;
use zt_agent::model::ClusterState;

const NAMESPACES: &[&str] = &["default", "prod", "kube-system", "a"];
const NAMES: &[&str] = &["web", "db", "api", "dns", "x", "coredns"];
const KEYS: &[&str] = &["app", "tier", "team", "kubernetes.io/metadata.name", "zt.dev/x"];
const VALUES: &[&str] = &["web", "db", "api", "prod", "default", "", "x"];
const NODES: &[&str] = &["node-a", "node-b", "node-a", "node-c"];
const POD_IPS: &[&str] = &[
    "10.0.0.1",
    "10.0.0.2",
    "10.0.1.1",
    "10.96.0.10",
    "192.168.0.10",
    "10.0.0.0",
    "255.255.255.255",
    "fd00::1",
    "fd00::2",
    "fd00:ffff::10",
    "::ffff:10.0.0.1",
    "::",
    "0.0.0.0",
];
const CIDRS: &[&str] = &[
    "10.0.0.0/8",
    "10.0.0.0/24",
    "10.0.0.1/32",
    "10.0.0.0/16",
    "0.0.0.0/0",
    "192.168.0.0/16",
    "10.0.0.1/8",
    "::/0",
    "fd00::/8",
    "fd00::1/128",
    "fd00::/64",
    "::ffff:0:0/96",
    "::ffff:10.0.0.0/104",
    "2001:db8::/32",
];
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP", "tcp", "ICMP"];
const PORT_NAMES: &[&str] = &["http", "dns", "pg", "metrics"];
const PORTS: &[i32] = &[53, 80, 443, 8080, 1, 65535, 0, 65536, 1024, 5432];
const FQDN_NAMES: &[&str] = &["api.example.com", "API.Example.COM.", "db.internal.test", "example.com", "a.b.c.d.e.f", "com", "x_y.example.com"];
const FQDN_PATTERNS: &[&str] = &["*.example.com", "*", "*.com", "*.internal.test", "*.*.example.com", "a*.example.com"];
const ENTITIES: &[&str] = &["host", "world", "remote-node", "cluster", "all", "dns"];
const TRUST_DOMAINS: &[&str] = &["cluster.local", "example.org", "Bad Domain"];

fn pick<T: Copy>(v: &[T], i: u8) -> T {
    v[i as usize % v.len()]
}

/// The input bytes, read front to back; zeros past the end.
pub struct Src<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Src<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Src { data, pos: 0 }
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// 0..=max
    fn len(&mut self, max: usize) -> usize {
        self.u8() as usize % (max + 1)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        pick(v, self.u8())
    }
    /// A word of `v`, or (one time in 16) a free string of the input's bytes.
    fn word(&mut self, v: &[&str]) -> String {
        let b = self.u8();
        if b & 0xf0 == 0xf0 {
            let n = (b & 0x0f) as usize;
            let start = self.pos.min(self.data.len());
            let end = (start + n).min(self.data.len());
            self.pos += n;
            String::from_utf8_lossy(&self.data[start..end]).into_owned()
        } else {
            pick(v, b).to_string()
        }
    }
    fn list(&mut self, max: usize, mut f: impl FnMut(&mut Self) -> Value) -> Value {
        let n = self.len(max);
        Value::Array((0..n).map(|_| f(self)).collect())
    }
}

fn labels(src: &mut Src) -> Value {
    let n = src.len(3);
    let m: Map<String, Value> = (0..n).map(|_| (src.pick(KEYS).to_string(), src.word(VALUES).into())).collect();
    Value::Object(m)
}

fn selector(src: &mut Src) -> Value {
    let mut o = Map::new();
    if src.bool() {
        o.insert("matchLabels".into(), labels(src));
    }
    if src.u8() % 4 == 0 {
        let e = src.list(2, |src| {
            let op = src.pick(&["In", "NotIn", "Exists", "DoesNotExist", "Bogus"]);
            let mut r = json!({"key": src.pick(KEYS), "operator": op});
            if op.ends_with("In") || src.u8() % 8 == 0 {
                r["values"] = src.list(3, |src| src.pick(VALUES).into());
            }
            r
        });
        o.insert("matchExpressions".into(), e);
    }
    Value::Object(o)
}

fn port(src: &mut Src) -> Value {
    let mut o = Map::new();
    if src.u8() % 3 != 0 {
        o.insert("protocol".into(), src.pick(PROTOCOLS).into());
    }
    match src.u8() % 4 {
        0 | 1 => {
            let p = src.pick(PORTS);
            o.insert("port".into(), p.into());
            if src.u8() % 4 == 0 {
                o.insert("endPort".into(), (p + src.u8() as i32 - 8).into());
            }
        }
        2 => {
            o.insert("port".into(), src.pick(PORT_NAMES).into());
        }
        _ => {}
    }
    Value::Object(o)
}

fn ip_block(src: &mut Src) -> Value {
    let mut b = json!({"cidr": src.word(CIDRS)});
    if src.u8() % 3 == 0 {
        b["except"] = src.list(2, |src| src.pick(CIDRS).into());
    }
    json!({ "ipBlock": b })
}

fn np_peer(src: &mut Src) -> Value {
    match src.u8() % 4 {
        0 => json!({"podSelector": selector(src)}),
        1 => json!({"namespaceSelector": selector(src)}),
        2 => json!({"podSelector": selector(src), "namespaceSelector": selector(src)}),
        _ => ip_block(src),
    }
}

fn spiffe(src: &mut Src, ns: Option<&str>) -> String {
    let ns = ns.map(str::to_string).unwrap_or_else(|| src.pick(NAMESPACES).to_string());
    if src.u8() % 4 == 0 {
        format!("spiffe://cluster.local/ns/{ns}/*")
    } else {
        format!("spiffe://cluster.local/ns/{ns}/sa/{}", src.word(NAMES))
    }
}

fn zt_peer(src: &mut Src) -> Value {
    match src.u8() % 9 {
        0 => json!({"spiffeId": spiffe(src, None)}),
        1 => json!({"podSelector": selector(src)}),
        2 => json!({"namespaceSelector": selector(src)}),
        3 => json!({"podSelector": selector(src), "namespaceSelector": selector(src)}),
        4 => ip_block(src),
        5 => json!({"entity": src.pick(ENTITIES)}),
        6 | 7 => json!({"fqdn": {"matchName": src.word(FQDN_NAMES)}}),
        _ => json!({"fqdn": {"matchPattern": src.word(FQDN_PATTERNS)}}),
    }
}

/// A rule of either kind; `zt`: a ZeroTrustPolicy rule (action, icmp, its peers).
fn rule(src: &mut Src, field: &str, zt: bool) -> Value {
    let mut o = Map::new();
    if zt && src.u8() % 4 == 0 {
        o.insert("action".into(), "Deny".into());
    }
    if src.u8() % 4 != 0 {
        let peers = if zt { src.list(3, zt_peer) } else { src.list(3, np_peer) };
        o.insert(field.into(), peers);
    }
    if src.bool() {
        o.insert("ports".into(), src.list(3, port));
    }
    if zt && src.u8() % 8 == 0 {
        let v = src.list(2, |src| json!({"family": if src.bool() { "IPv6" } else { "IPv4" }, "type": src.u8()}));
        o.insert("icmp".into(), v);
    }
    Value::Object(o)
}

fn meta(src: &mut Src, ns: Option<&str>, name: String) -> Value {
    let mut m = json!({ "name": name });
    if let Some(ns) = ns {
        m["namespace"] = ns.into();
    }
    if src.bool() {
        m["labels"] = labels(src);
    }
    m
}

/// One document.
fn doc(src: &mut Src) -> String {
    let v = match src.u8() % 8 {
        0 => {
            let name = src.word(NAMESPACES);
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": meta(src, None, name)})
        }
        1 => {
            let (ns, name) = (src.pick(NAMESPACES), src.pick(NAMES).to_string());
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(src, Some(ns), name)})
        }
        2 | 3 => {
            let (ns, name) = (src.pick(NAMESPACES), src.word(NAMES));
            let metadata = meta(src, Some(ns), name);
            let ports = src.list(2, |src| json!({"name": src.pick(PORT_NAMES), "containerPort": src.pick(PORTS), "protocol": src.pick(PROTOCOLS)}));
            let mut spec = json!({"nodeName": src.pick(NODES), "containers": [{"name": "c", "ports": ports}]});
            if src.u8() % 4 != 0 {
                spec["serviceAccountName"] = src.word(NAMES).into();
            }
            if src.u8() % 8 == 0 {
                spec["hostNetwork"] = true.into();
            }
            let phase = if src.u8() % 8 == 7 { src.pick(&["Pending", "Succeeded", "Failed", "Unknown"]) } else { "Running" };
            let mut status = json!({ "phase": phase });
            let n = match src.u8() % 8 {
                7 => 0,
                6 => 2,
                _ => 1,
            };
            if n > 0 {
                let ips: Vec<String> = (0..n).map(|_| src.word(POD_IPS)).collect();
                status["podIP"] = ips[0].clone().into();
                status["podIPs"] = ips.iter().map(|i| json!({ "ip": i })).collect();
            }
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status})
        }
        4 => {
            let a = src.list(2, |src| json!({"type": src.pick(&["InternalIP", "ExternalIP", "Hostname"]), "address": src.word(POD_IPS)}));
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": src.pick(NODES)}, "status": {"addresses": a}})
        }
        5 => {
            let (ns, name) = (src.pick(NAMESPACES), src.pick(NAMES).to_string());
            let metadata = meta(src, Some(ns), name);
            let mut spec = json!({"podSelector": selector(src)});
            if src.u8() % 3 == 0 {
                spec["policyTypes"] = src.list(2, |src| src.pick(&["Ingress", "Egress", "Inbound"]).into());
            }
            if src.bool() {
                spec["ingress"] = src.list(3, |src| rule(src, "from", false));
            }
            if src.bool() {
                spec["egress"] = src.list(3, |src| rule(src, "to", false));
            }
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata, "spec": spec})
        }
        6 => {
            let (ns, name) = (src.pick(NAMESPACES), src.pick(NAMES).to_string());
            let metadata = meta(src, Some(ns), name);
            let mut spec = Map::new();
            if src.u8() % 4 == 0 {
                spec.insert("enforcementMode".into(), src.pick(&["always", "default"]).into());
            }
            if src.bool() {
                let s = src.list(2, |src| if src.bool() { json!({"spiffeId": spiffe(src, Some(ns))}) } else { json!({"podSelector": selector(src)}) });
                spec.insert("subjects".into(), s);
            }
            if src.bool() {
                spec.insert("ingress".into(), src.list(3, |src| rule(src, "from", true)));
            }
            if src.u8() % 4 != 0 {
                spec.insert("egress".into(), src.list(4, |src| rule(src, "to", true)));
            }
            json!({"apiVersion": "zt.dev/v1alpha1", "kind": "ZeroTrustPolicy", "metadata": metadata, "spec": spec})
        }
        // A document as free text (YAML or not).
        _ => return src.word(&["{}", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}", "---", "kind: List\napiVersion: v1\nitems: []"]),
    };
    serde_yaml::to_string(&v).expect("a JSON value serializes as YAML")
}

/// The manifest file (a few YAML documents) and the compile settings of an input.
pub fn decode(data: &[u8]) -> (String, EnforcementMode, &'static str) {
    let mut src = Src::new(data);
    let mode = if src.u8() % 4 == 0 { EnforcementMode::Always } else { EnforcementMode::Default };
    let trust_domain = src.pick(TRUST_DOMAINS);
    let mut docs = vec![];
    // Documents while input lasts (at most 16).
    while src.pos < data.len() && docs.len() < 16 {
        docs.push(doc(&mut src));
    }
    (docs.join("\n---\n"), mode, trust_domain)
}

pub fn policy_compile(data: &[u8]) {
    let (text, mode, trust_domain) = decode(data);
    let mut ignored = Vec::new();
    let Ok(objects) = parse_manifests("fuzz.yaml", &text, &mut ignored) else { return };
    // A later object replaces an earlier one of the same key (as the Kubernetes source
    // updates objects): names come from small vocabularies, duplicates are common.
    let mut state = ClusterState::new();
    for (_, obj) in objects {
        state.upsert(obj);
    }
    super::compile_twice(&state, &super::config(mode, trust_domain));
}
