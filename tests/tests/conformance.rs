//! Upstream NetworkPolicy conformance in the test bed: the model of Kubernetes'
//! test/e2e/network/netpol (namespaces x, y, z; pods a, b, c; ports 80/81 over TCP, UDP,
//! SCTP), every runnable `It(...)` of network_policy.go and generated cyclonus-style
//! cases, each step checked as a 9x9 reachability matrix (both IP families) against an
//! oracle that implements the NetworkPolicy API semantics on its own.
//!
//! `cargo test -p zt-tests --test conformance -- --nocapture` (root for the matrix;
//! the oracle and case-list checks run without). `ZT_CONFORMANCE_FILTER=<substring>`
//! runs only the cases whose family or name contains it. The matrix runs once per
//! agent input (`conformance_matrix_manifests_dir`: `--manifests`;
//! `conformance_matrix_api_server`: `--kubeconfig` against the API stand-in); the two
//! tests run in parallel unless `--test-threads 1`.
#[path = "conformance/cases.rs"]
mod cases;
mod common;
#[path = "conformance/generated.rs"]
mod generated;
#[path = "conformance/list.rs"]
mod list;
#[path = "conformance/model.rs"]
mod model;
#[path = "conformance/oracle.rs"]
mod oracle;
#[path = "conformance/runner.rs"]
mod runner;

/// The whole suite with the agents reading the manifests directory.
#[test]
fn conformance_matrix_manifests_dir() {
    runner::run_suite(runner::AgentInput::ManifestsDir, runner::Via::PodIp);
}

/// The whole suite with the agents watching the API stand-in, which serves the same
/// manifests directory: the Kubernetes source must enforce the same matrix.
#[test]
fn conformance_matrix_api_server() {
    runner::run_suite(runner::AgentInput::ApiServer, runner::Via::PodIp);
}

/// Through Services, as upstream probes: each pod's own Service `s-<ns>-<pod>`, probes to
/// its ClusterIP from inside the source pod; kube-proxy's nftables rules in every node;
/// zt-agent translates the frontend at the pod's socket (`--service-translation=true`).
#[test]
fn conformance_services_translated() {
    runner::run_suite(runner::AgentInput::ManifestsDir, runner::Via::Service { translation: true });
}

/// The same with zt's socket translation off: kube-proxy's DNAT picks the backend and zt
/// judges the untranslated frontend (allowed only if policy allows every backend).
#[test]
fn conformance_services_kube_proxy() {
    runner::run_suite(runner::AgentInput::ManifestsDir, runner::Via::Service { translation: false });
}

#[test]
fn oracle_agrees_with_upstream_tables() {
    list::check_oracle_against_upstream();
}

#[test]
fn cases_md_lists_every_case() {
    list::check_cases_md();
}
