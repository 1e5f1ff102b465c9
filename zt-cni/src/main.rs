//! zt-cni: a chained CNI plugin (spec 1.0). Configured after the cluster's own network
//! plugin, it asks the node's zt-agent to hook the pod's host-side interface before
//! the pod's containers start, and fails ADD (the pod is retried, never started
//! unenforced) when the agent does not confirm in time.
mod agent;
mod input;

use std::io::{Read, Write};
use std::process::ExitCode;

use input::*;
use serde_json::{json, Value};

fn main() -> ExitCode {
    // Not a CNI call: the DaemonSet's init container installs the binary on the node.
    let argv: Vec<String> = std::env::args().collect();
    if std::env::var_os("CNI_COMMAND").is_none() && argv.get(1).map(String::as_str) == Some("install") {
        return match argv.get(2).map(|d| install(std::path::Path::new(d))) {
            Some(Ok(p)) => {
                eprintln!("zt-cni: installed {}", p.display());
                ExitCode::SUCCESS
            }
            Some(Err(e)) => {
                eprintln!("zt-cni install: {e}");
                ExitCode::FAILURE
            }
            None => {
                eprintln!("usage: zt-cni install <cni-bin-dir>   (e.g. /opt/cni/bin)");
                ExitCode::FAILURE
            }
        };
    }
    let get = |k: &str| std::env::var(k).ok();
    let mut stdin = vec![];
    let read = std::io::stdin().read_to_end(&mut stdin);
    let version = version_of(&stdin).filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str())).unwrap_or_else(|| "1.0.0".into());
    let result = match read {
        Ok(_) => run(&get, &stdin),
        Err(e) => Err(CniError::new(ERR_IO, format!("reading the network configuration from stdin: {e}"), "")),
    };
    match result {
        Ok(Some(out)) => {
            let _ = writeln!(std::io::stdout(), "{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let obj = json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details});
            let _ = writeln!(std::io::stdout(), "{obj}");
            eprintln!("zt-cni: {} ({})", e.msg, e.details);
            ExitCode::FAILURE
        }
    }
}

/// What to print on success (None: nothing, as for DEL and CHECK).
fn run(get: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let cmd = command(get)?;
    if cmd == Command::Version {
        let v = version_of(stdin).unwrap_or_else(|| "1.0.0".into());
        return Ok(Some(json!({"cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS})));
    }
    let env = env(cmd, get)?;
    let conf = netconf(cmd, stdin)?;
    let prev = conf.prev_result.as_ref().map(prev_result).transpose()?;
    let req = agent::Request {
        command: cmd.name().into(),
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        pod_namespace: env.arg("K8S_POD_NAMESPACE").unwrap_or_default().into(),
        pod_name: env.arg("K8S_POD_NAME").unwrap_or_default().into(),
        pod_uid: env.arg("K8S_POD_UID").unwrap_or_default().into(),
        ips: prev.as_ref().map(|p| p.ips.clone()).unwrap_or_default(),
        host_interfaces: prev.map(|p| p.host_interfaces).unwrap_or_default(),
    };
    let sock = conf.agent_socket.display().to_string();
    let ms = conf.timeout.as_millis();
    let reply = match agent::call(&conf.agent_socket, &req, conf.timeout) {
        Ok(r) => r,
        // DEL succeeds without the agent: what an attachment leaves behind fails closed
        // (an `init` endpoint on a hooked interface), the agent forgets attachments whose
        // interface is gone, and a failing DEL would keep the pod from being removed.
        Err(agent::Failure::Absent(e)) if cmd == Command::Del => {
            eprintln!("zt-cni: DEL {}: no zt-agent on {sock} ({e}): nothing to undo", env.container_id);
            return Ok(None);
        }
        Err(agent::Failure::Absent(e)) => {
            return Err(CniError::new(ERR_TRY_AGAIN_LATER, format!("zt-agent is not running: cannot connect to {sock}"), e.to_string()))
        }
        // A present but hung agent is retried, also for DEL (it may still hold the attachment).
        Err(agent::Failure::Timeout(t)) => {
            return Err(CniError::new(
                ERR_TRY_AGAIN_LATER,
                format!("zt-agent did not answer {} within {ms} ms on {sock}", cmd.name()),
                format!("gave up after {} ms", t.as_millis()),
            ))
        }
        Err(agent::Failure::Broken(e)) => {
            return Err(CniError::new(ERR_TRY_AGAIN_LATER, format!("talking to zt-agent on {sock} failed"), e))
        }
    };
    if !reply.ok {
        return Err(CniError::new(
            reply.code.unwrap_or(ERR_TRY_AGAIN_LATER),
            format!("zt-agent refused {} for container {}", cmd.name(), env.container_id),
            reply.error.unwrap_or_default(),
        ));
    }
    match cmd {
        Command::Add => {
            // A chained plugin passes the previous result on unchanged.
            let mut out = conf.prev_result.unwrap_or(Value::Null);
            if let Value::Object(o) = &mut out {
                o.entry("cniVersion").or_insert(Value::String(conf.cni_version.clone()));
            }
            Ok(Some(out))
        }
        Command::Check if !reply.attached => Err(CniError::new(
            ERR_NOT_ENFORCED,
            format!("zt-agent does not enforce container {}", env.container_id),
            "no attachment: the pod's interface is not hooked for this container",
        )),
        _ => Ok(None),
    }
}

/// Copies this binary to `<dir>/zt-cni` beside and renames it into place: a runtime
/// running the old binary meanwhile keeps a whole file, never half of one.
fn install(dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe()?;
    let dst = dir.join("zt-cni");
    let tmp = dir.join(".zt-cni.tmp");
    std::fs::copy(&me, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &dst)?;
    Ok(dst)
}
