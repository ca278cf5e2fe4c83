//! Turns decoded `pn.v1` events into what an operator reads: JSON (for `decode`, `tail --json`,
//! `status --json`) and one-line summaries. Shared by every command that shows events.
//!
//! Never prints a secret: the only secret-bearing field on the wire is the sealed claim token,
//! which is shown as its length only; the node secret exists on the wire only as a hash.

use proto::{Body, QuotaState};
use serde_json::{Map, Value, json};

/// `{"event":"claimed","type":"pn.v1.OpClaimed","body":{…}}` — the body in camelCase, bytes
/// fields made readable (hash as hex, sealed token as a size), quota states as labels.
pub fn to_json(body: &Body) -> Value {
    let inner = match serde_json::to_value(body) {
        // serde's external tagging gives {"claimed": {...}}: keep the inner object.
        Ok(Value::Object(mut m)) => m.remove(body.event_name()).unwrap_or(Value::Null),
        Ok(v) => v,
        Err(e) => json!({ "error": e.to_string() }),
    };
    let mut inner = inner;
    tidy(&mut inner);
    if let Body::Quota(q) = body
        && let Value::Object(m) = &mut inner
    {
        m.insert("from".into(), json!(quota_label(q.from)));
        m.insert("to".into(), json!(quota_label(q.to)));
    }
    json!({ "event": body.event_name(), "type": body.type_name(), "body": inner })
}

pub fn quota_label(v: i32) -> &'static str {
    QuotaState::try_from(v).map(QuotaState::label).unwrap_or("unknown")
}

/// Rewrites the `bytes` fields, which serde renders as arrays of numbers.
fn tidy(v: &mut Value) {
    if let Value::Object(m) = v {
        for (k, val) in m.iter_mut() {
            match k.as_str() {
                "sealedClaimToken" => *val = json!(sealed_label(val)),
                "nodeSecretSha256" => *val = json!(hex::encode(byte_array(val))),
                _ => tidy(val),
            }
        }
    }
}

fn byte_array(v: &Value) -> Vec<u8> {
    v.as_array().map(|a| a.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect()).unwrap_or_default()
}

fn sealed_label(v: &Value) -> String {
    let n = v.as_array().map(Vec::len).unwrap_or(0);
    if n == 0 { String::new() } else { format!("<sealed, {n} bytes>") }
}

/// The operation id an event belongs to (`""` for meter events).
pub fn op_id(body: &Body) -> &str {
    match body {
        Body::Claimed(e) => e.op.as_ref().map(|o| o.operation_id.as_str()).unwrap_or(""),
        Body::Instance(e) => e.op.as_ref().map(|o| o.operation_id.as_str()).unwrap_or(""),
        Body::Deployed(e) => e.op.as_ref().map(|o| o.operation_id.as_str()).unwrap_or(""),
        Body::Verified(e) => e.op.as_ref().map(|o| o.operation_id.as_str()).unwrap_or(""),
        Body::Failed(e) => e.operation_id.as_str(),
        Body::Degraded(e) => e.op.as_ref().map(|o| o.operation_id.as_str()).unwrap_or(""),
        Body::Rebuild(e) => e.op.as_ref().map(|o| o.operation_id.as_str()).unwrap_or(""),
        Body::Usage(_) | Body::Quota(_) => "",
    }
}

/// The subscription id an event carries, when it carries one.
pub fn sub_id(body: &Body) -> &str {
    let op = match body {
        Body::Claimed(e) => e.op.as_ref(),
        Body::Instance(e) => e.op.as_ref(),
        Body::Deployed(e) => e.op.as_ref(),
        Body::Verified(e) => e.op.as_ref(),
        Body::Degraded(e) => e.op.as_ref(),
        Body::Rebuild(e) => e.op.as_ref(),
        Body::Failed(e) => return e.sub_id.as_str(),
        Body::Usage(_) | Body::Quota(_) => None,
    };
    op.map(|o| o.sub_id.as_str()).unwrap_or("")
}

/// The node's IPv4 when the event knows it.
pub fn ipv4(body: &Body) -> Option<&str> {
    let inst = match body {
        Body::Instance(e) => e.instance.as_ref(),
        Body::Deployed(e) => e.instance.as_ref(),
        Body::Verified(e) => e.instance.as_ref(),
        _ => None,
    };
    inst.map(|i| i.ipv4.as_str()).filter(|s| !s.is_empty())
}

/// The node name when the event knows it.
pub fn node(body: &Body) -> Option<&str> {
    let n = match body {
        Body::Deployed(e) => e.node_name.as_str(),
        Body::Verified(e) => e.node_name.as_str(),
        Body::Degraded(e) => e.node_name.as_str(),
        Body::Usage(e) => e.node.as_str(),
        Body::Quota(e) => e.node.as_str(),
        _ => "",
    };
    Some(n).filter(|s| !s.is_empty())
}

/// One readable line: the event name, then its essentials.
pub fn summary(body: &Body) -> String {
    let mut parts: Vec<String> = Vec::new();
    let op = op_id(body);
    if !op.is_empty() {
        parts.push(format!("op={op}"));
    }
    match body {
        Body::Claimed(e) => {
            if let Some(o) = &e.op {
                parts.push(format!("sub={}", o.sub_id));
                parts.push(format!("region={}", o.region));
                parts.push(format!("quota={}", human_bytes(o.traffic_total_bytes)));
                parts.push(format!("ipType={}", o.ip_type));
                parts.push(format!("attempt={}", o.claim_attempt));
            }
        }
        Body::Instance(e) => {
            if let Some(i) = &e.instance {
                parts.push(format!("instance={}", i.instance_id));
                parts.push(format!("ip={}", i.ipv4));
                parts.push(format!("plan={}", i.plan));
                parts.push(format!("region={}", i.provider_region));
                if i.adopted {
                    parts.push("adopted".into());
                }
            }
        }
        Body::Deployed(e) => {
            parts.push(format!("node={}", e.node_name));
            if let Some(ip) = e.instance.as_ref().map(|i| i.ipv4.as_str()) {
                parts.push(format!("ip={ip}"));
            }
            parts.push(format!("ssh=:{}", e.ssh_port));
            parts.push(format!("sold={}", human_bytes(e.sold_bytes)));
            if !e.host_key.is_empty() {
                parts.push(format!("hostKey={}", kit::ssh::fingerprint(&e.host_key)));
            }
        }
        Body::Verified(e) => {
            parts.push(format!("node={}", e.node_name));
            parts.push(format!("domain={}", e.domain));
            parts.push(format!("tunnels={}", e.tunnel_count));
            parts.push(format!("timeToActive={}", human_ms(e.time_to_active_ms)));
        }
        Body::Failed(e) => {
            parts.push(format!("stage={}", e.stage));
            parts.push(format!("attempt={}", e.attempt));
            if !e.instance_id.is_empty() {
                parts.push(format!("instance={}", e.instance_id));
            }
            parts.push(format!("reason={:?}", e.reason));
        }
        Body::Degraded(e) => {
            parts.push(format!("node={}", e.node_name));
            parts.push(format!("stage={}", e.stage));
            if !e.instance_id.is_empty() {
                parts.push(format!("instance={}", e.instance_id));
            }
            parts.push(format!("reason={:?}", e.reason));
        }
        Body::Rebuild(e) => {
            if let Some(i) = &e.instance {
                parts.push(format!("instance={}", i.instance_id));
            }
            parts.push(format!("reason={:?}", e.reason));
        }
        Body::Usage(e) => {
            parts.push(format!("node={}", e.node));
            parts.push(format!("+{}", human_bytes(e.delta_bytes)));
            parts.push(format!("used={}/{}", human_bytes(e.used_bytes), human_bytes(e.sold_bytes)));
            parts.push(format!("reports={}", e.reports));
        }
        Body::Quota(e) => {
            parts.push(format!("node={}", e.node));
            parts.push(format!("{}→{}", quota_label(e.from), quota_label(e.to)));
            parts.push(format!("used={}/{}", human_bytes(e.used_bytes), human_bytes(e.sold_bytes)));
        }
    }
    format!("{:<9} {}", body.event_name(), parts.join(" "))
}

/// `1.5 GiB`-style sizes (IEC units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// `41.2s` / `3m05s`.
pub fn human_ms(ms: i64) -> String {
    if ms < 0 {
        return "-".into();
    }
    let s = ms as f64 / 1000.0;
    if s < 60.0 { format!("{s:.1}s") } else { format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60) }
}

/// An RFC 3339 timestamp (UTC, millisecond precision, fixed width) from epoch milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => String::new(),
    }
}

/// A JSON object from pairs, dropping empty strings (keeps `--json` outputs compact).
pub fn object(pairs: Vec<(&str, Value)>) -> Value {
    let mut m = Map::new();
    for (k, v) in pairs {
        if v.as_str() == Some("") {
            continue;
        }
        m.insert(k.to_string(), v);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{NodeDeployed, OpClaimed, Operation, QuotaChanged};

    #[test]
    fn sealed_tokens_show_as_sizes_and_hashes_as_hex() {
        let op = Operation { operation_id: "op-1".into(), sealed_claim_token: vec![9; 41], ..Default::default() };
        let j = to_json(&Body::Claimed(OpClaimed { op: Some(op.clone()) }));
        assert_eq!(j["event"], "claimed");
        assert_eq!(j["type"], "pn.v1.OpClaimed");
        assert_eq!(j["body"]["op"]["operationId"], "op-1");
        assert_eq!(j["body"]["op"]["sealedClaimToken"], "<sealed, 41 bytes>");
        let j = to_json(&Body::Deployed(NodeDeployed {
            op: Some(op),
            node_secret_sha256: vec![0xab, 0x01],
            ..Default::default()
        }));
        assert_eq!(j["body"]["nodeSecretSha256"], "ab01");
    }

    #[test]
    fn quota_states_are_labels() {
        let j = to_json(&Body::Quota(QuotaChanged {
            node: "pn-a".into(),
            from: QuotaState::Ok as i32,
            to: QuotaState::Warn as i32,
            ..Default::default()
        }));
        assert_eq!(j["body"]["from"], "ok");
        assert_eq!(j["body"]["to"], "warn");
        assert!(summary(&Body::Quota(QuotaChanged { from: 9, ..Default::default() })).contains("unknown"));
    }

    #[test]
    fn a_degraded_event_names_its_node_and_reason() {
        let op = Operation { operation_id: "op-1".into(), sub_id: "s-1".into(), ..Default::default() };
        let b = Body::Degraded(proto::OpDegraded {
            op: Some(op),
            node_name: "pn-s-1".into(),
            stage: "verify".into(),
            reason: "usage: none".into(),
            ..Default::default()
        });
        assert_eq!((op_id(&b), sub_id(&b), node(&b)), ("op-1", "s-1", Some("pn-s-1")));
        let line = summary(&b);
        assert!(line.starts_with("degraded") && line.contains("node=pn-s-1") && line.contains("reason=\"usage: none\""), "{line}");
        assert_eq!(to_json(&b)["body"]["reason"], "usage: none");
    }

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1 << 40), "1.0 TiB");
        assert_eq!(human_ms(41_200), "41.2s");
        assert_eq!(human_ms(185_000), "3m05s");
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_635_368_800), "2026-11-25T19:36:08.800Z");
    }
}
