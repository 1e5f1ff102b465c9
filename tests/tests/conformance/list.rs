//! Checks that need no test bed: tests/conformance/CASES.md lists exactly the cases in
//! code, and the oracle reproduces upstream's hand-written expected tables.

use std::collections::BTreeMap;
use std::path::PathBuf;

use zt_testbed::Proto;

use super::cases::{self, Case};
use super::common::lab;
use super::model::Cluster;
use super::oracle;
use super::runner::{apply, LAB};

/// Upstream tests this suite cannot run, with the reason (kept in CASES.md).
pub const NOT_PORTED: &[(&str, &str, &str)] = &[
    ("network_policy_api.go", "should support creating NetworkPolicy API operations", "API-server-only test (create/get/list/watch/patch/delete of the object); no traffic"),
    ("network_legacy.go", "every `It` of the legacy suite (NetworkPolicyLegacy)", "the older suite: one server pod behind a Service, a new client pod per check, probes through the Service (kube-proxy); its cases are covered by the network_policy.go ports"),
    ("network_policy.go", "(how every case probes)", "upstream probes each pod through its own Service (`QualifiedServiceAddress`, kube-proxy); here the probes go to the pod IPs directly, over both families"),
];

pub fn cases_md_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conformance").join("CASES.md")
}

fn probes_text(c: &Case) -> String {
    let steps: Vec<String> = c
        .steps
        .iter()
        .map(|s| {
            let p = s.probes.iter().map(|(p, n)| format!("{p}/{n}")).collect::<Vec<_>>().join(" ");
            if s.rejected {
                format!("(rejected) {p}")
            } else {
                p
            }
        })
        .collect();
    steps.join(" ; ")
}

/// The text CASES.md must have.
pub fn render_cases_md(all: &[Case]) -> String {
    let mut s = String::from(
        "# NetworkPolicy conformance cases\n\n\
Generated from the cases in `tests/tests/conformance/{cases,generated}.rs`; the unit test\n\
`cases_md_lists_every_case` fails when this file and the code differ\n\
(`ZT_UPDATE_CASES=1 cargo test -p zt-tests --test conformance cases_md` rewrites it).\n\
Every step probes the full 9x9 matrix (x, y, z x a, b, c; each pod to itself too) over\n\
IPv4 and IPv6 for the listed protocol/ports; the oracle gives the expected table.\nEvery case runs twice: agents reading the manifests dir (`--manifests`) and agents\nwatching the API stand-in (`--kubeconfig`), which serves the same objects.\n\n",
    );
    let mut families: Vec<&str> = all.iter().map(|c| c.family).collect();
    families.dedup();
    for f in families {
        let n = all.iter().filter(|c| c.family == f).count();
        s.push_str(&format!("## {f} ({n} cases)\n\n| # | case | steps: probes | upstream `It` |\n| --- | --- | --- | --- |\n"));
        for (i, c) in all.iter().filter(|c| c.family == f).enumerate() {
            let upstream = if c.upstream.is_some() { "yes (same name)" } else { "-" };
            s.push_str(&format!("| {} | {} | {} | {} |\n", i + 1, c.name.replace('|', "\\|"), probes_text(c), upstream));
        }
        s.push('\n');
    }
    s.push_str("## Upstream tests not run here\n\n| file | test | reason |\n| --- | --- | --- |\n");
    for (f, t, r) in NOT_PORTED {
        s.push_str(&format!("| {f} | {t} | {r} |\n"));
    }
    s
}

pub fn check_cases_md() {
    let all = cases::all();
    // Names are unique within a family (the summary and CASES.md key on them).
    let mut seen = std::collections::BTreeSet::new();
    for c in &all {
        assert!(seen.insert((c.family, c.name.clone())), "duplicate case [{}] {}", c.family, c.name);
        assert!(!c.steps.is_empty() && c.steps.iter().all(|s| !s.probes.is_empty()), "case {} has a step without probes", c.name);
    }
    let want = render_cases_md(&all);
    let path = cases_md_path();
    if std::env::var_os("ZT_UPDATE_CASES").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} does not match the cases in code; rewrite it with ZT_UPDATE_CASES=1 cargo test -p zt-tests --test conformance cases_md",
        path.display()
    );
}

/// Upstream's Reachability helpers over the 9 pods (all allowed to start with).
struct Reach(BTreeMap<(String, String), bool>);

const PODS: [&str; 9] = ["x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"];

/// Upstream's Peer{Namespace, Pod}: empty = any.
fn peer_has(p: &str, ns: &str, pod: &str) -> bool {
    let (pns, pname) = p.split_once('/').unwrap();
    (ns.is_empty() || ns == pns) && (pod.is_empty() || pod == pname)
}

impl Reach {
    fn new() -> Reach {
        Reach(PODS.iter().flat_map(|a| PODS.iter().map(move |b| ((a.to_string(), b.to_string()), true))).collect())
    }
    fn expect_peer(mut self, from: (&str, &str), to: (&str, &str), v: bool) -> Reach {
        for ((a, b), x) in self.0.iter_mut() {
            if peer_has(a, from.0, from.1) && peer_has(b, to.0, to.1) {
                *x = v;
            }
        }
        self
    }
    fn expect_all_ingress(self, pod: &str, v: bool) -> Reach {
        let (ns, p) = pod.split_once('/').unwrap();
        self.expect_peer(("", ""), (ns, p), v)
    }
    fn expect_all_egress(self, pod: &str, v: bool) -> Reach {
        let (ns, p) = pod.split_once('/').unwrap();
        self.expect_peer((ns, p), ("", ""), v)
    }
    fn expect(self, from: &str, to: &str, v: bool) -> Reach {
        let (fns, fp) = from.split_once('/').unwrap();
        let (tns, tp) = to.split_once('/').unwrap();
        self.expect_peer((fns, fp), (tns, tp), v)
    }
}

/// Upstream's expectations (transcribed from network_policy.go) for the given step of
/// a case, compared with the oracle over IPv4, loopback ignored as upstream does.
pub fn check_oracle_against_upstream() {
    let tables: Vec<(&str, usize, (Proto, u16), Reach)> = vec![
        ("should support a 'default-deny-ingress' policy", 0, cases::TCP80, Reach::new().expect_peer(("", ""), ("x", ""), false)),
        (
            "should support a 'default-deny-all' policy",
            0,
            cases::TCP80,
            Reach::new().expect_peer(("", ""), ("x", ""), false).expect_peer(("x", ""), ("", ""), false),
        ),
        (
            "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
            0,
            cases::TCP80,
            Reach::new().expect_all_ingress("x/a", false).expect("x/b", "x/a", true),
        ),
        (
            "should enforce policy to allow ingress traffic for a target",
            0,
            cases::TCP80,
            Reach::new().expect_peer(("", ""), ("x", ""), false).expect_all_ingress("x/a", true),
        ),
        (
            "should enforce policy based on PodSelector or NamespaceSelector",
            0,
            cases::TCP80,
            Reach::new().expect("x/a", "x/a", false).expect("x/c", "x/a", false),
        ),
        (
            "should enforce policy based on PodSelector and NamespaceSelector",
            0,
            cases::TCP80,
            Reach::new().expect_all_ingress("x/a", false).expect("y/b", "x/a", true).expect("z/b", "x/a", true),
        ),
        (
            "should enforce multiple, stacked policies with overlapping podSelectors",
            0,
            cases::TCP81,
            Reach::new().expect_peer(("x", ""), ("x", "a"), false).expect_peer(("y", ""), ("x", "a"), true).expect_peer(("z", ""), ("x", "a"), false),
        ),
        ("should enforce multiple, stacked policies with overlapping podSelectors", 0, cases::TCP80, Reach::new().expect_all_ingress("x/a", false)),
        ("should allow egress access on one named port", 0, cases::TCP81, Reach::new().expect_peer(("x", ""), ("", ""), false)),
        ("should allow egress access on one named port", 0, cases::TCP80, Reach::new()),
        ("should enforce updated policy", 1, cases::TCP81, Reach::new().expect_peer(("", ""), ("x", ""), false)),
        (
            "should allow ingress access from updated namespace",
            1,
            cases::TCP80,
            // As upstream writes it (the second ExpectPeer re-allows y -> everything).
            Reach::new().expect_all_ingress("x/a", false).expect_peer(("y", ""), ("", ""), true),
        ),
        (
            "should work with Ingress, Egress specified together",
            0,
            cases::TCP81,
            Reach::new().expect_all_ingress("x/a", false).expect_all_egress("x/a", false).expect("x/b", "x/a", true),
        ),
        (
            "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
            0,
            cases::TCP80,
            Reach::new()
                .expect_peer(("x", "a"), ("", ""), false)
                .expect_peer(("", ""), ("y", "a"), false)
                .expect_peer(("x", "a"), ("y", "a"), true)
                .expect_peer(("", ""), ("y", "b"), false),
        ),
        ("should allow egress access to server in CIDR block", 0, cases::TCP80, Reach::new().expect_all_egress("x/a", false).expect("x/a", "y/b", true)),
        ("should enforce except clause while egress access to server in CIDR block", 0, cases::TCP80, Reach::new().expect("x/a", "x/b", false)),
        (
            "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
            1,
            cases::TCP80,
            Reach::new().expect_all_egress("x/a", false).expect("x/a", "x/b", true),
        ),
        (
            "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
            0,
            cases::TCP80,
            Reach::new().expect_peer(("x", "a"), ("y", ""), false),
        ),
    ];
    let all = cases::upstream();
    let base = Cluster::load(&lab(LAB));
    let pods = base.model_pods();
    let by_key: BTreeMap<String, _> = pods.iter().map(|p| (p.key(), p.clone())).collect();
    let mut checked = 0;
    for (name, step, (proto, port), reach) in tables {
        let case = all.iter().find(|c| c.family == "upstream-tcp" && c.name == name).unwrap_or_else(|| panic!("no upstream case {name:?}"));
        let mut c = base.clone();
        for st in &case.steps[..=step] {
            apply(&mut c, &st.acts, &base);
        }
        assert!(case.steps[step].probes.contains(&(proto, port)), "{name}: step {step} does not probe {proto}/{port}");
        let mut bad = vec![];
        for ((from, to), want) in &reach.0 {
            if from == to {
                continue; // upstream's ignoreLoopback
            }
            let got = oracle::allowed(&c, &by_key[from], &by_key[to], proto.as_str(), port as i32, true);
            if got != *want {
                bad.push(format!("{from} -> {to}: oracle {got}, upstream {want}"));
            }
        }
        assert!(bad.is_empty(), "{name} (step {}, {proto}/{port}): oracle differs from upstream's table:\n{}", step + 1, bad.join("\n"));
        checked += 1;
    }
    assert!(checked >= 15);
}
