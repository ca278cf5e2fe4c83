//! PN_OPS read back: the stored events (`Record`, `read_all`) and one operation's events folded
//! in order (`OpFold`) — the one place that says what an event means for its operation.
//! `pnctl status` and `pnctl ops` show two readings of the same fold: status's stage is the
//! furthest outcome (`OpFold::outcome`), ops' the stage holding the operation now
//! (`OpFold::holder`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use proto::subjects::{CLAIMED, DEPLOYED, FAILED, INSTANCE, REBUILD, VERIFIED};
use proto::{Body, Event, subjects};
use serde_json::{Value, json};

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

    /// One line of a history: time, sequence, summary.
    pub fn line(&self) -> String {
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

/// One operation's events, folded in order of publication.
#[derive(Debug, Clone, Default)]
pub struct OpFold {
    pub operation_id: String,
    /// The first subscription id an event carries.
    pub sub_id: String,
    /// The latest node name an event carries.
    pub node: String,
    /// The latest IPv4 an event carries.
    pub ipv4: String,
    /// The domain of the latest `pn.op.verified`.
    pub domain: String,
    /// The latest `pn.op.failed`, as `<stage>: <reason>`; whether it still stands is a
    /// reading's ([`OpFold::error_at`]).
    pub failure: String,
    /// Why the operation is degraded (activated at Center, a check still not holding): set by
    /// `pn.op.degraded`, cleared by a later `pn.op.verified`.
    pub degraded: String,
    pub updated_ms: i64,
    /// Events folded, undecodable ones included.
    pub events: usize,
    /// The furthest outcome (`claimed`, `instance`, `deployed`, `verified`) or `failed`; `""`
    /// before the first. A rebuild is no outcome: the furthest one stands. `pnctl status`'s stage.
    pub outcome: String,
    /// The last pipeline event that moved the operation, `rebuild` included (it hands the
    /// operation back to cloud); `""` before the first. See [`OpFold::holder`].
    pub last_event: String,
    /// When the stage holding the operation ([`OpFold::holder`]) got it.
    pub since_ms: i64,
}

/// The pipeline's events in the order an operation passes them.
const PROGRESS: [&str; 5] = [CLAIMED, REBUILD, INSTANCE, DEPLOYED, VERIFIED];

/// Whether `event` moves an operation whose last move was `last`: a failure always does, and
/// anything after one (a replay revives it) or after nothing yet; an earlier stage's event
/// redelivered does not move it back; events that are no step (degraded, metering) never do.
fn moves(last: &str, event: &str) -> bool {
    let rank = |e: &str| PROGRESS.iter().position(|x| *x == e);
    match (rank(event), rank(last)) {
        (Some(new), Some(old)) => new >= old,
        (Some(_), None) => true,
        (None, _) => event == FAILED,
    }
}

/// The stage that holds an operation after `event` (`cloud`, `deploy`, `verify`), or `done` /
/// `failed`.
fn holder_after(event: &str) -> &'static str {
    match event {
        CLAIMED | REBUILD => "cloud",
        INSTANCE => "deploy",
        DEPLOYED => "verify",
        VERIFIED => "done",
        FAILED => "failed",
        _ => "",
    }
}

impl OpFold {
    pub fn new(operation_id: &str) -> OpFold {
        OpFold { operation_id: operation_id.to_string(), ..Default::default() }
    }

    pub fn apply(&mut self, r: &Record) {
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
        match b {
            Body::Verified(v) => {
                self.domain = v.domain.clone();
                self.degraded.clear();
            }
            Body::Degraded(g) => self.degraded = g.reason.clone(),
            Body::Failed(f) => self.failure = format!("{}: {}", f.stage, f.reason),
            _ => {}
        }
        let ev = b.event_name();
        if ev != REBUILD && moves(&self.outcome, ev) {
            self.outcome = ev.to_string();
        }
        if ev == REBUILD || moves(&self.last_event, ev) {
            if holder_after(ev) != self.holder() {
                self.since_ms = r.published_ms;
            }
            self.last_event = ev.to_string();
        }
    }

    /// The stage that holds the operation now (`cloud`, `deploy`, `verify`), or `done` /
    /// `failed`; `""` before its first pipeline event. `pnctl ops`' stage.
    pub fn holder(&self) -> &'static str {
        holder_after(&self.last_event)
    }

    /// The failure that stands when a reading's stage is `stage`: the latest `pn.op.failed`
    /// while it is `failed`, else nothing (a later step revived the operation).
    pub fn error_at(&self, stage: &str) -> &str {
        if stage == FAILED { &self.failure } else { "" }
    }
}

/// Every operation in `records`, folded, in order of first appearance.
pub fn fold_all(records: &[Record]) -> Vec<OpFold> {
    let mut order: Vec<String> = Vec::new();
    let mut by: BTreeMap<String, OpFold> = BTreeMap::new();
    for r in records {
        let Some(op) = subjects::op_id_of(&r.subject) else { continue };
        by.entry(op.to_string())
            .or_insert_with(|| {
                order.push(op.to_string());
                OpFold::new(op)
            })
            .apply(r);
    }
    order.into_iter().filter_map(|o| by.remove(&o)).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proto::{InstanceRebuild, NodeDeployed, OpClaimed, OpFailed, Operation};

    fn rec(at: i64, op: &str, body: Body) -> Record {
        Record { seq: at as u64, subject: format!("pn.op.{}.{op}", body.event_name()), published_ms: at, body: Ok(body) }
    }

    #[test]
    fn a_rebuild_moves_the_holder_back_to_cloud_but_is_no_outcome() {
        let op = Some(Operation { operation_id: "op-1".into(), sub_id: "s-1".into(), ..Default::default() });
        let failed = Body::Failed(OpFailed { operation_id: "op-1".into(), stage: "verify".into(), reason: "r".into(), ..Default::default() });
        let rs = vec![
            rec(1, "op-1", Body::Claimed(OpClaimed { op: op.clone() })),
            rec(2, "op-2", Body::Claimed(OpClaimed { op: None })),
            rec(3, "op-1", Body::Deployed(NodeDeployed { op: op.clone(), node_name: "pn-s-1".into(), ..Default::default() })),
            rec(4, "op-1", failed),
            rec(5, "op-1", Body::Rebuild(InstanceRebuild { op, ..Default::default() })),
        ];
        let folds = fold_all(&rs);
        assert_eq!(folds.iter().map(|f| f.operation_id.as_str()).collect::<Vec<_>>(), ["op-1", "op-2"]);
        let f = &folds[0];
        assert_eq!((f.events, f.sub_id.as_str(), f.node.as_str()), (4, "s-1", "pn-s-1"));
        // status: the failure stands; ops: the rebuild revived it, back in cloud since then.
        assert_eq!((f.outcome.as_str(), f.error_at(&f.outcome)), ("failed", "verify: r"));
        assert_eq!((f.holder(), f.last_event.as_str(), f.since_ms, f.error_at(f.holder())), ("cloud", "rebuild", 5, ""));
    }
}
