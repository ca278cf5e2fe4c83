//! svc-cloud's per-operation record.

use kit::state::Record;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CloudRecord {
    pub operation_id: String,
    pub sub_id: String,
    /// The claimed `pn.v1.Operation` (protobuf; its claim token is sealed), for replay.
    #[serde(with = "kit::state::b64", default)]
    pub op_pb: Vec<u8>,
    /// Set (and flushed) before the first create call: a crash after it means any
    /// `pn-<subId>` instance found later is this operation's own.
    pub create_started_at_ms: Option<i64>,
    /// Instance ids this service's create calls returned for this operation.
    pub created: Vec<String>,
    /// Instances this service deleted (no-IP fail path or reaping).
    pub deleted: Vec<String>,
    pub instance: Option<InstanceInfo>,
    pub published: bool,
    pub failed: bool,
    pub reap_at_ms: Option<i64>,
    pub reaped: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct InstanceInfo {
    pub id: String,
    pub name: String,
    pub ipv4: String,
    pub account: String,
    pub region: String,
    pub plan: String,
    pub image: String,
    pub adopted: bool,
}

impl Record for CloudRecord {
    const VERSION: u32 = 1;
}

impl CloudRecord {
    /// Instances of this operation that this service may delete.
    pub fn ours(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.created.clone();
        if let Some(i) = &self.instance {
            // Adopted after our own create started: the create's answer was lost, the VPS is ours.
            if (!i.adopted || self.create_started_at_ms.is_some()) && !ids.contains(&i.id) {
                ids.push(i.id.clone());
            }
        }
        ids.retain(|id| !self.deleted.contains(id));
        ids
    }
}
