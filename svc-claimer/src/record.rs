//! The claimer's per-operation record. The claim token is stored only sealed.

use kit::state::{Record, Store};
use proto::OpId;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpRecord {
    pub operation_id: OpId,
    /// Empty when a failure event of an operation another replica claimed came without one.
    pub sub_id: String,
    pub holder: String,
    pub claim_attempt: u32,
    pub lease_seconds: u32,
    /// The `pn.v1.Operation` as published (protobuf bytes; the claim token inside is sealed).
    #[serde(with = "kit::state::b64", default)]
    pub op_pb: Vec<u8>,
    pub published: bool,
    pub instance_id: Option<String>,
    pub ipv4: Option<String>,
    pub reported_in_progress: bool,
    /// `verified`, `failed`, `center` (Center says the operation is terminal), `activated`
    /// (a failure event came for an operation Center reports activated; not reported), or
    /// `lost` (the lease was lost and another holder holds the operation).
    pub terminal: Option<String>,
    pub failed_reported: bool,
}

/// `OpRecord::terminal` of an operation whose lease went to another holder.
pub const LOST: &str = "lost";

/// A concise, secret-free reason: `<stage>: <reason>`, at most 240 characters.
pub fn concise_reason(stage: &str, reason: &str, secrets: &[&str]) -> String {
    let mut r = reason.replace(['\n', '\r'], " ");
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        r = r.replace(s, "[redacted]");
    }
    let r: String = r.chars().take(220).collect();
    format!("{stage}: {r}")
}

impl OpRecord {
    /// A record of `operation_id` with nothing known yet.
    pub fn new(operation_id: OpId, sub_id: String) -> OpRecord {
        OpRecord {
            operation_id,
            sub_id,
            holder: String::new(),
            claim_attempt: 0,
            lease_seconds: 0,
            op_pb: Vec::new(),
            published: false,
            instance_id: None,
            ipv4: None,
            reported_in_progress: false,
            terminal: None,
            failed_reported: false,
        }
    }

    /// The `result` of an in_progress report: `{instanceId, ipv4}` once known.
    pub fn progress_result(&self) -> Option<serde_json::Value> {
        match (&self.instance_id, &self.ipv4) {
            (Some(i), Some(ip)) => Some(serde_json::json!({"instanceId": i, "ipv4": ip})),
            _ => None,
        }
    }
}

impl Record for OpRecord {
    const VERSION: u32 = 1;
}

impl OpRecord {
    pub fn is_active(&self) -> bool {
        self.terminal.is_none() && self.published
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    holder: String,
}

impl Record for Meta {
    const VERSION: u32 = 1;
}

/// The holder id: configured, or generated once and kept so a restart holds the same leases.
pub async fn holder(store: &Store, configured: &str) -> anyhow::Result<String> {
    if !configured.is_empty() {
        return Ok(configured.to_string());
    }
    let meta = store.table::<Meta>("meta")?;
    if let Some(m) = meta.get("holder")? {
        return Ok(m.holder);
    }
    let h = format!("pn-claimer-{}", hex_id());
    meta.put("holder", &Meta { holder: h.clone() }).await?;
    Ok(h)
}

fn hex_id() -> String {
    (0..6).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A record written when `operation_id` was a `String` reads into `OpId` and is written
    /// back byte for byte (the sled envelope's `r` is this JSON).
    #[test]
    fn a_record_of_the_string_shape_reads_and_writes_the_same_bytes() {
        let old = r#"{"operation_id":"op-7","sub_id":"s_7","holder":"pn-claimer-1","claim_attempt":2,"lease_seconds":600,"op_pb":"CgRvcC03","published":true,"instance_id":"i-1","ipv4":"192.0.2.1","reported_in_progress":true,"terminal":null,"failed_reported":false}"#;
        let r: OpRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.operation_id, OpId::parse("op-7").unwrap());
        assert_eq!((r.sub_id.as_str(), r.claim_attempt, r.op_pb.as_slice()), ("s_7", 2, b"\n\x04op-7".as_slice()));
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
    }
}
