//! `pnctl reap --pending` and `pnctl reap --confirm <operationId>`: the VPSs svc-cloud's reaper
//! kept because it could not prove them dead and ours (Center or the provider did not answer,
//! the failure was of another claim attempt, Center does not list the operation), and the
//! operator's go-ahead for one of them. svc-cloud runs the same checks again on a confirm and
//! never deletes an activated, in-flight or foreign instance; see svc-cloud's `reaper.rs`.
//!
//! The confirm sends the operator token (`PN_OPS_TOKEN`, else the dev stack's
//! `secrets/ops-token`); svc-cloud refuses a confirm without it (401).
//!
//! svc-cloud is found through `<data-dir>/stack.json` (`services["svc-cloud"].opsUrl`) or
//! `--cloud-url`, which wins.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::stack::StackFile;

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum ReapCmd {
    Pending,
    Confirm(String),
}

/// svc-cloud's ops URL: the flag, else the stack file's entry.
pub fn cloud_url(data_dir: &Path, flag: Option<String>) -> anyhow::Result<String> {
    if let Some(u) = flag.filter(|u| !u.trim().is_empty()) {
        return Ok(u.trim().trim_end_matches('/').to_string());
    }
    let from_stack = StackFile::read(data_dir).ok().and_then(|s| s.services.get("svc-cloud").map(|e| e.ops_url.clone())).filter(|u| !u.is_empty());
    from_stack.map(|u| u.trim_end_matches('/').to_string()).ok_or_else(|| {
        anyhow::anyhow!(
            "no svc-cloud URL: {} has no running stack with svc-cloud (start one with `pnctl up --detach`) and --cloud-url was not given",
            StackFile::path(data_dir).display()
        )
    })
}

fn unreachable(url: &str, e: &reqwest::Error) -> anyhow::Error {
    let why = if e.is_timeout() { "it did not answer in time".to_string() } else { "nothing answered".to_string() };
    anyhow::anyhow!("cannot reach svc-cloud at {url}: {why} (is the stack up? `pnctl up --detach`, or pass --cloud-url)")
}

pub async fn run(data_dir: &Path, flag: Option<String>, cmd: &ReapCmd, json_out: bool) -> anyhow::Result<ExitCode> {
    let base = cloud_url(data_dir, flag)?;
    match cmd {
        ReapCmd::Pending => pending(&base, json_out).await,
        ReapCmd::Confirm(op) => confirm(&base, op, crate::endpoints::ops_token(data_dir), json_out).await,
    }
}

async fn pending(base: &str, json_out: bool) -> anyhow::Result<ExitCode> {
    let url = format!("{base}/v1/reap/pending");
    let http = crate::endpoints::http()?;
    let resp = http.get(&url).send().await.map_err(|e| unreachable(base, &e))?;
    let status = resp.status();
    let text = resp.text().await.with_context(|| format!("GET {url}: reading the body"))?;
    if !status.is_success() {
        bail!("GET {url}: {status}: {}", text.chars().take(300).collect::<String>());
    }
    let v: Value = serde_json::from_str(&text).with_context(|| format!("GET {url}: not JSON"))?;
    if json_out {
        println!("{v}");
    } else {
        print!("{}", render_pending(&v, kit::now_ms()));
    }
    Ok(ExitCode::SUCCESS)
}

async fn confirm(base: &str, op: &str, token: Option<SecretString>, json_out: bool) -> anyhow::Result<ExitCode> {
    if !proto::subjects::is_token(op) {
        bail!("{op:?} is not an operation id");
    }
    let url = format!("{base}/v1/reap/{op}/confirm");
    // The checks ask Center and the provider, with their own retries: allow them the time.
    let http = crate::endpoints::http()?;
    let mut req = http.post(&url).timeout(Duration::from_secs(120));
    if let Some(t) = &token {
        req = req.bearer_auth(t.expose_secret());
    }
    let resp = req.send().await.map_err(|e| unreachable(base, &e))?;
    let status = resp.status();
    let text = resp.text().await.with_context(|| format!("POST {url}: reading the body"))?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if json_out {
        println!("{v}");
    }
    if status.is_success() {
        if !json_out {
            println!("{}", render_outcome(&v));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let why = match &v {
        _ if let Some(w) = crate::endpoints::ops_token_refusal(status) => w.to_string(),
        Value::Object(_) if v["decision"].is_string() => render_outcome(&v),
        Value::Object(_) => v["error"].as_str().unwrap_or("").to_string(),
        other => other.to_string(),
    };
    eprintln!("pnctl: not deleted ({status}): {why}");
    Ok(ExitCode::FAILURE)
}

fn render_outcome(v: &Value) -> String {
    let mut s = format!("{}: {}", v["decision"].as_str().unwrap_or("?"), v["reason"].as_str().unwrap_or(""));
    if let Some(o) = v["overridden"].as_array().filter(|o| !o.is_empty()) {
        let o: Vec<&str> = o.iter().filter_map(Value::as_str).collect();
        s.push_str(&format!(" (overridden by your confirm: {})", o.join("; ")));
    }
    s
}

fn age(since_ms: i64, now_ms: i64) -> String {
    let s = ((now_ms - since_ms).max(0) / 1000) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn render_pending(v: &Value, now_ms: i64) -> String {
    let items = v.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return "No reaps pending: every VPS of a failed operation was either proven dead and deleted, or kept for a reason that is final.\n".into();
    }
    let mut out = format!("{:<26} {:<14} {:<24} {:>6}  {}\n", "OPERATION", "SUB", "INSTANCES", "KEPT", "WHY");
    for i in &items {
        let ids: Vec<&str> = i["instanceIds"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        out.push_str(&format!(
            "{:<26} {:<14} {:<24} {:>6}  {}\n",
            i["operationId"].as_str().unwrap_or(""),
            i["subId"].as_str().unwrap_or(""),
            ids.join(","),
            age(i["since"].as_i64().unwrap_or(now_ms), now_ms),
            i["reason"].as_str().unwrap_or(""),
        ));
    }
    out.push_str(&format!("{} kept. Delete one after a look with `pnctl reap --confirm <operation>`.\n", items.len()));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_flag_wins_and_a_missing_stack_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(cloud_url(d.path(), Some("http://127.0.0.1:9/".into())).unwrap(), "http://127.0.0.1:9");
        let e = cloud_url(d.path(), None).unwrap_err().to_string();
        assert!(e.contains("--cloud-url") && e.contains("pnctl up"), "{e}");
    }

    #[test]
    fn pending_renders_one_line_per_kept_vps() {
        let v = serde_json::json!([{"operationId": "op-1", "subId": "s1", "instanceIds": ["i-1"], "reason": "center: list_nodes failed", "since": 1_000}]);
        let s = render_pending(&v, 181_000);
        assert!(s.contains("op-1") && s.contains("i-1") && s.contains("3m") && s.contains("list_nodes failed"), "{s}");
        assert!(render_pending(&serde_json::json!([]), 0).starts_with("No reaps pending"));
    }
}
