//! Pnp's wire contract: the `pn.v1` protobuf messages, the NATS subjects and the header names.
//! No I/O lives here — `proto` knows nothing about NATS connections, sled or Center.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/pn.v1.rs"));
}

pub mod ids;
pub mod subjects;

pub use ids::{BadId, OpId, SubId};

pub use pb::event::Body;
pub use pb::{
    Event, Instance, InstanceReady, InstanceRebuild, NodeDeployed, NodeVerified, OpClaimed, OpDegraded, OpFailed, Operation,
    QuotaChanged, QuotaState, UsageRecorded,
};

use prost::Message;

/// The pipeline's stages, in order. The names are those of `pn.replay.<stage>` and of the
/// `Pn-Stage` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Claim,
    Cloud,
    Deploy,
    Verify,
    Meter,
}

impl Stage {
    pub const ALL: [Stage; 5] = [Stage::Claim, Stage::Cloud, Stage::Deploy, Stage::Verify, Stage::Meter];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Claim => "claim",
            Stage::Cloud => "cloud",
            Stage::Deploy => "deploy",
            Stage::Verify => "verify",
            Stage::Meter => "meter",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a body could not be turned into an event.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a protobuf `pn.v1.Event` at all.
    Malformed(String),
    /// A valid envelope with no body set.
    Empty,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(e) => write!(f, "malformed pn.v1.Event: {e}"),
            DecodeError::Empty => f.write_str("pn.v1.Event has no body"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl Body {
    /// The message's protobuf name, for the `Content-Type` header.
    pub fn type_name(&self) -> &'static str {
        match self {
            Body::Claimed(_) => "pn.v1.OpClaimed",
            Body::Instance(_) => "pn.v1.InstanceReady",
            Body::Deployed(_) => "pn.v1.NodeDeployed",
            Body::Verified(_) => "pn.v1.NodeVerified",
            Body::Failed(_) => "pn.v1.OpFailed",
            Body::Usage(_) => "pn.v1.UsageRecorded",
            Body::Quota(_) => "pn.v1.QuotaChanged",
            Body::Degraded(_) => "pn.v1.OpDegraded",
            Body::Rebuild(_) => "pn.v1.InstanceRebuild",
        }
    }

    /// The event name used in subjects (`pn.op.<event>.<operationId>`).
    pub fn event_name(&self) -> &'static str {
        match self {
            Body::Claimed(_) => subjects::CLAIMED,
            Body::Instance(_) => subjects::INSTANCE,
            Body::Deployed(_) => subjects::DEPLOYED,
            Body::Verified(_) => subjects::VERIFIED,
            Body::Failed(_) => subjects::FAILED,
            Body::Usage(_) => "usage",
            Body::Quota(_) => "quota",
            Body::Degraded(_) => subjects::DEGRADED,
            Body::Rebuild(_) => subjects::REBUILD,
        }
    }
}

/// A message type an event body can hold: [`EventBody::from_body`] takes it out of a
/// [`Body`], or gives the body back when it holds another type.
pub trait EventBody: Sized {
    /// The protobuf name, as in [`Body::type_name`].
    const TYPE_NAME: &'static str;
    fn from_body(body: Body) -> Result<Self, Body>;
}

macro_rules! event_body {
    ($($ty:ident => $variant:ident, $name:literal;)*) => {$(
        impl EventBody for $ty {
            const TYPE_NAME: &'static str = $name;
            fn from_body(body: Body) -> Result<$ty, Body> {
                match body {
                    Body::$variant(m) => Ok(m),
                    other => Err(other),
                }
            }
        }
    )*};
}

event_body! {
    OpClaimed => Claimed, "pn.v1.OpClaimed";
    InstanceReady => Instance, "pn.v1.InstanceReady";
    NodeDeployed => Deployed, "pn.v1.NodeDeployed";
    NodeVerified => Verified, "pn.v1.NodeVerified";
    OpFailed => Failed, "pn.v1.OpFailed";
    UsageRecorded => Usage, "pn.v1.UsageRecorded";
    QuotaChanged => Quota, "pn.v1.QuotaChanged";
    OpDegraded => Degraded, "pn.v1.OpDegraded";
    InstanceRebuild => Rebuild, "pn.v1.InstanceRebuild";
}

impl Event {
    pub fn new(body: Body) -> Event {
        Event { body: Some(body) }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decodes an envelope; any byte string gives an error or an event, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Body, DecodeError> {
        let ev = Event::decode(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        ev.body.ok_or(DecodeError::Empty)
    }
}

/// `pn-<subId>`: the name of a subscription's VPS and node (the idempotency root at the
/// cloud and at Center). The one place it is built.
pub fn node_name(sub_id: &str) -> String {
    format!("pn-{sub_id}")
}

impl OpFailed {
    /// THE constructor of a `pn.op.failed`: `operation_id` failed at `stage` (a stage name, or
    /// svc-claimer's `abandon`) for `reason`, at `failed_at_ms`; attempt 1 until
    /// [`OpFailed::of_op`] gives the operation's own.
    pub fn new(operation_id: &str, stage: &str, reason: impl Into<String>, failed_at_ms: i64) -> OpFailed {
        OpFailed {
            operation_id: operation_id.to_string(),
            stage: stage.to_string(),
            reason: reason.into(),
            attempt: 1,
            failed_at_ms,
            ..Default::default()
        }
    }

    /// What the claimer and the reaper need from the operation: its subscription, holder and
    /// claim attempt (at least 1).
    pub fn of_op(mut self, op: &Operation) -> OpFailed {
        self.sub_id = op.sub_id.clone();
        self.holder = op.holder.clone();
        self.attempt = op.claim_attempt.max(1);
        self
    }

    /// The instance the operation holds, for svc-cloud's reaper.
    pub fn on_instance(mut self, instance_id: impl Into<String>) -> OpFailed {
        self.instance_id = instance_id.into();
        self
    }

    /// Its deduplication id, `<operationId>.failed.<attempt>`.
    pub fn msg_id(&self) -> String {
        subjects::failed_msg_id(&self.operation_id, self.attempt)
    }
}

impl QuotaState {
    pub fn label(self) -> &'static str {
        match self {
            QuotaState::Unspecified => "unknown",
            QuotaState::Ok => "ok",
            QuotaState::Warn => "warn",
            QuotaState::Cutoff => "cutoff",
        }
    }
}

/// Header names. `Nats-Msg-Id` is NATS's own deduplication header.
pub mod headers {
    pub const MSG_ID: &str = "Nats-Msg-Id";
    pub const OP: &str = "Pn-Op";
    pub const SUB: &str = "Pn-Sub";
    pub const STAGE: &str = "Pn-Stage";
    pub const CONTENT_TYPE: &str = "Content-Type";
    pub const TRACEPARENT: &str = "traceparent";

    /// `application/protobuf; proto=pn.v1.<Message>`
    pub fn content_type(type_name: &str) -> String {
        format!("application/protobuf; proto={type_name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op() -> Operation {
        Operation {
            operation_id: "op-1".into(),
            sub_id: "sub-1".into(),
            region: "sg".into(),
            traffic_total_bytes: 950 * 1024 * 1024 * 1024,
            ip_type: "residential".into(),
            center_url: "http://127.0.0.1:1".into(),
            domain: String::new(),
            sealed_claim_token: vec![1, 2, 3],
            holder: "h".into(),
            claimed_at_ms: 5,
            claim_attempt: 1,
            queued_at_ms: 4,
        }
    }

    #[test]
    fn every_body_round_trips() {
        let bodies = vec![
            Body::Claimed(OpClaimed { op: Some(op()) }),
            Body::Instance(InstanceReady {
                op: Some(op()),
                instance: Some(Instance { instance_id: "i-1".into(), ipv4: "127.0.1.1".into(), ..Default::default() }),
                ready_at_ms: 9,
            }),
            Body::Deployed(NodeDeployed {
                op: Some(op()),
                node_secret_sha256: vec![7; 32],
                sold_bytes: 10,
                private_node: true,
                ..Default::default()
            }),
            Body::Verified(NodeVerified { tunnel_count: 1, ..Default::default() }),
            Body::Failed(OpFailed { stage: "cloud".into(), reason: "no plan".into(), ..Default::default() }),
            Body::Degraded(OpDegraded { stage: "verify".into(), reason: "usage: none seen".into(), ..Default::default() }),
            Body::Rebuild(InstanceRebuild { reason: "cloud-init: status: error".into(), requested_at_ms: 7, ..Default::default() }),
            Body::Usage(UsageRecorded { node: "pn-a".into(), delta_bytes: 3, ..Default::default() }),
            Body::Quota(QuotaChanged {
                node: "pn-a".into(),
                from: QuotaState::Ok as i32,
                to: QuotaState::Cutoff as i32,
                ..Default::default()
            }),
        ];
        for b in bodies {
            let bytes = Event::new(b.clone()).to_bytes();
            assert_eq!(Event::from_bytes(&bytes), Ok(b));
        }
        let failed = Body::Failed(OpFailed::new("op-1", "cloud", "r", 1));
        assert_eq!(<OpFailed as EventBody>::TYPE_NAME, failed.type_name());
        assert!(OpFailed::from_body(failed.clone()).is_ok());
        assert_eq!(NodeVerified::from_body(failed.clone()), Err(failed));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Event::from_bytes(&[0xff, 0xff, 0xff]).is_err());
        assert_eq!(Event::from_bytes(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn subjects_carry_the_operation_as_last_token() {
        assert_eq!(subjects::op_event(subjects::CLAIMED, "op-9"), "pn.op.claimed.op-9");
        assert_eq!(subjects::op_id_of("pn.op.instance.op-9"), Some("op-9"));
        assert_eq!(subjects::replay(Stage::Deploy), "pn.replay.deploy");
        assert_eq!(subjects::meter_usage("pn-x"), "meter.usage.pn-x");
        assert_eq!(subjects::msg_id("op-9", Stage::Cloud, 2), "op-9.cloud.2");
        assert_eq!(subjects::failed_msg_id("op-9", 0), "op-9.failed.1");
        assert_eq!(subjects::degraded_msg_id("op-9", 2), "op-9.degraded.2");
        assert_eq!(subjects::rebuild_msg_id("op-9", "i-1"), "op-9.rebuild.i-1");
        assert_eq!(subjects::rebuilt_msg_id("op-9.cloud.1", 2), "op-9.cloud.1.rebuilt2");
        assert_eq!(subjects::replay_msg_id("op-9.cloud.1", 5), "op-9.cloud.1.replay.5");
        assert_eq!(subjects::usage_msg_id("pn-x", 3), "pn-x.usage.3");
        assert_eq!(subjects::quota_msg_id("pn-x", 4), "pn-x.quota.4");
        assert_eq!(node_name("s-1"), "pn-s-1");
    }

    #[test]
    fn op_failed_is_built_from_the_operation() {
        let f = OpFailed::new("op-1", "deploy", "boom", 9).of_op(&op()).on_instance("i-1");
        assert_eq!(
            f,
            OpFailed {
                operation_id: "op-1".into(),
                sub_id: "sub-1".into(),
                stage: "deploy".into(),
                reason: "boom".into(),
                attempt: 1,
                failed_at_ms: 9,
                instance_id: "i-1".into(),
                holder: "h".into(),
            }
        );
        assert_eq!(f.msg_id(), "op-1.failed.1");
        let bare = OpFailed::new("op-2", "cloud", "x", 1);
        assert_eq!((bare.attempt, bare.sub_id.as_str(), bare.instance_id.as_str()), (1, "", ""));
    }

    #[test]
    fn stage_names_parse_back() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(s));
        }
        assert_eq!(Stage::parse("nope"), None);
    }
}
