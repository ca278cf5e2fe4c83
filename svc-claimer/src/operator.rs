//! The operator's requests to the claimer, and what every replica can read about any claim.
//!
//! - `POST /v1/ops/<operationId>/abandon` on the ops listener (`pnctl ops abandon`), body
//!   `{"reason": "…"}`: ends an operation that is stuck in flight. Under the fail-safe rules:
//!   Center is asked first (`kit::world::activation`); an activated operation is refused (409,
//!   activation is final), an unanswered question changes nothing (503); an operation in flight
//!   is failed — `pn.op.failed.<op>` (stage `abandon`, the claim attempt of its latest claim) is
//!   published, so svc-cloud's reaper plans its reap as for any failure (and deletes the VPS only
//!   once it proves it dead and ours), and `failed` is reported to Center at once (the
//!   `pn.op.failed` consumer would report it too; Center takes the first). 200 with
//!   `{operationId, decision: "abandoned"|"already-failed", center, attempt, reason}`; 404 when
//!   no claim of the operation is known; 400 for a bad id or an empty reason.
//!   It needs the operator token (`PN_OPS_TOKEN`, `Authorization: Bearer …`): 401 without it
//!   (nothing is asked or published), 403 when the claimer has none (`kit::ops::require_operator`).
//! - Any replica can serve a claim replay or an abandon: an operation another replica claimed is
//!   read from PN_OPS (the latest `pn.op.claimed.<op>`, `STREAM.MSG.GET`), the audit trail every
//!   replica reads, not from this replica's sled.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kit::bus::{HandleError, Meta};
use kit::center::CenterError;
use kit::world::Activation;
use proto::{Body, Event, OpClaimed, OpFailed, OpId, Operation, Stage, subjects};
use serde_json::{Value, json};

use crate::Ctx;

pub type Cell = Arc<OnceLock<Arc<Ctx>>>;

pub fn router(cell: Cell) -> Router {
    Router::new().route("/v1/ops/{op}/abandon", post(abandon)).with_state(cell)
}

/// The stage name of an operator's abandon in `OpFailed.stage`.
pub const ABANDON: &str = "abandon";

/// One operation's claim as this replica can know it: its own record, or PN_OPS.
#[derive(Debug, Clone)]
pub struct Claim {
    pub op: Operation,
    /// This replica's record of it, when it is the one that claimed it.
    pub local: Option<crate::OpRecord>,
}

/// The latest message on `subject` in PN_OPS, decoded; `None` when there is none.
async fn last_on(ctx: &Ctx, subject: &str) -> Result<Option<Body>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let stream = ctx.rt.bus.js.get_stream(subjects::OPS_STREAM).await.map_err(|e| format!("stream {}: {e}", subjects::OPS_STREAM))?;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Event::from_bytes(&m.payload).map(Some).map_err(|e| format!("{subject}: undecodable: {e}")),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(format!("{subject}: {e}")),
    }
}

/// The operation's latest claim: this replica's record, else the latest `pn.op.claimed.<op>`.
pub async fn find_claim(ctx: &Ctx, id: &OpId) -> Result<Option<Claim>, String> {
    if let Some(rec) = ctx.ops.get(id.as_str()).map_err(|e| e.to_string())? {
        let op: Operation = prost::Message::decode(rec.op_pb.as_slice()).map_err(|e| format!("stored operation undecodable: {e}"))?;
        return Ok(Some(Claim { op, local: Some(rec) }));
    }
    match last_on(ctx, &subjects::op_event(subjects::CLAIMED, id.as_str())).await? {
        Some(Body::Claimed(OpClaimed { op: Some(op) })) => Ok(Some(Claim { op, local: None })),
        _ => Ok(None),
    }
}

/// Whether PN_OPS shows the operation ended for `attempt`: verified, or failed in that attempt
/// or a later one.
async fn ended_in_stream(ctx: &Ctx, id: &OpId, attempt: u32) -> Result<Option<String>, String> {
    if last_on(ctx, &subjects::op_event(subjects::VERIFIED, id.as_str())).await?.is_some() {
        return Ok(Some("verified".into()));
    }
    if let Some(Body::Failed(f)) = last_on(ctx, &subjects::op_event(subjects::FAILED, id.as_str())).await?
        && f.attempt.max(1) >= attempt.max(1)
    {
        return Ok(Some(format!("failed ({}: {})", f.stage, f.reason)));
    }
    Ok(None)
}

/// `pn.replay.claim`: publish the operation's claim again, under a msg id of its own
/// (`<op>.claim.<attempt>.replay.<unix-ms>`) so JetStream's dedup window does not swallow it.
/// Any replica serves it: the claim comes from its record or from PN_OPS.
pub async fn replay_claim(ctx: &Arc<Ctx>, id: &OpId) -> Result<(), HandleError> {
    let retry = |e: String| HandleError::retry(e, Duration::from_secs(1));
    let Some(claim) = find_claim(ctx, id).await.map_err(retry)? else {
        return Err(HandleError::Drop(format!("operation {id}: no claim of it in this claimer's state or in PN_OPS")));
    };
    match &claim.local {
        Some(rec) if rec.terminal.is_some() => return Err(HandleError::Drop(format!("operation {id} is already terminal"))),
        // Claimed here but never published (a crash in between): this is its first publish.
        Some(rec) if !rec.published => {
            crate::poll::publish_claimed(ctx, rec.clone()).await;
            return Ok(());
        }
        Some(_) => {}
        None => {
            if let Some(how) = ended_in_stream(ctx, id, claim.op.claim_attempt).await.map_err(retry)? {
                return Err(HandleError::Drop(format!("operation {id} is already terminal: {how}")));
            }
        }
    }
    let op = claim.op;
    let mut meta = Meta::outcome(id.as_str(), &op.sub_id, Stage::Claim, op.claim_attempt);
    meta.msg_id = subjects::replay_msg_id(&meta.msg_id, kit::now_ms());
    let attempt = op.claim_attempt;
    let from = if claim.local.is_some() { "this claimer's record" } else { "PN_OPS" };
    ctx.rt
        .bus
        .publish(subjects::op_event(subjects::CLAIMED, id.as_str()), Body::Claimed(OpClaimed { op: Some(op) }), &meta)
        .await
        .map_err(|e| retry(e.to_string()))?;
    tracing::info!(op = %id, attempt, from, "claim replayed");
    Ok(())
}

fn answer(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    answer(status, json!({"error": msg.into()}))
}

async fn abandon(State(cell): State<Cell>, Path(op): Path<String>, body: Option<axum::Json<Value>>) -> Response {
    let Some(ctx) = cell.get() else { return error(StatusCode::SERVICE_UNAVAILABLE, "svc-claimer is starting") };
    let Ok(op) = OpId::parse(&op) else {
        return error(StatusCode::BAD_REQUEST, "not an operation id");
    };
    let reason = body.as_ref().and_then(|b| b.0.get("reason")).and_then(Value::as_str).unwrap_or("").trim().to_string();
    if reason.is_empty() {
        return error(StatusCode::BAD_REQUEST, "a reason is required (`--reason`)");
    }
    let (status, v) = run_abandon(ctx, &op, &reason).await;
    answer(status, v)
}

/// The abandon itself (see the module's doc); the answer's status and body.
pub async fn run_abandon(ctx: &Arc<Ctx>, id: &OpId, reason: &str) -> (StatusCode, Value) {
    let claim = match find_claim(ctx, id).await {
        Ok(Some(c)) => c,
        Ok(None) => return (StatusCode::NOT_FOUND, json!({"error": format!("no claim of operation {id} is known (not in this claimer's state nor in PN_OPS): nothing to abandon")})),
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, json!({"error": format!("cannot read the operation's claim: {e}")})),
    };
    let op = &claim.op;
    let attempt = op.claim_attempt.max(1);
    let reason = crate::record::concise_reason("abandoned by the operator", reason, &[]);
    tracing::warn!(op = %id, attempt, %reason, "the operator asks to abandon the operation");
    let node = proto::node_name(&op.sub_id);
    let failed_at_center = match kit::world::activation(ctx.rt.center.as_ref(), id.as_str(), &node).await {
        Activation::Active { why } => {
            tracing::warn!(op = %id, %why, "abandon refused: the operation is activated");
            return (
                StatusCode::CONFLICT,
                json!({"operationId": id, "decision": "refused-activated",
                       "error": format!("refused: operation {id} is activated at Center ({why}); activation is final — nothing was failed and its VPS is kept")}),
            );
        }
        Activation::Unknown { why } => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"operationId": id, "decision": "unknown", "error": format!("Center cannot tell whether operation {id} is activated ({why}); nothing was done — try again")}),
            );
        }
        Activation::Failed { .. } => true,
        Activation::InFlight { .. } => false,
    };
    // The failure event first: it is what svc-cloud's reaper and this service's own report
    // consumer act on, retried until delivered; the direct report below only makes it prompt.
    let failed = OpFailed::new(id.as_str(), ABANDON, reason.clone(), kit::now_ms())
        .of_op(op)
        .on_instance(claim.local.as_ref().and_then(|r| r.instance_id.clone()).unwrap_or_default());
    if let Err(e) = ctx.rt.bus.publish_failed(failed).await {
        return (StatusCode::SERVICE_UNAVAILABLE, json!({"operationId": id, "error": format!("could not publish pn.op.failed: {e}; nothing was done")}));
    }
    let center = if failed_at_center {
        "failed".to_string()
    } else {
        match ctx.rt.center.update_node_operation(id.as_str(), &op.holder, "failed", None, Some(&reason)).await {
            Ok(_) => "failed".to_string(),
            Err(e @ (CenterError::Conflict { .. } | CenterError::Rejected { .. })) => format!("not accepted: {e}"),
            Err(e) => format!("pending (the report consumer retries): {e}"),
        }
    };
    if center == "failed"
        && let Some(mut rec) = claim.local.clone()
    {
        rec.failed_reported = true;
        rec.terminal = Some("failed".into());
        if let Err(e) = ctx.ops.put(id.as_str(), &rec).await {
            tracing::warn!(op = %id, error = %e, "could not record the abandon (the failure consumer records it)");
        }
        ctx.forget(id);
    }
    let decision = if failed_at_center { "already-failed" } else { "abandoned" };
    tracing::warn!(op = %id, decision, center = %center, "operation abandoned by the operator");
    (StatusCode::OK, json!({"operationId": id, "decision": decision, "center": center, "attempt": attempt, "reason": reason}))
}
