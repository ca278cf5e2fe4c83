//! svc-verifier's per-operation record: everything a round needs, so no round holds anything
//! between messages — the deadline (kept across restarts), the checks that held (log lines
//! scroll away; a restarted verifier keeps what it saw), when to look next, and the outcome:
//! verified, failed, or degraded (activated at Center, a check still not holding).

use kit::state::Record;
use proto::{NodeVerified, OpId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyRecord {
    pub operation_id: OpId,
    #[serde(default)]
    pub claim_attempt: u32,
    /// The `NodeDeployed` event (protobuf; holds no secret), for replay.
    #[serde(default, with = "kit::state::b64")]
    pub deployed_pb: Vec<u8>,
    #[serde(default)]
    pub started_ms: i64,
    #[serde(default)]
    pub deadline_ms: i64,
    /// The first check that did not hold in the last round.
    #[serde(default)]
    pub last_unmet: String,
    /// The checks that held (each stays held).
    #[serde(default)]
    pub held: Held,
    /// Rounds run so far (the back-off between rounds grows with them).
    #[serde(default)]
    pub rounds: u32,
    /// When the next round is due (epoch ms); a message delivered earlier parks until then.
    #[serde(default)]
    pub next_check_ms: i64,
    /// Consecutive times Center could not say whether the operation is activated.
    #[serde(default)]
    pub unknown_looks: u32,
    /// Set by a `pn.replay.verify` that took the operation over: the `pn.op.deployed` message
    /// then leaves it to the replay.
    #[serde(default)]
    pub replay_driven: bool,
    #[serde(default, with = "verified_pb")]
    pub verified: Option<NodeVerified>,
    #[serde(default)]
    pub failed: Option<String>,
    #[serde(default)]
    pub degraded: Option<Degraded>,
    /// Why the verifier stopped looking without an outcome (the watch ran out).
    #[serde(default)]
    pub gave_up: Option<String>,
}

/// Runbook step-7 checks that held.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Held {
    /// k2s logged `server ready`.
    pub k2s_ready: bool,
    /// The sidecar logged `Registration completed`.
    pub registered_log: bool,
    /// The sidecar logged `usage-reporter-start` (private nodes).
    pub reporter: bool,
    /// The node is listed at Center with one tunnel on this domain.
    pub listed_domain: Option<String>,
    /// Center reported the operation `done`.
    pub done: bool,
    /// Center's ledger (`trafficUsedBytes` in `get_cloud_instance`) advanced past the first
    /// reading (runbook step 7, "Usage recorded in Center").
    pub usage: bool,
    /// The first reading of Center's ledger for this deployment; `usage` holds on a later,
    /// higher one.
    pub center_usage_first: Option<u64>,
}

impl Held {
    /// Whether a check that reads the node's logs over SSH is still pending.
    pub fn needs_logs(&self, private_node: bool) -> bool {
        !self.k2s_ready || !self.registered_log || (private_node && !self.reporter)
    }
}

/// The operation is activated at Center but a check did not hold by the deadline.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Degraded {
    pub reason: String,
    /// What Center said (why the operation counts as activated).
    pub activation: String,
    pub since_ms: i64,
    /// `pn.op.degraded` was published (it is published once).
    pub published: bool,
    /// The slow watch ends here (`since_ms + degraded_watch_ms`).
    pub watch_until_ms: i64,
    /// The round it degraded at (the slow pauses grow with the rounds since).
    pub at_round: u32,
}

impl VerifyRecord {
    /// The record of an operation not looked at yet.
    pub fn new(operation_id: OpId) -> VerifyRecord {
        VerifyRecord {
            operation_id,
            claim_attempt: 0,
            deployed_pb: Vec::new(),
            started_ms: 0,
            deadline_ms: 0,
            last_unmet: String::new(),
            held: Held::default(),
            rounds: 0,
            next_check_ms: 0,
            unknown_looks: 0,
            replay_driven: false,
            verified: None,
            failed: None,
            degraded: None,
            gave_up: None,
        }
    }

    /// Still being watched while degraded (counts in the `pn_ops_degraded` gauge).
    pub fn degraded_open(&self) -> bool {
        self.degraded.is_some() && self.verified.is_none() && self.gave_up.is_none()
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_record_keeps_what_was_seen_and_old_records_still_load() {
        let r = VerifyRecord {
            deployed_pb: vec![1, 2, 3],
            held: Held { k2s_ready: true, registered_log: true, reporter: true, listed_domain: Some("d".into()), done: true, usage: false, center_usage_first: Some(7) },
            degraded: Some(Degraded { reason: "usage".into(), since_ms: 5, published: true, ..Default::default() }),
            ..VerifyRecord::new(OpId::parse("op-1").unwrap())
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""deployed_pb":"AQID""#), "{text}");
        let back: VerifyRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back.held, r.held);
        assert_eq!(back.degraded, r.degraded);
        assert!(back.degraded_open());
        assert!(!back.held.needs_logs(true));
        // A record written before these fields existed (bytes as a number array).
        let old = r#"{"operation_id":"op-1","claim_attempt":1,"deployed_pb":[1,2],"started_ms":1,"deadline_ms":2,"last_unmet":"x","verified":null,"failed":null}"#;
        let back: VerifyRecord = serde_json::from_str(old).unwrap();
        assert_eq!(back.deployed_pb, vec![1, 2]);
        assert_eq!(back.held, Held::default());
        assert!(back.held.needs_logs(false));
        assert_eq!(back.operation_id.as_str(), "op-1");
    }

    /// A record written when `operation_id` was a `String` reads into `OpId` and is written
    /// back byte for byte (the sled envelope's `r` is this JSON).
    #[test]
    fn a_record_of_the_string_shape_reads_and_writes_the_same_bytes() {
        let old = r#"{"operation_id":"op-7","claim_attempt":2,"deployed_pb":"AQID","started_ms":1,"deadline_ms":2,"last_unmet":"usage","held":{"k2s_ready":true,"registered_log":false,"reporter":false,"listed_domain":null,"done":false,"usage":false,"center_usage_first":null},"rounds":3,"next_check_ms":4,"unknown_looks":0,"replay_driven":false,"verified":null,"failed":null,"degraded":null,"gave_up":null}"#;
        let r: VerifyRecord = serde_json::from_str(old).unwrap();
        assert_eq!((r.operation_id.as_str(), r.rounds, r.deployed_pb.as_slice()), ("op-7", 3, [1u8, 2, 3].as_slice()));
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
    }
}
