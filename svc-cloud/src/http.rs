//! The operator's reap commands on svc-cloud's ops listener (beside `/healthz`, `/readyz`,
//! `/metrics`; `pnctl reap` calls them):
//!
//! - `GET /v1/reap/pending` — the kept, uncertain reaps: a JSON list of
//!   `{operationId, subId, instanceIds, reason, since}` (`since`: unix ms).
//! - `POST /v1/reap/<operationId>/confirm` — the reaper's checks again, overriding only the soft
//!   doubts (attempt mismatch, Center not listing the operation). 200 when the VPS is deleted
//!   (or already gone); 409 when something says never (active, in flight, not ours) or the
//!   operation never failed here; 503 when Center or the provider did not answer; 404 for an
//!   unknown operation. The body is `{operationId, decision, reason, instanceIds, overridden}`
//!   or `{error}`.
//!
//! The confirm needs the operator token (`PN_OPS_TOKEN`, `Authorization: Bearer …`; 401
//! without it, 403 when svc-cloud has none): `kit::ops::require_operator` guards every
//! mutating route of the ops listener. The GET stays open.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::Ctx;
use crate::reaper::{self, Decision, Mode, PendingView, ReapError};

type Cell = Arc<OnceLock<Arc<Ctx>>>;

pub fn router(cell: Cell) -> Router {
    Router::new().route("/v1/reap/pending", get(pending)).route("/v1/reap/{op}/confirm", post(confirm)).with_state(cell)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": msg.into()}))).into_response()
}

fn starting() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "svc-cloud is starting")
}

async fn pending(State(cell): State<Cell>) -> Response {
    let Some(ctx) = cell.get() else { return starting() };
    let list: Vec<PendingView> = match ctx.pending.lock() {
        Ok(p) => p.values().cloned().collect(),
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "pending list unavailable"),
    };
    axum::Json(list).into_response()
}

async fn confirm(State(cell): State<Cell>, Path(op): Path<String>) -> Response {
    let Some(ctx) = cell.get() else { return starting() };
    let Ok(op) = proto::OpId::parse(&op) else {
        return error(StatusCode::BAD_REQUEST, "not an operation id");
    };
    tracing::info!(op = %op, "operator confirms the reap");
    match reaper::reap(ctx, &op, Mode::Confirm).await {
        Ok(Some(o)) => {
            let status = match o.kind {
                Decision::Deleted | Decision::Gone => StatusCode::OK,
                Decision::Pending => StatusCode::SERVICE_UNAVAILABLE,
                Decision::KeptActive | Decision::KeptInFlight | Decision::KeptNotOurs | Decision::NotFailed => StatusCode::CONFLICT,
            };
            (status, axum::Json(o)).into_response()
        }
        Ok(None) => error(StatusCode::INTERNAL_SERVER_ERROR, "no decision"),
        Err(e @ ReapError::Unknown(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ ReapError::Busy(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e @ ReapError::Store(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
