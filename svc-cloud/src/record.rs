//! svc-cloud's per-operation record: what was created (the intent, the ids), where the create
//! path and the boot wait stand (so a parked operation resumes where it was), and the reaper's
//! view of the operation's VPS.

use kit::state::Record;
use proto::{OpId, SubId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloudRecord {
    pub operation_id: OpId,
    pub sub_id: SubId,
    /// The claimed `pn.v1.Operation` (protobuf; its claim token is sealed), for replay.
    #[serde(with = "kit::state::b64", default)]
    pub op_pb: Vec<u8>,
    /// Set (and flushed) before the first create call: a crash after it means any
    /// `pn-<subId>` instance found later is this operation's own.
    pub create_started_at_ms: Option<i64>,
    /// Instance ids this service's create calls returned for this operation.
    pub created: Vec<String>,
    /// Instances this service deleted (no-IP fail path or reaping), or found gone.
    pub deleted: Vec<String>,
    pub instance: Option<InstanceInfo>,
    pub published: bool,
    pub failed: bool,
    /// When the reaper looks at this operation next (after the grace, or a re-check of an
    /// uncertain case); `None`: no reap planned.
    pub reap_at_ms: Option<i64>,
    /// Every instance of this operation is deleted or gone: nothing more to reap.
    pub reaped: bool,
    /// The claim attempt of the newest `pn.op.failed` seen for this operation.
    #[serde(default)]
    pub failed_attempt: Option<u32>,
    /// Center reported the operation activated (done, or its node registered): final — its
    /// VPS is never deleted by Pnp.
    #[serde(default)]
    pub activated: bool,
    /// Instances the provider showed under another name than `pn-<subId>`: never deleted.
    #[serde(default)]
    pub disowned: Vec<String>,
    /// A reap that could not be proven safe: the VPS is kept, listed for an operator
    /// (`pnctl reap --pending`) and checked again every `reap_recheck_ms`.
    #[serde(default)]
    pub reap_pending: Option<PendingReap>,
    /// The reaper's last decision, for the record.
    #[serde(default)]
    pub reap_decision: Option<ReapDecision>,
    /// Where the create path stands (seed 001 §3.f): region, tries there, reasons so far, pause.
    #[serde(default)]
    pub create: CreateCursor,
    /// An instance being waited on until it runs with a public IPv4 (the message is parked).
    #[serde(default)]
    pub boot: Option<BootWait>,
    /// Consecutive transient errors (provider, store, bus): the handler's own attempt budget,
    /// since a parking consumer has no JetStream delivery limit.
    #[serde(default)]
    pub transient_failures: u32,
    /// Instances created (or adopted) through the alternate provider (`PN_ALT_PROVIDER`):
    /// they are looked at, reaped and published through it.
    #[serde(default)]
    pub alt_instances: Vec<String>,
    /// The published instance's ports are open in its provider's firewall (or the provider
    /// has no firewall API: then the deployer's outside check decides).
    #[serde(default)]
    pub ports_opened: bool,
    /// Instances the deployer found broken (cloud-init error) that this service deleted and
    /// replaced (`pn.op.rebuild`, seed 001 §3.f); at most `PN_REBUILDS` (1).
    #[serde(default)]
    pub rebuilt: Vec<String>,
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
    /// Through the alternate provider.
    #[serde(default)]
    pub alt: bool,
}

/// An uncertain reap, kept for an operator.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct PendingReap {
    pub reason: String,
    pub since_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct ReapDecision {
    /// `deleted`, `gone`, `kept-active`, `kept-inflight`, `kept-not-ours`, `pending`.
    pub decision: String,
    pub reason: String,
    pub at_ms: i64,
}

/// The create path's position: the index into the job region's provider regions, the creates
/// tried there, the reasons collected, and the end of a seed-001 §3.f pause.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct CreateCursor {
    pub region_idx: usize,
    pub tries_in_region: u32,
    pub reasons: Vec<String>,
    /// No create before this time (the pause before a retry or a sibling region).
    pub next_create_at_ms: Option<i64>,
    /// The configured provider failed in every sibling region: the alternate one's regions.
    #[serde(default)]
    pub alt: bool,
}

/// A boot wait: the instance, since when, and what was seen so far.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct BootWait {
    pub instance_id: String,
    pub started_at_ms: i64,
    /// When the instance was first seen `running` without an IPv4.
    pub running_since_ms: Option<i64>,
    pub last_status: String,
    /// The provider region of this create (for the no-IP reason); empty for an adopted one.
    pub region: String,
    /// Created by this handler's create path (a no-IP instance is deleted and the path goes
    /// on); false for one found by the probe (adopted), which fails on no IP.
    pub from_create: bool,
    /// `InstanceInfo::adopted` for the outcome.
    pub adopted: bool,
    /// Through the alternate provider.
    #[serde(default)]
    pub alt: bool,
}

impl Record for CloudRecord {
    const VERSION: u32 = 1;
}

impl CloudRecord {
    /// The record of an operation this service has not worked on yet.
    pub fn new(operation_id: OpId, sub_id: SubId) -> CloudRecord {
        CloudRecord {
            operation_id,
            sub_id,
            op_pb: Vec::new(),
            create_started_at_ms: None,
            created: Vec::new(),
            deleted: Vec::new(),
            instance: None,
            published: false,
            failed: false,
            reap_at_ms: None,
            reaped: false,
            failed_attempt: None,
            activated: false,
            disowned: Vec::new(),
            reap_pending: None,
            reap_decision: None,
            create: CreateCursor::default(),
            boot: None,
            transient_failures: 0,
            alt_instances: Vec::new(),
            ports_opened: false,
            rebuilt: Vec::new(),
        }
    }

    /// Instances of this operation that this service may delete.
    pub fn ours(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.created.clone();
        if let Some(i) = &self.instance {
            // Adopted after our own create started: the create's answer was lost, the VPS is ours.
            if (!i.adopted || self.create_started_at_ms.is_some()) && !ids.contains(&i.id) {
                ids.push(i.id.clone());
            }
        }
        ids.retain(|id| !self.deleted.contains(id) && !self.disowned.contains(id));
        ids
    }

    /// The stored operation (the newest claim attempt this service handled), if it decodes.
    pub fn operation(&self) -> Option<proto::Operation> {
        if self.op_pb.is_empty() {
            return None;
        }
        prost::Message::decode(self.op_pb.as_slice()).ok()
    }

    /// The claim attempt of the stored operation (attempts count from 1).
    pub fn claim_attempt(&self) -> u32 {
        self.operation().map(|o| o.claim_attempt.max(1)).unwrap_or(1)
    }

    /// The node name this operation's VPS and node carry.
    pub fn node_name(&self) -> String {
        self.sub_id.node_name()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A record of operation `op-1` (subscription `s-1`) with nothing known yet.
    pub(crate) fn blank() -> CloudRecord {
        CloudRecord::new(OpId::parse("op-1").unwrap(), SubId::parse("s-1").unwrap())
    }

    #[test]
    fn ours_excludes_deleted_disowned_and_adopted_strangers() {
        let mut r = CloudRecord { created: vec!["a".into(), "b".into()], deleted: vec!["a".into()], ..blank() };
        assert_eq!(r.ours(), vec!["b".to_string()]);
        r.disowned.push("b".into());
        assert!(r.ours().is_empty());
        // Found by the probe before any create of ours: not ours to delete.
        r.instance = Some(InstanceInfo { id: "c".into(), adopted: true, ..Default::default() });
        assert!(r.ours().is_empty());
        // Found after our create started (the create's answer was lost): ours.
        r.create_started_at_ms = Some(1);
        assert_eq!(r.ours(), vec!["c".to_string()]);
    }

    #[test]
    fn an_old_record_without_the_new_fields_still_reads() {
        let old = serde_json::json!({
            "operation_id": "op", "sub_id": "s", "op_pb": "", "create_started_at_ms": null, "created": ["i"],
            "deleted": [], "instance": null, "published": true, "failed": true, "reap_at_ms": 5, "reaped": false
        });
        let r: CloudRecord = serde_json::from_value(old).unwrap();
        assert_eq!(r.reap_at_ms, Some(5));
        assert!(r.boot.is_none() && r.reap_pending.is_none() && !r.activated);
        assert_eq!(r.claim_attempt(), 1);
        assert_eq!((r.operation_id.as_str(), r.sub_id.as_str()), ("op", "s"));
    }

    /// A record written when the ids were `String`s reads into `OpId`/`SubId` and is written
    /// back byte for byte (the sled envelope's `r` is this JSON).
    #[test]
    fn a_record_of_the_string_shape_reads_and_writes_the_same_bytes() {
        let old = r#"{"operation_id":"op-7","sub_id":"s_7","op_pb":"","create_started_at_ms":1,"created":["i-1"],"deleted":[],"instance":null,"published":true,"failed":false,"reap_at_ms":null,"reaped":false,"failed_attempt":null,"activated":false,"disowned":[],"reap_pending":null,"reap_decision":null,"create":{"region_idx":0,"tries_in_region":1,"reasons":[],"next_create_at_ms":null,"alt":false},"boot":null,"transient_failures":0,"alt_instances":[],"ports_opened":true,"rebuilt":[]}"#;
        let r: CloudRecord = serde_json::from_str(old).unwrap();
        assert_eq!((r.operation_id.as_str(), r.node_name().as_str()), ("op-7", "pn-s_7"));
        assert_eq!(serde_json::to_string(&r).unwrap(), old);
    }
}
