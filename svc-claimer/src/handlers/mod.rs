//! One handler per input: `pn.op.instance` (report in_progress), `pn.op.failed` (report failed),
//! `pn.op.verified` (stop renewing), `pn.replay.claim` (republish the claim).

mod failed;
mod instance;

pub use failed::OnFailed;
pub use instance::OnInstance;

use std::sync::Arc;

use kit::bus::{HandleError, Handler, Incoming};
use proto::{NodeVerified, OpId};

use crate::{Ctx, OpRecord};

fn forget(ctx: &Ctx, id: &OpId) {
    ctx.forget(id);
}

/// Claims recorded but not yet published (a crash in between) are published at start.
pub async fn republish_unpublished(ctx: &Arc<Ctx>) {
    let pending: Vec<OpRecord> = ctx.ops.iter().filter_map(Result::ok).map(|(_, r)| r).filter(|r| !r.published && r.terminal.is_none()).collect();
    for rec in pending {
        crate::poll::publish_claimed(ctx, rec).await;
    }
}

pub struct OnVerified(pub Arc<Ctx>);

#[async_trait::async_trait]
impl Handler for OnVerified {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let v: NodeVerified = msg.observe_as()?;
        let id = v.op.as_ref().map(|o| o.operation_id.as_str()).unwrap_or("");
        let id = OpId::parse(id).map_err(|e| HandleError::Drop(format!("NodeVerified: {e}")))?;
        if let Ok(Some(mut rec)) = self.0.ops.get(id.as_str())
            && rec.terminal.is_none() {
                rec.terminal = Some("verified".into());
                self.0.ops.put(id.as_str(), &rec).await.map_err(|e| HandleError::retry(e.to_string(), std::time::Duration::from_secs(1)))?;
            }
        forget(&self.0, &id);
        Ok(())
    }
}

pub struct OnReplay(pub Arc<Ctx>);

#[async_trait::async_trait]
impl Handler for OnReplay {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let id = msg.replay_op_id()?;
        crate::operator::replay_claim(&self.0, &id).await
    }
}
