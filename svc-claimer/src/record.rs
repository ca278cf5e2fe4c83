//! The claimer's per-operation record. The claim token is stored only sealed.

use kit::state::{Record, Store};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct OpRecord {
    pub operation_id: String,
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
