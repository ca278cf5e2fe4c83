//! `pnctl status [<operationId>]`: what PN_OPS, the audit trail, says about operations — one
//! operation's stage-by-stage history (an ordered consumer over `pn.op.*.<op>`), or one line
//! per operation. Read-only: it never publishes and creates no durable consumer.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use proto::{Body, Event, subjects};
use serde_json::{Value, json};

use crate::endpoints::{Endpoints, get_json};
use crate::events;

/// One stored event.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub subject: String,
    pub published_ms: i64,
    pub body: Result<Body, String>,
}

impl Record {
    pub fn to_json(&self) -> Value {
        let mut v = match &self.body {
            Ok(b) => events::to_json(b),
            Err(e) => json!({ "event": "undecodable", "error": e }),
        };
        if let Value::Object(m) = &mut v {
            m.insert("seq".into(), json!(self.seq));
            m.insert("subject".into(), json!(self.subject));
            m.insert("at".into(), json!(events::rfc3339_ms(self.published_ms)));
        }
        v
    }

    fn line(&self) -> String {
        let at = events::rfc3339_ms(self.published_ms);
        match &self.body {
            Ok(b) => format!("{at}  #{:<6} {}", self.seq, events::summary(b)),
            Err(e) => format!("{at}  #{:<6} undecodable ({}): {e}", self.seq, self.subject),
        }
    }
}

/// Every message of `stream` matching `filter`, oldest first, read until caught up.
pub async fn read_all(js: &async_nats::jetstream::Context, stream: &str, filter: &str) -> anyhow::Result<Vec<Record>> {
    let consumer = crate::endpoints::ordered_consumer(js, stream, filter, DeliverPolicy::All).await?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut msgs = consumer.messages().await.context("read the stream")?;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), msgs.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => bail!("reading {filter}: {e}"),
            Ok(None) | Err(_) => break,
        };
        let (seq, pending, published_ms) = match msg.info() {
            Ok(i) => (i.stream_sequence, i.pending, (i.published.unix_timestamp_nanos() / 1_000_000) as i64),
            Err(_) => (0, 0, 0),
        };
        out.push(Record {
            seq,
            subject: msg.subject.to_string(),
            published_ms,
            body: Event::from_bytes(&msg.payload).map_err(|e| e.to_string()),
        });
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// The summary of one operation, built from its events in order.
#[derive(Debug, Default, Clone)]
struct Summary {
    operation_id: String,
    sub_id: String,
    stage: String,
    node: String,
    ipv4: String,
    domain: String,
    error: String,
    /// Why the operation is degraded (activated at Center, a check still not holding): set by
    /// `pn.op.degraded`, cleared by a later `pn.op.verified`.
    degraded: String,
    updated_ms: i64,
    events: usize,
}

impl Summary {
    fn apply(&mut self, r: &Record) {
        self.events += 1;
        self.updated_ms = self.updated_ms.max(r.published_ms);
        let Ok(b) = &r.body else { return };
        if self.sub_id.is_empty() {
            self.sub_id = events::sub_id(b).to_string();
        }
        if let Some(ip) = events::ipv4(b) {
            self.ipv4 = ip.to_string();
        }
        if let Some(n) = events::node(b) {
            self.node = n.to_string();
        }
        if let Body::Verified(v) = b {
            self.domain = v.domain.clone();
            self.degraded.clear();
        }
        if let Body::Degraded(g) = b {
            self.degraded = g.reason.clone();
        }
        if let Body::Failed(f) = b {
            self.error = format!("{}: {}", f.stage, f.reason);
        }
        // A failure is final unless a later stage succeeds (e.g. after a replay).
        let rank = |s: &str| ["claimed", "instance", "deployed", "verified"].iter().position(|x| *x == s);
        let ev = b.event_name();
        match (rank(ev), ev) {
            (Some(_), _) if self.stage == "failed" => {
                self.stage = ev.to_string();
                self.error.clear();
            }
            (Some(new), _) if rank(&self.stage).is_none_or(|old| new >= old) => self.stage = ev.to_string(),
            (None, "failed") => self.stage = "failed".into(),
            _ => {}
        }
    }

    /// The stage as a person reads it: `degraded` while a degradation stands.
    fn shown_stage(&self) -> &str {
        if self.degraded.is_empty() || self.stage == "failed" { &self.stage } else { "degraded" }
    }

    /// The REASON column: the failure, or why it is degraded.
    fn reason(&self) -> String {
        match (self.error.is_empty(), self.degraded.is_empty()) {
            (false, _) => self.error.clone(),
            (true, false) => format!("degraded: {}", self.degraded),
            (true, true) => String::new(),
        }
    }

    fn to_json(&self) -> Value {
        events::object(vec![
            ("operationId", json!(self.operation_id)),
            ("subId", json!(self.sub_id)),
            ("stage", json!(self.stage)),
            ("node", json!(self.node)),
            ("ipv4", json!(self.ipv4)),
            ("domain", json!(self.domain)),
            ("error", json!(self.error)),
            ("degraded", json!(self.degraded)),
            ("events", json!(self.events)),
            ("updatedAt", json!(events::rfc3339_ms(self.updated_ms))),
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
    let mut s = Summary { operation_id: operation_id.to_string(), stage: "queued".into(), ..Default::default() };
    for r in &records {
        s.apply(r);
    }
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
    let sub = if s.sub_id.is_empty() { String::new() } else { format!(" (sub {})", s.sub_id) };
    let degraded = if s.degraded.is_empty() { String::new() } else { format!(" — degraded: {}", s.degraded) };
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
    let mut order: Vec<String> = Vec::new();
    let mut by_op: BTreeMap<String, Summary> = BTreeMap::new();
    for r in &records {
        let Some(op) = subjects::op_id_of(&r.subject) else { continue };
        let s = by_op.entry(op.to_string()).or_insert_with(|| {
            order.push(op.to_string());
            Summary { operation_id: op.to_string(), ..Default::default() }
        });
        s.apply(r);
    }
    let list: Vec<&Summary> = order.iter().filter_map(|o| by_op.get(o)).collect();
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
            s.operation_id,
            s.shown_stage(),
            if s.node.is_empty() { "-" } else { &s.node },
            if s.ipv4.is_empty() { "-" } else { &s.ipv4 },
            events::rfc3339_ms(s.updated_ms),
            s.reason()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{NodeDeployed, NodeVerified, OpClaimed, OpDegraded, OpFailed, Operation};

    fn rec(seq: u64, body: Body) -> Record {
        Record { seq, subject: format!("pn.op.{}.op-1", body.event_name()), published_ms: seq as i64, body: Ok(body) }
    }

    #[test]
    fn the_summary_follows_the_latest_stage_and_failure() {
        let op = Operation { operation_id: "op-1".into(), sub_id: "s-1".into(), ..Default::default() };
        let mut s = Summary::default();
        s.apply(&rec(1, Body::Claimed(OpClaimed { op: Some(op.clone()) })));
        assert_eq!((s.stage.as_str(), s.sub_id.as_str()), ("claimed", "s-1"));
        s.apply(&rec(2, Body::Failed(OpFailed { stage: "cloud".into(), reason: "no plan".into(), ..Default::default() })));
        assert_eq!(s.stage, "failed");
        assert_eq!(s.error, "cloud: no plan");
        s.apply(&rec(3, Body::Verified(NodeVerified { op: Some(op), domain: "d".into(), ..Default::default() })));
        assert_eq!(s.stage, "verified");
        assert!(s.error.is_empty());
        assert_eq!(s.to_json()["events"], 3);
    }

    #[test]
    fn a_degraded_operation_shows_as_such_until_verified() {
        let op = Operation { operation_id: "op-1".into(), sub_id: "s-1".into(), ..Default::default() };
        let mut s = Summary::default();
        s.apply(&rec(1, Body::Deployed(NodeDeployed { op: Some(op.clone()), node_name: "pn-s-1".into(), ..Default::default() })));
        let reason = "not verified within 4s: usage: none";
        s.apply(&rec(2, Body::Degraded(OpDegraded { op: Some(op.clone()), reason: reason.into(), stage: "verify".into(), ..Default::default() })));
        assert_eq!(s.stage, "deployed", "the stage is kept");
        assert_eq!(s.shown_stage(), "degraded");
        assert_eq!(s.reason(), format!("degraded: {reason}"));
        let j = s.to_json();
        assert_eq!((j["stage"].as_str(), j["degraded"].as_str(), j["node"].as_str()), (Some("deployed"), Some(reason), Some("pn-s-1")));
        assert!(j.get("error").is_none());
        s.apply(&rec(3, Body::Verified(NodeVerified { op: Some(op), domain: "d".into(), ..Default::default() })));
        assert_eq!((s.stage.as_str(), s.shown_stage()), ("verified", "verified"));
        assert!(s.to_json().get("degraded").is_none());
    }
}
