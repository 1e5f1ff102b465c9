//! The node's tunnel endpoints (ZT_TUNNELS): destination ports and IP protocols on a
//! node address that a pod may not send to unless a policy explicitly allows it. A node
//! decapsulates what arrives there and routes the inner packet with whatever source
//! address the pod wrote, past the pod's own hook.
use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, MapData};
use zt_common::{tunnel_key, TUNNELS_MAX};

/// VXLAN (IANA and the Linux/Flannel default), Geneve, IPIP (and 4in6), IPv6-in-IP
/// (6in4, ip6ip6), GRE.
pub const DEFAULT_TUNNELS: &str = "udp/4789,udp/8472,udp/6081,ipip,ipv6,gre";

pub type TunnelsMap = HashMap<MapData, u32, u32>;

/// One entry of `--tunnels`: `udp/PORT`, `tcp/PORT`, `ipip` (4), `ipv6` (41), `gre`
/// (47), or `proto/N` for any other IP protocol number.
fn parse_one(s: &str) -> Result<u32> {
    let s = s.trim();
    let named = match s.to_ascii_lowercase().as_str() {
        "ipip" => Some(4),
        "ipv6" => Some(41),
        "gre" => Some(47),
        _ => None,
    };
    if let Some(p) = named {
        return Ok(tunnel_key(p, 0));
    }
    let (kind, n) = s.split_once('/').with_context(|| format!("{s:?}: expected udp/PORT, tcp/PORT, proto/N, ipip, ipv6 or gre"))?;
    match kind.to_ascii_lowercase().as_str() {
        "udp" | "tcp" => {
            let port: u16 = n.parse().with_context(|| format!("{s:?}: port {n:?} is not a number 1-65535"))?;
            if port == 0 {
                bail!("{s:?}: port 0 would name every {kind} port");
            }
            Ok(tunnel_key(if kind.eq_ignore_ascii_case("udp") { 17 } else { 6 }, port))
        }
        "proto" => {
            let p: u8 = n.parse().with_context(|| format!("{s:?}: protocol {n:?} is not a number 0-255"))?;
            if matches!(p, 1 | 6 | 17 | 58 | 132) {
                bail!("{s:?}: protocol {p} is not a tunnel protocol (name a port: udp/PORT)");
            }
            Ok(tunnel_key(p, 0))
        }
        other => bail!("{s:?}: unknown kind {other:?} (udp, tcp, proto)"),
    }
}

/// Parses the comma-separated `--tunnels` list (empty: none).
pub fn parse(list: &str) -> Result<Vec<u32>> {
    let mut keys: Vec<u32> = list.split(',').filter(|s| !s.trim().is_empty()).map(parse_one).collect::<Result<_>>().context("--tunnels")?;
    keys.sort_unstable();
    keys.dedup();
    if keys.len() > TUNNELS_MAX as usize {
        bail!("--tunnels: {} entries, at most {TUNNELS_MAX}", keys.len());
    }
    Ok(keys)
}

/// Makes the map hold exactly `keys` (adds first, so no wanted entry is ever missing).
pub fn sync(map: &mut TunnelsMap, keys: &[u32]) -> Result<()> {
    for k in keys {
        map.insert(k, 1, 0).context("writing ZT_TUNNELS")?;
    }
    let stale: Vec<u32> = map.keys().filter_map(|k| k.ok()).filter(|k| !keys.contains(k)).collect();
    for k in stale {
        map.remove(&k).context("removing from ZT_TUNNELS")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_list_and_errors() {
        let k = parse(DEFAULT_TUNNELS).unwrap();
        for want in [tunnel_key(17, 4789), tunnel_key(17, 8472), tunnel_key(17, 6081), tunnel_key(4, 0), tunnel_key(41, 0), tunnel_key(47, 0)] {
            assert!(k.contains(&want), "{want:#x} missing from {k:?}");
        }
        assert_eq!(k.len(), 6);
        assert_eq!(parse("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse("proto/115, udp/4789,udp/4789").unwrap(), vec![tunnel_key(17, 4789), tunnel_key(115, 0)]);
        for (bad, says) in
            [("udp/0", "every udp port"), ("udp/x", "not a number"), ("sctp/1", "unknown kind"), ("proto/6", "not a tunnel protocol"), ("vxlan", "expected")]
        {
            let e = format!("{:#}", parse(bad).unwrap_err());
            assert!(e.contains("--tunnels") && e.contains(says), "{bad}: {e}");
        }
    }
}
