//! `pnctl demo`: the whole pipeline, end to end, on the dev stack. Enqueues intents at the
//! simulated Center, follows every operation live (PN_OPS events, the sim's operation status),
//! pushes emulated traffic through each node, and succeeds only when every operation is
//! verified and its usage is on the meter's ledger.
//!
//! It starts the stack (`up --detach`) only when none runs, and then stops it again at the end;
//! a stack it found running is left alone.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use proto::{Body, Event, subjects};
use serde::Serialize;
use serde_json::{Value, json};

use crate::endpoints::{self, get_json, post_json};
use secrecy::SecretString;
use crate::events::{human_bytes, human_ms};
use crate::stack::{self, StackFile, UpOptions};

const REGIONS: [&str; 4] = ["sg", "jp", "de", "us"];
const GIB: u64 = 1 << 30;
const QUOTAS: [u64; 5] = [100 * GIB, 500 * GIB, 1024 * GIB, 2048 * GIB, 250 * GIB];
const IP_TYPES: [&str; 2] = ["residential", "non_residential"];
/// What the demo's emulated customer downloads through each node.
const TRAFFIC_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub intents: usize,
    pub json: bool,
    pub timeout: Duration,
    pub up: UpOptions,
}

/// How far one operation got. Ordered: an operation only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Queued,
    Claimed,
    Instance,
    Deployed,
    Registered,
    Verified,
    Metered,
    Failed,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::Claimed => "claimed",
            Stage::Instance => "instance",
            Stage::Deployed => "deployed",
            Stage::Registered => "registered",
            Stage::Verified => "verified",
            Stage::Metered => "metered",
            Stage::Failed => "failed",
        }
    }

    fn done(self) -> bool {
        matches!(self, Stage::Metered | Stage::Failed)
    }
}

/// One operation as the demo follows it.
#[derive(Debug)]
struct Op {
    operation_id: String,
    sub_id: String,
    stage: Stage,
    enqueued: Instant,
    node: String,
    ipv4: String,
    domain: String,
    time_to_active_ms: i64,
    usage_bytes: u64,
    quota_state: String,
    error: Option<String>,
    /// Why it is degraded (activated at Center, a check still not holding), until verified.
    degraded: Option<String>,
    /// The last stage reached before a failure.
    reached: Stage,
    traffic_pushed: Option<Instant>,
    bar: ProgressBar,
}

/// The `--json` shape: `{"operations":[…]}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub operations: Vec<OpReport>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpReport {
    pub operation_id: String,
    pub sub_id: String,
    /// `verified` when done (verified and metered); otherwise the last stage reached.
    pub stage: String,
    pub node: String,
    pub ipv4: String,
    pub domain: String,
    pub time_to_active_ms: i64,
    pub usage_bytes: u64,
    pub quota_state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set while the operation is degraded: activated at Center, a check still not holding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    /// The last stage reached before a failure (for the table).
    #[serde(skip)]
    pub reached: String,
}

impl Report {
    pub fn all_ok(&self) -> bool {
        self.operations.iter().all(|o| o.error.is_none())
    }
}

/// Runs the demo. Returns the report (its `all_ok` decides the exit code).
pub async fn run(opts: &DemoOptions) -> anyhow::Result<Report> {
    let data_dir: PathBuf = opts.up.data_dir.clone();
    let (stack_file, mut started) = match stack::running(&data_dir) {
        Some(s) => (s, None),
        None => {
            if !opts.json {
                eprintln!("starting the dev stack in {} (stopped again at the end) …", data_dir.display());
            }
            let d = stack::up_detached(&opts.up).await?;
            if !opts.json {
                for l in stack::summary_lines(&d.stack) {
                    eprintln!("{l}");
                }
            }
            (d.stack, Some(d.child))
        }
    };
    let res = tokio::select! {
        r = drive(&stack_file, opts) => r,
        _ = stack::stop_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Some(mut child) = started.take() {
        if !opts.json {
            eprintln!("stopping the dev stack …");
        }
        let msg = stack::down(&data_dir).await;
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        if let Err(e) = msg {
            eprintln!("pnctl: stopping the stack: {e:#}");
        }
    }
    res
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {wide_msg} {elapsed:>4}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

async fn drive(stack: &StackFile, opts: &DemoOptions) -> anyhow::Result<Report> {
    let http = endpoints::http()?;
    let (_client, js) = endpoints::connect_nats(&stack.nats_url, &endpoints::operator_auth(&opts.up.data_dir)).await?;
    let meter_token = endpoints::Endpoints::resolve(&opts.up.data_dir, None, None, None).meter_token()?;
    // Subscribed before the first intent is enqueued, so no event is missed.
    let consumer = endpoints::ordered_consumer(&js, subjects::OPS_STREAM, subjects::OPS_ALL, DeliverPolicy::New).await?;
    let mut events = consumer.messages().await.context("read PN_OPS")?;

    let tty = std::io::stderr().is_terminal();
    let multi = if opts.json || !tty {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    } else {
        MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
    };
    let plain_lines = !opts.json && !tty;

    let tag: String = hex::encode(rand::random::<[u8; 3]>());
    let mut ops: BTreeMap<String, Op> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for i in 0..opts.intents {
        let sub_id = format!("demo-{tag}-{i}");
        let (region, quota, ip_type) = (REGIONS[i % REGIONS.len()], QUOTAS[i % QUOTAS.len()], IP_TYPES[i % IP_TYPES.len()]);
        let body = json!({ "subId": sub_id, "region": region, "trafficTotalBytes": quota, "ipType": ip_type });
        let resp = post_json(&http, &format!("{}/admin/intents", stack.center_url), &body).await?;
        let operation_id = resp["operationId"]
            .as_str()
            .filter(|s| subjects::is_token(s))
            .ok_or_else(|| anyhow::anyhow!("center-sim answered POST /admin/intents without an operationId: {resp}"))?
            .to_string();
        let bar = multi.add(ProgressBar::new_spinner());
        bar.set_style(bar_style());
        bar.set_prefix(format!("{operation_id} {region} {} {ip_type}", human_bytes(quota)));
        bar.set_message("queued");
        bar.enable_steady_tick(Duration::from_millis(120));
        if plain_lines {
            eprintln!("{operation_id}: queued ({region}, {}, {ip_type}, sub {sub_id})", human_bytes(quota));
        }
        order.push(operation_id.clone());
        ops.insert(
            operation_id.clone(),
            Op {
                operation_id,
                node: proto::node_name(&sub_id),
                sub_id,
                stage: Stage::Queued,
                enqueued: Instant::now(),
                ipv4: String::new(),
                domain: String::new(),
                time_to_active_ms: 0,
                usage_bytes: 0,
                quota_state: String::new(),
                error: None,
                degraded: None,
                reached: Stage::Queued,
                traffic_pushed: None,
                bar,
            },
        );
    }

    let deadline = tokio::time::Instant::now() + opts.timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_sim_poll = Instant::now();
    while !ops.values().all(|o| o.stage.done()) {
        tokio::select! {
            m = events.next() => match m {
                Some(Ok(msg)) => {
                    let Some(op_id) = subjects::op_id_of(&msg.subject) else { continue };
                    if let (Some(op), Ok(body)) = (ops.get_mut(op_id), Event::from_bytes(&msg.payload)) {
                        on_event(op, &body, plain_lines);
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "PN_OPS read error; the ordered consumer recovers"),
                None => anyhow::bail!("the PN_OPS event stream ended"),
            },
            _ = tick.tick() => {
                let poll_sim = last_sim_poll.elapsed() >= Duration::from_secs(2);
                if poll_sim {
                    last_sim_poll = Instant::now();
                }
                for op in ops.values_mut() {
                    poll(op, stack, (&http, &meter_token), poll_sim, plain_lines).await;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                for op in ops.values_mut().filter(|o| !o.stage.done()) {
                    let reason = format!("timed out after {} at stage {}", human_ms(opts.timeout.as_millis() as i64), op.stage.label());
                    fail(op, reason, plain_lines);
                }
            }
        }
    }
    let report = Report {
        operations: order
            .iter()
            .filter_map(|id| ops.get(id))
            .map(|o| OpReport {
                operation_id: o.operation_id.clone(),
                sub_id: o.sub_id.clone(),
                stage: match o.stage {
                    Stage::Metered => "verified".into(),
                    s => s.label().into(),
                },
                node: o.node.clone(),
                ipv4: o.ipv4.clone(),
                domain: o.domain.clone(),
                time_to_active_ms: o.time_to_active_ms,
                usage_bytes: o.usage_bytes,
                quota_state: o.quota_state.clone(),
                error: o.error.clone(),
                degraded: o.degraded.clone(),
                reached: o.reached.label().into(),
            })
            .collect(),
    };
    let _ = multi.clear();
    Ok(report)
}

fn advance(op: &mut Op, to: Stage, detail: &str, plain_lines: bool) {
    if op.stage.done() || to <= op.stage {
        return;
    }
    op.stage = to;
    let elapsed = human_ms(op.enqueued.elapsed().as_millis() as i64);
    let msg = if detail.is_empty() { to.label().to_string() } else { format!("{} {detail}", to.label()) };
    if plain_lines {
        eprintln!("{}: {msg} ({elapsed})", op.operation_id);
    }
    if to == Stage::Metered {
        op.bar.finish_with_message(format!("✔ {msg}"));
    } else {
        op.bar.set_message(msg);
    }
}

fn fail(op: &mut Op, reason: String, plain_lines: bool) {
    if op.stage.done() {
        return;
    }
    if plain_lines {
        eprintln!("{}: failed: {reason}", op.operation_id);
    }
    op.bar.finish_with_message(format!("✘ failed at {}: {reason}", op.stage.label()));
    op.error = Some(reason);
    op.reached = op.stage;
    op.stage = Stage::Failed;
}

/// Activated at Center but a check did not hold in time: shown, never a failure; a later
/// `verified` moves it on as usual.
fn degrade(op: &mut Op, reason: &str, plain_lines: bool) {
    if op.stage.done() || op.stage >= Stage::Verified {
        return;
    }
    if plain_lines {
        eprintln!("{}: degraded (activated, not failed): {reason}", op.operation_id);
    }
    op.bar.set_message(format!("⚠ degraded: {reason}"));
    op.degraded = Some(reason.to_string());
}

fn on_event(op: &mut Op, body: &Body, plain_lines: bool) {
    if let Some(ip) = crate::events::ipv4(body) {
        op.ipv4 = ip.to_string();
    }
    match body {
        Body::Claimed(_) => advance(op, Stage::Claimed, "", plain_lines),
        Body::Instance(e) => {
            let plan = e.instance.as_ref().map(|i| format!("{} {}", i.plan, i.provider_region)).unwrap_or_default();
            let detail = format!("{} {plan}", op.ipv4);
            advance(op, Stage::Instance, detail.trim(), plain_lines)
        }
        Body::Deployed(e) => {
            if !e.node_name.is_empty() {
                op.node = e.node_name.clone();
            }
            let detail = format!("{} {}", op.node, op.ipv4);
            advance(op, Stage::Deployed, &detail, plain_lines)
        }
        Body::Verified(e) => {
            if !e.node_name.is_empty() {
                op.node = e.node_name.clone();
            }
            op.domain = e.domain.clone();
            op.time_to_active_ms =
                if e.time_to_active_ms > 0 { e.time_to_active_ms } else { op.enqueued.elapsed().as_millis() as i64 };
            let detail = format!("{} {} in {}", op.node, op.domain, human_ms(op.time_to_active_ms));
            op.degraded = None;
            advance(op, Stage::Verified, &detail, plain_lines)
        }
        Body::Failed(e) => fail(op, format!("{} stage: {}", e.stage, e.reason), plain_lines),
        Body::Degraded(e) => degrade(op, &e.reason, plain_lines),
        // svc-cloud replaces the broken instance; a new pn.op.instance follows.
        Body::Rebuild(_) | Body::Usage(_) | Body::Quota(_) => {}
    }
}

/// The periodic part: Center's view, emulated traffic, the meter's ledger.
async fn poll(op: &mut Op, stack: &StackFile, (http, meter_token): (&reqwest::Client, &SecretString), poll_sim: bool, plain_lines: bool) {
    if op.stage.done() {
        return;
    }
    if poll_sim && op.stage < Stage::Verified {
        let url = format!("{}/admin/operations/{}", stack.center_url, op.operation_id);
        if let Ok((200, v)) = get_json(http, &url).await {
            let v = v.get("operation").cloned().unwrap_or(v);
            match v["status"].as_str() {
                Some("failed") => {
                    let why = v["error"].as_str().unwrap_or("no reason given").to_string();
                    fail(op, format!("Center marked it failed: {why}"), plain_lines);
                    return;
                }
                Some("done") => advance(op, Stage::Registered, "(Center: done)", plain_lines),
                _ => {}
            }
            if op.ipv4.is_empty()
                && let Some(ip) = v["result"]["ipv4"].as_str()
            {
                op.ipv4 = ip.to_string();
            }
        }
    }
    // The emulated customer uses the node once it is verified (the sidecar's own reporting
    // chatter is what the verifier sees first); traffic pushed earlier would fall into the
    // first report, which is the billing baseline.
    let due = op.traffic_pushed.is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
    if op.stage >= Stage::Verified && due {
        let url = format!("{}/admin/nodes/{}/traffic", stack.center_url, op.node);
        if post_json(http, &url, &json!({ "bytes": TRAFFIC_BYTES })).await.is_ok() {
            op.traffic_pushed = Some(Instant::now());
        }
    }
    if op.stage == Stage::Verified {
        // The ledger, on the meter's internal listener.
        let url = format!("{}/v1/nodes/{}/usage", stack.meter_internal_url, op.node);
        if let Ok((200, v)) = endpoints::get_json_bearer(http, &url, meter_token).await {
            let used = v["usedBytes"].as_u64().unwrap_or(0);
            op.quota_state = match &v["state"] {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            op.usage_bytes = used;
            if used >= TRAFFIC_BYTES {
                let detail = format!("{} {} on the ledger ({})", op.node, human_bytes(used), op.quota_state);
                advance(op, Stage::Metered, &detail, plain_lines);
            }
        }
    }
}

/// The closing table.
pub fn table(r: &Report) -> String {
    let mut rows = vec![[
        "OPERATION".to_string(),
        "NODE".into(),
        "IPV4".into(),
        "DOMAIN".into(),
        "ACTIVE IN".into(),
        "USAGE".into(),
        "QUOTA".into(),
        "RESULT".into(),
    ]];
    for o in &r.operations {
        rows.push([
            o.operation_id.clone(),
            o.node.clone(),
            dash(&o.ipv4),
            dash(&o.domain),
            if o.time_to_active_ms > 0 { human_ms(o.time_to_active_ms) } else { "-".into() },
            if o.usage_bytes > 0 { human_bytes(o.usage_bytes) } else { "-".into() },
            dash(&o.quota_state),
            match (&o.error, &o.degraded) {
                (Some(_), _) => format!("FAILED after {}", o.reached),
                (None, Some(_)) => "DEGRADED".into(),
                (None, None) => "ok".into(),
            },
        ]);
    }
    let mut widths = [0usize; 8];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    rows.iter()
        .map(|r| {
            r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect::<Vec<_>>().join("  ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_only_move_forward_and_failure_is_final() {
        let mut op = Op {
            operation_id: "op-1".into(),
            sub_id: "s".into(),
            stage: Stage::Queued,
            enqueued: Instant::now(),
            node: "pn-s".into(),
            ipv4: String::new(),
            domain: String::new(),
            time_to_active_ms: 0,
            usage_bytes: 0,
            quota_state: String::new(),
            error: None,
            degraded: None,
            reached: Stage::Queued,
            traffic_pushed: None,
            bar: ProgressBar::hidden(),
        };
        advance(&mut op, Stage::Deployed, "", false);
        advance(&mut op, Stage::Claimed, "", false);
        assert_eq!(op.stage, Stage::Deployed);
        fail(&mut op, "boom".into(), false);
        advance(&mut op, Stage::Metered, "", false);
        assert_eq!(op.stage, Stage::Failed);
        assert_eq!(op.reached, Stage::Deployed);
        assert_eq!(op.error.as_deref(), Some("boom"));
    }

    #[test]
    fn a_degraded_operation_is_shown_not_failed_and_clears_when_verified() {
        let mut op = Op {
            operation_id: "op-1".into(),
            sub_id: "s".into(),
            stage: Stage::Deployed,
            enqueued: Instant::now(),
            node: "pn-s".into(),
            ipv4: String::new(),
            domain: String::new(),
            time_to_active_ms: 0,
            usage_bytes: 0,
            quota_state: String::new(),
            error: None,
            degraded: None,
            reached: Stage::Queued,
            traffic_pushed: None,
            bar: ProgressBar::hidden(),
        };
        let g = proto::OpDegraded { reason: "usage: none".into(), ..Default::default() };
        on_event(&mut op, &Body::Degraded(g), false);
        assert_eq!((op.stage, op.degraded.as_deref(), op.error.as_deref()), (Stage::Deployed, Some("usage: none"), None));
        on_event(&mut op, &Body::Verified(proto::NodeVerified { domain: "d".into(), ..Default::default() }), false);
        assert_eq!((op.stage, op.degraded.as_deref()), (Stage::Verified, None));
    }

    #[test]
    fn the_json_report_has_the_documented_fields() {
        let r = Report {
            operations: vec![OpReport {
                operation_id: "op-1".into(),
                sub_id: "s".into(),
                stage: "verified".into(),
                node: "pn-s".into(),
                ipv4: "127.0.1.2".into(),
                domain: "127-0-1-2.sslip.io".into(),
                time_to_active_ms: 1234,
                usage_bytes: 5,
                quota_state: "ok".into(),
                error: None,
                degraded: None,
                reached: String::new(),
            }],
        };
        let v = serde_json::to_value(&r).unwrap_or_default();
        let o = &v["operations"][0];
        for k in ["operationId", "subId", "stage", "node", "ipv4", "domain", "timeToActiveMs", "usageBytes", "quotaState"] {
            assert!(o.get(k).is_some(), "{k}");
        }
        assert!(o.get("error").is_none());
        assert!(r.all_ok());
        assert!(table(&r).contains("127-0-1-2.sslip.io"));
    }
}
