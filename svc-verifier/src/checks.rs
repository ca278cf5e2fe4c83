//! One round of the runbook step-7 checks, in order. A check that held stays held (the record
//! keeps it); a round reports the first check that does not hold yet, or a fatal finding (host
//! key changed, the sidecar says it is not a private node, Center failed the operation).
//!
//! The logs are read whole and filtered on the node — `docker logs <c> 2>&1 | grep -F -m 1 -e
//! '<line>'`, one bounded answer per line looked for — so a line that scrolled out of the last
//! N lines still counts. An SSH session is opened only while a log check is pending, and closed
//! at the end of the round: nothing is held between rounds.

use std::sync::Arc;
use std::time::Duration;

use kit::ssh::{self, SshError};
use proto::{Body, Event, NodeDeployed, subjects};

use crate::Ctx;
use crate::record::Held;

/// What the checks saw once every one held.
pub struct Seen {
    pub domain: String,
    pub tunnels: u32,
}

pub enum Round {
    AllHeld(Seen),
    Pending(String),
    Fatal(String),
}

/// The log lines looked for (fixed strings, no single quote: they go into `'…'` on the node).
pub const K2S_READY: &str = "server ready";
pub const REGISTERED: &str = "Registration completed";
pub const REPORTER_START: &str = "usage-reporter-start";
pub const REPORTER_DISABLED: &str = "Usage reporter disabled";
/// The sidecar's line when Center refuses its registration (403: a revoked claim, one another
/// node used, or one Center never issued).
pub const REGISTRATION_REFUSED: &str = "Registration failed status=403";

pub const K2S: &str = "k2s";
pub const SIDECAR: &str = "k2-sidecar";

/// `[sudo ]docker logs <container> 2>&1 | grep -F -m 1 -e '<line>'`: the first line of the
/// container's whole log containing `line` (exit 0), or nothing (exit 1).
pub fn grep_command(sudo: &str, container: &str, line: &str) -> String {
    let sudo = if sudo.is_empty() { String::new() } else { format!("{sudo} ") };
    format!("{sudo}docker logs {container} 2>&1 | grep -F -m 1 -e '{line}'")
}

/// The node's logs over at most one SSH session, opened on first use.
struct NodeLogs<'a> {
    ctx: &'a Arc<Ctx>,
    d: &'a NodeDeployed,
    session: Option<ssh::Session>,
}

impl<'a> NodeLogs<'a> {
    async fn session(&mut self) -> Result<&ssh::Session, Round> {
        if self.session.is_none() {
            let s = &self.ctx.settings;
            let inst = self.d.instance.clone().unwrap_or_default();
            let key = self.ctx.keys.load(&inst.account).map_err(Round::Fatal)?;
            let target = ssh::Target {
                host: inst.ipv4.clone(),
                port: u16::try_from(self.d.ssh_port).unwrap_or(22),
                // The user the deployer logged in as (the image's); older events name none.
                user: if self.d.ssh_user.trim().is_empty() { s.ssh.user.clone() } else { self.d.ssh_user.clone() },
                key,
                pinned: Some(self.d.host_key.clone()).filter(|k| !k.is_empty()),
                connect_timeout: Duration::from_millis(s.ssh.connect_timeout_ms),
            };
            match ssh::connect(&target).await {
                Ok(sess) => self.session = Some(sess),
                Err(e @ SshError::HostKeyChanged { .. }) => return Err(Round::Fatal(format!("ssh: {e}"))),
                Err(e) => return Err(Round::Pending(format!("ssh: node unreachable for log checks ({e})"))),
            }
        }
        self.session.as_ref().ok_or_else(|| Round::Pending("ssh: no session".into()))
    }

    /// Whether `container`'s log holds a line containing `line`.
    async fn has(&mut self, container: &str, line: &str) -> Result<bool, Round> {
        let cmd = grep_command(&self.ctx.settings.sudo, container, line);
        let timeout = Duration::from_millis(self.ctx.settings.ssh.command_timeout_ms);
        let res = self.session().await?.exec(&cmd, None, timeout).await;
        match res {
            Ok(out) if out.status == 0 => Ok(out.stdout_str().contains(line)),
            // grep: no line matched (also what a missing container or docker looks like).
            Ok(out) if out.status == 1 => Ok(false),
            Ok(out) => Err(Round::Pending(format!(
                "ssh: reading `docker logs {container}` exited {} ({})",
                out.status,
                out.stderr_tail().chars().take(200).collect::<String>()
            ))),
            Err(e) => {
                if let Some(s) = self.session.take() {
                    s.close().await;
                }
                Err(Round::Pending(format!("ssh: reading `docker logs {container}` failed ({e})")))
            }
        }
    }

    async fn close(mut self) {
        if let Some(s) = self.session.take() {
            s.close().await;
        }
    }
}

fn expected_domain(d: &NodeDeployed) -> String {
    let op = d.op.clone().unwrap_or_default();
    if !op.domain.is_empty() {
        return op.domain;
    }
    let ip = d.instance.as_ref().map(|i| i.ipv4.clone()).unwrap_or_default();
    format!("{}.sslip.io", ip.replace('.', "-"))
}

/// Runs the checks not yet held, in order, updating `held`; no session outlives the round.
pub async fn round(ctx: &Arc<Ctx>, d: &NodeDeployed, held: &mut Held) -> Round {
    let mut logs = NodeLogs { ctx, d, session: None };
    let res = round_inner(ctx, d, held, &mut logs).await;
    logs.close().await;
    match res {
        Ok(seen) => Round::AllHeld(seen),
        Err(r) => r,
    }
}

async fn round_inner(ctx: &Arc<Ctx>, d: &NodeDeployed, held: &mut Held, logs: &mut NodeLogs<'_>) -> Result<Seen, Round> {
    let node = d.node_name.clone();
    if !held.k2s_ready {
        if !logs.has(K2S, K2S_READY).await? {
            return Err(Round::Pending(format!("k2s: no `{K2S_READY}` in `docker logs {K2S}`")));
        }
        held.k2s_ready = true;
    }
    if !held.registered_log && logs.has(SIDECAR, REGISTERED).await? {
        held.registered_log = true;
    }
    if d.private_node && !held.reporter {
        if logs.has(SIDECAR, REPORTER_START).await? {
            held.reporter = true;
        } else if logs.has(SIDECAR, REPORTER_DISABLED).await? {
            return Err(Round::Fatal(
                "usage reporter: the sidecar logged `Usage reporter disabled (not a private node)` — K2_PRIVATE_CLAIM did not reach it".into(),
            ));
        }
    }
    if !held.registered_log {
        if logs.has(SIDECAR, REGISTRATION_REFUSED).await? {
            return Err(claim_refused(ctx, d).await);
        }
        return Err(Round::Pending(format!("registration: the sidecar has not logged `{REGISTERED}`")));
    }
    if d.private_node && !held.reporter {
        return Err(Round::Pending(format!("usage reporter: no `{REPORTER_START}` in the sidecar's log")));
    }
    let center = &ctx.rt.center;
    if held.listed_domain.is_none() {
        let nodes = center.list_nodes(Some(&node)).await.map_err(|e| Round::Pending(format!("center: list_nodes failed ({e})")))?;
        let mine: Vec<_> = nodes.iter().filter(|n| n.name == node).collect();
        let expected = expected_domain(d);
        match mine.as_slice() {
            [] => return Err(Round::Pending(format!("registration: {node} is not listed at Center"))),
            [n] => {
                if n.tunnels.len() != 1 {
                    return Err(Round::Pending(format!("tunnels: {node} has {} tunnel entries, expected 1", n.tunnels.len())));
                }
                if n.tunnels[0].domain != expected {
                    return Err(Round::Pending(format!("domain: {node} lists {}, expected {expected}", n.tunnels[0].domain)));
                }
                held.listed_domain = Some(n.tunnels[0].domain.clone());
            }
            more => return Err(Round::Pending(format!("registration: {node} is listed {} times at Center", more.len()))),
        }
    }
    // Once seen `done`, the status is not asked again: activation is final, so "Center marked
    // it failed" can only be found before it.
    if !held.done {
        let id = d.op.as_ref().map(|o| o.operation_id.clone()).unwrap_or_default();
        // By its id, or by its status where Center ignores the id filter.
        let op = kit::world::find_operation(center.as_ref(), &id, &kit::world::STATUS_ORDER)
            .await
            .map_err(|e| Round::Pending(format!("center: list_node_operations failed ({e})")))?;
        match op.as_ref() {
            Some(o) if o.status == "done" => held.done = true,
            Some(o) if o.status == "failed" => {
                let why: String = o.error.clone().unwrap_or_default().chars().take(160).collect();
                return Err(Round::Fatal(format!("operation: Center marked it failed ({why})")));
            }
            Some(o) => return Err(Round::Pending(format!("operation: status is {} at Center, not done", o.status))),
            None => return Err(Round::Pending("operation: not found at Center".into())),
        }
    }
    if d.private_node && !held.usage {
        center_usage(ctx, d, held).await?;
    }
    Ok(Seen { domain: held.listed_domain.clone().unwrap_or_default(), tunnels: 1 })
}

/// The sidecar logged Center's refusal of its registration: where does the operation stand at
/// Center? Not ours any more (failed, requeued, held by another holder) → fatal, the claim this
/// deployment carried is refused or revoked. Still held by our holder (a newer deployment with
/// the live claim may follow; an older one's refusal stays in the log) or done → pending.
async fn claim_refused(ctx: &Arc<Ctx>, d: &NodeDeployed) -> Round {
    let op = d.op.clone().unwrap_or_default();
    let seen = format!("the sidecar logged `{REGISTRATION_REFUSED}`");
    match kit::world::find_operation(ctx.rt.center.as_ref(), &op.operation_id, &kit::world::STATUS_ORDER).await {
        Ok(Some(o)) if o.status == "done" => Round::Pending(format!("registration: Center refused a registration ({seen}); the operation is done")),
        Ok(Some(o)) if o.status == "failed" => {
            let why: String = o.error.clone().unwrap_or_default().chars().take(120).collect();
            Round::Fatal(format!("registration: claim refused/revoked — Center refused the node's claim ({seen}); the operation failed at Center ({why})"))
        }
        Ok(Some(o)) if o.status == "queued" => {
            Round::Fatal(format!("registration: claim refused/revoked — Center refused the node's claim ({seen}); the lease was lost and Center requeued the operation"))
        }
        Ok(Some(o)) if !op.holder.is_empty() && o.holder.as_deref().is_some_and(|h| h != op.holder) => Round::Fatal(format!(
            "registration: claim refused/revoked — Center refused the node's claim ({seen}); the operation is {} by another holder",
            o.status
        )),
        Ok(Some(o)) => Round::Pending(format!(
            "registration: Center refused a registration ({seen}, claim refused/revoked?); the operation is {} by us, waiting for the node to register with its live claim",
            o.status
        )),
        Ok(None) => Round::Pending(format!("registration: Center refused a registration ({seen}); the operation is not listed at Center")),
        Err(e) => Round::Pending(format!("registration: Center refused a registration ({seen}); center: list_node_operations failed ({e})")),
    }
}

/// Runbook step 7, "Usage recorded in Center": `get_cloud_instance` for the node's instance,
/// `trafficUsedBytes` advancing. Two readings, the second higher: the first one read is kept
/// in the record (`center_usage_first`), and the check holds on the first later reading above
/// it. A non-zero first reading alone does not do: Center's ledger belongs to the node's name
/// across re-registrations, so bytes of an earlier deployment would pass without this
/// deployment's reporter ever reaching Center. A reading below the first (a ledger started
/// over) becomes the new first. When it holds, the meter's ledger is compared ([`cross_check`]).
async fn center_usage(ctx: &Ctx, d: &NodeDeployed, held: &mut Held) -> Result<(), Round> {
    let node = &d.node_name;
    let id = d.instance.as_ref().map(|i| i.instance_id.clone()).unwrap_or_default();
    if id.is_empty() {
        return Err(Round::Pending(format!("usage: the deployment of {node} names no instance; Center's ledger cannot be read")));
    }
    let inst = ctx
        .rt
        .center
        .get_cloud_instance(&id)
        .await
        .map_err(|e| Round::Pending(format!("usage: Center's get_cloud_instance({id}) failed ({e})")))?;
    let now = inst.traffic_used_bytes;
    match held.center_usage_first {
        Some(first) if now > first => {
            cross_check(ctx, node, first, now).await;
            held.usage = true;
            Ok(())
        }
        Some(first) => {
            if now < first {
                held.center_usage_first = Some(now);
            }
            Err(Round::Pending(format!(
                "usage: Center's ledger of {node} (trafficUsedBytes of {id}) has not advanced past {first} bytes"
            )))
        }
        None => {
            held.center_usage_first = Some(now);
            Err(Round::Pending(format!("usage: Center's ledger of {node} reads {now} bytes; waiting for it to advance")))
        }
    }
}

/// The meter's ledger as a cross-check of Center's (never a condition of verification): the
/// last `meter.usage.<node>` against Center's two readings `first < now`. "One report" is the
/// advance between them (the check holds on the first advance it sees, so that is one report
/// in the usual case); the meter may be behind Center's first reading or ahead of its second
/// by that much (its news is coalesced, and a report may reach one ledger a moment before the
/// other). Farther apart: a warning and `pn_verify_usage_mismatch_total`. A meter with no
/// news of the node counts as 0.
async fn cross_check(ctx: &Ctx, node: &str, first: u64, now: u64) {
    let meter = meter_usage(ctx, node).await;
    let (m, known) = match &meter {
        Some(u) => (u.used_bytes, true),
        None => (0, false),
    };
    if usage_agrees(first, now, m) {
        tracing::debug!(node, center = now, meter = m, "usage: the meter's ledger agrees with Center's");
        return;
    }
    tracing::warn!(
        node,
        center_first = first,
        center = now,
        meter = m,
        meter_known = known,
        meter_at_ms = meter.as_ref().map(|u| u.at_ms).unwrap_or(0),
        "usage mismatch: the meter's ledger and Center's trafficUsedBytes disagree by more than one report (verification goes on: Center's ledger is the record)"
    );
    metrics::counter!("pn_verify_usage_mismatch_total").increment(1);
}

/// Whether the meter's `m` is within one report (`now - first`) of Center's readings.
pub fn usage_agrees(first: u64, now: u64, m: u64) -> bool {
    let one = now.saturating_sub(first);
    m >= first.saturating_sub(one) && m <= now.saturating_add(one)
}

/// The meter's last `meter.usage.<node>`, when there is one.
async fn meter_usage(ctx: &Ctx, node: &str) -> Option<proto::UsageRecorded> {
    let stream = ctx.rt.bus.js.get_stream(subjects::METER_STREAM).await.ok()?;
    let m = stream.get_last_raw_message_by_subject(&subjects::meter_usage(node)).await.ok()?;
    match Event::from_bytes(&m.payload) {
        Ok(Body::Usage(u)) => Some(u),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_commands_are_bounded_and_quote_safe() {
        for line in [K2S_READY, REGISTERED, REPORTER_START, REPORTER_DISABLED, REGISTRATION_REFUSED] {
            assert!(!line.contains('\'') && !line.contains('\\'), "{line}");
        }
        assert_eq!(grep_command("sudo", K2S, K2S_READY), "sudo docker logs k2s 2>&1 | grep -F -m 1 -e 'server ready'");
        assert_eq!(grep_command("", SIDECAR, REGISTERED), "docker logs k2-sidecar 2>&1 | grep -F -m 1 -e 'Registration completed'");
    }

    #[test]
    fn the_meter_agrees_within_one_report_of_centers_readings() {
        // Center read 1000 then 1500: one report is 500.
        for m in [500, 1000, 1200, 1500, 2000] {
            assert!(usage_agrees(1000, 1500, m), "{m}");
        }
        for m in [0, 499, 2001, u64::MAX] {
            assert!(!usage_agrees(1000, 1500, m), "{m}");
        }
        // From the baseline (0): a meter that has nothing yet is one report behind.
        assert!(usage_agrees(0, 700, 0));
        assert!(!usage_agrees(0, 700, 1401));
    }
}
