//! The bench's view of the operations it enqueued: `Tracker` enqueues intents at center-sim and
//! folds PN_OPS events in; `ops_events` is the live PN_OPS feed it reads. Shared by `pipeline`
//! and `capacity`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use proto::{Body, Event, subjects};
use serde_json::json;

use pnctl::endpoints::{self, post_json};

const REGIONS: [&str; 4] = ["sg", "jp", "de", "us"];
const GIB: u64 = 1 << 30;

/// One operation as the bench follows it.
#[derive(Debug)]
pub struct Tracked {
    pub node: String,
    /// When the intent was accepted, then when each event reached pnctl.
    pub enqueued: Instant,
    pub seen: [Option<Instant>; 4],
    pub instance: bool,
    pub deployed: bool,
    /// queued→verified, ms.
    pub verified_ms: Option<f64>,
    pub verified_at: Option<Instant>,
    pub failed: Option<String>,
}

impl Tracked {
    pub fn done(&self) -> bool {
        self.verified_ms.is_some() || self.failed.is_some()
    }
}

/// Every operation a run enqueued, updated from PN_OPS.
pub struct Tracker {
    pub ops: HashMap<String, Tracked>,
    pub done: usize,
    pub instances: usize,
    pub failed: usize,
    http: reqwest::Client,
    center: String,
    /// When set, the delay after `deployed` at which 1 MiB of traffic is pushed through the node.
    pub push_after: Option<Duration>,
}

impl Tracker {
    pub fn new(http: reqwest::Client, center: &str) -> Tracker {
        Tracker { ops: HashMap::new(), done: 0, instances: 0, failed: 0, http, center: center.to_string(), push_after: None }
    }

    /// Enqueues `n` intents (32 requests at a time) and tracks them.
    pub async fn enqueue(&mut self, n: usize, tag: &str, from: usize) -> anyhow::Result<()> {
        let url = format!("{}/admin/intents", self.center);
        let http = self.http.clone();
        let results: Vec<anyhow::Result<(String, String, Instant)>> = futures::stream::iter(from..from + n)
            .map(|i| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let sub = format!("bench-{tag}-{i}");
                    let body = json!({
                        "subId": sub,
                        "region": REGIONS[i % REGIONS.len()],
                        "trafficTotalBytes": 100 * GIB,
                        "ipType": if i % 2 == 0 { "residential" } else { "non_residential" },
                    });
                    let v = post_json(&http, &url, &body).await?;
                    let id = v["operationId"]
                        .as_str()
                        .filter(|s| subjects::is_token(s))
                        .ok_or_else(|| anyhow::anyhow!("POST {url} answered without an operationId: {v}"))?;
                    Ok((id.to_string(), sub, Instant::now()))
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for r in results {
            let (id, sub, at) = r?;
            self.ops.insert(
                id,
                Tracked { node: proto::node_name(&sub), enqueued: at, seen: [None; 4], instance: false, deployed: false, verified_ms: None, verified_at: None, failed: None },
            );
        }
        Ok(())
    }

    /// Folds one PN_OPS event in.
    pub fn on_event(&mut self, subject: &str, payload: &[u8]) {
        let Some(id) = subjects::op_id_of(subject) else { return };
        let Some(op) = self.ops.get_mut(id) else { return };
        let Ok(body) = Event::from_bytes(payload) else { return };
        if op.done() {
            return;
        }
        let slot = match &body {
            Body::Claimed(_) => Some(0),
            Body::Instance(_) => Some(1),
            Body::Deployed(_) => Some(2),
            Body::Verified(_) => Some(3),
            _ => None,
        };
        if let Some(i) = slot {
            op.seen[i].get_or_insert_with(Instant::now);
        }
        match body {
            Body::Instance(_) if !op.instance => {
                op.instance = true;
                self.instances += 1;
            }
            Body::Deployed(d) if !op.deployed => {
                op.deployed = true;
                if !d.node_name.is_empty() {
                    op.node = d.node_name;
                }
                if let Some(after) = self.push_after {
                    let url = format!("{}/admin/nodes/{}/traffic", self.center, op.node);
                    let http = self.http.clone();
                    // A few pushes, spread out: a report the meter refuses (it did not know
                    // the node yet, or the previous report was < 100 ms before) is not retried
                    // by the sidecar before its next interval.
                    tokio::spawn(async move {
                        for pause in [after, Duration::from_millis(500), Duration::from_secs(1), Duration::from_secs(2)] {
                            tokio::time::sleep(pause).await;
                            let _ = post_json(&http, &url, &json!({ "bytes": 1u64 << 20 })).await;
                        }
                    });
                }
            }
            Body::Verified(v) => {
                op.verified_at = Some(Instant::now());
                op.verified_ms = Some(v.time_to_active_ms.max(0) as f64);
                self.done += 1;
            }
            Body::Failed(f) => {
                op.failed = Some(format!("{} stage: {}", f.stage, f.reason));
                self.done += 1;
                self.failed += 1;
            }
            _ => {}
        }
    }

    /// Marks every unfinished operation failed with `why`.
    pub fn give_up(&mut self, why: &str) {
        for op in self.ops.values_mut().filter(|o| !o.done()) {
            op.failed = Some(why.to_string());
            self.done += 1;
            self.failed += 1;
        }
    }
}

/// A live view of PN_OPS from now on (subscribed before the first intent is enqueued).
/// `data_dir` is the stack's (its operator identity connects).
pub async fn ops_events(nats_url: &str, data_dir: &std::path::Path) -> anyhow::Result<(async_nats::Client, async_nats::jetstream::consumer::pull::Ordered)> {
    let (client, js) = endpoints::connect_nats(nats_url, &endpoints::operator_auth(data_dir)).await?;
    let consumer = endpoints::ordered_consumer(&js, subjects::OPS_STREAM, subjects::OPS_ALL, DeliverPolicy::New).await?;
    let messages = consumer.messages().await.context("read PN_OPS")?;
    Ok((client, messages))
}
