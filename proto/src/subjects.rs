//! Every NATS subject and stream name Pnp uses is built here; no subject literal lives
//! anywhere else. The operation id (or the node name) is always the last token.

use crate::Stage;

pub const OPS_STREAM: &str = "PN_OPS";
pub const REPLAY_STREAM: &str = "PN_REPLAY";
pub const METER_STREAM: &str = "PN_METER";

pub const OPS_ALL: &str = "pn.op.>";
pub const REPLAY_ALL: &str = "pn.replay.>";
pub const METER_ALL: &str = "meter.>";

pub const CLAIMED: &str = "claimed";
pub const INSTANCE: &str = "instance";
pub const DEPLOYED: &str = "deployed";
pub const VERIFIED: &str = "verified";
pub const FAILED: &str = "failed";
/// An activated node whose later check did not hold: a warning, never a failure.
pub const DEGRADED: &str = "degraded";
/// The deployer asks svc-cloud to replace a broken, never-activated instance (seed 001 §3.f).
pub const REBUILD: &str = "rebuild";

/// `pn.op.<event>.<operationId>`
pub fn op_event(event: &str, operation_id: &str) -> String {
    format!("pn.op.{event}.{operation_id}")
}

/// `pn.op.<event>.>`: a consumer's filter for one event kind.
pub fn op_filter(event: &str) -> String {
    format!("pn.op.{event}.>")
}

/// `pn.op.*.<operationId>`: one operation's whole history.
pub fn op_history(operation_id: &str) -> String {
    format!("pn.op.*.{operation_id}")
}

/// `pn.replay.<stage>`; the payload is the plain operation id.
pub fn replay(stage: Stage) -> String {
    format!("pn.replay.{stage}")
}

pub fn meter_usage(node: &str) -> String {
    format!("meter.usage.{node}")
}

pub fn meter_quota(node: &str) -> String {
    format!("meter.quota.{node}")
}

/// The deduplication id: `<operationId>.<stage>.<attempt>`.
pub fn msg_id(operation_id: &str, stage: Stage, attempt: u32) -> String {
    format!("{operation_id}.{stage}.{attempt}")
}

/// `<operationId>.failed.<attempt>` (attempt at least 1): a `pn.op.failed`'s deduplication id.
pub fn failed_msg_id(operation_id: &str, attempt: u32) -> String {
    format!("{operation_id}.{FAILED}.{}", attempt.max(1))
}

/// `<operationId>.degraded.<attempt>`: a `pn.op.degraded`'s deduplication id.
pub fn degraded_msg_id(operation_id: &str, attempt: u32) -> String {
    format!("{operation_id}.{DEGRADED}.{attempt}")
}

/// `<operationId>.rebuild.<instanceId>`: one rebuild request per broken instance.
pub fn rebuild_msg_id(operation_id: &str, instance_id: &str) -> String {
    format!("{operation_id}.{REBUILD}.{instance_id}")
}

/// `<msgId>.rebuilt<n>`: svc-cloud's outcome for the same attempt after `n` replaced instances.
pub fn rebuilt_msg_id(msg_id: &str, n: usize) -> String {
    format!("{msg_id}.rebuilt{n}")
}

/// `<msgId>.replay.<nonce>`: a replayed outcome, a message of its own (not deduplicated
/// against the original).
pub fn replay_msg_id(msg_id: &str, nonce: i64) -> String {
    format!("{msg_id}.replay.{nonce}")
}

/// `<node>.usage.<reports>`: svc-meter's usage event of a node's `reports`-th report.
pub fn usage_msg_id(node: &str, reports: u64) -> String {
    format!("{node}.usage.{reports}")
}

/// `<node>.quota.<seq>`: svc-meter's `seq`-th quota change of a node.
pub fn quota_msg_id(node: &str, seq: u64) -> String {
    format!("{node}.quota.{seq}")
}

/// The last token of a subject: the operation id or the node name.
pub fn op_id_of(subject: &str) -> Option<&str> {
    subject.rsplit('.').next().filter(|s| !s.is_empty())
}

/// Subjects may not contain whitespace, `.`, `*` or `>` inside a token: ids that would are
/// refused before they are used in a subject.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
