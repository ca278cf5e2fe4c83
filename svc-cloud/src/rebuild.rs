//! `pn.op.rebuild.<op>`: the deployer found the operation's instance broken before anything ran
//! on it (cloud-init reported an error). Seed 001 §3.f: "re-provision fresh (destroy the broken
//! VM first)". The request is a hint, checked like a reap:
//!
//! - the instance must be the one this service published for the operation (else the request
//!   is dropped) and one it created (`CloudRecord::ours`; an adopted stranger is left alone and
//!   the operation fails: it cannot be deployed);
//! - Center must say the operation is in flight (`kit::world::activation`): activated → kept
//!   for good; failed → the reaper's business; unknown → asked again later;
//! - the provider must show it with our id and the name `pn-<subId>` (another name: never
//!   deleted; gone: nothing to delete);
//! - at most `PN_REBUILDS` (1) per operation: the next broken instance fails the operation
//!   (`pn.op.failed`, stage cloud), and its VPS is then the reaper's.
//!
//! Then the instance is deleted, recorded (`rebuilt`, `deleted`), and the create path starts
//! over; this message parks through the new instance's boot like `pn.op.claimed` does, and the
//! new `pn.op.instance` goes out (a message id of its own). A redelivery finds the instance in
//! `rebuilt` and only drives the create path on.

use std::sync::Arc;
use std::time::Duration;

use kit::bus::{HandleError, Handler, Incoming};
use kit::world::Activation;
use proto::Body;

use crate::Ctx;
use crate::reaper::{Seen, classify};
use crate::record::CreateCursor;
use crate::stage::{budget, drive, failed, park, transient};

pub struct OnRebuild(pub Arc<Ctx>);

#[async_trait::async_trait]
impl Handler for OnRebuild {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let ctx = &self.0;
        let Body::Rebuild(r) = msg.decode()? else {
            return Err(HandleError::Drop("pn.op.rebuild carries another message type".into()));
        };
        let (Some(op_in), Some(inst)) = (r.op, r.instance) else {
            return Err(HandleError::Drop("InstanceRebuild without an operation or an instance".into()));
        };
        let Ok(id) = proto::OpId::parse(&op_in.operation_id) else {
            return Err(HandleError::Drop("operation id is not a plain token".into()));
        };
        let Some(_busy) = ctx.try_busy(&id) else {
            return Err(park(Duration::from_secs(2), "operation being handled here".into()));
        };
        let Some(mut rec) = ctx.ops.get(&id).map_err(transient)? else {
            return Err(HandleError::Drop(format!("rebuild of operation {id}, which this service never handled")));
        };
        // The operation as this service holds it (its claim token sealed, as the deployer needs).
        let Some(op) = rec.operation() else {
            return Err(HandleError::Drop(format!("no stored operation for {id}")));
        };
        let broken = inst.instance_id.clone();
        if rec.rebuilt.contains(&broken) {
            // Ours, already deleted: bring the replacement on (parked while it boots).
            let res = drive(ctx, &op, &mut rec, false, false).await;
            return budget(ctx, &op, &mut rec, res);
        }
        if rec.failed {
            return Err(HandleError::Drop(format!("operation {id} failed already; its VPS is the reaper's")));
        }
        let current = rec.instance.as_ref().map(|i| i.id.clone()).unwrap_or_default();
        if current != broken {
            tracing::warn!(instance = %broken, current = %current, "rebuild asked for an instance that is not this operation's published one; nothing deleted");
            metrics::counter!("pn_rebuilds_total", "result" => "refused").increment(1);
            return Err(HandleError::Drop(format!("instance {broken} is not the one this service published for {id}")));
        }
        let reason: String = r.reason.chars().filter(|c| !c.is_control()).take(200).collect();
        if !rec.ours().contains(&broken) {
            // Adopted, not created by us: never deleted; it cannot be deployed either.
            metrics::counter!("pn_rebuilds_total", "result" => "kept-not-ours").increment(1);
            return Err(failed(&op, &broken, format!("instance {broken} came up broken ({reason}); it was adopted, not created by this service, so it is not deleted or replaced")));
        }
        let limit = ctx.settings.rebuilds as usize;
        if rec.rebuilt.len() >= limit {
            metrics::counter!("pn_rebuilds_total", "result" => "exhausted").increment(1);
            return Err(failed(
                &op,
                &broken,
                format!("instance {broken} came up broken ({reason}) after {} fresh instance(s) already; giving up", rec.rebuilt.len()),
            ));
        }
        let node = rec.node_name();
        match kit::world::activation(ctx.rt.center.as_ref(), id.as_str(), &node).await {
            Activation::InFlight { .. } => {}
            Activation::Active { why } => {
                tracing::warn!(instance = %broken, %why, "rebuild asked for an activated operation; the VPS is kept for good");
                rec.activated = true;
                ctx.ops.put(&id, &rec).await.map_err(transient)?;
                metrics::counter!("pn_rebuilds_total", "result" => "kept-active").increment(1);
                return Err(HandleError::Drop(format!("operation {id} is activated ({why}); its VPS is never deleted")));
            }
            Activation::Failed { .. } => {
                return Err(HandleError::Drop(format!("operation {id} failed at Center; its VPS is the reaper's")));
            }
            Activation::Unknown { why } => return Err(transient(format!("cannot tell whether {id} is activated: {why}"))),
        }
        let provider = ctx.provider_of(&rec, &broken);
        let seen = classify(&node, &broken, &provider.get(&broken).await);
        match seen {
            Seen::Ours => crate::stage::delete_own(ctx, &mut rec, &broken).await?,
            Seen::Gone => rec.deleted.push(broken.clone()),
            Seen::Foreign(why) => {
                rec.disowned.push(broken.clone());
                ctx.ops.put(&id, &rec).await.map_err(transient)?;
                metrics::counter!("pn_rebuilds_total", "result" => "kept-not-ours").increment(1);
                return Err(HandleError::Drop(format!("instance {broken} is not ours to delete ({why})")));
            }
            Seen::Unanswered(why) => return Err(transient(why)),
        }
        tracing::warn!(instance = %broken, %reason, "broken instance deleted; provisioning a fresh one");
        metrics::counter!("pn_rebuilds_total", "result" => "rebuilt").increment(1);
        rec.rebuilt.push(broken.clone());
        rec.instance = None;
        rec.published = false;
        rec.boot = None;
        rec.ports_opened = false;
        rec.create = CreateCursor { reasons: vec![format!("instance {broken} came up broken ({reason}); provisioned again")], ..Default::default() };
        ctx.ops.put(&id, &rec).await.map_err(transient)?;
        let res = drive(ctx, &op, &mut rec, false, false).await;
        budget(ctx, &op, &mut rec, res)
    }
}
