//! Each instance's sshd (a russh server): only the image's login user (`cloud::login_user`)
//! with its account's key — root on an image whose user is not root gets cloud-init's
//! "Please login as the user …" and exit 142; after the prep root is refused outright
//! (`PermitRootLogin no`) and the admin the prep left gets in — behind the provider firewall (the
//! `providerFirewall` knob). Each exec request runs through `serve`'s `exec` (the emulated host).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, Disconnect, MethodKind, MethodSet};

use super::Listener;
use super::shell::parse;
use crate::cloud::{Instance, real_port};
use crate::sim::Sim;

/// Largest stdin a command may receive (the prep script and stack files are far smaller).
const MAX_STDIN: usize = 16 << 20;
/// What a fresh Ubuntu host's sshd announces.
const SERVER_ID: &str = "SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5";

/// What a command printed and its exit status.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: u32,
}

/// A command running on the host.
pub type Running = Pin<Box<dyn Future<Output = Output> + Send>>;
/// What runs one exec request: (sim, instance id, user, the sshd port the connection came in
/// on, the command line, its stdin) — the emulated host's `node::host::exec`.
pub type Exec = fn(Sim, String, String, u16, String, Vec<u8>) -> Running;


/// Starts `inst`'s sshd on `listener` (its `port`), replacing nothing: the caller stops the old
/// one. Each exec request runs through `exec`.
pub fn serve(sim: Sim, inst: &mut Instance, listener: tokio::net::TcpListener, port: u16, exec: Exec) {
    let stop = inst.host.life.child_token();
    inst.host.listener = Some(Listener { port, stop: stop.clone() });
    let id = inst.id.clone();
    let life = inst.host.life.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(instance = %id, error = %e, "sshd accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(config) = connection_config(&sim, &id) else { break };
            if !firewall_lets_in(&sim, &id, port) {
                // The provider's firewall: the connection never reaches the host.
                drop(sock);
                continue;
            }
            if sim.st().dice_roll(|f| f.ssh_drop_rate) {
                drop(sock);
                continue;
            }
            let handler = Conn { sim: sim.clone(), exec, id: id.clone(), port, user: String::new(), restricted: None, chans: HashMap::new() };
            let life = life.clone();
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                let Ok(session) = server::run_stream(config, sock, handler).await else { return };
                let handle = session.handle();
                tokio::select! {
                    _ = life.cancelled() => {
                        let _ = handle.disconnect(Disconnect::ByApplication, "host going down".into(), "en".into()).await;
                    }
                    _ = session => {}
                }
            });
        }
        // Dropping the listener closes the port: new connections are refused.
    });
}

/// Whether the provider firewall lets a connection to `port` (a simulated sshd port) in;
/// counts the refusals.
fn firewall_lets_in(sim: &Sim, id: &str, port: u16) -> bool {
    let (fresh, hardened) = (sim.cfg.ssh_port_fresh, sim.cfg.ssh_port_hardened);
    let mut st = sim.st();
    if !st.faults.provider_firewall {
        return true;
    }
    let Some(inst) = st.cloud.instances.get_mut(id) else { return false };
    let rule = crate::cloud::port_rule(real_port(port, fresh, hardened), "tcp");
    let open = inst.firewall.contains(&rule);
    if !open {
        inst.firewall_refused += 1;
        tracing::info!(instance = %id, port = %rule, "provider firewall refused a connection");
    }
    open
}

/// A fresh server config with the instance's current host key (a rekey affects new connections).
fn connection_config(sim: &Sim, id: &str) -> Option<Arc<server::Config>> {
    let st = sim.st();
    let inst = st.cloud.instances.get(id).filter(|i| i.live())?;
    Some(Arc::new(server::Config {
        server_id: russh::SshId::Standard(SERVER_ID.into()),
        keys: vec![inst.host.host_key.clone()],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(200),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: Some(Duration::from_secs(900)),
        nodelay: true,
        ..Default::default()
    }))
}

#[derive(Default)]
struct Pending {
    command: Option<String>,
    stdin: Vec<u8>,
    started: bool,
}

struct Conn {
    sim: Sim,
    exec: Exec,
    id: String,
    /// The simulated sshd port this connection came in on.
    port: u16,
    user: String,
    /// Logged in as root on an image whose user is this one: every command is refused as
    /// cloud-init's `disable_root` does.
    restricted: Option<&'static str>,
    chans: HashMap<ChannelId, Pending>,
}

/// How a login is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Login {
    Accept,
    /// root with the right key on an image whose user is the one named: in, but restricted.
    RootRestricted(&'static str),
    Reject,
}

impl Conn {
    fn login(&self, user: &str, key: &russh::keys::PublicKey) -> Login {
        let (account, image_user, prepared, admin) = {
            let st = self.sim.st();
            match st.cloud.instances.get(&self.id) {
                Some(i) => (i.account.clone(), i.login_user(), i.host.hardened, i.host.admin_user.clone()),
                None => return Login::Reject,
            }
        };
        if key.key_data() != self.sim.account_key(&account).key_data() {
            return Login::Reject;
        }
        // After the prep: `PermitRootLogin no` (sshd refuses root, key or not); the admin the
        // prep left (the session's user, or the one it made for a root session) gets in.
        if prepared && user == "root" {
            let mut st = self.sim.st();
            if let Some(i) = st.cloud.instances.get_mut(&self.id) {
                i.host.root_logins_refused += 1;
            }
            return Login::Reject;
        }
        if admin.as_deref() == Some(user) || user == image_user {
            Login::Accept
        } else if user == "root" {
            Login::RootRestricted(image_user)
        } else {
            Login::Reject
        }
    }

    fn start(&mut self, channel: ChannelId, session: &Session) {
        let Some(p) = self.chans.get_mut(&channel) else { return };
        let Some(command) = p.command.clone().filter(|_| !p.started) else { return };
        p.started = true;
        let stdin = std::mem::take(&mut p.stdin);
        let (sim, id, user, port, handle) = (self.sim.clone(), self.id.clone(), self.user.clone(), self.port, session.handle());
        let exec = self.exec;
        let restricted = self.restricted;
        tokio::spawn(async move {
            let out = match restricted {
                // cloud-init's disable_root: root's key runs this instead of any command.
                Some(u) => Output {
                    stdout: format!("Please login as the user \"{u}\" rather than the user \"root\".\n\n").into_bytes(),
                    stderr: Vec::new(),
                    status: 142,
                },
                None => exec(sim, id, user, port, command, stdin).await,
            };
            if !out.stdout.is_empty() {
                let _ = handle.data(channel, out.stdout).await;
            }
            if !out.stderr.is_empty() {
                let _ = handle.extended_data(channel, 1, out.stderr).await;
            }
            let _ = handle.exit_status_request(channel, out.status).await;
            let _ = handle.eof(channel).await;
            let _ = handle.close(channel).await;
        });
    }
}

impl server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(&mut self, user: &str, offer: server::PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        Ok(if self.login(user, offer.public_key) == Login::Reject { Auth::reject() } else { Auth::Accept })
    }

    async fn auth_publickey(&mut self, user: &str, key: server::VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let login = self.login(user, key.public_key);
        if login == Login::Reject {
            return Ok(Auth::reject());
        }
        self.user = user.to_string();
        if let Login::RootRestricted(u) = login {
            self.restricted = Some(u);
        } else if self.port == self.sim.cfg.ssh_port_hardened {
            let mut st = self.sim.st();
            if let Some(inst) = st.cloud.instances.get_mut(&self.id)
                && inst.host.hardened_login_ms.is_none()
            {
                inst.host.hardened_login_ms = Some(kit::now_ms());
            }
        }
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.chans.insert(channel.id(), Pending::default());
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(&mut self, channel: ChannelId, data: &[u8], session: &mut Session) -> Result<(), Self::Error> {
        if self.sim.st().dice_roll(|f| f.ssh_drop_rate) {
            // The link dropped before the command ran.
            return Err(russh::Error::Disconnect);
        }
        session.channel_success(channel)?;
        let command = String::from_utf8_lossy(data).into_owned();
        let needs_stdin = parse(&command).needs_stdin();
        let p = self.chans.entry(channel).or_default();
        p.command = Some(command);
        if !needs_stdin {
            self.start(channel, session);
        }
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn data(&mut self, channel: ChannelId, data: &[u8], _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(p) = self.chans.get_mut(&channel)
            && p.stdin.len() + data.len() <= MAX_STDIN
        {
            p.stdin.extend_from_slice(data);
        }
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, session);
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.chans.remove(&channel);
        Ok(())
    }
}
