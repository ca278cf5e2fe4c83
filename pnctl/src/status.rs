//! `pnctl status [<operationId>]`: what PN_OPS, the audit trail, says about operations — one
//! operation's stage-by-stage history (an ordered consumer over `pn.op.*.<op>`), or one line
//! per operation. Read-only: it never publishes and creates no durable consumer.

use anyhow::bail;
use proto::subjects;
use serde_json::{Value, json};

use crate::endpoints::{Endpoints, get_json};
use crate::events;
use crate::history::{OpFold, Record, fold_all, read_all};

/// `pnctl status`'s reading of one operation's fold: its furthest outcome is the stage.
struct Summary<'a> {
    f: &'a OpFold,
    stage: &'a str,
}

impl<'a> Summary<'a> {
    /// `stage` when the operation has no outcome yet.
    fn of(f: &'a OpFold, stage: &'a str) -> Summary<'a> {
        Summary { f, stage: if f.outcome.is_empty() { stage } else { &f.outcome } }
    }

    fn error(&self) -> &str {
        self.f.error_at(self.stage)
    }

    /// The stage as a person reads it: `degraded` while a degradation stands.
    fn shown_stage(&self) -> &str {
        if self.f.degraded.is_empty() || self.stage == "failed" { self.stage } else { "degraded" }
    }

    /// The REASON column: the failure, or why it is degraded.
    fn reason(&self) -> String {
        match (self.error().is_empty(), self.f.degraded.is_empty()) {
            (false, _) => self.error().to_string(),
            (true, false) => format!("degraded: {}", self.f.degraded),
            (true, true) => String::new(),
        }
    }

    fn to_json(&self) -> Value {
        let f = self.f;
        events::object(vec![
            ("operationId", json!(f.operation_id)),
            ("subId", json!(f.sub_id)),
            ("stage", json!(self.stage)),
            ("node", json!(f.node)),
            ("ipv4", json!(f.ipv4)),
            ("domain", json!(f.domain)),
            ("error", json!(self.error())),
            ("degraded", json!(f.degraded)),
            ("events", json!(f.events)),
            ("updatedAt", json!(events::rfc3339_ms(f.updated_ms))),
        ])
    }
}

/// `pnctl status <op>`: prints the history; fails when PN_OPS knows nothing of the operation
/// and Center does not either.
pub async fn one(ep: &Endpoints, operation_id: &str, json_out: bool) -> anyhow::Result<()> {
    if !subjects::is_token(operation_id) {
        bail!("{operation_id:?} is not an operation id (letters, digits, '-' and '_' only)");
    }
    let (_c, js) = ep.connect().await?;
    let records = read_all(&js, subjects::OPS_STREAM, &subjects::op_history(operation_id)).await?;
    let center = center_view(ep, operation_id).await;
    if records.is_empty() && center.is_none() {
        bail!("no events for operation {operation_id} in PN_OPS (and Center does not know it)");
    }
    let mut f = OpFold::new(operation_id);
    for r in &records {
        f.apply(r);
    }
    let s = Summary::of(&f, "queued");
    if json_out {
        let mut v = s.to_json();
        if let Value::Object(m) = &mut v {
            m.insert("history".into(), Value::Array(records.iter().map(Record::to_json).collect()));
            if let Some(c) = &center {
                m.insert("center".into(), c.clone());
            }
        }
        println!("{v}");
        return Ok(());
    }
    let sub = if f.sub_id.is_empty() { String::new() } else { format!(" (sub {})", f.sub_id) };
    let degraded = if f.degraded.is_empty() { String::new() } else { format!(" — degraded: {}", f.degraded) };
    println!("operation {operation_id}{sub}: {}{degraded}", s.stage);
    for r in &records {
        println!("  {}", r.line());
    }
    if records.is_empty() {
        println!("  (no events in PN_OPS yet)");
    }
    if let Some(c) = center {
        let status = c["status"].as_str().unwrap_or("?");
        let err = c["error"].as_str().map(|e| format!(" — {e}")).unwrap_or_default();
        println!("  Center says: {status}{err}");
    }
    Ok(())
}

/// The sim's view of the operation, when a center URL is known and answers.
async fn center_view(ep: &Endpoints, operation_id: &str) -> Option<Value> {
    let base = ep.center_url.as_deref()?;
    let http = crate::endpoints::http().ok()?;
    match get_json(&http, &format!("{base}/admin/operations/{operation_id}")).await {
        Ok((200, v)) => Some(v.get("operation").cloned().unwrap_or(v)),
        _ => None,
    }
}

/// `pnctl status`: one line per operation in PN_OPS, oldest first.
pub async fn all(ep: &Endpoints, json_out: bool) -> anyhow::Result<()> {
    let (_c, js) = ep.connect().await?;
    let records = read_all(&js, subjects::OPS_STREAM, subjects::OPS_ALL).await?;
    let folds = fold_all(&records);
    let list: Vec<Summary> = folds.iter().map(|f| Summary::of(f, "")).collect();
    if json_out {
        println!("{}", json!({ "operations": list.iter().map(|s| s.to_json()).collect::<Vec<_>>() }));
        return Ok(());
    }
    if list.is_empty() {
        println!("no operations in PN_OPS yet");
        return Ok(());
    }
    println!("{:<38} {:<9} {:<28} {:<15} {:<24} REASON", "OPERATION", "STAGE", "NODE", "IPV4", "UPDATED");
    for s in list {
        println!(
            "{:<38} {:<9} {:<28} {:<15} {:<24} {}",
            s.f.operation_id,
            s.shown_stage(),
            if s.f.node.is_empty() { "-" } else { &s.f.node },
            if s.f.ipv4.is_empty() { "-" } else { &s.f.ipv4 },
            events::rfc3339_ms(s.f.updated_ms),
            s.reason()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Body, NodeDeployed, NodeVerified, OpClaimed, OpDegraded, OpFailed, Operation};

    fn rec(seq: u64, body: Body) -> Record {
        Record { seq, subject: format!("pn.op.{}.op-1", body.event_name()), published_ms: seq as i64, body: Ok(body) }
    }

    fn read(f: &OpFold) -> Summary<'_> {
        Summary::of(f, "")
    }

    #[test]
    fn the_summary_follows_the_latest_stage_and_failure() {
        let op = Operation { operation_id: "op-1".into(), sub_id: "s-1".into(), ..Default::default() };
        let mut f = OpFold::default();
        f.apply(&rec(1, Body::Claimed(OpClaimed { op: Some(op.clone()) })));
        assert_eq!((read(&f).stage, f.sub_id.as_str()), ("claimed", "s-1"));
        f.apply(&rec(2, Body::Failed(OpFailed { stage: "cloud".into(), reason: "no plan".into(), ..Default::default() })));
        assert_eq!(read(&f).stage, "failed");
        assert_eq!(read(&f).error(), "cloud: no plan");
        f.apply(&rec(3, Body::Verified(NodeVerified { op: Some(op), domain: "d".into(), ..Default::default() })));
        assert_eq!(read(&f).stage, "verified");
        assert!(read(&f).error().is_empty());
        assert_eq!(read(&f).to_json()["events"], 3);
    }

    #[test]
    fn a_degraded_operation_shows_as_such_until_verified() {
        let op = Operation { operation_id: "op-1".into(), sub_id: "s-1".into(), ..Default::default() };
        let mut f = OpFold::default();
        f.apply(&rec(1, Body::Deployed(NodeDeployed { op: Some(op.clone()), node_name: "pn-s-1".into(), ..Default::default() })));
        let reason = "not verified within 4s: usage: none";
        f.apply(&rec(2, Body::Degraded(OpDegraded { op: Some(op.clone()), reason: reason.into(), stage: "verify".into(), ..Default::default() })));
        let s = read(&f);
        assert_eq!(s.stage, "deployed", "the stage is kept");
        assert_eq!(s.shown_stage(), "degraded");
        assert_eq!(s.reason(), format!("degraded: {reason}"));
        let j = s.to_json();
        assert_eq!((j["stage"].as_str(), j["degraded"].as_str(), j["node"].as_str()), (Some("deployed"), Some(reason), Some("pn-s-1")));
        assert!(j.get("error").is_none());
        f.apply(&rec(3, Body::Verified(NodeVerified { op: Some(op), domain: "d".into(), ..Default::default() })));
        assert_eq!((read(&f).stage, read(&f).shown_stage()), ("verified", "verified"));
        assert!(read(&f).to_json().get("degraded").is_none());
    }

    #[test]
    fn one_operation_without_an_outcome_reads_queued() {
        let f = OpFold::new("op-1");
        assert_eq!(Summary::of(&f, "queued").to_json()["stage"], "queued");
        assert!(read(&f).to_json().get("stage").is_none());
    }
}
