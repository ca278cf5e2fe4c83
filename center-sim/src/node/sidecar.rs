//! The emulated k2s/k2-sidecar containers of one node, started by `docker compose up -d`: the
//! sidecar registers with the Center named by `K2_CENTER_URL` over real HTTP (Basic
//! `ipv4:K2_NODE_SECRET`, carrying `K2_PRIVATE_CLAIM`), then — only for a private node — posts
//! cumulative host-NIC counters to `/slave/usage` every `usageIntervalMs`. The NIC counters see
//! a little background chatter each interval, plus whatever `POST /admin/nodes/<n>/traffic` adds.
//!
//! Never: log the node secret or the claim (the log lines are what `docker logs` shows).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::parse_env;
use crate::cloud::Instance;
use crate::sim::Sim;

/// The running sidecar of a node.
pub struct SidecarRun {
    pub stop: CancellationToken,
    /// Wakes the usage reporter for an early report (after injected traffic).
    pub wake: Arc<Notify>,
    /// The `.env` it started with (compose recreates the container when it changes).
    pub env: Vec<u8>,
}

/// Starts the sidecar of `inst` with `env` (the `.env` content at `up -d` time).
pub fn start(sim: &Sim, inst: &mut Instance, env: Vec<u8>) {
    let stop = inst.host.life.child_token();
    let wake = Arc::new(Notify::new());
    inst.host.sidecar = Some(SidecarRun { stop: stop.clone(), wake: wake.clone(), env: env.clone() });
    inst.host.log_sidecar("k2-sidecar starting");
    let Some(ip) = inst.ipv4 else {
        inst.host.log_sidecar("ERROR cannot detect the public IPv4");
        return;
    };
    let vars = parse_env(&String::from_utf8_lossy(&env));
    tokio::spawn(run(sim.clone(), inst.id.clone(), ip, vars, stop, wake));
}

/// Sleeps `ms`; false if stopped meanwhile.
async fn pause(stop: &CancellationToken, ms: u64) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
    }
}

fn log(sim: &Sim, id: &str, line: &str) {
    if let Some(inst) = sim.st().cloud.instances.get_mut(id) {
        inst.host.log_sidecar(line);
    }
}

/// The `logNoiseLines` fault: filler lines right after the sidecar's start-up lines.
fn noise(sim: &Sim, id: &str) {
    let mut st = sim.st();
    let n = st.faults.log_noise_lines;
    if let Some(inst) = st.cloud.instances.get_mut(id) {
        inst.host.sidecar_log.noise(n);
    }
}

async fn run(sim: Sim, id: String, ip: Ipv4Addr, env: BTreeMap<String, String>, stop: CancellationToken, wake: Arc<Notify>) {
    let (delay, never) = {
        let st = sim.st();
        (st.faults.registration_delay_ms, st.faults.never_register)
    };
    if !pause(&stop, delay).await {
        return;
    }
    let var = |k: &str| env.get(k).cloned().unwrap_or_default();
    let center = var("K2_CENTER_URL").trim_end_matches('/').to_string();
    let secret = var("K2_NODE_SECRET");
    if center.is_empty() || secret.is_empty() {
        log(&sim, &id, "ERROR K2_CENTER_URL and K2_NODE_SECRET are required; not registering");
        return;
    }
    if never {
        log(&sim, &id, "Registration pending: waiting for center");
        stop.cancelled().await;
        return;
    }
    let mut builder = reqwest::Client::builder().local_address(IpAddr::V4(ip)).timeout(Duration::from_secs(10));
    if center.starts_with("http://") {
        // Plain HTTP needs no roots: an empty store spares reading and parsing the OS's
        // certificates for every node (the bulk of a sidecar's start-up cost).
        builder = builder.tls_certs_only(std::iter::empty::<reqwest::Certificate>());
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(_) => {
            log(&sim, &id, "ERROR http client unavailable");
            return;
        }
    };
    let claim = var("K2_PRIVATE_CLAIM");
    let body = json!({
        "name": var("K2_NODE_NAME"),
        "region": var("K2_NODE_REGION"),
        "ipType": var("K2_IP_TYPE"),
        "privateClaim": claim,
        "domain": var("K2_DOMAIN"),
    });
    let ip_s = ip.to_string();
    let mut backoff = 500;
    loop {
        let res = client.post(format!("{center}/slave/register")).basic_auth(&ip_s, Some(&secret)).json(&body).send().await;
        match res {
            Ok(r) if r.status().is_success() => {
                log(&sim, &id, "Registration completed tunnels=1");
                break;
            }
            Ok(r) => log(&sim, &id, &format!("Registration failed status={}; retrying", r.status().as_u16())),
            Err(_) => log(&sim, &id, "Registration failed: center unreachable; retrying"),
        }
        if !pause(&stop, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(10_000);
    }
    if claim.is_empty() {
        log(&sim, &id, "Usage reporter disabled (not a private node)");
        noise(&sim, &id);
        return;
    }
    log(&sim, &id, "DIAG: usage-reporter-start");
    noise(&sim, &id);
    loop {
        let snapshot = {
            let mut guard = sim.st();
            let st = &mut *guard;
            let (drx, dtx) = (st.dice.between(500, 8_000), st.dice.between(500, 8_000));
            let interval = st.faults.usage_interval_ms;
            st.cloud.instances.get_mut(&id).map(|inst| {
                inst.host.nic.rx += drx;
                inst.host.nic.tx += dtx;
                (inst.host.nic.clone(), interval)
            })
        };
        let Some((nic, interval)) = snapshot else { return };
        let report = json!({
            "rxBytes": nic.rx,
            "txBytes": nic.tx,
            "bootId": nic.boot_id,
            "at": crate::rfc3339(kit::now_ms()),
        });
        let res = client.post(format!("{center}/slave/usage")).basic_auth(&ip_s, Some(&secret)).json(&report).send().await;
        match res {
            Ok(r) if r.status().is_success() => log(&sim, &id, "DIAG: usage-reporter-cycle-ok"),
            Ok(r) => log(&sim, &id, &format!("DIAG: usage-reporter-cycle-failed status={}", r.status().as_u16())),
            Err(_) => log(&sim, &id, "DIAG: usage-reporter-cycle-failed err=center unreachable"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(interval)) => {}
        }
    }
}
