//! End to end with the Kubernetes source: zt-agent in node1's netns watches the API
//! stand-in (HTTPS, list/watch) fed from the bed's YAML, enforces what it lists,
//! follows edits, keeps enforcing while the API is unreachable and relists after 410.
mod common;

use std::time::Duration;

use common::*;
use zt_testbed::{bins, ApiServer, Family, ProbeResult, Proto, Verb};

/// The lab's pods plus `files` in a private dir, served by a stand-in, and an agent on
/// node1 watching it. The stand-in is dropped after the bed (the agent dies first).
fn kube_bed(files: &[(&str, &str)]) -> (Bed, ApiServer) {
    kube_bed_with(files, true)
}

/// `kube_bed`; `available`: whether the API answers when the agent starts (if not, the
/// agent is not waited for).
fn kube_bed_with(files: &[(&str, &str)], available: bool) -> (Bed, ApiServer) {
    let tb = testbed("basic");
    let dir = tb.tmp_dir().join("cluster");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(lab("basic")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let api = ApiServer::start(&dir).unwrap();
    api.set_bookmark_interval(Duration::from_millis(500));
    api.set_available(available).unwrap();
    let agent = tb
        .start_agent_kube("node1", &bins::find("zt-agent").unwrap(), &api, &[])
        .unwrap();
    if available {
        agent.wait_ready(Duration::from_secs(20)).unwrap();
    }
    let bed = Bed {
        agent,
        dir,
        ztctl: bins::find("ztctl").unwrap(),
        tb,
    };
    (bed, api)
}

/// Service default/b (ClusterIP 10.96.0.2, port 8080 -> http) and its EndpointSlice
/// with one endpoint at `endpoint`.
fn service_b(endpoint: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: b, namespace: default}}\n\
         spec: {{clusterIP: 10.96.0.2, selector: {{app: b}}, ports: [{{name: http, port: 8080, targetPort: http}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: b-1, namespace: default, labels: {{kubernetes.io/service-name: b}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 80}}]\n\
         endpoints: [{{addresses: [{endpoint}], conditions: {{ready: true}}, nodeName: node1}}]\n"
    )
}

/// The backends `ztctl services` shows for 10.96.0.2:8080/TCP.
fn service_b_backends(bed: &Bed) -> Vec<String> {
    let v = bed.ztctl_json(&["services", "--service", "default/b"]);
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v:#}");
    assert_eq!((&rows[0]["frontend"], &rows[0]["kind"]), (&"10.96.0.2:8080/TCP".into(), &"ClusterIP".into()), "{v:#}");
    rows[0]["backends"].as_array().unwrap().iter().map(|b| format!("{}:{}", b["addr"].as_str().unwrap(), b["port"])).collect()
}

#[test]
fn agent_enforces_and_follows_the_api() {
    let (bed, api) = kube_bed(&[("10-isolate-b.yaml", ISOLATE_B), ("20-service-b.yaml", &service_b("10.200.0.2"))]);
    let (a, c) = (pod("default", "a"), pod("default", "c"));
    let b4 = tgt("default", "b", Family::V4);
    assert!(bed.agent.args().contains(&"--kubeconfig".to_string()));
    // The agent listed every kind, then watched (it does not poll).
    for kind in [
        "pods",
        "namespaces",
        "serviceaccounts",
        "nodes",
        "networkpolicies",
        "zerotrustpolicies",
        "services",
        "endpointslices",
    ] {
        assert!(
            api.requests(kind, Verb::List) >= 1,
            "{kind} listed: {:?}",
            api.request_counts()
        );
    }
    bed.wait_until("eight open watches", || api.open_watches() == 8);

    assert_eq!(
        bed.tb.probe(&a, &b4, Proto::Tcp, 80, ALLOWED),
        ok("default/b")
    );
    assert_eq!(bed.probe(&c, &b4, Proto::Tcp, 80), ProbeResult::Timeout);

    // The Service and its EndpointSlice from the API: the agent's table, in ztctl.
    assert_eq!(service_b_backends(&bed), ["10.200.0.2:80"]);
    bed.write("20-service-b.yaml", &service_b("10.200.0.3"));
    bed.wait_until("the moved endpoint in ztctl services", || service_b_backends(&bed) == ["10.200.0.3:80"]);

    // An edit reaches the agent through the watch.
    bed.write(
        "10-isolate-b.yaml",
        &ISOLATE_B.replace("app: a}", "app: c}"),
    );
    bed.wait_probe(&c, &b4, Proto::Tcp, 80, &ok("default/b"));
    assert_eq!(bed.probe(&a, &b4, Proto::Tcp, 80), ProbeResult::Timeout);

    // API unreachable: the last state stays enforced, the source is reported down.
    api.set_available(false).unwrap();
    bed.wait_until("zt_source_up 0", || {
        bed.metrics().val("zt_source_up", &[]) == 0.0
    });
    assert_eq!(
        bed.tb.probe(&c, &b4, Proto::Tcp, 80, ALLOWED),
        ok("default/b")
    );
    assert_eq!(bed.probe(&a, &b4, Proto::Tcp, 80), ProbeResult::Timeout);
    // Changed while down, and the history compacted meanwhile: 410, relist.
    bed.write("10-isolate-b.yaml", ISOLATE_B);
    api.sync_now().unwrap();
    api.compact();
    let lists = api.requests("zerotrustpolicies", Verb::List);
    let relists = bed
        .metrics()
        .get("zt_source_relists_total", &[])
        .unwrap_or(0.0);
    api.set_available(true).unwrap();
    bed.wait_until("zt_source_up 1", || {
        bed.metrics().val("zt_source_up", &[]) == 1.0
    });
    bed.wait_probe(&a, &b4, Proto::Tcp, 80, &ok("default/b"));
    assert_eq!(bed.probe(&c, &b4, Proto::Tcp, 80), ProbeResult::Timeout);
    assert!(
        api.requests("zerotrustpolicies", Verb::List) > lists,
        "relisted after 410: {:?}",
        api.request_counts()
    );
    bed.wait_until("relists counted", || {
        bed.metrics()
            .get("zt_source_relists_total", &[])
            .unwrap_or(0.0)
            > relists
    });
    let log = bed.agent.log();
    assert!(
        log.contains("watching the Kubernetes API at https://127.0.0.1:"),
        "{}",
        tail(&log, 30)
    );
    drop(bed);
    drop(api);
}

/// A fresh node whose agent has no state yet (the API does not answer): the pods' own
/// traffic is judged by the cgroup programs from the agent's first start and fails
/// closed (`not-ready`), instead of running unenforced until the first full state.
#[test]
fn fresh_node_fails_closed_before_the_first_full_state() {
    let (bed, api) = kube_bed_with(&[], false);
    let (a, b4) = (pod("default", "a"), tgt("default", "b", Family::V4));
    bed.wait_until("the agent serving metrics, not ready", || {
        bed.agent.metrics().is_ok_and(|m| m.contains("zt_agent_ready 0"))
    });
    assert_eq!(bed.probe(&a, &b4, Proto::Tcp, 80), ProbeResult::Timeout);
    assert_eq!(bed.probe(&a, &b4, Proto::Udp, 53), ProbeResult::Timeout);
    let m = bed.metrics();
    // (the probes' sockets are the test's; b's servers are in b's cgroup: its ingress)
    assert!(
        m.verdicts("ingress", "drop", "not-ready") >= 2.0,
        "the cgroup programs dropped the packets to b as not-ready:\n{}",
        bed.agent.metrics().unwrap().lines().filter(|l| l.starts_with("zt_verdicts")).collect::<Vec<_>>().join("\n")
    );
    // The API comes back: the first full state opens what no policy isolates.
    api.set_available(true).unwrap();
    bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    bed.wait_probe(&a, &b4, Proto::Tcp, 80, &ok("default/b"));
    drop(bed);
    drop(api);
}
