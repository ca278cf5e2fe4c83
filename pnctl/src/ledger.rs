//! `pnctl ledger <node>`: the meter's quota ledger for one node (`GET /v1/nodes/<node>/usage` on
//! the meter's internal listener, with its bearer token),
//! shown readably or, with `--json`, exactly as the meter answered. Read-only.

use anyhow::bail;
use serde_json::Value;

use crate::endpoints::{Endpoints, get_json_bearer, http};
use crate::events::human_bytes;

pub async fn run(ep: &Endpoints, node: &str, json_out: bool) -> anyhow::Result<()> {
    if !proto::subjects::is_token(node) {
        bail!("{node:?} is not a node name (e.g. pn-<subId>)");
    }
    // The ledger is on the meter's internal listener, behind its token.
    let url = format!("{}/v1/nodes/{node}/usage", ep.meter_internal()?);
    let (status, v) = get_json_bearer(&http()?, &url, &ep.meter_token()?).await?;
    match status {
        200 => {}
        401 => bail!("the meter refused the internal token (PN_INTERNAL_TOKEN or the stack's secrets/meter-internal-token)"),
        404 => bail!("the meter has no ledger for {node} (not deployed yet, or a typo?)"),
        s => bail!("GET {url}: {s}: {v}"),
    }
    if json_out {
        println!("{v}");
    } else {
        print!("{}", render(node, &v));
    }
    Ok(())
}

fn render(node: &str, v: &Value) -> String {
    let used = v["usedBytes"].as_u64().unwrap_or(0);
    let sold = v["soldBytes"].as_u64().unwrap_or(0);
    let pct = if sold > 0 { format!(" ({:.2}%)", used as f64 * 100.0 / sold as f64) } else { String::new() };
    let state = match &v["state"] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = format!("{:<16}{node}\n{:<16}{} of {}{pct}\n{:<16}{state}\n", "node", "used", human_bytes(used), human_bytes(sold), "state");
    if let Value::Object(m) = v {
        for (k, val) in m {
            if !matches!(k.as_str(), "usedBytes" | "soldBytes" | "state" | "node") {
                out.push_str(&format!("{k:<16}{val}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_use_of_quota() {
        let v = serde_json::json!({"usedBytes": 1u64 << 30, "soldBytes": 100u64 << 30, "state": "ok", "epochs": []});
        let s = render("pn-a", &v);
        assert!(s.contains("1.0 GiB of 100.0 GiB (1.00%)"), "{s}");
        assert!(s.contains("state           ok"), "{s}");
        assert!(s.contains("epochs"));
    }
}
