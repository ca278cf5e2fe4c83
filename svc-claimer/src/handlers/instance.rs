//! `pn.op.instance`: the VPS exists — report `in_progress {instanceId, ipv4}` (runbook step 3).
//! Center refusing the report (transiently) is retried with back-off for as long as it takes
//! (the consumer is reports-only): the node registers meanwhile and activates the operation
//! anyway, so a report that cannot be made never fails the operation.

use std::sync::Arc;
use std::time::Duration;

use kit::bus::{HandleError, Handler, Incoming};
use kit::center::CenterError;
use proto::{InstanceReady, OpId};

use crate::{Ctx, OpRecord};

pub struct OnInstance(pub Arc<Ctx>);

#[async_trait::async_trait]
impl Handler for OnInstance {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let ctx = &self.0;
        let ev: InstanceReady = msg.observe_as()?;
        let (Some(op), Some(inst)) = (ev.op, ev.instance) else {
            return Err(HandleError::Drop("InstanceReady without op or instance".into()));
        };
        let id = OpId::parse(&op.operation_id).map_err(|e| HandleError::Drop(format!("InstanceReady: {e}")))?;
        let retry = |e: String| HandleError::retry(e, Duration::from_secs(2));
        let mut rec = ctx.ops.get(id.as_str()).map_err(|e| retry(e.to_string()))?.unwrap_or_else(|| OpRecord {
            // Claimed by another replica: report for its holder.
            holder: op.holder.clone(),
            claim_attempt: op.claim_attempt,
            published: true,
            ..OpRecord::new(id.clone(), op.sub_id.clone())
        });
        if rec.reported_in_progress && rec.instance_id.as_deref() == Some(inst.instance_id.as_str()) {
            return Ok(());
        }
        if rec.terminal.is_some() {
            return Ok(());
        }
        rec.instance_id = Some(inst.instance_id.clone());
        rec.ipv4 = Some(inst.ipv4.clone());
        ctx.ops.put(id.as_str(), &rec).await.map_err(|e| retry(e.to_string()))?;
        let result = rec.progress_result();
        let holder = if op.holder.is_empty() { rec.holder.clone() } else { op.holder.clone() };
        let asked_at = kit::now_ms();
        match ctx.rt.center.update_node_operation(id.as_str(), &holder, "in_progress", result, None).await {
            Ok(answer) => {
                rec.reported_in_progress = true;
                ctx.ops.put(id.as_str(), &rec).await.map_err(|e| retry(e.to_string()))?;
                if rec.holder == ctx.holder {
                    let after = answer.lease_expires_at.as_deref().and_then(crate::poll::parse_rfc3339_ms);
                    let lease_ms = i64::from(ctx.settings.lease_seconds.max(1)) * 1000;
                    // Only an answer that shows the lease's end not moved turns renewal by claim on.
                    if after.is_none() || crate::poll::lease_extended(None, after, asked_at, lease_ms).is_ok() {
                        ctx.hold(&id, after);
                    } else {
                        ctx.progress_does_not_extend(&id);
                    }
                }
                tracing::info!(instance = %inst.instance_id, ipv4 = %inst.ipv4, "reported in_progress");
                Ok(())
            }
            Err(e @ (CenterError::Conflict { .. } | CenterError::Rejected { .. })) => {
                // Already terminal at Center (the node registered first, or the sweep failed it).
                tracing::info!(reason = %e, "in_progress not accepted; operation is terminal or not ours");
                Ok(())
            }
            Err(e) if e.is_transient() => Err(retry(e.to_string())),
            Err(e) => Err(HandleError::Drop(e.to_string())),
        }
    }
}
