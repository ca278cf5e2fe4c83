//! `pnctl ops list|show|abandon`: find, show and end operations — from PN_OPS (each operation's
//! events: the stage holding it, since when) and the services' own state (their ops listeners:
//! `GET /v1/ops/held`, what each service's consumer loops hold now — running, parked or
//! retrying — and `/metrics`' `pn_ops_{in_flight,parked,overdue}{stage}`), never from logs.
//!
//! - `list` — one line per operation still held by a stage (`--all`: every operation).
//!   `--stuck`: held in a stage longer than that stage's deadline. The deadlines are the
//!   services' own settings' defaults (cloud: `PN_BOOT_TIMEOUT_MS`; deploy: the deployer's
//!   `PN_SSH__REACH_PATIENCE_MS` + `PN_SSH__PREP_TIMEOUT_MS` + `PN_SSH__OUTSIDE_CHECK_PATIENCE_MS`;
//!   verify: `PN_DEADLINE_MS`), each overridable with `--deadline <stage>=<duration>` to match a
//!   deployment's settings. `--parked`: a service says it holds the operation parked.
//!   `--degraded`: activated but a check does not hold (`pn.op.degraded`, not verified since).
//! - `show <op>` — every event of the operation on PN_OPS (subject, time, summary; the sealed
//!   claim token only as its size), each stage's record (its outcome event, what the service
//!   holds now), the failure or degradation reason, and Center's view when a center URL is known.
//! - `abandon <op> --reason R` — svc-claimer's `POST /v1/ops/<op>/abandon` (its ops listener):
//!   Center is asked first; activated → refused (exit 1), in flight → failed at Center and
//!   `pn.op.failed` published, so svc-cloud's reaper deals with the VPS under its usual rules.
//!   Sends the operator token: `PN_OPS_TOKEN`, else the dev stack's `secrets/ops-token`.
//!
//! The services' ops URLs come from `<data-dir>/stack.json`, or `--ops-url <service>=<url>`
//! (repeatable) / `PN_OPS_URLS` (`svc-cloud=http://…,svc-claimer=http://…`) for a deployment
//! reached through port-forwards; a service that does not answer is named in the output, and
//! the list is built from PN_OPS alone for it.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use proto::{Body, subjects};
use serde_json::{Value, json};

use crate::endpoints::{Endpoints, get_json};
use crate::events;
use crate::stack::StackFile;
use crate::history::{OpFold, Record, fold_all, read_all};

/// The stages that hold an operation, in pipeline order.
pub const STAGES: [&str; 4] = ["claim", "cloud", "deploy", "verify"];

/// Each stage's deadline (ms): the services' settings' defaults (pnctl depends on no service;
/// the `pnp` crate's tests check these against the services' `Settings::default()`).
pub fn default_deadlines() -> BTreeMap<String, u64> {
    BTreeMap::from([
        // Claimed at Center, pn.op.claimed not published yet: a lease's time
        // (svc-claimer PN_LEASE_SECONDS = 600).
        ("claim".to_string(), 600 * 1000),
        // svc-cloud PN_BOOT_TIMEOUT_MS.
        ("cloud".to_string(), 300_000),
        // svc-deployer: ssh reach patience + prep timeout + outside-check patience.
        ("deploy".to_string(), 300_000 + 300_000 + 60_000),
        // svc-verifier PN_DEADLINE_MS.
        ("verify".to_string(), 600_000),
    ])
}

/// `--deadline verify=5s` → ("verify", 5000).
pub fn parse_deadline(s: &str) -> Result<(String, u64), String> {
    let (stage, d) = s.split_once('=').ok_or_else(|| format!("{s:?}: want <stage>=<duration>, e.g. verify=10m"))?;
    let stage = stage.trim().to_string();
    if !STAGES.contains(&stage.as_str()) {
        return Err(format!("{stage:?}: the stages are {}", STAGES.join(", ")));
    }
    let d = crate::parse_duration(d)?;
    Ok((stage, d.as_millis() as u64))
}

/// The options of `ops list`.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub stage: Option<String>,
    pub stuck: bool,
    pub parked: bool,
    pub degraded: bool,
    pub all: bool,
    pub json: bool,
    pub deadlines: Vec<(String, u64)>,
    pub ops_urls: Vec<String>,
}

/// What a service holds of one operation (`GET /v1/ops/held`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    pub operation_id: String,
    pub stage: String,
    pub state: String,
    pub since_ms: i64,
    #[serde(default)]
    pub until_ms: Option<i64>,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub deliveries: i64,
    /// Which service said so (filled in here).
    #[serde(default)]
    pub service: String,
}

/// Whether a stage holds the operation (not done, not failed).
fn is_held(v: &OpFold) -> bool {
    STAGES.contains(&v.holder())
}

/// The services' ops URLs: stack.json's, then `PN_OPS_URLS`, then `--ops-url` (last wins).
pub fn ops_urls(data_dir: &std::path::Path, flags: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    if let Ok(s) = StackFile::read(data_dir) {
        for (name, e) in s.services {
            if name.starts_with("svc-") && !e.ops_url.is_empty() {
                m.insert(name, e.ops_url.trim_end_matches('/').to_string());
            }
        }
    }
    let env = std::env::var("PN_OPS_URLS").unwrap_or_default();
    for item in env.split(',').map(str::trim).filter(|s| !s.is_empty()).chain(flags.iter().map(String::as_str)) {
        let (svc, url) = item.split_once('=').with_context(|| format!("{item:?}: want <service>=<url>, e.g. svc-claimer=http://127.0.0.1:9464"))?;
        m.insert(svc.trim().to_string(), url.trim().trim_end_matches('/').to_string());
    }
    Ok(m)
}

/// What the services hold now, and the ones that did not answer.
async fn services_state(urls: &BTreeMap<String, String>) -> (Vec<Held>, BTreeMap<String, Value>) {
    let mut held = Vec::new();
    let mut status = BTreeMap::new();
    let Ok(http) = crate::endpoints::http() else { return (held, status) };
    for (svc, base) in urls {
        match get_json(&http, &format!("{base}/v1/ops/held")).await {
            Ok((200, v)) => {
                let list: Vec<Held> = serde_json::from_value(v).unwrap_or_default();
                let mut gauges = serde_json::Map::new();
                if let Ok((200, Value::String(text))) = get_json(&http, &format!("{base}/metrics")).await {
                    for (k, n) in stage_gauges(&text) {
                        gauges.insert(k, json!(n));
                    }
                }
                status.insert(svc.clone(), json!({"ok": true, "held": list.len(), "gauges": gauges}));
                held.extend(list.into_iter().map(|mut h| {
                    h.service = svc.clone();
                    h
                }));
            }
            Ok((code, v)) => {
                status.insert(svc.clone(), json!({"ok": false, "error": format!("{code}: {v}")}));
            }
            Err(e) => {
                status.insert(svc.clone(), json!({"ok": false, "error": format!("{e:#}")}));
            }
        }
    }
    (held, status)
}

/// `pn_ops_in_flight{stage="cloud"} 3` and the like from a `/metrics` text.
pub fn stage_gauges(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with("pn_ops_in_flight{") || l.starts_with("pn_ops_parked{") || l.starts_with("pn_ops_overdue{"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn age(ms: i64) -> String {
    let s = (ms.max(0) / 1000) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// One listed operation, with what the services say.
fn row(v: &OpFold, held_by: &[&Held], deadlines: &BTreeMap<String, u64>, now: i64) -> Value {
    let deadline = deadlines.get(v.holder()).copied();
    let age_ms = now - v.since_ms;
    let stuck = is_held(v) && deadline.is_some_and(|d| age_ms > d as i64);
    let parked = held_by.iter().any(|h| h.state == "parked");
    events::object(vec![
        ("operationId", json!(v.operation_id)),
        ("subId", json!(v.sub_id)),
        ("stage", json!(v.holder())),
        ("lastEvent", json!(v.last_event)),
        ("since", json!(events::rfc3339_ms(v.since_ms))),
        ("ageMs", json!(age_ms)),
        ("deadlineMs", deadline.map(|d| json!(d)).unwrap_or(Value::Null)),
        ("stuck", json!(stuck)),
        ("parked", json!(parked)),
        ("degraded", json!(v.degraded)),
        ("error", json!(v.error_at(v.holder()))),
        ("node", json!(v.node)),
        ("events", json!(v.events)),
        ("held", json!(held_by)),
    ])
}

pub async fn list(ep: &Endpoints, opts: &ListOptions) -> anyhow::Result<ExitCode> {
    if let Some(s) = &opts.stage
        && !STAGES.contains(&s.as_str())
        && !["done", "failed"].contains(&s.as_str())
    {
        bail!("--stage {s:?}: one of {}, done, failed", STAGES.join(", "));
    }
    let mut deadlines = default_deadlines();
    for (s, d) in &opts.deadlines {
        deadlines.insert(s.clone(), *d);
    }
    let (_c, js) = ep.connect().await?;
    let records = read_all(&js, subjects::OPS_STREAM, subjects::OPS_ALL).await?;
    let urls = ops_urls(&ep.data_dir, &opts.ops_urls)?;
    let (held, services) = services_state(&urls).await;
    let now = kit::now_ms();
    let filtering = opts.stage.is_some() || opts.stuck || opts.parked || opts.degraded;
    let mut rows = Vec::new();
    for v in fold_all(&records) {
        let h: Vec<&Held> = held.iter().filter(|h| h.operation_id == v.operation_id).collect();
        let r = row(&v, &h, &deadlines, now);
        let keep = opts.stage.as_ref().is_none_or(|s| *s == v.holder())
            && (!opts.stuck || r["stuck"] == true)
            && (!opts.parked || r["parked"] == true)
            && (!opts.degraded || !v.degraded.is_empty())
            && (opts.all || filtering || is_held(&v) || !v.degraded.is_empty());
        if keep {
            rows.push(r);
        }
    }
    if opts.json {
        println!("{}", json!({"operations": rows, "deadlinesMs": deadlines, "services": services}));
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no operation matches (PN_OPS has {} events)", records.len());
    } else {
        println!("{:<38} {:<7} {:<9} {:>6} {:>8} {:<22} REASON", "OPERATION", "STAGE", "EVENT", "AGE", "DEADLINE", "STATE");
        for r in &rows {
            let mut state: Vec<String> = Vec::new();
            if r["stuck"] == true {
                state.push("STUCK".into());
            }
            for h in r["held"].as_array().into_iter().flatten() {
                state.push(format!("{}:{}", h["stage"].as_str().unwrap_or(""), h["state"].as_str().unwrap_or("")));
            }
            if r.get("degraded").is_some() {
                state.push("degraded".into());
            }
            let reason = r["error"].as_str().or(r["degraded"].as_str()).unwrap_or("");
            println!(
                "{:<38} {:<7} {:<9} {:>6} {:>8} {:<22} {}",
                r["operationId"].as_str().unwrap_or(""),
                r["stage"].as_str().unwrap_or(""),
                r["lastEvent"].as_str().unwrap_or(""),
                age(r["ageMs"].as_i64().unwrap_or(0)),
                r["deadlineMs"].as_i64().map(age).unwrap_or_else(|| "-".into()),
                if state.is_empty() { "-".into() } else { state.join(",") },
                reason
            );
        }
    }
    for (svc, s) in &services {
        if s["ok"] != true {
            println!("note: {svc} did not answer ({}); its parked operations are not shown", s["error"].as_str().unwrap_or(""));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(ep: &Endpoints, op: &str, ops_urls_flags: &[String], json_out: bool) -> anyhow::Result<ExitCode> {
    if !subjects::is_token(op) {
        bail!("{op:?} is not an operation id (letters, digits, '-' and '_' only)");
    }
    let (_c, js) = ep.connect().await?;
    let records = read_all(&js, subjects::OPS_STREAM, &subjects::op_history(op)).await?;
    let urls = ops_urls(&ep.data_dir, ops_urls_flags)?;
    let (held, services) = services_state(&urls).await;
    let held: Vec<&Held> = held.iter().filter(|h| h.operation_id == op).collect();
    let center = center_view(ep, op).await;
    if records.is_empty() && center.is_none() && held.is_empty() {
        bail!("no events for operation {op} in PN_OPS (and neither Center nor a service knows it)");
    }
    let (v, stage) = match fold_all(&records).into_iter().next() {
        Some(v) => {
            let stage = v.holder();
            (v, stage)
        }
        None => (OpFold::new(op), "queued"),
    };
    let error = v.error_at(stage);
    // Each stage's record: its latest outcome event and what its service holds now.
    let outcome_of = |stage: &str| -> &'static [&'static str] {
        match stage {
            "claim" => &["claimed"],
            "cloud" => &["instance"],
            "deploy" => &["deployed", "rebuild"],
            _ => &["verified", "degraded"],
        }
    };
    let mut stages = serde_json::Map::new();
    for st in STAGES {
        let last = records.iter().rev().find(|r| r.body.as_ref().is_ok_and(|b| outcome_of(st).contains(&b.event_name())));
        let failed = records.iter().rev().find(|r| matches!(&r.body, Ok(Body::Failed(f)) if f.stage == st));
        let h: Vec<&&Held> = held.iter().filter(|h| h.stage == st).collect();
        stages.insert(
            st.to_string(),
            events::object(vec![
                ("outcome", last.map(|r| json!(events::summary(r.body.as_ref().ok().unwrap_or(&Body::Usage(Default::default()))))).unwrap_or(Value::Null)),
                ("outcomeAt", last.map(|r| json!(events::rfc3339_ms(r.published_ms))).unwrap_or(Value::Null)),
                ("failed", failed.and_then(|r| match &r.body { Ok(Body::Failed(f)) => Some(json!(f.reason)), _ => None }).unwrap_or(Value::Null)),
                ("held", json!(h)),
            ]),
        );
    }
    if json_out {
        let out = json!({
            "operationId": op,
            "subId": v.sub_id,
            "stage": stage,
            "lastEvent": v.last_event,
            "error": error,
            "degraded": v.degraded,
            "events": records.iter().map(Record::to_json).collect::<Vec<_>>(),
            "stages": stages,
            "center": center,
            "services": services,
        });
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    let sub = if v.sub_id.is_empty() { String::new() } else { format!(" (sub {})", v.sub_id) };
    println!("operation {op}{sub}: {}", if stage.is_empty() { "queued" } else { stage });
    if !error.is_empty() {
        println!("  failed: {error}");
    }
    if !v.degraded.is_empty() {
        println!("  degraded: {}", v.degraded);
    }
    println!("events ({}):", records.len());
    for r in &records {
        let at = events::rfc3339_ms(r.published_ms);
        match &r.body {
            Ok(b) => println!("  {at}  #{:<6} {:<30} {}", r.seq, r.subject, events::summary(b)),
            Err(e) => println!("  {at}  #{:<6} {:<30} undecodable: {e}", r.seq, r.subject),
        }
    }
    println!("stages:");
    for st in STAGES {
        let s = &stages[st];
        let mut parts = Vec::new();
        if let Some(o) = s["outcome"].as_str() {
            parts.push(format!("{o} at {}", s["outcomeAt"].as_str().unwrap_or("")));
        }
        if let Some(f) = s["failed"].as_str() {
            parts.push(format!("failed: {f}"));
        }
        for h in s["held"].as_array().into_iter().flatten() {
            let until = h["untilMs"].as_i64().map(|u| format!(" until {}", events::rfc3339_ms(u))).unwrap_or_default();
            parts.push(format!("held by {}: {}{until} {}", h["service"].as_str().unwrap_or(""), h["state"].as_str().unwrap_or(""), h["reason"].as_str().unwrap_or("")));
        }
        println!("  {st:<7} {}", if parts.is_empty() { "-".to_string() } else { parts.join("; ") });
    }
    if let Some(c) = &center {
        let err = c["error"].as_str().map(|e| format!(" — {e}")).unwrap_or_default();
        println!("Center says: {}{err}", c["status"].as_str().unwrap_or("?"));
    }
    Ok(ExitCode::SUCCESS)
}

/// center-sim's admin view of the operation (the dev stack), when a center URL is known.
async fn center_view(ep: &Endpoints, op: &str) -> Option<Value> {
    let base = ep.center_url.as_deref()?;
    let http = crate::endpoints::http().ok()?;
    match get_json(&http, &format!("{base}/admin/operations/{op}")).await {
        Ok((200, v)) => {
            let o = v.get("operation").cloned().unwrap_or(v);
            // Only the status and its reason: never a token or anything else Center keeps.
            Some(events::object(vec![("status", o["status"].clone()), ("error", o["error"].clone())]))
        }
        _ => None,
    }
}

/// svc-claimer's ops URL: the flag, `PN_OPS_URLS`/`--ops-url`'s `svc-claimer`, or stack.json.
pub fn claimer_url(data_dir: &std::path::Path, flag: Option<String>, ops_urls_flags: &[String]) -> anyhow::Result<String> {
    if let Some(u) = flag.filter(|u| !u.trim().is_empty()) {
        return Ok(u.trim().trim_end_matches('/').to_string());
    }
    ops_urls(data_dir, ops_urls_flags)?.remove("svc-claimer").ok_or_else(|| {
        anyhow::anyhow!(
            "no svc-claimer URL: {} has no running stack (start one with `pnctl up --detach`) and neither --claimer-url nor --ops-url svc-claimer=… was given",
            StackFile::path(data_dir).display()
        )
    })
}

/// `token`: the operator token ([`crate::endpoints::ops_token`]); the claimer refuses an
/// abandon without it (401).
pub async fn abandon(base: &str, op: &str, reason: &str, token: Option<secrecy::SecretString>, json_out: bool) -> anyhow::Result<ExitCode> {
    if !subjects::is_token(op) {
        bail!("{op:?} is not an operation id");
    }
    if reason.trim().is_empty() {
        bail!("--reason must say why");
    }
    let url = format!("{base}/v1/ops/{op}/abandon");
    let http = crate::endpoints::http()?;
    // The claimer asks Center (with its retries) and reports: allow it the time.
    let mut req = http.post(&url).json(&json!({"reason": reason})).timeout(Duration::from_secs(120));
    if let Some(t) = &token {
        req = req.bearer_auth(secrecy::ExposeSecret::expose_secret(t));
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach svc-claimer at {base} (is the stack up? `pnctl up --detach`, or pass --claimer-url)"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if json_out {
        println!("{v}");
    }
    if status.is_success() {
        if !json_out {
            println!(
                "{}: {} (claim attempt {}); Center: {}. svc-cloud's reaper decides about its VPS (`pnctl reap --pending`).",
                v["operationId"].as_str().unwrap_or(op),
                v["decision"].as_str().unwrap_or("?"),
                v["attempt"],
                v["center"].as_str().unwrap_or("?")
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let why = match crate::endpoints::ops_token_refusal(status) {
        Some(w) => w.to_string(),
        None => v["error"].as_str().map(str::to_string).unwrap_or_else(|| v.to_string()),
    };
    eprintln!("pnctl: not abandoned ({status}): {why}");
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proto::{NodeDeployed, OpClaimed, OpFailed, Operation};

    fn rec(seq: u64, at: i64, body: Body) -> Record {
        Record { seq, subject: format!("pn.op.{}.op-1", body.event_name()), published_ms: at, body: Ok(body) }
    }

    #[test]
    fn the_holding_stage_and_its_start_follow_the_events() {
        let op = Operation { operation_id: "op-1".into(), sub_id: "s-1".into(), ..Default::default() };
        let rs = vec![
            rec(1, 1_000, Body::Claimed(OpClaimed { op: Some(op.clone()) })),
            rec(2, 5_000, Body::Deployed(NodeDeployed { op: Some(op.clone()), node_name: "pn-s-1".into(), ..Default::default() })),
            // A redelivered old claim does not move it back.
            rec(3, 6_000, Body::Claimed(OpClaimed { op: Some(op) })),
        ];
        let v = fold_all(&rs).pop().unwrap();
        assert_eq!((v.holder(), v.last_event.as_str(), v.since_ms, v.events), ("verify", "deployed", 5_000, 3));
        let d = BTreeMap::from([("verify".to_string(), 2_000u64)]);
        let r = row(&v, &[], &d, 8_000);
        assert_eq!((r["stuck"].as_bool(), r["ageMs"].as_i64()), (Some(true), Some(3_000)));
        assert_eq!(row(&v, &[], &d, 6_500)["stuck"], false);
        let mut rs2 = rs.clone();
        rs2.push(rec(4, 9_000, Body::Failed(OpFailed { operation_id: "op-1".into(), stage: "abandon".into(), reason: "r".into(), ..Default::default() })));
        let v = fold_all(&rs2).pop().unwrap();
        assert!(!is_held(&v));
        assert_eq!(row(&v, &[], &d, 100_000)["error"], "abandon: r");
        assert_eq!(row(&v, &[], &d, 100_000)["stuck"], false, "a failed operation is not stuck");
    }

    #[test]
    fn deadlines_parse_and_default_to_the_services_settings() {
        assert_eq!(parse_deadline("verify=5s").unwrap(), ("verify".to_string(), 5_000));
        assert!(parse_deadline("meter=5s").is_err() && parse_deadline("verify").is_err());
        let d = default_deadlines();
        assert!(STAGES.iter().all(|s| d.contains_key(*s)));
    }

    #[test]
    fn stage_gauges_are_read_from_metrics_text() {
        let t = "# HELP x\npn_ops_parked{stage=\"cloud\"} 2\npn_ops_overdue{stage=\"cloud\"} 1\npn_other 3\n";
        assert_eq!(stage_gauges(t), vec![("pn_ops_parked{stage=\"cloud\"}".to_string(), 2.0), ("pn_ops_overdue{stage=\"cloud\"}".to_string(), 1.0)]);
    }
}
