//! `pn.op.failed`: report `failed` with a concise reason, once (runbook step 8). The reason is
//! clipped and scrubbed of the claim token defensively; `done` is never sent.
//!
//! Activation is final: before reporting, Center is asked (`kit::world::activation`). An
//! operation that is `done`, or whose node `pn-<subId>` is registered, is not reported failed —
//! the failure event is recorded (`terminal = "activated"`), logged and counted
//! (`pn_failed_for_activated_total`). When Center cannot tell, the report waits (retried with
//! back-off) rather than going out blind.
//!
//! A failure of an earlier claim attempt than the record's (its lease was lost and the
//! operation claimed again), or of an operation whose lease went to another holder, is not
//! reported either (`pn_stale_failures_total`): it would fail the work of the newer holder.

use std::sync::Arc;
use std::time::Duration;

use kit::bus::{HandleError, Handler, Incoming};
use kit::center::CenterError;
use kit::world::Activation;
use proto::{OpFailed, OpId, Operation};
use secrecy::ExposeSecret;

use crate::Ctx;
use crate::record::concise_reason;

pub struct OnFailed(pub Arc<Ctx>);

/// `OpRecord::terminal` of an operation Center reported activated when a failure event came.
pub const ACTIVATED: &str = "activated";

#[async_trait::async_trait]
impl Handler for OnFailed {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let ctx = &self.0;
        let f: OpFailed = msg.observe_as()?;
        let id = OpId::parse(&f.operation_id).map_err(|e| HandleError::Drop(format!("OpFailed: {e}")))?;
        let retry = |e: String| HandleError::retry(e, Duration::from_secs(2));
        let rec = ctx.ops.get(id.as_str()).map_err(|e| retry(e.to_string()))?;
        if rec.as_ref().is_some_and(|r| r.failed_reported) {
            return Ok(());
        }
        let token = rec
            .as_ref()
            .and_then(|r| prost::Message::decode(r.op_pb.as_slice()).ok())
            .and_then(|op: Operation| ctx.seal.open_str(&op.sealed_claim_token).ok());
        let secrets: Vec<&str> = token.as_ref().map(|t| vec![t.expose_secret()]).unwrap_or_default();
        let reason = concise_reason(&f.stage, &f.reason, &secrets);
        if rec.as_ref().is_some_and(|r| r.terminal.as_deref() == Some(ACTIVATED)) {
            return Ok(());
        }
        // A failure of an earlier claim attempt (its lease was lost; a newer attempt carries the
        // operation now) or of a lease another holder took: reporting it would fail their work.
        if let Some(r) = rec.as_ref().filter(|r| (f.attempt > 0 && f.attempt < r.claim_attempt) || r.terminal.as_deref() == Some(crate::record::LOST)) {
            metrics::counter!("pn_stale_failures_total").increment(1);
            tracing::warn!(attempt = f.attempt, current = r.claim_attempt, terminal = ?r.terminal, failed_stage = %f.stage, %reason,
                "a failure of an earlier claim attempt (or of a lost lease); not reported to Center");
            return Ok(());
        }
        let sub_id = if f.sub_id.is_empty() { rec.as_ref().map(|r| r.sub_id.clone()).unwrap_or_default() } else { f.sub_id.clone() };
        match kit::world::activation(ctx.rt.center.as_ref(), id.as_str(), &proto::node_name(&sub_id)).await {
            Activation::Active { why } => {
                metrics::counter!("pn_failed_for_activated_total").increment(1);
                tracing::warn!(%why, failed_stage = %f.stage, %reason, "a failure event arrived for an activated operation; not reported to Center");
                let mut rec = rec.unwrap_or_else(|| crate::OpRecord::new(id.clone(), sub_id.clone()));
                // A verified operation stays `verified`; anything else is now known activated.
                rec.terminal.get_or_insert_with(|| ACTIVATED.into());
                ctx.ops.put(id.as_str(), &rec).await.map_err(|e| retry(e.to_string()))?;
                super::forget(ctx, &id);
                return Ok(());
            }
            Activation::Unknown { why } => {
                return Err(retry(format!("not reporting failed before Center says whether the operation is activated: {why}")));
            }
            Activation::Failed { .. } | Activation::InFlight { .. } => {}
        }
        let holder = rec.as_ref().map(|r| r.holder.clone()).filter(|h| !h.is_empty()).unwrap_or(f.holder.clone());
        let outcome = ctx.rt.center.update_node_operation(id.as_str(), &holder, "failed", None, Some(&reason)).await;
        match outcome {
            Ok(_) => tracing::warn!(%reason, "reported failed"),
            Err(e @ (CenterError::Conflict { .. } | CenterError::Rejected { .. })) => {
                tracing::info!(reason = %e, "failed not accepted; operation is already terminal or not ours");
            }
            Err(e) if e.is_transient() => return Err(retry(e.to_string())),
            Err(e) => tracing::error!(error = %e, "failed report refused"),
        }
        let mut rec = rec.unwrap_or_else(|| crate::OpRecord::new(id.clone(), f.sub_id.clone()));
        rec.failed_reported = true;
        rec.terminal = Some("failed".into());
        ctx.ops.put(id.as_str(), &rec).await.map_err(|e| retry(e.to_string()))?;
        super::forget(ctx, &id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_clipped_and_scrubbed() {
        let r = concise_reason("deploy", "boom ct_0123456789abcdef\nline2", &["ct_0123456789abcdef"]);
        assert_eq!(r, "deploy: boom [redacted] line2");
        let long = "x".repeat(1000);
        assert!(concise_reason("cloud", &long, &[]).len() <= 240);
    }
}
