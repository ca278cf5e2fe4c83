//! The checks of runbook step 7, in order. A check that held stays held (log lines scroll
//! away); a round reports the first check that does not hold yet, or a fatal finding (host
//! key changed, the sidecar says it is not a private node, Center failed the operation).

use std::sync::Arc;
use std::time::Duration;

use kit::center::OpFilter;
use kit::ssh::{self, SshError};
use proto::{Body, Event, NodeDeployed, subjects};

use crate::Ctx;

pub struct Seen {
    pub domain: String,
    pub tunnels: u32,
}

pub enum Round {
    AllHeld(Seen),
    Pending(String),
    Fatal(String),
}

pub struct Prober<'a> {
    ctx: &'a Arc<Ctx>,
    d: &'a NodeDeployed,
    session: Option<ssh::Session>,
    k2s_ready: bool,
    registered_log: bool,
    reporter: bool,
    listed: Option<Seen>,
    done: bool,
}

impl<'a> Prober<'a> {
    pub fn new(ctx: &'a Arc<Ctx>, d: &'a NodeDeployed) -> Prober<'a> {
        Prober { ctx, d, session: None, k2s_ready: false, registered_log: false, reporter: !d.private_node, listed: None, done: false }
    }

    fn expected_domain(&self) -> String {
        let op = self.d.op.clone().unwrap_or_default();
        if !op.domain.is_empty() {
            return op.domain;
        }
        let ip = self.d.instance.as_ref().map(|i| i.ipv4.clone()).unwrap_or_default();
        format!("{}.sslip.io", ip.replace('.', "-"))
    }

    async fn logs(&mut self, container: &str, tail: u32) -> Result<String, Round> {
        let s = &self.ctx.settings;
        if self.session.is_none() {
            let inst = self.d.instance.clone().unwrap_or_default();
            let key = self.ctx.keys.load(&inst.account).map_err(Round::Fatal)?;
            let target = ssh::Target {
                host: inst.ipv4.clone(),
                port: u16::try_from(self.d.ssh_port).unwrap_or(22),
                user: s.ssh.user.clone(),
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
        let Some(sess) = self.session.as_ref() else { return Err(Round::Pending("ssh: no session".into())) };
        let sudo = if s.sudo.is_empty() { String::new() } else { format!("{} ", s.sudo) };
        let cmd = format!("{sudo}docker logs --tail {tail} {container} 2>&1");
        match sess.exec(&cmd, None, Duration::from_millis(s.ssh.command_timeout_ms)).await {
            Ok(out) => Ok(out.stdout_str()),
            Err(e) => {
                self.session = None;
                Err(Round::Pending(format!("ssh: `docker logs {container}` failed ({e})")))
            }
        }
    }

    pub async fn round(&mut self) -> Round {
        match self.round_inner().await {
            Ok(seen) => Round::AllHeld(seen),
            Err(r) => r,
        }
    }

    async fn round_inner(&mut self) -> Result<Seen, Round> {
        let node = self.d.node_name.clone();
        if !self.k2s_ready {
            let l = self.logs("k2s", 20).await?;
            if !l.contains("server ready") {
                return Err(Round::Pending("k2s: no `server ready` in `docker logs --tail 20 k2s`".into()));
            }
            self.k2s_ready = true;
        }
        if !self.registered_log || !self.reporter {
            let l = self.logs("k2-sidecar", 80).await?;
            if l.contains("Registration completed") {
                self.registered_log = true;
            }
            if self.d.private_node {
                if l.contains("Usage reporter disabled") {
                    return Err(Round::Fatal(
                        "usage reporter: the sidecar logged `Usage reporter disabled (not a private node)` — K2_PRIVATE_CLAIM did not reach it".into(),
                    ));
                }
                if l.contains("usage-reporter-start") {
                    self.reporter = true;
                }
            }
            if !self.registered_log {
                return Err(Round::Pending("registration: the sidecar has not logged `Registration completed`".into()));
            }
            if !self.reporter {
                return Err(Round::Pending("usage reporter: no `usage-reporter-start` in the sidecar's log".into()));
            }
        }
        let center = &self.ctx.rt.center;
        if self.listed.is_none() {
            let nodes = center.list_nodes(Some(&node)).await.map_err(|e| Round::Pending(format!("center: list_nodes failed ({e})")))?;
            let mine: Vec<_> = nodes.iter().filter(|n| n.name == node).collect();
            let expected = self.expected_domain();
            match mine.as_slice() {
                [] => return Err(Round::Pending(format!("registration: {node} is not listed at Center"))),
                [n] => {
                    if n.tunnels.len() != 1 {
                        return Err(Round::Pending(format!("tunnels: {node} has {} tunnel entries, expected 1", n.tunnels.len())));
                    }
                    if n.tunnels[0].domain != expected {
                        return Err(Round::Pending(format!("domain: {node} lists {}, expected {expected}", n.tunnels[0].domain)));
                    }
                    self.listed = Some(Seen { domain: n.tunnels[0].domain.clone(), tunnels: 1 });
                }
                more => return Err(Round::Pending(format!("registration: {node} is listed {} times at Center", more.len()))),
            }
        }
        if !self.done {
            let id = self.d.op.as_ref().map(|o| o.operation_id.clone()).unwrap_or_default();
            let f = OpFilter { action: Some("provision".into()), status: None, id: Some(id.clone()) };
            let ops = center.list_node_operations(&f).await.map_err(|e| Round::Pending(format!("center: list_node_operations failed ({e})")))?;
            match ops.iter().find(|o| o.id == id) {
                Some(o) if o.status == "done" => self.done = true,
                Some(o) if o.status == "failed" => {
                    let why: String = o.error.clone().unwrap_or_default().chars().take(160).collect();
                    return Err(Round::Fatal(format!("operation: Center marked it failed ({why})")));
                }
                Some(o) => return Err(Round::Pending(format!("operation: status is {} at Center, not done", o.status))),
                None => return Err(Round::Pending("operation: not found at Center".into())),
            }
        }
        if self.d.private_node {
            let used = self.usage(&node).await;
            if used == 0 {
                return Err(Round::Pending(format!("usage: the meter has recorded no usage for {node} after its first report")));
            }
        }
        Ok(Seen { domain: self.listed.as_ref().map(|s| s.domain.clone()).unwrap_or_default(), tunnels: 1 })
    }

    /// Bytes the meter has recorded for `node` (the last `meter.usage.<node>`), 0 when none.
    async fn usage(&self, node: &str) -> u64 {
        let Ok(stream) = self.ctx.rt.bus.js.get_stream(subjects::METER_STREAM).await else { return 0 };
        let Ok(m) = stream.get_last_raw_message_by_subject(&subjects::meter_usage(node)).await else { return 0 };
        match Event::from_bytes(&m.payload) {
            Ok(Body::Usage(u)) => u.used_bytes,
            _ => 0,
        }
    }
}
