//! What the container runtime hands a CNI plugin: `CNI_*` environment variables and the
//! network configuration on stdin (CNI spec 1.0). Every rejection names the variable
//! or field and carries the spec's error code.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// Production default: the agent's `--admin-socket` default.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/zt/admin.sock";
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// A runtime waits for ADD; more than a minute only hides a broken agent.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// Result formats this plugin reads and writes (CHECK exists from 0.4.0 on).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0"];

// Error codes of the CNI spec ("Error" section); 100+ are the plugin's own.
pub const ERR_INCOMPATIBLE_VERSION: u32 = 1;
pub const ERR_INVALID_ENV: u32 = 4;
pub const ERR_IO: u32 = 5;
pub const ERR_DECODE: u32 = 6;
pub const ERR_INVALID_CONFIG: u32 = 7;
pub const ERR_TRY_AGAIN_LATER: u32 = 11;
/// CHECK: the agent does not enforce this container's interface.
pub const ERR_NOT_ENFORCED: u32 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: details.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
        }
    }
}

/// The `CNI_*` variables of one invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`, ...).
    pub args: BTreeMap<String, String>,
}

impl Env {
    pub fn arg(&self, k: &str) -> Option<&str> {
        self.args.get(k).map(|s| s.as_str())
    }
}

pub fn command(get: &dyn Fn(&str) -> Option<String>) -> Result<Command, CniError> {
    match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Ok(Command::Add),
        Some("DEL") => Ok(Command::Del),
        Some("CHECK") => Ok(Command::Check),
        Some("VERSION") => Ok(Command::Version),
        Some(other) => Err(CniError::new(
            ERR_INVALID_ENV,
            format!("CNI_COMMAND: unsupported command {other:?}"),
            "zt-cni implements ADD, DEL, CHECK and VERSION (CNI 1.0)",
        )),
        None => Err(CniError::new(ERR_INVALID_ENV, "CNI_COMMAND is not set", "the runtime must set CNI_COMMAND")),
    }
}

/// Reads and checks the variables `cmd` needs. CNI_NETNS is optional for DEL (the
/// runtime may have removed the namespace already); CNI_PATH is not used (no delegation).
pub fn env(cmd: Command, get: &dyn Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let need = |k: &str| -> Result<String, CniError> {
        match get(k) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(CniError::new(ERR_INVALID_ENV, format!("{k} is not set"), format!("{k} is required for {}", cmd.name()))),
        }
    };
    let container_id = need("CNI_CONTAINERID")?;
    // Spec: alphanumerics plus underscore, dot and hyphen, starting with an alphanumeric.
    let valid = container_id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && container_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        return Err(CniError::new(
            ERR_INVALID_ENV,
            format!("CNI_CONTAINERID {container_id:?} is invalid"),
            "it must start with a letter or digit and hold only letters, digits, '_', '.', '-'",
        ));
    }
    let ifname = need("CNI_IFNAME")?;
    if ifname.len() > 15 || ifname.contains(['/', ' ', ':']) || ifname == "." || ifname == ".." {
        return Err(CniError::new(ERR_INVALID_ENV, format!("CNI_IFNAME {ifname:?} is not a valid interface name"), ""));
    }
    let netns = match cmd {
        Command::Del => get("CNI_NETNS").filter(|s| !s.is_empty()),
        _ => Some(need("CNI_NETNS")?),
    };
    let mut args = BTreeMap::new();
    for item in get("CNI_ARGS").unwrap_or_default().split(';').filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(CniError::new(ERR_INVALID_ENV, format!("CNI_ARGS: {item:?} is not KEY=VALUE"), "CNI_ARGS is a ';'-separated list of KEY=VALUE"));
        };
        args.insert(k.to_string(), v.to_string());
    }
    let e = Env { container_id, netns, ifname, args };
    if cmd == Command::Add {
        // The agent matches the attachment to the pod the policy source reports.
        for k in ["K8S_POD_NAMESPACE", "K8S_POD_NAME"] {
            if e.arg(k).is_none_or(|v| v.is_empty()) {
                return Err(CniError::new(ERR_INVALID_ENV, format!("CNI_ARGS: {k} is missing"), "zt-cni runs for Kubernetes pods: the runtime passes K8S_POD_NAMESPACE and K8S_POD_NAME"));
            }
        }
    }
    Ok(e)
}

/// The network configuration (one plugin's entry of the conflist, with `prevResult`).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub agent_socket: PathBuf,
    pub timeout: Duration,
    /// The previous plugin's result, as received (printed back unchanged on ADD).
    pub prev_result: Option<Value>,
}

/// The pod's addresses and interfaces, read from `prevResult`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrevResult {
    pub ips: Vec<IpAddr>,
    /// Interfaces without `sandbox`: on the host side (the pod's veth peer, maybe a bridge).
    pub host_interfaces: Vec<String>,
}

fn cfg_err(msg: String) -> CniError {
    CniError::new(ERR_INVALID_CONFIG, msg, "see the zt-cni section of the zt README for the configuration")
}

/// `cniVersion` alone, for VERSION and for the error object.
pub fn version_of(stdin: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(stdin).ok()?.get("cniVersion")?.as_str().map(str::to_string)
}

pub fn netconf(cmd: Command, stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(ERR_DECODE, format!("network configuration on stdin is not JSON: {e}"), ""))?;
    let Value::Object(o) = v else {
        return Err(cfg_err("network configuration must be a JSON object".into()));
    };
    let string = |k: &str| -> Result<String, CniError> {
        match o.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(other) => Err(cfg_err(format!("field {k:?} must be a non-empty string, got {other}"))),
            None => Err(cfg_err(format!("field {k:?} is missing"))),
        }
    };
    let cni_version = string("cniVersion")?;
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            ERR_INCOMPATIBLE_VERSION,
            format!("cniVersion {cni_version:?} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let name = string("name")?;
    string("type")?;
    let agent_socket = match o.get("agentSocket") {
        None => PathBuf::from(DEFAULT_AGENT_SOCKET),
        Some(Value::String(s)) if s.starts_with('/') => PathBuf::from(s),
        Some(other) => return Err(cfg_err(format!("field \"agentSocket\" must be an absolute path, got {other}"))),
    };
    let timeout_ms = match o.get("timeoutMs") {
        None => DEFAULT_TIMEOUT_MS,
        Some(v) => match v.as_u64() {
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => ms,
            _ => return Err(cfg_err(format!("field \"timeoutMs\" must be an integer from 1 to {MAX_TIMEOUT_MS}, got {v}"))),
        },
    };
    let prev_result = match o.get("prevResult") {
        None | Some(Value::Null) if matches!(cmd, Command::Add | Command::Check) => {
            return Err(cfg_err(format!(
                "field \"prevResult\" is missing: zt-cni is a chained plugin and goes after the cluster's network plugin in the conflist ({})",
                cmd.name()
            )))
        }
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(other) => return Err(cfg_err(format!("field \"prevResult\" must be an object, got {other}"))),
    };
    Ok(NetConf { cni_version, name, agent_socket, timeout: Duration::from_millis(timeout_ms), prev_result })
}

/// Addresses and host-side interfaces of `prevResult` (`ips[].address` is a CIDR,
/// `ips[].interface` an index into `interfaces`).
pub fn prev_result(p: &Value) -> Result<PrevResult, CniError> {
    let mut out = PrevResult::default();
    let ifaces = match p.get("interfaces") {
        None => vec![],
        Some(Value::Array(a)) => a.clone(),
        Some(other) => return Err(cfg_err(format!("prevResult.interfaces must be an array, got {other}"))),
    };
    for (i, itf) in ifaces.iter().enumerate() {
        let Some(name) = itf.get("name").and_then(Value::as_str).filter(|s| !s.is_empty()) else {
            return Err(cfg_err(format!("prevResult.interfaces[{i}].name is missing")));
        };
        let sandbox = itf.get("sandbox").and_then(Value::as_str).unwrap_or("");
        if sandbox.is_empty() {
            out.host_interfaces.push(name.to_string());
        }
    }
    let ips = match p.get("ips") {
        Some(Value::Array(a)) => a,
        None => return Err(cfg_err("prevResult.ips is missing: the previous plugin assigned no address".into())),
        Some(other) => return Err(cfg_err(format!("prevResult.ips must be an array, got {other}"))),
    };
    for (i, ip) in ips.iter().enumerate() {
        let Some(addr) = ip.get("address").and_then(Value::as_str) else {
            return Err(cfg_err(format!("prevResult.ips[{i}].address is missing")));
        };
        let host = addr.split_once('/').map_or(addr, |(h, _)| h);
        let parsed: IpAddr = host.parse().map_err(|_| cfg_err(format!("prevResult.ips[{i}].address {addr:?} is not an address in CIDR form")))?;
        if let Some(idx) = ip.get("interface") {
            let ok = idx.as_u64().is_some_and(|n| (n as usize) < ifaces.len());
            if !ok {
                return Err(cfg_err(format!("prevResult.ips[{i}].interface {idx} is not an index into prevResult.interfaces")));
            }
        }
        out.ips.push(parsed);
    }
    if out.ips.is_empty() {
        return Err(cfg_err("prevResult.ips is empty: the previous plugin assigned no address".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn getter(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    const ADD_ENV: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=d;K8S_POD_UID=u-1"),
    ];

    #[test]
    fn env_add() {
        let g = getter(ADD_ENV);
        assert_eq!(command(&g).unwrap(), Command::Add);
        let e = env(Command::Add, &g).unwrap();
        assert_eq!(e.arg("K8S_POD_NAME"), Some("d"));
        assert_eq!(e.arg("K8S_POD_UID"), Some("u-1"));
        assert_eq!(e.netns.as_deref(), Some("/var/run/netns/x"));
    }

    #[test]
    fn env_errors_name_the_variable() {
        for drop in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let vars: Vec<_> = ADD_ENV.iter().copied().filter(|(k, _)| *k != drop).collect();
            let e = env(Command::Add, &getter(&vars)).unwrap_err();
            assert_eq!(e.code, ERR_INVALID_ENV);
            assert!(e.msg.contains(drop), "{e:?}");
        }
        // DEL does not need the namespace.
        let vars: Vec<_> = ADD_ENV.iter().copied().filter(|(k, _)| *k != "CNI_NETNS").collect();
        assert!(env(Command::Del, &getter(&vars)).is_ok());
        let mut vars = ADD_ENV.to_vec();
        vars[4] = ("CNI_ARGS", "K8S_POD_NAMESPACE=default;oops");
        assert!(env(Command::Add, &getter(&vars)).unwrap_err().msg.contains("\"oops\""));
        vars[4] = ("CNI_ARGS", "K8S_POD_NAMESPACE=default");
        assert!(env(Command::Add, &getter(&vars)).unwrap_err().msg.contains("K8S_POD_NAME"));
        vars[1] = ("CNI_CONTAINERID", "../x");
        assert!(env(Command::Add, &getter(&vars)).unwrap_err().msg.contains("CNI_CONTAINERID"));
        let e = command(&getter(&[("CNI_COMMAND", "GC")])).unwrap_err();
        assert!(e.msg.contains("CNI_COMMAND") && e.code == ERR_INVALID_ENV);
    }

    #[test]
    fn netconf_fields() {
        let base = r#"{"cniVersion":"1.0.0","name":"k8s","type":"zt-cni","prevResult":{"ips":[{"address":"10.0.0.5/32","interface":1}],
            "interfaces":[{"name":"veth1"},{"name":"eth0","sandbox":"/var/run/netns/x"}]}}"#;
        let c = netconf(Command::Add, base.as_bytes()).unwrap();
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(c.timeout, Duration::from_millis(DEFAULT_TIMEOUT_MS));
        let p = prev_result(c.prev_result.as_ref().unwrap()).unwrap();
        assert_eq!(p.host_interfaces, vec!["veth1".to_string()]);
        assert_eq!(p.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);

        let e = netconf(Command::Add, br#"{"cniVersion":"1.0.0","name":"k8s","type":"zt-cni"}"#).unwrap_err();
        assert!(e.code == ERR_INVALID_CONFIG && e.msg.contains("prevResult"), "{e:?}");
        assert!(netconf(Command::Del, br#"{"cniVersion":"1.0.0","name":"k8s","type":"zt-cni"}"#).is_ok());
        let e = netconf(Command::Add, br#"{"cniVersion":"9.9.9","name":"k8s","type":"zt-cni"}"#).unwrap_err();
        assert_eq!(e.code, ERR_INCOMPATIBLE_VERSION);
        let e = netconf(Command::Add, br#"{"cniVersion":"1.0.0","type":"zt-cni"}"#).unwrap_err();
        assert!(e.msg.contains("\"name\""));
        let e = netconf(Command::Del, br#"{"cniVersion":"1.0.0","name":"k","type":"zt-cni","timeoutMs":0}"#).unwrap_err();
        assert!(e.msg.contains("timeoutMs"));
        let e = netconf(Command::Del, br#"{"cniVersion":"1.0.0","name":"k","type":"zt-cni","agentSocket":"rel.sock"}"#).unwrap_err();
        assert!(e.msg.contains("agentSocket"));
        assert_eq!(netconf(Command::Add, b"{not json").unwrap_err().code, ERR_DECODE);
        let e = prev_result(&serde_json::json!({"ips":[{"address":"10.0.0.300/32"}]})).unwrap_err();
        assert!(e.msg.contains("ips[0].address"));
        let e = prev_result(&serde_json::json!({"ips":[{"address":"10.0.0.3/32","interface":4}],"interfaces":[]})).unwrap_err();
        assert!(e.msg.contains("ips[0].interface"));
    }
}
