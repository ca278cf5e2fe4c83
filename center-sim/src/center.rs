//! Center's operations: intents, atomic claims with a holder and a lease (a claim by the
//! current holder renews it), progress/failure reports, lease expiry (back to `queued`, old
//! token revoked), the timeout sweep, and the check a registering node's claim goes through
//! (only the live token of a held operation activates it; a revoked or used one is refused).
//! Pure state transitions with the clock passed in, so the rules are unit-tested without waiting.
//!
//! Never: return a claim token anywhere but the claim answer, or put one in an error text.

use std::collections::HashMap;

use kit::center::{NodeOperation, OpParams};
use serde::Serialize;
use serde_json::Value;

use crate::mcp::ToolError;
use crate::rfc3339;

pub const ACTION_PROVISION: &str = "provision";
/// Longest lease a claim may ask for (a day).
pub const MAX_LEASE_SECONDS: u64 = 86_400;
pub const DEFAULT_LEASE_SECONDS: u64 = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpStatus {
    Queued,
    Claimed,
    InProgress,
    Done,
    Failed,
}

impl OpStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OpStatus::Queued => "queued",
            OpStatus::Claimed => "claimed",
            OpStatus::InProgress => "in_progress",
            OpStatus::Done => "done",
            OpStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<OpStatus> {
        Some(match s {
            "queued" => OpStatus::Queued,
            "claimed" => OpStatus::Claimed,
            "in_progress" => OpStatus::InProgress,
            "done" => OpStatus::Done,
            "failed" => OpStatus::Failed,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, OpStatus::Done | OpStatus::Failed)
    }

    fn is_held(self) -> bool {
        matches!(self, OpStatus::Claimed | OpStatus::InProgress)
    }
}

/// A provisioning intent as the admin API queues it.
#[derive(Debug, Clone)]
pub struct Intent {
    pub sub_id: String,
    pub region: String,
    pub traffic_total_bytes: u64,
    pub ip_type: String,
    pub domain: String,
}

/// The arguments of one `update_node_operation` call.
#[derive(Debug, Clone, Default)]
pub struct Report<'a> {
    /// The lease's holder, when the call names one.
    pub holder: Option<&'a str>,
    /// `in_progress` or `failed` (anything else is refused).
    pub status: &'a str,
    /// Merged into the operation's result.
    pub result: Option<Value>,
    /// A failure's reason.
    pub error: Option<&'a str>,
    /// Whether an `in_progress` extends the lease.
    pub extends: bool,
}

/// One operation and its bookkeeping (counters for tests: claims, terminal reports).
#[derive(Debug, Clone)]
pub struct Op {
    pub seq: u64,
    pub id: String,
    pub action: String,
    pub sub_id: String,
    pub params: OpParams,
    pub domain: String,
    pub status: OpStatus,
    pub holder: Option<String>,
    pub lease_seconds: u64,
    pub lease_expires_ms: Option<i64>,
    pub created_ms: i64,
    pub first_claimed_ms: Option<i64>,
    pub done_ms: Option<i64>,
    pub result: Option<Value>,
    pub error: Option<String>,
    /// The token of the current claim; `None` once used or revoked (done, lease expiry,
    /// failure, sweep).
    live_token: Option<String>,
    /// The token that activated the operation and the node (name, ipv4) that carried it: only
    /// that node may register with it again.
    used: Option<(String, String, String)>,
    pub claims: u32,
    /// Claims by the current holder that renewed its lease (no new token).
    pub lease_renewals: u32,
    /// Registrations carrying one of this operation's tokens that were refused (revoked or used).
    pub claim_refusals: u32,
    pub terminal_reports: u32,
    pub progress_reports: u32,
    pub lease_expiries: u32,
    pub node_name: Option<String>,
}

/// What the sweep or lease expiry did to an operation, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickEvent {
    LeaseExpired(String),
    TimedOut(String),
}

impl Op {
    fn new(seq: u64, id: String, intent: Intent, now: i64) -> Op {
        Op {
            seq,
            id,
            action: ACTION_PROVISION.into(),
            sub_id: intent.sub_id,
            params: OpParams { region: intent.region, traffic_total_bytes: intent.traffic_total_bytes, ip_type: intent.ip_type },
            domain: intent.domain,
            status: OpStatus::Queued,
            holder: None,
            lease_seconds: DEFAULT_LEASE_SECONDS,
            lease_expires_ms: None,
            created_ms: now,
            first_claimed_ms: None,
            done_ms: None,
            result: None,
            error: None,
            live_token: None,
            used: None,
            claims: 0,
            lease_renewals: 0,
            claim_refusals: 0,
            terminal_reports: 0,
            progress_reports: 0,
            lease_expiries: 0,
            node_name: None,
        }
    }

    /// Leases a queued operation to `holder` (`Ok(true)`: a new claim with `token`), or renews
    /// the lease of the holder that holds it (`Ok(false)`: the lease runs `lease_seconds` from
    /// now, the live token stays, `token` is not used).
    pub fn claim(&mut self, holder: &str, lease_seconds: u64, now: i64, token: String) -> Result<bool, ToolError> {
        if self.status.is_held() && self.holder.as_deref() == Some(holder) {
            self.lease_seconds = lease_seconds;
            self.lease_expires_ms = Some(now + (lease_seconds as i64) * 1000);
            self.lease_renewals += 1;
            return Ok(false);
        }
        if self.status != OpStatus::Queued {
            return Err(ToolError::conflict(format!("operation {} is {}", self.id, self.status.as_str())));
        }
        self.status = OpStatus::Claimed;
        self.holder = Some(holder.to_string());
        self.lease_seconds = lease_seconds;
        self.lease_expires_ms = Some(now + (lease_seconds as i64) * 1000);
        self.first_claimed_ms.get_or_insert(now);
        self.live_token = Some(token);
        self.claims += 1;
        Ok(true)
    }

    /// `update_node_operation`: only `in_progress` (extends the lease when `report.extends`) or
    /// `failed`, of a held operation. `report.holder`, when given, must be the lease's holder;
    /// the runbook's call names none (the caller's credentials stand for it).
    pub fn update(&mut self, report: Report, now: i64) -> Result<(), ToolError> {
        let Report { holder, status, result, error, extends } = report;
        let next = match OpStatus::parse(status) {
            Some(OpStatus::Done) => {
                return Err(ToolError::rejected("done is set by the node's self-registration; a provision accepts in_progress or failed"));
            }
            Some(s @ (OpStatus::InProgress | OpStatus::Failed)) => s,
            _ => return Err(ToolError::bad_request("status must be in_progress or failed")),
        };
        if self.status.is_terminal() {
            return Err(ToolError::conflict(format!("operation {} is already {}", self.id, self.status.as_str())));
        }
        if !self.status.is_held() {
            return Err(ToolError::conflict(format!("operation {} is not held", self.id)));
        }
        if holder.is_some_and(|h| self.holder.as_deref() != Some(h)) {
            return Err(ToolError::conflict(format!("operation {} is not held by this holder", self.id)));
        }
        match next {
            OpStatus::InProgress => {
                self.status = OpStatus::InProgress;
                if extends {
                    self.lease_expires_ms = Some(now + (self.lease_seconds as i64) * 1000);
                }
                if let Some(r) = result {
                    self.result = Some(merge(self.result.take(), r));
                }
                self.progress_reports += 1;
            }
            _ => {
                self.status = OpStatus::Failed;
                self.lease_expires_ms = None;
                self.live_token = None;
                self.error = Some(clip(error.unwrap_or("failed"), 500));
                if let Some(r) = result {
                    self.result = Some(merge(self.result.take(), r));
                }
                self.terminal_reports += 1;
            }
        }
        Ok(())
    }

    /// Applies the timeout sweep and lease expiry at `now`.
    pub fn tick(&mut self, now: i64, timeout_ms: u64) -> Option<TickEvent> {
        if self.status.is_terminal() {
            return None;
        }
        if let Some(first) = self.first_claimed_ms
            && now.saturating_sub(first) >= timeout_ms as i64
        {
            self.status = OpStatus::Failed;
            self.lease_expires_ms = None;
            self.live_token = None;
            self.error = Some(format!("timed out: the node did not register within {} s of the first claim", timeout_ms / 1000));
            return Some(TickEvent::TimedOut(self.id.clone()));
        }
        if self.status.is_held() && self.lease_expires_ms.is_some_and(|t| now >= t) {
            self.status = OpStatus::Queued;
            self.holder = None;
            self.lease_expires_ms = None;
            self.live_token = None;
            self.lease_expiries += 1;
            return Some(TickEvent::LeaseExpired(self.id.clone()));
        }
        None
    }

    /// A node (`node_name` at `ipv4`) registers carrying `token` (known to belong to this
    /// operation). The live token of a held operation activates it (`done`); the token that
    /// activated it is accepted again from the same node only (re-registration after a
    /// re-`up`, a reboot); any other — a token revoked by lease expiry, a newer claim, a
    /// failure or the sweep, or one another node used — is refused.
    fn activate(&mut self, token: &str, node_name: &str, ipv4: &str, now: i64) -> ClaimCheck {
        let accepted = |op: &Op, activated| ClaimCheck::Accepted { op_id: op.id.clone(), sub_id: op.sub_id.clone(), activated };
        if let Some((used, name, ip)) = &self.used
            && used == token
        {
            if name == node_name && ip == ipv4 {
                return accepted(self, false);
            }
            self.claim_refusals += 1;
            return ClaimCheck::Refused("claim refused: already used by another node");
        }
        if self.status.is_held() && self.live_token.as_deref() == Some(token) {
            self.status = OpStatus::Done;
            self.done_ms = Some(now);
            self.lease_expires_ms = None;
            self.live_token = None;
            self.used = Some((token.to_string(), node_name.to_string(), ipv4.to_string()));
            self.node_name = Some(node_name.to_string());
            return accepted(self, true);
        }
        self.claim_refusals += 1;
        ClaimCheck::Refused("claim revoked: not the live claim of this operation")
    }

    pub fn to_wire(&self) -> NodeOperation {
        NodeOperation {
            id: self.id.clone(),
            action: self.action.clone(),
            status: self.status.as_str().into(),
            sub_id: self.sub_id.clone(),
            params: self.params.clone(),
            holder: self.holder.clone(),
            lease_expires_at: self.lease_expires_ms.map(rfc3339),
            created_at: Some(rfc3339(self.created_ms)),
            result: self.result.clone(),
            error: self.error.clone(),
        }
    }

    pub fn to_admin(&self) -> AdminOp {
        AdminOp {
            op: self.to_wire(),
            domain: self.domain.clone(),
            claims: self.claims,
            lease_renewals: self.lease_renewals,
            claim_refusals: self.claim_refusals,
            terminal_reports: self.terminal_reports,
            progress_reports: self.progress_reports,
            lease_expiries: self.lease_expiries,
            first_claimed_at: self.first_claimed_ms.map(rfc3339),
            done_at: self.done_ms.map(rfc3339),
            node_name: self.node_name.clone(),
        }
    }
}

/// `GET /admin/operations…`: the wire operation plus the counters tests assert on.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminOp {
    #[serde(flatten)]
    pub op: NodeOperation,
    pub domain: String,
    pub claims: u32,
    pub lease_renewals: u32,
    pub claim_refusals: u32,
    pub terminal_reports: u32,
    pub progress_reports: u32,
    pub lease_expiries: u32,
    pub first_claimed_at: Option<String>,
    pub done_at: Option<String>,
    pub node_name: Option<String>,
}

/// The outcome of checking a registering node's claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimCheck {
    /// The live claim of a held operation (`activated`: this registration set it `done`), or
    /// the node that used it registering again (`activated` false): the node is private and
    /// bound to `sub_id`.
    Accepted { op_id: String, sub_id: String, activated: bool },
    /// Not a claim this Center ever issued, a revoked one, or one another node used.
    Refused(&'static str),
}

/// `GET /admin/stats`: how many operations are held (`claimed` or `in_progress`) now, the most
/// ever held at once, how many leases ran out (each requeued an operation), how many were
/// renewed by a claim of their holder, and how many registrations carried a claim that was
/// refused (revoked, used by another node, or never issued).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldStats {
    pub held_now: u64,
    pub held_peak: u64,
    pub lease_expiries: u64,
    pub lease_renewals: u64,
    pub claim_refusals: u64,
}

/// Every operation, plus an index of every claim token ever issued.
#[derive(Debug, Default)]
pub struct Operations {
    ops: HashMap<String, Op>,
    seq: u64,
    tokens: HashMap<String, String>,
    /// The distinct lengths of the issued tokens (for `token_in`).
    token_lens: std::collections::BTreeSet<usize>,
    stats: HeldStats,
}

impl HeldStats {
    /// One operation went from held-or-not `was` to `now`.
    fn moved(&mut self, was: bool, now: bool) {
        match (was, now) {
            (false, true) => {
                self.held_now += 1;
                self.held_peak = self.held_peak.max(self.held_now);
            }
            (true, false) => self.held_now = self.held_now.saturating_sub(1),
            _ => {}
        }
    }
}

impl Operations {
    pub fn add(&mut self, id: String, intent: Intent, now: i64) -> &Op {
        self.seq += 1;
        let op = Op::new(self.seq, id.clone(), intent, now);
        self.ops.entry(id).or_insert(op)
    }

    pub fn get(&self, id: &str) -> Option<&Op> {
        self.ops.get(id)
    }

    /// Operations in creation order, filtered.
    pub fn list(&self, action: Option<&str>, status: Option<&str>, id: Option<&str>) -> Vec<&Op> {
        let mut v: Vec<&Op> = self
            .ops
            .values()
            .filter(|o| action.is_none_or(|a| o.action == a))
            .filter(|o| status.is_none_or(|s| o.status.as_str() == s))
            .filter(|o| id.is_none_or(|i| o.id == i))
            .collect();
        v.sort_by_key(|o| o.seq);
        v
    }

    /// Claims `id`; the caller passes a fresh token and whether an injected conflict fires.
    /// `(operation, true)`: a new claim with `token`; `(operation, false)`: the holder's lease
    /// renewed, `token` unused (the answer carries no identity).
    pub fn claim(
        &mut self,
        id: &str,
        holder: &str,
        lease_seconds: u64,
        now: i64,
        token: String,
        injected_conflict: bool,
    ) -> Result<(NodeOperation, bool), ToolError> {
        let op = self.ops.get_mut(id).ok_or_else(|| ToolError::not_found(format!("operation {id} not found")))?;
        if injected_conflict && op.status == OpStatus::Queued {
            return Err(ToolError::conflict(format!("operation {id} is claimed")));
        }
        let was = op.status.is_held();
        let new = op.claim(holder, lease_seconds, now, token.clone())?;
        self.stats.moved(was, op.status.is_held());
        let wire = op.to_wire();
        if new {
            self.token_lens.insert(token.len());
            self.tokens.insert(token, id.to_string());
        } else {
            self.stats.lease_renewals += 1;
        }
        Ok((wire, new))
    }

    pub fn update(&mut self, id: &str, report: Report, now: i64) -> Result<NodeOperation, ToolError> {
        let op = self.ops.get_mut(id).ok_or_else(|| ToolError::not_found(format!("operation {id} not found")))?;
        let was = op.status.is_held();
        op.update(report, now)?;
        self.stats.moved(was, op.status.is_held());
        Ok(op.to_wire())
    }

    pub fn tick(&mut self, now: i64, timeout_ms: u64) -> Vec<TickEvent> {
        let stats = &mut self.stats;
        self.ops
            .values_mut()
            .filter_map(|o| {
                let was = o.status.is_held();
                let ev = o.tick(now, timeout_ms)?;
                stats.moved(was, o.status.is_held());
                if matches!(ev, TickEvent::LeaseExpired(_)) {
                    stats.lease_expiries += 1;
                }
                Some(ev)
            })
            .collect()
    }

    /// Center's operator takes the lease of a held operation back (`POST
    /// /admin/operations/<id>/revoke`): as at a lease expiry, it is queued again, its holder
    /// cleared and its token revoked. With `claim_by`, another agent claims it at once (with
    /// `token`, which nobody is shown). Not held → 409.
    pub fn revoke(&mut self, id: &str, claim_by: Option<(&str, String)>, now: i64) -> Result<NodeOperation, ToolError> {
        let op = self.ops.get_mut(id).ok_or_else(|| ToolError::not_found(format!("operation {id} not found")))?;
        if !op.status.is_held() {
            return Err(ToolError::conflict(format!("operation {id} is {}, not held", op.status.as_str())));
        }
        op.status = OpStatus::Queued;
        op.holder = None;
        op.lease_expires_ms = None;
        op.live_token = None;
        self.stats.moved(true, false);
        if let Some((holder, token)) = claim_by {
            op.claim(holder, DEFAULT_LEASE_SECONDS, now, token.clone())?;
            self.stats.moved(false, true);
            self.token_lens.insert(token.len());
            self.tokens.insert(token, id.to_string());
        }
        Ok(op.to_wire())
    }

    /// Held now, the peak, and the lease expiries so far (`GET /admin/stats`).
    pub fn stats(&self) -> HeldStats {
        self.stats
    }

    /// The operation a claim token was issued for (current or revoked).
    pub fn op_of_token(&self, token: &str) -> Option<&Op> {
        self.tokens.get(token).and_then(|id| self.ops.get(id))
    }

    pub fn tokens(&self) -> impl Iterator<Item = &String> {
        self.tokens.keys()
    }

    /// Whether `text` contains a claim token ever issued.
    pub fn token_in(&self, text: &str) -> bool {
        crate::sim::contains_any(text, &self.token_lens, |w| self.tokens.contains_key(w))
    }

    /// A node (`node_name` at `ipv4`) registers with `token`: `done` if it is the live token of
    /// a held operation; accepted again from the node that used it; otherwise refused.
    pub fn register_claim(&mut self, token: &str, node_name: &str, ipv4: &str, now: i64) -> ClaimCheck {
        let check = match self.tokens.get(token).and_then(|id| self.ops.get_mut(id)) {
            Some(op) => {
                let was = op.status.is_held();
                let check = op.activate(token, node_name, ipv4, now);
                self.stats.moved(was, op.status.is_held());
                check
            }
            None => ClaimCheck::Refused("claim refused: unknown claim"),
        };
        if matches!(check, ClaimCheck::Refused(_)) {
            self.stats.claim_refusals += 1;
        }
        check
    }
}

/// Shallow merge of two JSON objects (a non-object replaces).
fn merge(old: Option<Value>, new: Value) -> Value {
    match (old, new) {
        (Some(Value::Object(mut a)), Value::Object(b)) => {
            a.extend(b);
            Value::Object(a)
        }
        (_, n) => n,
    }
}

pub fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    const IP: &str = "127.0.1.1";

    /// An update by `holder` to `status` that extends the lease.
    fn report<'a>(holder: Option<&'a str>, status: &'a str) -> Report<'a> {
        Report { holder, status, extends: true, ..Default::default() }
    }

    fn ops_with_one() -> Operations {
        let mut o = Operations::default();
        o.add(
            "op-1".into(),
            Intent {
                sub_id: "s1".into(),
                region: "sg".into(),
                traffic_total_bytes: 1 << 30,
                ip_type: "residential".into(),
                domain: String::new(),
            },
            0,
        );
        o
    }

    #[test]
    fn claim_is_exclusive_and_unknown_is_not_found() {
        let mut o = ops_with_one();
        let (op, new) = o.claim("op-1", "a", 600, 0, "t1".into(), false).unwrap();
        assert!(new);
        assert_eq!(op.status, "claimed");
        assert_eq!(op.holder.as_deref(), Some("a"));
        assert_eq!(o.claim("op-1", "b", 600, 1, "t2".into(), false).unwrap_err().code, 409);
        assert_eq!(o.claim("op-9", "b", 600, 1, "t3".into(), false).unwrap_err().code, 404);
        assert_eq!(o.get("op-1").unwrap().claims, 1);
    }

    #[test]
    fn injected_conflict_leaves_the_op_queued() {
        let mut o = ops_with_one();
        assert_eq!(o.claim("op-1", "a", 600, 0, "t1".into(), true).unwrap_err().code, 409);
        assert_eq!(o.get("op-1").unwrap().status, OpStatus::Queued);
    }

    #[test]
    fn update_rules() {
        let mut o = ops_with_one();
        let a = Some("a");
        assert_eq!(o.update("op-1", report(a, "in_progress"), 0).unwrap_err().code, 409, "not held");
        assert_eq!(o.update("op-1", report(None, "in_progress"), 0).unwrap_err().code, 409, "not held");
        o.claim("op-1", "a", 10, 0, "t1".into(), false).unwrap();
        assert_eq!(o.update("op-1", report(a, "done"), 1).unwrap_err().code, 422);
        assert_eq!(o.update("op-1", report(a, "queued"), 1).unwrap_err().code, 400);
        assert_eq!(o.update("op-1", report(Some("b"), "in_progress"), 1).unwrap_err().code, 409);
        let op = o.update("op-1", Report { result: Some(json!({"instanceId": "i-1"})), ..report(a, "in_progress") }, 5_000).unwrap();
        assert_eq!(op.status, "in_progress");
        // The runbook's own call names no holder: accepted for a held operation.
        let op = o.update("op-1", Report { result: Some(json!({"ipv4": "127.0.1.1"})), ..report(None, "in_progress") }, 6_000).unwrap();
        assert_eq!(op.result, Some(json!({"instanceId": "i-1", "ipv4": "127.0.1.1"})));
        assert_eq!(o.get("op-1").unwrap().lease_expires_ms, Some(16_000), "in_progress extends the lease");
        o.update("op-1", Report { extends: false, ..report(a, "in_progress") }, 6_500).unwrap();
        assert_eq!(o.get("op-1").unwrap().lease_expires_ms, Some(16_000), "leaseExtendsOnProgress off: unchanged");
        o.update("op-1", Report { error: Some("boom"), ..report(a, "failed") }, 7_000).unwrap();
        assert_eq!(o.update("op-1", Report { error: Some("again"), ..report(a, "failed") }, 8_000).unwrap_err().code, 409);
        let op = o.get("op-1").unwrap();
        assert_eq!(op.terminal_reports, 1);
        assert_eq!(op.error.as_deref(), Some("boom"));
    }

    #[test]
    fn lease_expiry_requeues_and_revokes_the_token() {
        let mut o = ops_with_one();
        o.claim("op-1", "a", 1, 0, "t1".into(), false).unwrap();
        assert!(o.tick(999, 1_800_000).is_empty());
        assert_eq!(o.tick(1_000, 1_800_000), vec![TickEvent::LeaseExpired("op-1".into())]);
        let op = o.get("op-1").unwrap();
        assert_eq!((op.status, op.holder.clone(), op.lease_expiries), (OpStatus::Queued, None, 1));
        assert!(matches!(o.register_claim("t1", "pn-s1", IP, 1_001), ClaimCheck::Refused(w) if w.starts_with("claim revoked")));
        assert_eq!(o.get("op-1").unwrap().status, OpStatus::Queued, "a revoked token does not activate");
        assert_eq!(o.update("op-1", report(Some("a"), "in_progress"), 1_001).unwrap_err().code, 409);
        o.claim("op-1", "b", 600, 2_000, "t2".into(), false).unwrap();
        assert_eq!(o.get("op-1").unwrap().claims, 2);
        assert!(matches!(o.register_claim("t1", "pn-s1", IP, 2_001), ClaimCheck::Refused(_)), "the old token stays revoked");
        assert!(matches!(o.register_claim("t2", "pn-s1", IP, 2_001), ClaimCheck::Accepted { activated: true, .. }));
        assert_eq!(o.get("op-1").unwrap().status, OpStatus::Done);
        assert!(matches!(o.register_claim("t2", "pn-s1", IP, 2_002), ClaimCheck::Accepted { activated: false, .. }), "the same node again");
        let used = o.register_claim("t2", "pn-evil", "127.0.9.9", 2_003);
        assert!(matches!(used, ClaimCheck::Refused(w) if w.contains("already used")), "{used:?}");
        assert!(matches!(o.register_claim("t2", "pn-s1", "127.0.9.9", 2_003), ClaimCheck::Refused(_)), "same name, another host");
        assert!(matches!(o.register_claim("t1", "pn-s1", IP, 2_004), ClaimCheck::Refused(_)));
        let op = o.get("op-1").unwrap();
        assert_eq!((op.claim_refusals, o.stats().claim_refusals), (5, 5));
        assert!(o.tick(10_000_000, 1_000).is_empty(), "done is final");
    }

    #[test]
    fn sweep_fails_from_the_first_claim_even_when_requeued() {
        let mut o = ops_with_one();
        o.claim("op-1", "a", 1, 0, "t1".into(), false).unwrap();
        o.tick(1_500, 5_000);
        o.claim("op-1", "a", 600, 2_000, "t2".into(), false).unwrap();
        assert_eq!(o.tick(5_000, 5_000), vec![TickEvent::TimedOut("op-1".into())]);
        let op = o.get("op-1").unwrap();
        assert_eq!(op.status, OpStatus::Failed);
        assert_eq!(op.terminal_reports, 0, "the sweep is not a report");
        assert!(matches!(o.register_claim("t2", "pn-s1", IP, 5_001), ClaimCheck::Refused(w) if w.starts_with("claim revoked")));
        assert_eq!(o.get("op-1").unwrap().status, OpStatus::Failed);
        assert_eq!(o.register_claim("nope", "pn-s1", IP, 5_001), ClaimCheck::Refused("claim refused: unknown claim"));
    }

    #[test]
    fn held_stats_follow_every_transition() {
        let mut o = ops_with_one();
        for (i, id) in ["op-2", "op-3"].into_iter().enumerate() {
            let intent = Intent { sub_id: format!("s{}", i + 2), region: "sg".into(), traffic_total_bytes: 1, ip_type: "x".into(), domain: String::new() };
            o.add(id.into(), intent, 0);
        }
        let st = |o: &Operations| (o.stats().held_now, o.stats().held_peak, o.stats().lease_expiries);
        assert_eq!(st(&o), (0, 0, 0));
        o.claim("op-1", "a", 1, 0, "t1".into(), false).unwrap();
        o.claim("op-2", "a", 600, 0, "t2".into(), false).unwrap();
        o.claim("op-3", "a", 600, 0, "t3".into(), false).unwrap();
        assert_eq!(st(&o), (3, 3, 0));
        o.claim("op-3", "b", 600, 0, "t4".into(), false).unwrap_err();
        o.update("op-2", report(Some("a"), "in_progress"), 10).unwrap();
        assert_eq!(st(&o), (3, 3, 0), "in_progress is still held");
        o.tick(1_000, 1_800_000);
        assert_eq!(st(&o), (2, 3, 1), "op-1's lease ran out");
        assert!(matches!(o.register_claim("t2", "pn-s2", IP, 1_001), ClaimCheck::Accepted { activated: true, .. }));
        assert_eq!(st(&o), (1, 3, 1), "done is not held");
        o.update("op-3", Report { error: Some("x"), ..report(Some("a"), "failed") }, 1_002).unwrap();
        assert_eq!(st(&o), (0, 3, 1));
        o.claim("op-1", "a", 600, 2_000, "t5".into(), false).unwrap();
        o.tick(3_000, 2_000);
        assert_eq!(st(&o), (0, 3, 1), "the sweep's failure is not held, and not a lease expiry");
    }

    #[test]
    fn a_claim_by_the_holder_renews_the_lease_and_keeps_the_token() {
        let mut o = ops_with_one();
        o.claim("op-1", "a", 10, 0, "t1".into(), false).unwrap();
        o.update("op-1", Report { extends: false, ..report(Some("a"), "in_progress") }, 1_000).unwrap();
        let (op, new) = o.claim("op-1", "a", 10, 8_000, "t-unused".into(), false).unwrap();
        assert!(!new, "a renewal issues no token");
        assert_eq!(op.status, "in_progress", "a renewal keeps the status");
        assert_eq!(o.get("op-1").unwrap().lease_expires_ms, Some(18_000));
        assert!(o.tick(12_000, 1_800_000).is_empty(), "renewed: not expired at the first lease's end");
        assert!(o.op_of_token("t-unused").is_none());
        assert_eq!(o.claim("op-1", "b", 10, 9_000, "t3".into(), false).unwrap_err().code, 409, "another holder");
        assert_eq!((o.get("op-1").unwrap().claims, o.get("op-1").unwrap().lease_renewals, o.stats().lease_renewals), (1, 1, 1));
        assert!(matches!(o.register_claim("t1", "pn-s1", IP, 9_500), ClaimCheck::Accepted { activated: true, .. }), "the first token is live");
        assert_eq!(o.claim("op-1", "a", 10, 9_600, "t4".into(), false).unwrap_err().code, 409, "done: nothing to renew");
    }

    #[test]
    fn a_revoked_lease_refuses_its_token_and_may_go_to_another_holder() {
        let mut o = ops_with_one();
        o.claim("op-1", "a", 600, 0, "t1".into(), false).unwrap();
        let op = o.revoke("op-1", Some(("other", "t2".into())), 10).unwrap();
        assert_eq!((op.status.as_str(), op.holder.as_deref()), ("claimed", Some("other")));
        assert!(matches!(o.register_claim("t1", "pn-s1", IP, 20), ClaimCheck::Refused(w) if w.starts_with("claim revoked")));
        assert_eq!(o.update("op-1", report(Some("a"), "in_progress"), 30).unwrap_err().code, 409, "the old holder lost it");
        assert_eq!(o.stats().held_now, 1);
        o.revoke("op-1", None, 40).unwrap();
        assert_eq!((o.get("op-1").unwrap().status, o.stats().held_now), (OpStatus::Queued, 0));
        assert_eq!(o.revoke("op-1", None, 50).unwrap_err().code, 409, "not held");
    }

    #[test]
    fn never_claimed_is_never_swept() {
        let mut o = ops_with_one();
        assert!(o.tick(i64::MAX / 2, 1).is_empty());
    }
}
