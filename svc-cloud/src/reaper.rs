//! No VPS bills for nothing — and no live node is ever deleted. When an operation this service
//! created a VPS for is reported failed (`pn.op.failed`), a reap is planned after
//! `reap_grace_ms` (in sled, so a restart keeps it). The event is only a hint: when the reap
//! is due, the world is asked and the VPS is deleted only when it is provably dead and ours:
//!
//! - Center (`kit::world::activation`) says the operation is `failed` and no node `pn-<subId>`
//!   is registered. `Active` → never (the record is marked activated, the reap is off for
//!   good); `InFlight` → off (a newer claim attempt owns the VPS and adopts it by name);
//!   `Unknown` → uncertain.
//! - The failure belongs to the operation's current claim attempt (a stale failure of an older
//!   attempt → uncertain).
//! - The provider shows each instance with the id this service created and the name
//!   `pn-<subId>` (gone → recorded as deleted; another name → never).
//!
//! A Center without the `delete_cloud_instance` tool makes every proven reap uncertain the same
//! way: listed with the reason "Center has no delete_cloud_instance tool" (and counted in
//! `pn_reap_delete_unsupported_total`) for the operator to delete by hand, never retried faster.
//!
//! Uncertain keeps the VPS, counts it (`pn_reap_pending`), lists it (`GET /v1/reap/pending`,
//! `pnctl reap --pending`) and looks again every `reap_recheck_ms`, deleting it once the checks
//! hold. An operator's `POST /v1/reap/<op>/confirm` runs the same checks and overrides only the
//! soft doubts — the attempt mismatch and Center not listing the operation; it never overrides
//! "active", "in flight", "not ours", or a Center or provider that did not answer. Every
//! decision is one log line with its reason and one count in `pn_reap_decisions_total`.

use std::sync::Arc;
use std::time::Duration;

use kit::bus::{HandleError, Handler, Incoming};
use kit::world::Activation;
use proto::{OpFailed, OpId, SubId};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use kit::cloud::{ProviderError, Vps};
use crate::record::{PendingReap, ReapDecision};
use crate::{CloudRecord, Ctx};

pub struct OnFailed(pub Arc<Ctx>);

#[async_trait::async_trait]
impl Handler for OnFailed {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let ctx = &self.0;
        let f: OpFailed = msg.observe_as()?;
        let Ok(id) = OpId::parse(&f.operation_id) else {
            return Err(HandleError::Drop("pn.op.failed without a plain operation id".into()));
        };
        let retry = |e: String| HandleError::retry(e, Duration::from_secs(2));
        let Some(_busy) = ctx.wait_busy(&id, Duration::from_secs(20)).await else {
            return Err(retry("operation busy here".into()));
        };
        let Some(mut rec) = ctx.ops.get(&id).map_err(|e| retry(e.to_string()))? else {
            return Ok(());
        };
        let attempt = f.attempt.max(1);
        if rec.failed && rec.failed_attempt.is_none_or(|a| a >= attempt) {
            return Ok(());
        }
        rec.failed = true;
        rec.failed_attempt = Some(attempt);
        if rec.activated {
            tracing::warn!(op = %id, attempt, stage = %f.stage, "pn.op.failed for an operation Center activated; its VPS is kept");
        } else if ctx.settings.reap && !rec.reaped && !rec.ours().is_empty() {
            let at = kit::now_ms() + ctx.settings.reap_grace_ms as i64;
            rec.reap_at_ms = Some(at);
            ctx.schedule_reap(&id, at);
            tracing::info!(op = %id, attempt, instances = ?rec.ours(), grace_ms = ctx.settings.reap_grace_ms,
                "operation reported failed; its VPS will be reaped after the grace if Center and the provider prove it dead and ours");
        }
        ctx.ops.put(&id, &rec).await.map_err(|e| retry(e.to_string()))?;
        Ok(())
    }
}

/// One kept, uncertain reap as an operator sees it (`GET /v1/reap/pending`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PendingView {
    pub operation_id: OpId,
    pub sub_id: SubId,
    pub instance_ids: Vec<String>,
    pub reason: String,
    /// Unix ms since when it is kept.
    pub since: i64,
}

impl PendingView {
    pub fn of(rec: &CloudRecord, p: &PendingReap) -> PendingView {
        PendingView {
            operation_id: rec.operation_id.clone(),
            sub_id: rec.sub_id.clone(),
            instance_ids: rec.ours(),
            reason: p.reason.clone(),
            since: p.since_ms,
        }
    }
}

fn set_gauge(n: usize) {
    metrics::gauge!("pn_reap_pending").set(n as f64);
}

fn list(ctx: &Ctx, view: PendingView) {
    if let Ok(mut p) = ctx.pending.lock() {
        p.insert(view.operation_id.clone(), view);
        set_gauge(p.len());
    }
}

/// Takes an operation off the pending list (its reap was decided, or cancelled).
pub fn unlist(ctx: &Ctx, id: &OpId) {
    if let Ok(mut p) = ctx.pending.lock()
        && p.remove(id).is_some()
    {
        set_gauge(p.len());
    }
}

/// What a reap look concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Instances deleted (now, or found already gone).
    Deleted,
    /// Nothing was left to delete: every instance was already gone.
    Gone,
    /// Center activated the operation: never deleted.
    KeptActive,
    /// Center has the operation queued or in progress: the reap is off.
    KeptInFlight,
    /// The provider shows the instance under another name (or id): never deleted.
    KeptNotOurs,
    /// Uncertain: kept, listed, looked at again later.
    Pending,
    /// (confirm only) this service saw no failure of the operation: nothing to reap.
    NotFailed,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Deleted => "deleted",
            Decision::Gone => "gone",
            Decision::KeptActive => "kept-active",
            Decision::KeptInFlight => "kept-inflight",
            Decision::KeptNotOurs => "kept-not-ours",
            Decision::Pending => "pending",
            Decision::NotFailed => "not-failed",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub operation_id: OpId,
    pub decision: &'static str,
    pub reason: String,
    /// The instances concerned (deleted, kept, or pending).
    pub instance_ids: Vec<String>,
    /// The soft doubts an operator's confirm overrode.
    pub overridden: Vec<String>,
    #[serde(skip)]
    pub kind: Decision,
}

#[derive(Debug, thiserror::Error)]
pub enum ReapError {
    #[error("svc-cloud has no record of operation {0}")]
    Unknown(String),
    #[error("operation {0} is being worked on here; try again in a moment")]
    Busy(String),
    #[error("state store: {0}")]
    Store(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The reaper's own look when a reap is due.
    Auto,
    /// An operator's `confirm`: overrides the soft doubts.
    Confirm,
}

/// What Center and the record say before the provider is asked.
#[derive(Debug, Clone, PartialEq)]
enum Gate {
    Proceed { overridden: Vec<String> },
    Active(String),
    InFlight(String),
    Uncertain(String),
}

/// `kit::world::activation`'s `Unknown` for an operation Center's list does not contain (Center
/// answered both calls; no node is registered): a doubt an operator may override.
fn not_listed(why: &str) -> bool {
    why.starts_with("center: operation ") && why.ends_with(" not listed")
}

fn gate(act: &Activation, failed_attempt: Option<u32>, current_attempt: u32, mode: Mode) -> Gate {
    let mut overridden = Vec::new();
    match act {
        Activation::Active { why } => return Gate::Active(why.clone()),
        Activation::InFlight { status } => {
            return Gate::InFlight(format!("operation is {status} at Center: a newer claim attempt owns the VPS and adopts it by name"));
        }
        Activation::Unknown { why } if mode == Mode::Confirm && not_listed(why) => overridden.push(why.clone()),
        Activation::Unknown { why } => return Gate::Uncertain(why.clone()),
        Activation::Failed { .. } => {}
    }
    if failed_attempt != Some(current_attempt) {
        let doubt = match failed_attempt {
            Some(a) => format!("the failure reported is of claim attempt {a}, the operation's current attempt here is {current_attempt}"),
            None => format!("no failure of claim attempt {current_attempt} was reported"),
        };
        if mode == Mode::Confirm {
            overridden.push(doubt);
        } else {
            return Gate::Uncertain(doubt);
        }
    }
    Gate::Proceed { overridden }
}

/// What the provider shows for one instance of ours.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seen {
    Ours,
    Gone,
    Foreign(String),
    Unanswered(String),
}

pub(crate) fn classify(node: &str, id: &str, res: &Result<Vps, ProviderError>) -> Seen {
    match res {
        Err(ProviderError::NotFound(_)) => Seen::Gone,
        Err(e) => Seen::Unanswered(format!("provider: get {id} failed ({})", clip(&e.to_string()))),
        Ok(v) if v.is_gone() => Seen::Gone,
        Ok(v) if v.id != id => Seen::Foreign(format!("the provider answered instance {} for {id}", v.id)),
        Ok(v) if v.name != node => Seen::Foreign(format!("instance {id} is named {:?}, not {node}", clip(&v.name))),
        Ok(_) => Seen::Ours,
    }
}

fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

/// One look at an operation's VPS: the checks, the deletes they allow, the record updated,
/// one log line and one count. `Auto` does nothing (`None`) unless a reap is due for it.
pub async fn reap(ctx: &Ctx, id: &OpId, mode: Mode) -> Result<Option<Outcome>, ReapError> {
    let _busy = match mode {
        Mode::Auto => ctx.try_busy(id),
        Mode::Confirm => ctx.wait_busy(id, Duration::from_secs(10)).await,
    }
    .ok_or_else(|| ReapError::Busy(id.to_string()))?;
    let store = |e: kit::state::StateError| ReapError::Store(e.to_string());
    let mut rec = ctx.ops.get(id).map_err(store)?.ok_or_else(|| ReapError::Unknown(id.to_string()))?;
    let now = kit::now_ms();
    if mode == Mode::Auto {
        match rec.reap_at_ms {
            Some(t) if t <= now && !rec.reaped => {}
            // Cancelled, done, or planned for later (another schedule entry exists).
            _ => return Ok(None),
        }
    }
    let mut out = Outcome {
        operation_id: id.clone(),
        decision: "",
        reason: String::new(),
        instance_ids: rec.ours(),
        overridden: Vec::new(),
        kind: Decision::Pending,
    };
    if mode == Mode::Confirm && !rec.failed {
        out.kind = Decision::NotFailed;
        out.decision = out.kind.as_str();
        out.reason = "svc-cloud saw no failure of this operation; nothing to reap".into();
        tracing::warn!(op = %id, decision = out.decision, reason = %out.reason, "reap confirm refused");
        return Ok(Some(out));
    }
    decide(ctx, &mut rec, mode, &mut out).await;
    rec.reap_decision = Some(ReapDecision { decision: out.kind.as_str().into(), reason: out.reason.clone(), at_ms: now });
    if out.kind == Decision::Pending {
        let since = rec.reap_pending.as_ref().map(|p| p.since_ms).unwrap_or(now);
        let p = PendingReap { reason: out.reason.clone(), since_ms: since };
        let at = now + ctx.settings.reap_recheck_ms.max(1000) as i64;
        rec.reap_at_ms = Some(at);
        list(ctx, PendingView::of(&rec, &p));
        rec.reap_pending = Some(p);
        ctx.schedule_reap(id, at);
    } else {
        rec.reap_at_ms = None;
        rec.reap_pending = None;
        rec.reaped = rec.ours().is_empty();
        unlist(ctx, id);
    }
    ctx.ops.put(id, &rec).await.map_err(store)?;
    out.decision = out.kind.as_str();
    log(id, mode, &out);
    metrics::counter!("pn_reap_decisions_total", "decision" => out.kind.as_str()).increment(1);
    Ok(Some(out))
}

fn log(id: &OpId, mode: Mode, o: &Outcome) {
    let by = if mode == Mode::Confirm { "operator confirm" } else { "reaper" };
    let (d, r, ids, ov) = (o.decision, &o.reason, &o.instance_ids, &o.overridden);
    match o.kind {
        Decision::KeptInFlight | Decision::Gone => tracing::info!(op = %id, decision = d, reason = %r, instances = ?ids, by, "reap: {d} ({r})"),
        _ => tracing::warn!(op = %id, decision = d, reason = %r, instances = ?ids, overridden = ?ov, by, "reap: {d} ({r})"),
    }
}

/// The checks and the deletes; fills `out` and updates `rec` (not stored).
async fn decide(ctx: &Ctx, rec: &mut CloudRecord, mode: Mode, out: &mut Outcome) {
    let node = rec.node_name();
    let id = rec.operation_id.clone();
    if rec.activated {
        out.kind = Decision::KeptActive;
        out.reason = "Center activated this operation earlier; activation is final".into();
        return;
    }
    if rec.ours().is_empty() {
        out.kind = Decision::Gone;
        out.reason = "no instance of this operation is left to delete".into();
        return;
    }
    let act = kit::world::activation(ctx.rt.center.as_ref(), id.as_str(), &node).await;
    match gate(&act, rec.failed_attempt, rec.claim_attempt(), mode) {
        Gate::Active(why) => {
            rec.activated = true;
            out.kind = Decision::KeptActive;
            out.reason = why;
            return;
        }
        Gate::InFlight(why) => {
            out.kind = Decision::KeptInFlight;
            out.reason = why;
            return;
        }
        Gate::Uncertain(why) => {
            out.kind = Decision::Pending;
            out.reason = why;
            return;
        }
        Gate::Proceed { overridden } => out.overridden = overridden,
    }
    // Every instance must be answered for before anything is deleted.
    let mut seen = Vec::new();
    for inst in rec.ours() {
        let res = ctx.provider_of(rec, &inst).get(&inst).await;
        let s = classify(&node, &inst, &res);
        if let Seen::Unanswered(why) = &s {
            out.kind = Decision::Pending;
            out.reason = why.clone();
            return;
        }
        seen.push((inst, s));
    }
    let (mut deleted, mut gone, mut foreign) = (Vec::new(), Vec::new(), Vec::new());
    for (inst, s) in seen {
        match s {
            Seen::Gone => {
                rec.deleted.push(inst.clone());
                gone.push(inst);
            }
            Seen::Foreign(why) => {
                rec.disowned.push(inst.clone());
                foreign.push(why);
            }
            Seen::Unanswered(_) => {}
            Seen::Ours => match ctx.provider_of(rec, &inst).delete(&inst).await {
                Ok(()) | Err(ProviderError::NotFound(_)) => {
                    rec.deleted.push(inst.clone());
                    if let Err(e) = ctx.ops.put_nowait(&id, rec) {
                        tracing::warn!(op = %id, error = %e, "could not record a delete");
                    }
                    deleted.push(inst);
                }
                Err(e) if e.to_string().contains(kit::center::UNSUPPORTED_MARK) => {
                    // Center has no delete_cloud_instance: the orphan is listed for the operator
                    // (`pnctl reap --pending`) and looked at again every `reap_recheck_ms` — once
                    // it is deleted by hand, the provider shows it gone and the reap is recorded.
                    metrics::counter!("pn_reap_delete_unsupported_total").increment(1);
                    out.kind = Decision::Pending;
                    out.reason = format!(
                        "provider: cannot delete {inst}: Center has no delete_cloud_instance tool; delete it at the provider by hand (it is dead and ours), then it is recorded gone at the next look"
                    );
                    return;
                }
                Err(e) => {
                    out.kind = Decision::Pending;
                    out.reason = format!("provider: delete {inst} failed ({})", clip(&e.to_string()));
                    return;
                }
            },
        }
    }
    let mut reason = match &act {
        Activation::Failed { error } if !error.is_empty() => format!("failed at Center ({error})"),
        Activation::Failed { .. } => "failed at Center".to_string(),
        _ => "operator confirmed".to_string(),
    };
    if !deleted.is_empty() {
        out.kind = Decision::Deleted;
        out.instance_ids = deleted.clone();
        reason = format!("{node} {} deleted: {reason}", deleted.join(","));
    } else if foreign.is_empty() {
        out.kind = Decision::Gone;
        out.instance_ids = gone.clone();
        reason = format!("{} already gone at the provider", gone.join(","));
    } else {
        out.kind = Decision::KeptNotOurs;
    }
    if !gone.is_empty() && out.kind == Decision::Deleted {
        reason.push_str(&format!("; {} already gone", gone.join(",")));
    }
    if !foreign.is_empty() {
        reason.push_str(&format!("; never deleted: {}", foreign.join("; ")));
    }
    out.reason = reason;
}

/// Runs the planned reaps when they are due, and the re-checks of uncertain ones.
pub async fn reap_loop(ctx: Arc<Ctx>, token: CancellationToken) {
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let now = kit::now_ms();
        let due: Vec<OpId> = match ctx.reaps.lock() {
            Ok(mut r) => {
                let later = r.split_off(&(now + 1));
                let due = std::mem::replace(&mut *r, later);
                due.into_values().flatten().collect()
            }
            Err(_) => continue,
        };
        for id in due {
            if token.is_cancelled() {
                return;
            }
            match reap(&ctx, &id, Mode::Auto).await {
                Ok(_) | Err(ReapError::Unknown(_)) => {}
                Err(ReapError::Busy(_)) => ctx.schedule_reap(&id, kit::now_ms() + 2_000),
                Err(e) => {
                    tracing::warn!(op = %id, error = %e, "reap look failed; again in 30s");
                    ctx.schedule_reap(&id, kit::now_ms() + 30_000);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn vps(id: &str, name: &str, status: &str) -> Vps {
        Vps {
            id: id.into(),
            name: name.into(),
            status: status.into(),
            ipv4: None,
            region: String::new(),
            plan: String::new(),
            image: String::new(),
            account: String::new(),
        }
    }

    fn failed() -> Activation {
        Activation::Failed { error: "verify: no registration".into() }
    }

    #[test]
    fn only_a_failure_of_the_current_attempt_at_center_proceeds() {
        for mode in [Mode::Auto, Mode::Confirm] {
            assert_eq!(gate(&failed(), Some(2), 2, mode), Gate::Proceed { overridden: vec![] });
            // Never, whoever asks.
            assert!(matches!(gate(&Activation::Active { why: "done".into() }, Some(2), 2, mode), Gate::Active(_)));
            assert!(matches!(gate(&Activation::InFlight { status: "in_progress".into() }, Some(2), 2, mode), Gate::InFlight(_)));
            // Center did not answer: uncertain even for an operator.
            let down = Activation::Unknown { why: "center: list_nodes failed (center list_nodes: transient: 503)".into() };
            assert!(matches!(gate(&down, Some(2), 2, mode), Gate::Uncertain(_)));
            let odd = Activation::Unknown { why: "center: operation status \"paused\" not understood".into() };
            assert!(matches!(gate(&odd, Some(2), 2, mode), Gate::Uncertain(_)));
        }
        // A stale failure of an older attempt: uncertain for the reaper, overridable by an operator.
        assert!(matches!(gate(&failed(), Some(1), 2, Mode::Auto), Gate::Uncertain(w) if w.contains("attempt 1")));
        assert!(matches!(gate(&failed(), None, 1, Mode::Auto), Gate::Uncertain(_)));
        let Gate::Proceed { overridden } = gate(&failed(), Some(1), 2, Mode::Confirm) else { panic!() };
        assert_eq!(overridden.len(), 1);
        // Center does not list the operation: the same.
        let unlisted = Activation::Unknown { why: "center: operation op-1 not listed".into() };
        assert!(matches!(gate(&unlisted, Some(1), 1, Mode::Auto), Gate::Uncertain(_)));
        let Gate::Proceed { overridden } = gate(&unlisted, Some(1), 2, Mode::Confirm) else { panic!() };
        assert_eq!(overridden.len(), 2);
    }

    #[test]
    fn an_instance_is_deleted_only_with_our_id_and_name() {
        let node = "pn-s1";
        assert_eq!(classify(node, "i1", &Ok(vps("i1", node, "running"))), Seen::Ours);
        assert_eq!(classify(node, "i1", &Ok(vps("i1", node, "pending"))), Seen::Ours);
        assert_eq!(classify(node, "i1", &Ok(vps("i1", node, "deleted"))), Seen::Gone);
        assert_eq!(classify(node, "i1", &Err(ProviderError::NotFound("404".into()))), Seen::Gone);
        assert!(matches!(classify(node, "i1", &Ok(vps("i1", "pn-other", "running"))), Seen::Foreign(_)));
        assert!(matches!(classify(node, "i1", &Ok(vps("i2", node, "running"))), Seen::Foreign(_)));
        assert!(matches!(classify(node, "i1", &Err(ProviderError::Transient("503".into()))), Seen::Unanswered(_)));
        assert!(matches!(classify(node, "i1", &Err(ProviderError::Permanent("401".into()))), Seen::Unanswered(_)));
    }

    #[test]
    fn the_soft_unknown_is_exactly_worlds_not_listed() {
        assert!(not_listed("center: operation op-7 not listed"));
        assert!(!not_listed("center: list_node_operations failed (timeout)"));
        assert!(!not_listed("center: list_nodes failed (x not listed)"));
    }
}
