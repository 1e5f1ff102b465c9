//! `cargo xtask demo` as a test: runs the zt-demo binary (lab `labs/demo`, every step
//! checked by the demo itself, which exits with an error when one does not behave) and
//! checks that it finished and that the STRICT step (4) showed what it is for: sleep2's
//! drops as `auth-required` in `ztctl drops`, the missing proof in `ztctl explain`, sleep's
//! proof in `ztctl auth`. Needs root and the built binaries
//! (`cargo build -p zt-agent -p zt-cni --bins`).

#[test]
fn the_demo_runs_every_step() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "the demo needs root");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_zt-demo")).output().expect("running zt-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "zt-demo failed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    for want in [
        "== 4. STRICT",
        "DROP ingress TCP default/sleep2 [10.202.0.40]",
        "reason=auth-required",
        "ZT_AUTH_PROOFS[node 0x",
        "-> none: not proven",
        "spiffe://cluster.local/ns/default/sa/sleep                   this node",
        "== demo done: every step behaved as expected",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from the demo's output:\n{stdout}");
    }
}
