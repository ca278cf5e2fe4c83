//! Center's node-facing ingress: `POST /slave/register` (a sidecar announces itself; a valid
//! claim makes the node private, binds the owner and sets the operation `done`),
//! `POST /slave/usage` (Center's own usage ledger: the node authenticates with Basic
//! `ipv4:secret`, its cumulative host-NIC counters become deltas, and at ≥ 95 % of the sold
//! quota Center cuts the node off by itself) and `POST /api/device-auth` (a device connecting
//! through a node: 402 once that node is cut off).
//!
//! Center never calls or waits on Pnp's meter: in production the ingress at Center's host
//! mirrors `/slave/usage` to the meter (the dev stack's `pn-ingress`, see `ingress.rs`).
//!
//! Never: echo a credential or a claim in an answer or a log line.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::center::ClaimCheck;
use crate::sim::{NodeRec, Sim};

const MAX_BODY: usize = 64 * 1024;
/// `warn` from this share of the sold quota, in percent.
pub const WARN_PERCENT: u128 = 80;
/// Center's cut-off (402 on new device auth, node hidden), in percent of the sold quota.
pub const CUTOFF_PERCENT: u128 = 95;
/// Boot ids of earlier epochs remembered per node, so a late report from one is stale.
const OLD_BOOTS: usize = 16;

pub fn routes() -> Router<Sim> {
    Router::new()
        .route("/slave/register", post(register))
        .route("/slave/usage", post(usage))
        .route("/api/device-auth", post(device_auth))
}

/// `Authorization: Basic base64(ipv4:secret)`.
fn basic(headers: &HeaderMap) -> Option<(Ipv4Addr, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (ip, secret) = s.split_once(':')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    (!secret.is_empty()).then(|| (ip, secret.to_string()))
}

fn err(code: StatusCode, msg: &str) -> Response {
    (code, axum::Json(json!({"error": msg}))).into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RegisterBody {
    pub name: String,
    pub region: String,
    #[serde(alias = "ip_type")]
    pub ip_type: String,
    #[serde(alias = "private_claim")]
    pub private_claim: String,
    pub domain: String,
}

async fn register(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    if sim.ingress_down() {
        return err(StatusCode::SERVICE_UNAVAILABLE, "center unavailable (injected)");
    }
    let Some((ip, secret)) = basic(&headers) else {
        return err(StatusCode::UNAUTHORIZED, "Basic ipv4:secret credentials required");
    };
    if body.len() > MAX_BODY {
        return err(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    let Ok(b) = serde_json::from_slice::<RegisterBody>(&body) else {
        return err(StatusCode::BAD_REQUEST, "malformed registration");
    };
    match sim.register_node(ip, &secret, b) {
        Ok(node) => (StatusCode::OK, axum::Json(json!({"data": {"node": node}}))).into_response(),
        Err((code, msg)) => err(code, msg),
    }
}

/// Center's normalization of `ipType`.
fn normalize_ip_type(t: &str) -> &'static str {
    match t {
        "residential" => "residential",
        "non_residential" => "non_residential",
        _ => "unknown",
    }
}

impl Sim {
    /// The `slaveErrorRate` fault: Center's node ingress answers 503 before doing anything.
    fn ingress_down(&self) -> bool {
        let mut st = self.st();
        st.faults.slave_error_rate > 0.0 && st.dice_roll(|f| f.slave_error_rate)
    }

    fn register_node(&self, ip: Ipv4Addr, secret: &str, b: RegisterBody) -> Result<kit::center::Node, (StatusCode, &'static str)> {
        let name = b.name.trim().to_string();
        if name.is_empty() || name.len() > 255 {
            return Err((StatusCode::BAD_REQUEST, "name is required"));
        }
        let now = kit::now_ms();
        let mut guard = self.st_ticked();
        let st = &mut *guard;
        let (class, owner, op_id) = if b.private_claim.is_empty() {
            ("shared", None, None)
        } else {
            match st.ops.register_claim(&b.private_claim, &name, &ip.to_string(), now) {
                ClaimCheck::Accepted { op_id, sub_id, activated } => {
                    if activated {
                        tracing::info!(op = %op_id, node = %name, "node registered with its claim: operation done");
                    }
                    ("private", Some(sub_id), Some(op_id))
                }
                ClaimCheck::Refused(why) => {
                    // A revoked claim (an earlier claim attempt's, or a failed operation's), one
                    // another node used, or one never issued: the node stays unregistered.
                    tracing::warn!(node = %name, %ip, why, "registration refused");
                    return Err((StatusCode::FORBIDDEN, why));
                }
            }
        };
        st.learn_node_secret(secret);
        let instance_id = st.cloud.live_by_ip(ip).map(|i| i.id.clone());
        let domain =
            if b.domain.trim().is_empty() { format!("{}.sslip.io", ip.to_string().replace('.', "-")) } else { b.domain.trim().to_string() };
        let prev = st.nodes.get(&name);
        let rec = NodeRec {
            name: name.clone(),
            ipv4: ip.to_string(),
            region: b.region,
            class: class.into(),
            ip_type: normalize_ip_type(&b.ip_type).into(),
            hidden: prev.is_some_and(|p| p.hidden),
            domain,
            owner_sub_id: owner,
            operation_id: op_id,
            instance_id,
            registered_ms: now,
            registrations: prev.map(|p| p.registrations).unwrap_or(0) + 1,
            usage_reports: prev.map(|p| p.usage_reports).unwrap_or(0),
            secret: secret.to_string(),
            // Center's ledger belongs to the node (its name), across re-registrations.
            usage: prev.map(|p| p.usage.clone()).unwrap_or_default(),
            quota_cutoff: prev.is_some_and(|p| p.quota_cutoff),
        };
        let wire = rec.to_wire();
        if let Some(old_ip) = prev.map(|p| p.ipv4.clone())
            && old_ip != rec.ipv4
            && let Ok(old) = old_ip.parse::<Ipv4Addr>()
            && st.node_by_ip.get(&old) == Some(&name)
        {
            st.node_by_ip.remove(&old);
        }
        st.node_by_ip.insert(ip, name.clone());
        st.nodes.insert(name.clone(), rec);
        tracing::info!(node = %name, %ip, class, "node registered");
        Ok(wire)
    }

    /// Records one usage report in Center's ledger. The caller has checked the body size.
    fn record_usage(&self, headers: &HeaderMap, body: &[u8]) -> Result<serde_json::Value, (StatusCode, &'static str)> {
        let Some((ip, secret)) = basic(headers) else {
            return Err((StatusCode::UNAUTHORIZED, "Basic ipv4:secret credentials required"));
        };
        let report = Report::parse(body).ok_or((StatusCode::BAD_REQUEST, "malformed usage report"))?;
        let now = kit::now_ms();
        let mut guard = self.st();
        let st = &mut *guard;
        // One answer for an unknown address and a wrong secret.
        let unauthorized = (StatusCode::UNAUTHORIZED, "bad node credentials");
        let name = st.node_by_ip.get(&ip).cloned().ok_or(unauthorized)?;
        let sold = {
            let node = st.nodes.get(&name).ok_or(unauthorized)?;
            if node.ipv4 != ip.to_string() || !bool::from(node.secret.as_bytes().ct_eq(secret.as_bytes())) {
                return Err(unauthorized);
            }
            node.operation_id.as_deref().and_then(|op| st.ops.get(op)).map(|op| op.params.traffic_total_bytes)
        };
        let Some(node) = st.nodes.get_mut(&name) else { return Err(unauthorized) };
        node.usage_reports = node.usage_reports.saturating_add(1);
        let outcome = node.usage.apply(report.rx, report.tx, &report.boot_id, report.at_ms, now);
        let used = node.usage.used_bytes;
        let state = quota_state(used, sold);
        if state == "cutoff" && !node.quota_cutoff {
            node.quota_cutoff = true;
            tracing::warn!(node = %name, used, sold = ?sold, "node at Center's cut-off: hidden, new device auth gets 402");
        }
        let inst_id = node.instance_id.clone();
        let inst = match inst_id {
            Some(id) => st.cloud.instances.get_mut(&id),
            None => st.cloud.instances.values_mut().find(|i| i.live() && i.ipv4 == Some(ip)),
        };
        if let Some(inst) = inst {
            inst.traffic_used_bytes = used;
        }
        Ok(json!({"data": {"usage": {
            "node": name,
            "outcome": outcome.as_str(),
            "trafficUsedBytes": used,
            "soldBytes": sold,
            "state": state,
        }}}))
    }
}

/// `ok`, `warn` (≥ 80 %) or `cutoff` (≥ 95 %) of the sold quota; `ok` without one (a shared
/// node has no sold quota).
pub fn quota_state(used: u64, sold: Option<u64>) -> &'static str {
    match sold {
        Some(s) if s > 0 && u128::from(used) * 100 >= u128::from(s) * CUTOFF_PERCENT => "cutoff",
        Some(s) if s > 0 && u128::from(used) * 100 >= u128::from(s) * WARN_PERCENT => "warn",
        _ => "ok",
    }
}

/// A usage report as Center reads it (camelCase or snake_case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub rx: u64,
    pub tx: u64,
    pub boot_id: String,
    pub at_ms: Option<i64>,
}

impl Report {
    pub fn parse(body: &[u8]) -> Option<Report> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire {
            #[serde(alias = "rx_bytes")]
            rx_bytes: u64,
            #[serde(alias = "tx_bytes")]
            tx_bytes: u64,
            #[serde(alias = "boot_id", default)]
            boot_id: String,
            #[serde(default)]
            at: Option<String>,
        }
        let w: Wire = serde_json::from_slice(body).ok()?;
        if w.boot_id.len() > 128 {
            return None;
        }
        let at_ms = match w.at.as_deref().filter(|a| !a.is_empty()) {
            None => None,
            Some(a) => {
                let t = time::OffsetDateTime::parse(a, &time::format_description::well_known::Rfc3339).ok()?;
                Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
            }
        };
        Some(Report { rx: w.rx_bytes, tx: w.tx_bytes, boot_id: w.boot_id, at_ms })
    }
}

/// What one report did to a node's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node's first report: the starting point (traffic before it — the OS prep — is not
    /// the customer's).
    Baseline,
    Counted { delta: u64, new_epoch: bool },
    /// The same counters again: counted once.
    Repeat,
    /// Older than what is known (a late retry, a boot already left): ignored.
    Stale,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Baseline => "baseline",
            Outcome::Counted { new_epoch: true, .. } => "new_epoch",
            Outcome::Counted { .. } => "counted",
            Outcome::Repeat => "repeat",
            Outcome::Stale => "stale",
        }
    }
}

/// Center's ledger of one node: cumulative counters → deltas (rx + tx). The first report is
/// the baseline; a new boot id or a counter that went down starts an epoch counting from 0; a
/// repeat counts once; a report older (by the node's `at`) than the last of its boot, or from
/// an earlier boot, is stale. The same rules as the meter's (`svc-meter/src/delta.rs`), so the
/// two ledgers agree report for report.
#[derive(Debug, Clone, Default)]
pub struct NodeUsage {
    started: bool,
    boot_id: String,
    last_rx: u64,
    last_tx: u64,
    last_at_ms: Option<i64>,
    old_boots: VecDeque<String>,
    pub used_bytes: u64,
    /// Accepted reports (baseline, counted and repeats).
    pub reports: u64,
    /// Epochs after the first (reboots, NIC resets).
    pub epochs: u32,
    pub last_report_ms: Option<i64>,
}

impl NodeUsage {
    pub fn apply(&mut self, rx: u64, tx: u64, boot_id: &str, at_ms: Option<i64>, now_ms: i64) -> Outcome {
        if !self.started {
            self.started = true;
            self.boot_id = boot_id.to_string();
            (self.last_rx, self.last_tx, self.last_at_ms) = (rx, tx, at_ms);
            self.reports = 1;
            self.last_report_ms = Some(now_ms);
            return Outcome::Baseline;
        }
        let (delta, new_epoch) = if boot_id != self.boot_id {
            if self.old_boots.iter().any(|b| b == boot_id) {
                return Outcome::Stale;
            }
            let old = std::mem::replace(&mut self.boot_id, boot_id.to_string());
            self.old_boots.push_back(old);
            if self.old_boots.len() > OLD_BOOTS {
                self.old_boots.pop_front();
            }
            (rx.saturating_add(tx), true)
        } else {
            if let (Some(at), Some(last)) = (at_ms, self.last_at_ms)
                && at < last
            {
                return Outcome::Stale;
            }
            if rx == self.last_rx && tx == self.last_tx {
                self.last_at_ms = self.last_at_ms.max(at_ms);
                self.reports = self.reports.saturating_add(1);
                self.last_report_ms = Some(now_ms);
                return Outcome::Repeat;
            }
            if rx < self.last_rx || tx < self.last_tx {
                // A NIC reset without a reboot: the counters are the traffic since the reset.
                (rx.saturating_add(tx), true)
            } else {
                ((rx - self.last_rx).saturating_add(tx - self.last_tx), false)
            }
        };
        if new_epoch {
            self.epochs = self.epochs.saturating_add(1);
            self.last_at_ms = at_ms;
        } else {
            self.last_at_ms = self.last_at_ms.max(at_ms);
        }
        (self.last_rx, self.last_tx) = (rx, tx);
        self.used_bytes = self.used_bytes.saturating_add(delta);
        self.reports = self.reports.saturating_add(1);
        self.last_report_ms = Some(now_ms);
        Outcome::Counted { delta, new_epoch }
    }
}

async fn usage(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    if body.len() > MAX_BODY {
        return err(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    if sim.ingress_down() {
        return err(StatusCode::SERVICE_UNAVAILABLE, "center unavailable (injected)");
    }
    match sim.record_usage(&headers, &body) {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err((code, msg)) => err(code, msg),
    }
}

#[derive(Debug, Deserialize)]
struct DeviceAuthBody {
    node: String,
}

/// A device asks to connect through `node` (the sim does not model the device's own
/// credentials): 402 once Center's ledger put the node at or over 95 % of its sold quota.
async fn device_auth(State(sim): State<Sim>, body: Bytes) -> Response {
    if body.len() > MAX_BODY {
        return err(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    let Ok(b) = serde_json::from_slice::<DeviceAuthBody>(&body) else {
        return err(StatusCode::BAD_REQUEST, "expected {\"node\": \"<name>\"}");
    };
    let st = sim.st();
    let Some(n) = st.nodes.get(&b.node) else { return err(StatusCode::NOT_FOUND, "unknown node") };
    if n.quota_cutoff {
        return (
            StatusCode::PAYMENT_REQUIRED,
            axum::Json(json!({"error": "the node's owner is over quota", "node": n.name, "trafficUsedBytes": n.usage.used_bytes})),
        )
            .into_response();
    }
    (StatusCode::OK, axum::Json(json!({"data": {"node": n.name, "allowed": true}}))).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn baseline_deltas_repeats_reboots_and_stale_reports() {
        let mut u = NodeUsage::default();
        assert_eq!(u.apply(1000, 500, "b1", Some(1), 0), Outcome::Baseline);
        assert_eq!(u.used_bytes, 0, "traffic before the first report is not the customer's");
        assert_eq!(u.apply(1100, 600, "b1", Some(2), 1), Outcome::Counted { delta: 200, new_epoch: false });
        assert_eq!(u.apply(1100, 600, "b1", Some(2), 2), Outcome::Repeat);
        assert_eq!(u.apply(50, 25, "b2", Some(3), 3), Outcome::Counted { delta: 75, new_epoch: true });
        assert_eq!(u.used_bytes, 275);
        assert_eq!(u.apply(1100, 600, "b1", Some(2), 4), Outcome::Stale, "a late report of the previous boot");
        assert_eq!(u.apply(10, 5, "b2", Some(4), 5), Outcome::Counted { delta: 15, new_epoch: true }, "a NIC reset");
        assert_eq!(u.apply(50, 25, "b2", Some(3), 6), Outcome::Stale, "older by `at`, even with higher counters");
        assert_eq!(u.used_bytes, 290);
        assert_eq!((u.reports, u.epochs), (5, 2));
    }

    #[test]
    fn the_same_stream_gives_the_same_total_as_the_true_traffic_after_the_baseline() {
        // Cumulative counters with two reboots; every report delivered twice and some lost.
        let mut u = NodeUsage::default();
        let mut truth = 0u64;
        let mut at = 0i64;
        let mut first = true;
        for boot in ["a", "b", "c"] {
            let (mut rx, mut tx) = (0u64, 0u64);
            for i in 0..50u64 {
                let (drx, dtx) = (i * 37 % 1000, i * 91 % 700);
                rx += drx;
                tx += dtx;
                at += 1;
                if !first {
                    truth += drx + dtx;
                }
                if i % 7 == 3 {
                    continue; // lost: the next report carries it
                }
                let o = u.apply(rx, tx, boot, Some(at), at);
                if first {
                    assert_eq!(o, Outcome::Baseline);
                    first = false;
                }
                assert!(matches!(u.apply(rx, tx, boot, Some(at), at), Outcome::Repeat));
            }
            // The bytes after the last delivered report of this boot are lost with the reboot
            // only if that report was lost; report the final counters again so none are.
            u.apply(rx, tx, boot, Some(at), at);
        }
        assert_eq!(u.used_bytes, truth);
    }

    #[test]
    fn quota_states_follow_the_sold_bytes() {
        assert_eq!(quota_state(0, None), "ok");
        assert_eq!(quota_state(u64::MAX, None), "ok");
        assert_eq!(quota_state(799, Some(1000)), "ok");
        assert_eq!(quota_state(800, Some(1000)), "warn");
        assert_eq!(quota_state(949, Some(1000)), "warn");
        assert_eq!(quota_state(950, Some(1000)), "cutoff");
        assert_eq!(quota_state(u64::MAX, Some(u64::MAX)), "cutoff");
    }

    #[test]
    fn reports_parse_in_both_cases_and_garbage_does_not() {
        let r = Report::parse(br#"{"rxBytes":1,"txBytes":2,"bootId":"b","at":"1970-01-01T00:00:01.5Z"}"#).unwrap();
        assert_eq!(r, Report { rx: 1, tx: 2, boot_id: "b".into(), at_ms: Some(1500) });
        let r = Report::parse(br#"{"rx_bytes":3,"tx_bytes":4,"boot_id":"c"}"#).unwrap();
        assert_eq!((r.rx, r.tx, r.boot_id.as_str(), r.at_ms), (3, 4, "c", None));
        for bad in [&b"{}"[..], b"[]", b"nope", br#"{"rxBytes":-1,"txBytes":0}"#, br#"{"rxBytes":1,"txBytes":1,"at":"yesterday"}"#] {
            assert_eq!(Report::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
