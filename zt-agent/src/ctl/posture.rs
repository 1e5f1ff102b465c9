//! `ztctl posture`: what the policy leaves open (namespaces without default-deny, pods
//! no policy isolates, identities reachable from world, the largest blast radii, allow
//! rules that allowed nothing in the window), from the agent's map.
use serde_json::Value;

fn items(v: &Value, key: &str) -> Vec<Value> {
    v.get(key).and_then(|x| x.as_array()).cloned().unwrap_or_default()
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "),
        Some(x) => x.to_string(),
        None => String::new(),
    }
}

/// The report as text for people.
pub fn text(v: &Value) -> String {
    let mut out = String::new();
    let mut section = |title: &str, rows: Vec<String>| {
        out.push_str(&format!("{title} ({}):\n", rows.len()));
        for r in rows {
            out.push_str(&format!("  {r}\n"));
        }
    };
    section(
        "namespaces without default-deny",
        items(v, "namespaces_without_default_deny").iter().map(|n| format!("{} (open: {})", s(n, "namespace"), s(n, "open"))).collect(),
    );
    section(
        "pods no policy isolates",
        items(v, "pods_not_isolated").iter().map(|n| format!("{} {} (open: {})", s(n, "pod"), s(n, "spiffe_id"), s(n, "open"))).collect(),
    );
    section(
        "identities reachable from world",
        items(v, "reachable_from_world").iter().map(|n| format!("{} on {}", s(n, "spiffe_id"), s(n, "detail"))).collect(),
    );
    section("largest blast radius", items(v, "largest_blast_radius").iter().map(|n| format!("{} {}", s(n, "spiffe_id"), s(n, "detail"))).collect());
    let w = v.get("window_s").and_then(|x| x.as_u64()).unwrap_or(0);
    section(&format!("allow rules that allowed nothing in the last {w} s"), items(v, "rules_unused").iter().map(|n| s(n, "name")).collect());
    out
}
