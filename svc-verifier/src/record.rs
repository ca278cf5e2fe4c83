//! svc-verifier's per-operation record: the deadline survives restarts.

use kit::state::Record;
use proto::NodeVerified;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct VerifyRecord {
    pub operation_id: String,
    pub claim_attempt: u32,
    /// The `NodeDeployed` event (protobuf; holds no secret), for replay.
    pub deployed_pb: Vec<u8>,
    pub started_ms: i64,
    pub deadline_ms: i64,
    pub last_unmet: String,
    #[serde(with = "verified_pb", default)]
    pub verified: Option<NodeVerified>,
    pub failed: Option<String>,
}

impl Record for VerifyRecord {
    const VERSION: u32 = 1;
}

mod verified_pb {
    use proto::NodeVerified;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<NodeVerified>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref().map(prost::Message::encode_to_vec).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NodeVerified>, D::Error> {
        let b: Option<Vec<u8>> = Option::deserialize(d)?;
        match b {
            Some(b) => prost::Message::decode(b.as_slice()).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}
