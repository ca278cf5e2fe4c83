//! No VPS bills for nothing: when an operation this service created a VPS for ends failed,
//! that VPS is deleted after a grace period. The schedule is in sled, so a restart keeps it.
//! Only instances in `CloudRecord::ours()` are ever deleted.

use std::sync::Arc;
use std::time::Duration;

use kit::bus::{HandleError, Handler, Incoming};
use proto::Body;
use tokio_util::sync::CancellationToken;

use crate::Ctx;

pub struct OnFailed(pub Arc<Ctx>);

#[async_trait::async_trait]
impl Handler for OnFailed {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        let ctx = &self.0;
        let Body::Failed(f) = msg.decode().map_err(|_| HandleError::Drop("undecodable pn.op.failed".into()))? else {
            return Err(HandleError::Drop("not an OpFailed".into()));
        };
        let retry = |e: String| HandleError::retry(e, Duration::from_secs(2));
        let Some(mut rec) = ctx.ops.get(&f.operation_id).map_err(|e| retry(e.to_string()))? else {
            return Ok(());
        };
        if rec.failed {
            return Ok(());
        }
        rec.failed = true;
        if ctx.settings.reap && !rec.ours().is_empty() {
            let at = kit::now_ms() + ctx.settings.reap_grace_ms as i64;
            rec.reap_at_ms = Some(at);
            if let Ok(mut r) = ctx.reaps.lock() {
                r.entry(at).or_default().push(f.operation_id.clone());
            }
            tracing::info!(op = %f.operation_id, instances = ?rec.ours(), grace_ms = ctx.settings.reap_grace_ms, "failed operation's VPS scheduled for deletion");
        }
        ctx.ops.put(&f.operation_id, &rec).await.map_err(|e| retry(e.to_string()))?;
        Ok(())
    }
}

pub async fn reap_loop(ctx: Arc<Ctx>, token: CancellationToken) {
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let now = kit::now_ms();
        let due: Vec<String> = match ctx.reaps.lock() {
            Ok(mut r) => {
                let later = r.split_off(&(now + 1));
                let due = std::mem::replace(&mut *r, later);
                due.into_values().flatten().collect()
            }
            Err(_) => continue,
        };
        for id in due {
            if let Err(e) = reap(&ctx, &id).await {
                tracing::warn!(op = %id, error = %e, "reap failed; retrying in 30s");
                if let Ok(mut r) = ctx.reaps.lock() {
                    r.entry(kit::now_ms() + 30_000).or_default().push(id);
                }
            }
        }
    }
}

async fn reap(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let Some(mut rec) = ctx.ops.get(id)? else { return Ok(()) };
    for inst in rec.ours() {
        match ctx.provider.delete(&inst).await {
            Ok(()) => tracing::warn!(op = %id, instance = %inst, "deleted the failed operation's VPS"),
            Err(crate::provider::ProviderError::Transient(m)) => anyhow::bail!(m),
            Err(e) => tracing::warn!(op = %id, instance = %inst, error = %e, "delete refused; treating as gone"),
        }
        rec.deleted.push(inst);
        ctx.ops.put(id, &rec).await?;
    }
    rec.reaped = true;
    ctx.ops.put(id, &rec).await?;
    Ok(())
}
