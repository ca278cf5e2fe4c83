//! What this process's consumer loops hold now, per operation: a message being handled
//! (`running`), parked until a time (`parked`, `HandleError::Park`) or nak'ed to be tried again
//! (`retrying`). In memory only: a restarted process learns a parked operation again when
//! JetStream brings its message back. Served read-only on the ops listener as
//! `GET /v1/ops/held` (`pnctl ops list` reads it for `--parked`).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use proto::OpId;
use serde::Serialize;

/// One held operation at one stage.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldOp {
    pub operation_id: OpId,
    pub stage: String,
    /// `running` | `parked` | `retrying`
    pub state: &'static str,
    /// When this process first took the operation's message at this stage (unix ms).
    pub since_ms: i64,
    /// When a parked or retrying message comes back (unix ms).
    pub until_ms: Option<i64>,
    /// Why it is parked or retried (the handler's words).
    pub reason: String,
    /// JetStream's delivery count of the message.
    pub deliveries: i64,
}

static HELD: LazyLock<Mutex<HashMap<(String, OpId), HeldOp>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn set(stage: &str, op: &OpId, state: &'static str, until: Option<Duration>, reason: &str, deliveries: i64) {
    let now = crate::now_ms();
    if let Ok(mut m) = HELD.lock() {
        let e = m.entry((stage.to_string(), op.clone())).or_insert_with(|| HeldOp {
            operation_id: op.clone(),
            stage: stage.to_string(),
            state,
            since_ms: now,
            until_ms: None,
            reason: String::new(),
            deliveries,
        });
        e.state = state;
        e.until_ms = until.map(|d| now + d.as_millis() as i64);
        e.reason = reason.chars().take(200).collect();
        e.deliveries = deliveries;
    }
}

/// A handler started on `op`'s message at `stage`.
pub fn running(stage: &str, op: &OpId, deliveries: i64) {
    set(stage, op, "running", None, "", deliveries);
}

/// `op`'s message was parked for `after`.
pub fn parked(stage: &str, op: &OpId, after: Duration, reason: &str, deliveries: i64) {
    set(stage, op, "parked", Some(after), reason, deliveries);
}

/// `op`'s message was nak'ed to be tried again after `after`.
pub fn retrying(stage: &str, op: &OpId, after: Duration, reason: &str, deliveries: i64) {
    set(stage, op, "retrying", Some(after), reason, deliveries);
}

/// `op`'s message at `stage` is done with (acked, failed, dropped).
pub fn released(stage: &str, op: &OpId) {
    if let Ok(mut m) = HELD.lock() {
        m.remove(&(stage.to_string(), op.clone()));
    }
}

/// Everything held now, oldest first.
pub fn snapshot() -> Vec<HeldOp> {
    let mut v: Vec<HeldOp> = HELD.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
    v.sort_by(|a, b| a.since_ms.cmp(&b.since_ms).then_with(|| a.operation_id.cmp(&b.operation_id)));
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_parked_operation_is_listed_until_released() {
        let op = OpId::parse("op-held-1").unwrap();
        running("cloud", &op, 1);
        parked("cloud", &op, Duration::from_secs(60), "waiting for boot", 1);
        let v = snapshot();
        let h = v.iter().find(|h| h.operation_id == op).unwrap();
        assert_eq!((h.state, h.stage.as_str(), h.reason.as_str()), ("parked", "cloud", "waiting for boot"));
        assert!(h.until_ms.unwrap() > h.since_ms);
        released("cloud", &op);
        assert!(!snapshot().iter().any(|h| h.operation_id == op));
    }
}
