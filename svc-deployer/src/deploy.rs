//! The deploy stage as a reconciler: from an operation's record, bring its node to "stack up"
//! (runbook steps 4–6) — connect as the image's user (TOFU), `cloud-init status` (a broken
//! instance is handed back to svc-cloud: `pn.op.rebuild`), OS prep once, the hardened port
//! checked from outside before 22 is closed (`harden.rs`), `.env`, stack files, `pull`,
//! `up -d` — then record and publish `pn.op.deployed`. Each step is idempotent; what must survive a
//! crash (pin, prep done, node secret, outcome) is flushed before the next step relies on it.
//!
//! Never: a plaintext secret in sled, NATS, a log line or a reason; `docker compose down`;
//! a command against a node other than the operation's own instance.

use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kit::bus::{Bus, HandleError, Meta};
use kit::cloud::{Claim, Confirmation, Providers};
use kit::seal::SealKey;
use kit::ssh::AdminKeys;
use kit::state::{StateError, Table};
use proto::{Body, InstanceReady, InstanceRebuild, NodeDeployed, OpFailed, OpId, Operation, Stage, SubId, subjects};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::harden::{self, CloudInit};
use crate::node_env::{EnvInputs, NodeEnv, node_name};
use crate::prep::{self, PrepStatus};
use crate::record::{Confirmed, DeployRecord, Deployed};
use crate::remote::{Commands, Remote, RemoteError};
use crate::scrub::Scrubber;
use crate::settings::Settings;
use crate::stack::Stack;

/// Why a deploy did not finish. `Fail` kinds cannot succeed by retrying the message.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Runbook step 0: the operation's cloud account has no (usable) admin key.
    #[error("{0} (PN_SSH__ADMIN_KEYS); cannot reach the node")]
    NoKey(String),
    #[error("bad input: {0}")]
    BadInput(String),
    /// The provider contradicts the event: nothing is sent, no connection made.
    #[error("the provider does not confirm the instance: {0}; nothing sent")]
    NotConfirmed(String),
    #[error("host key changed — possible man-in-the-middle; refusing to deploy: {0}")]
    HostKeyChanged(String),
    #[error("the admin key was refused by the node: {0}")]
    AuthRefused(String),
    #[error("{0}")]
    StepFailed(String),
    #[error("node unreachable or link unstable: {0}")]
    Transient(String),
    #[error("local state: {0}")]
    State(#[from] StateError),
    #[error("publish: {0}")]
    Publish(String),
    /// Not an error: the node's prep is still running; look again after `after`.
    #[error("waiting for {what}")]
    Waiting { what: String, after: Duration },
    /// The instance came up broken (cloud-init failed) before anything ran on it: svc-cloud
    /// is asked to replace it (`pn.op.rebuild`), nothing more is done here.
    #[error("instance broken: {0}")]
    Rebuild(String),
}

impl From<RemoteError> for DeployError {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::HostKeyChanged(m) => DeployError::HostKeyChanged(m),
            RemoteError::AuthRefused(m) => DeployError::AuthRefused(m),
            RemoteError::Transient(m) => DeployError::Transient(m),
            f @ (RemoteError::Failed { .. } | RemoteError::OutputTooLarge(_)) => DeployError::StepFailed(f.to_string()),
        }
    }
}

impl DeployError {
    fn is_transient(&self) -> bool {
        matches!(self, DeployError::Transient(_) | DeployError::State(_) | DeployError::Publish(_))
    }
}

/// The deploy stage's shared state.
pub struct Deployer {
    settings: Settings,
    /// The cloud (the configured provider and the alternate one), asked before any secret
    /// moves (`confirm`) and for the image's login user.
    providers: Providers,
    keys: AdminKeys,
    seal: SealKey,
    stack: Stack,
    cmds: Commands,
    table: Table<DeployRecord>,
    bus: Bus,
    locks: kit::locks::OpLocks,
    /// The detached-prep launcher and status scripts, built once.
    prep_start: Vec<u8>,
    prep_status: Vec<u8>,
    /// How long preps take, learned from the nodes' own reports: (how many seen, average).
    prep_learned: Mutex<(u64, u64)>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer").field("keys", &self.keys).finish_non_exhaustive()
    }
}

fn state_retry(e: StateError) -> HandleError {
    HandleError::retry(format!("local state: {e}"), Duration::from_secs(2))
}

impl Deployer {
    pub fn new(
        settings: Settings,
        providers: Providers,
        keys: AdminKeys,
        seal: SealKey,
        stack: Stack,
        table: Table<DeployRecord>,
        bus: Bus,
    ) -> Deployer {
        let cmds = Commands::new(&settings.sudo, settings.deploy_dir());
        let prep_start = prep::start_script(&settings.ssh.prep_state_dir, &stack.prep_script);
        let prep_status = prep::status_script(&settings.ssh.prep_state_dir);
        Deployer {
            settings,
            providers,
            keys,
            seal,
            stack,
            cmds,
            table,
            bus,
            locks: kit::locks::OpLocks::default(),
            prep_start,
            prep_status,
            prep_learned: Mutex::new((0, 0)),
        }
    }

    /// `pn.op.instance.<op>`: check the input against the record and the world, record it,
    /// then deploy — or, when this input's outcome is already recorded (a second delivery),
    /// publish it again without touching the node.
    ///
    /// An event is a hint, not an order: before it may steer the deploy (and before a pinned
    /// host key is dropped for a new instance) the provider must confirm its instance — the id,
    /// the name `pn-<subId>`, one of our accounts, the event's IPv4. An event the provider (or
    /// the record: another subscription) contradicts fails the operation with the reason when
    /// nothing was confirmed for it yet; once an instance is confirmed, such an event is dropped
    /// (logged, counted) and the confirmed deploy goes on. Either way nothing is sent and no
    /// connection is made to the event's address. `delivered` counts this message's deliveries:
    /// a provider that does not answer is asked again, up to `PN_MAX_DELIVER` times.
    pub async fn on_instance(&self, op_id: &OpId, ir: InstanceReady, delivered: i64) -> Result<(), HandleError> {
        let op = ir.op.clone().unwrap_or_default();
        let instance_id = ir.instance.as_ref().map(|i| i.instance_id.clone()).unwrap_or_default();
        if op.operation_id != op_id.as_str() {
            return Err(HandleError::Fail {
                reason: "InstanceReady names another operation than its subject".into(),
                failed: Some(failed_for(&ir, op_id, String::new())),
            });
        }
        let _guard = self.locks.lock(op_id).await;
        let existing = self.table.get(op_id).map_err(state_retry)?;
        if let Some(rec) = &existing
            && rec.rebuild_requested.as_deref() == Some(instance_id.as_str())
            && rec.confirms(&ir)
        {
            // Found broken before: ask again (the same message id), touch nothing.
            let input = rec.input().unwrap_or(ir);
            return self.request_rebuild(&input, "instance found broken before").await.map_err(|e| self.handle_error(&input, op_id, e));
        }
        if let Some(rec) = &existing
            && let Some(d) = rec.deployed_for(&op, &instance_id)
            && rec.confirms(&ir)
        {
            tracing::info!(op = op_id.as_str(), "outcome already recorded; publishing it again");
            let input = rec.input().unwrap_or(ir);
            return self.publish(&input, d).await.map_err(|e| self.handle_error(&input, op_id, e));
        }
        // What the deploy works from must be backed by the record and the world.
        let confirmed = existing.as_ref().and_then(|r| r.confirmed.clone());
        let refuse = |e: DeployError| -> HandleError {
            match &confirmed {
                Some(c) => {
                    metrics::counter!("pn_instance_checks_total", "service" => "svc-deployer", "result" => "dropped").increment(1);
                    tracing::warn!(op = op_id.as_str(), confirmed_instance = %c.instance_id, why = %e, "pn.op.instance not backed by the record or the provider; dropped, the confirmed deploy goes on");
                    HandleError::Drop(format!("pn.op.instance not backed ({e}); the operation's confirmed instance {} stays", c.instance_id))
                }
                None => self.handle_error(&ir, op_id, e),
            }
        };
        if let Err(e) = self.local_checks(&ir) {
            return Err(refuse(e));
        }
        if let Some(sub) = existing.as_ref().and_then(DeployRecord::sub_id)
            && sub != op.sub_id
        {
            return Err(refuse(DeployError::NotConfirmed(format!(
                "the event names subscription {:?}, the operation is for {sub:?}",
                clip(&op.sub_id)
            ))));
        }
        let mut stamp = None;
        if !existing.as_ref().is_some_and(|r| r.confirms(&ir)) {
            match self.confirm(&ir).await {
                Ok(c) => stamp = Some(c),
                Err(e @ DeployError::NotConfirmed(_)) => return Err(refuse(e)),
                Err(e) if delivered >= self.settings.common.max_deliver.max(1) => {
                    let e = DeployError::StepFailed(format!("gave up after {delivered} attempts: {e}"));
                    return Err(self.handle_error(&ir, op_id, e));
                }
                Err(e) => return Err(self.handle_error(&ir, op_id, e)),
            }
        }
        let mut rec = existing.unwrap_or_default();
        if op.claim_attempt >= rec.claim_attempt || rec.input().is_none() {
            // Only now (the provider confirmed this instance) may a new instance drop the pin.
            rec.set_input(&ir);
            if let Some(c) = stamp {
                rec.confirmed = Some(c);
            }
        }
        self.table.put(op_id, &rec).await.map_err(state_retry)?;
        if let Some(d) = rec.deployed_for(&op, &instance_id)
            && rec.confirms(&ir)
        {
            tracing::info!(op = op_id.as_str(), "outcome already recorded; publishing it again");
            let input = rec.input().unwrap_or(ir);
            return self.publish(&input, d).await.map_err(|e| self.handle_error(&input, op_id, e));
        }
        self.deploy(op_id, rec).await
    }

    /// What can be checked without asking anyone: an instance, an IPv4, a plain account with
    /// an admin key. Nothing is connected to here.
    fn local_checks(&self, ir: &InstanceReady) -> Result<Ipv4Addr, DeployError> {
        let inst = ir.instance.clone().unwrap_or_default();
        if inst.instance_id.is_empty() {
            return Err(DeployError::BadInput("InstanceReady carries no instance".into()));
        }
        let host: Ipv4Addr = inst
            .ipv4
            .trim()
            .parse()
            .map_err(|_| DeployError::BadInput(format!("instance {} has no valid IPv4 address", clip(&inst.instance_id))))?;
        if inst.account.is_empty() || inst.account != clip(&inst.account) {
            return Err(DeployError::BadInput("the instance names no plain cloud account; no admin key can be chosen".into()));
        }
        self.keys.load(&inst.account).map_err(DeployError::NoKey)?;
        Ok(host)
    }

    /// Check the world before a secret moves: the provider must show the input's instance
    /// with this id, the name `pn-<subId>`, one of our accounts (the event's) and the event's
    /// IPv4. `NotConfirmed` when it contradicts the event, `Transient` when it did not answer.
    async fn confirm(&self, ir: &InstanceReady) -> Result<Confirmed, DeployError> {
        let mut facts = Confirmed::facts(ir);
        let named = ir.instance.as_ref().map(|i| i.name.as_str()).unwrap_or_default();
        if !named.is_empty() && named != facts.name {
            metrics::counter!("pn_instance_checks_total", "service" => "svc-deployer", "result" => "mismatch").increment(1);
            return Err(DeployError::NotConfirmed(format!("the event names the instance {:?}, the operation's is {:?}", clip(named), facts.name)));
        }
        let named_provider = ir.instance.as_ref().map(|i| i.provider.as_str()).unwrap_or_default();
        let Some(provider) = self.providers.for_instance(named_provider, &facts.account) else {
            metrics::counter!("pn_instance_checks_total", "service" => "svc-deployer", "result" => "mismatch").increment(1);
            return Err(DeployError::NotConfirmed(format!("the event names provider {:?} (account {:?}), which this deployer does not work with", clip(named_provider), clip(&facts.account))));
        };
        let claim = Claim { instance_id: &facts.instance_id, name: &facts.name, ipv4: &facts.ipv4, account: &facts.account };
        let verdict = kit::cloud::confirm_instance(provider.as_ref(), &claim).await;
        let result = match &verdict {
            Confirmation::Confirmed(_) => "confirmed",
            Confirmation::Mismatch(_) => "mismatch",
            Confirmation::Unanswered(_) => "unanswered",
        };
        metrics::counter!("pn_instance_checks_total", "service" => "svc-deployer", "result" => result).increment(1);
        match verdict {
            Confirmation::Confirmed(vps) => {
                facts.at_ms = kit::now_ms();
                // The user this instance's image lets in (unless one is forced).
                facts.login_user = match self.settings.ssh.user.trim() {
                    "" => provider
                        .login_user(&vps)
                        .await
                        .map_err(|e| DeployError::Transient(format!("cannot tell the image's login user yet: {e}")))?,
                    forced => forced.to_string(),
                };
                tracing::info!(instance = %facts.instance_id, ipv4 = %facts.ipv4, provider = provider.name(), user = %facts.login_user, "instance confirmed by the provider");
                Ok(facts)
            }
            Confirmation::Mismatch(why) => {
                tracing::warn!(instance = %clip(&facts.instance_id), ipv4 = %clip(&facts.ipv4), %why, "the provider does not confirm the event's instance; nothing sent");
                Err(DeployError::NotConfirmed(why))
            }
            Confirmation::Unanswered(why) => Err(DeployError::Transient(format!("cannot confirm the instance with the provider yet: {why}"))),
        }
    }

    /// `pn.replay.deploy`: run every step again from the record (the prep only if it never
    /// finished). An unknown operation is dropped.
    pub async fn on_replay(&self, op_id: &OpId) -> Result<(), HandleError> {
        let _guard = self.locks.lock(op_id).await;
        match self.table.get(op_id).map_err(state_retry)? {
            Some(rec) => self.deploy_as(op_id, rec, true).await,
            None => Err(HandleError::Drop(format!("replay of unknown operation {op_id}"))),
        }
    }

    /// Records that this stage failed the operation's current attempt (its `pn.op.failed` is
    /// on its way): the stage no longer holds it (`crate::gauges`). A recorded outcome wins.
    pub async fn record_failed(&self, op_id: &OpId) {
        let _guard = self.locks.lock(op_id).await;
        let Ok(Some(mut rec)) = self.table.get(op_id) else { return };
        if rec.deployed.is_some() || rec.failed_attempt.is_some_and(|a| a >= rec.claim_attempt) {
            return;
        }
        rec.failed_attempt = Some(rec.claim_attempt);
        rec.failed_at_ms = Some(kit::now_ms());
        if let Err(e) = self.table.put(op_id, &rec).await {
            tracing::warn!(op = op_id.as_str(), error = %e, "could not record the failure");
        }
    }

    async fn deploy(&self, op_id: &OpId, rec: DeployRecord) -> Result<(), HandleError> {
        self.deploy_as(op_id, rec, false).await
    }

    /// The deploy; a `replay`'s outcome is published under a msg id of its own (see `publish_as`).
    async fn deploy_as(&self, op_id: &OpId, mut rec: DeployRecord, replay: bool) -> Result<(), HandleError> {
        let Some(input) = rec.input() else {
            return Err(HandleError::Fail {
                reason: "the recorded input does not decode".into(),
                failed: Some(OpFailed::new(op_id.as_str(), Stage::Deploy.as_str(), "the recorded input does not decode", kit::now_ms())),
            });
        };
        let span = tracing::info_span!("deploy", op = op_id.as_str(), stage = "deploy");
        let res = self.steps(op_id, &input, &mut rec).instrument(span).await;
        let res = match res {
            Ok(d) => self.publish_as(&input, &d, replay).await,
            Err(DeployError::Rebuild(why)) => {
                rec.rebuild_requested = Some(rec.instance_id.clone());
                match self.table.put(op_id, &rec).await {
                    Ok(()) => self.request_rebuild(&input, &why).await,
                    Err(e) => Err(DeployError::State(e)),
                }
            }
            Err(e) => Err(e),
        };
        let transient = matches!(&res, Err(e) if e.is_transient());
        if transient || rec.transient_failures > 0 {
            // The attempt budget lives here: parks are deliveries too, so JetStream's count
            // says nothing about how often this operation really failed.
            rec.transient_failures = if transient { rec.transient_failures + 1 } else { 0 };
            let _ = self.table.put_nowait(op_id, &rec);
        }
        match res {
            Ok(()) => Ok(()),
            Err(DeployError::Waiting { what, after }) => Err(HandleError::Park { reason: format!("waiting for {what}"), after }),
            Err(e) if transient && i64::from(rec.transient_failures) >= self.settings.common.max_deliver.max(1) => {
                let e = DeployError::StepFailed(format!("gave up after {} attempts: {e}", rec.transient_failures));
                Err(self.handle_error(&input, op_id, e))
            }
            Err(e) => Err(self.handle_error(&input, op_id, e)),
        }
    }

    /// Maps an error to the loop's verdict, with a complete, scrubbed `OpFailed`.
    fn handle_error(&self, input: &InstanceReady, op_id: &OpId, e: DeployError) -> HandleError {
        // Texts from the node were scrubbed of this operation's secrets already; mask any
        // `.env` secret assignment once more before the reason leaves the process.
        let reason: String = Scrubber::default().clean(&e.to_string()).chars().take(600).collect();
        let failed = failed_for(input, op_id, reason.clone());
        if e.is_transient() {
            let after = (self.settings.ssh.retry_delay() * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
            HandleError::Retry { reason, after, failed: Some(failed) }
        } else {
            HandleError::Fail { reason, failed: Some(failed) }
        }
    }

    async fn publish(&self, input: &InstanceReady, d: &Deployed) -> Result<(), DeployError> {
        self.publish_as(input, d, false).await
    }

    /// Publishes `pn.op.deployed`; an operator's replay under `<msgId>.replay.<unix-ms>`, so
    /// JetStream's dedup window does not swallow it (the consumers are idempotent).
    async fn publish_as(&self, input: &InstanceReady, d: &Deployed, replay: bool) -> Result<(), DeployError> {
        let nd = outcome(input, d);
        let op = nd.op.clone().unwrap_or_default();
        let mut meta = Meta::outcome(&op.operation_id, &op.sub_id, Stage::Deploy, d.claim_attempt);
        if replay {
            meta.msg_id = subjects::replay_msg_id(&meta.msg_id, kit::now_ms());
        }
        let subject = subjects::op_event(subjects::DEPLOYED, &op.operation_id);
        self.bus.publish(subject, Body::Deployed(nd), &meta).await.map_err(|e| DeployError::Publish(e.to_string()))?;
        tracing::info!(op = %op.operation_id, node = %node_name(&op.sub_id), "pn.op.deployed published");
        Ok(())
    }

    /// The node secret of this operation: made once, kept sealed in the record.
    async fn node_secret(&self, op_id: &OpId, rec: &mut DeployRecord) -> Result<SecretString, DeployError> {
        if let Some(h) = &rec.sealed_node_secret_hex {
            let sealed = hex::decode(h).map_err(|_| DeployError::BadInput("the recorded node secret is corrupt".into()))?;
            return self
                .seal
                .open_str(&sealed)
                .map_err(|_| DeployError::BadInput("the recorded node secret does not open with PN_SEAL_KEY".into()));
        }
        let secret = SecretString::from(hex::encode(rand::random::<[u8; 32]>()));
        rec.sealed_node_secret_hex = Some(hex::encode(self.seal.seal_str(&secret)));
        self.save(op_id, rec).await?;
        Ok(secret)
    }

    async fn save(&self, op_id: &OpId, rec: &mut DeployRecord) -> Result<(), DeployError> {
        rec.updated_at_ms = kit::now_ms();
        self.table.put(op_id, rec).await?;
        Ok(())
    }

    async fn steps(&self, op_id: &OpId, input: &InstanceReady, rec: &mut DeployRecord) -> Result<Deployed, DeployError> {
        let op = input.op.clone().unwrap_or_default();
        let inst = input.instance.clone().unwrap_or_default();
        let host = self.local_checks(input)?;
        // Nothing is unsealed, connected or sent before the provider has confirmed exactly
        // this instance and address (a replay, or a record from before this check, asks now).
        if !rec.confirms(input) || rec.login_user().is_empty() {
            let c = self.confirm(input).await?;
            rec.confirmed = Some(c);
            self.save(op_id, rec).await?;
        }
        let user = rec.login_user().to_string();
        let key = self.keys.load(&inst.account).map_err(DeployError::NoKey)?;
        let claim = self.claim_token(&op)?;
        let secret = self.node_secret(op_id, rec).await?;
        let sub_id = SubId::parse(&op.sub_id).map_err(|_| DeployError::BadInput(crate::node_env::bad_sub_id().to_string()))?;
        let env = NodeEnv::new(EnvInputs {
            node_secret: &secret,
            claim: &claim,
            center_url: &op.center_url,
            domain: &op.domain,
            version: &self.settings.k2_version,
            traffic_total_bytes: op.traffic_total_bytes,
            sub_id: &sub_id,
            region: &op.region,
            ip_type: &op.ip_type,
        })
        .map_err(|e| DeployError::BadInput(e.to_string()))?;
        let mut scrub = Scrubber::default();
        scrub.add(&claim);
        scrub.add(&secret);

        let mut remote = Remote::new(&host.to_string(), &user, key, &self.settings.ssh, rec.host_key.clone(), rec.prepared, scrub);
        let res = self.on_node(op_id, rec, &mut remote, &env, &secret).await;
        remote.disconnect().await;
        res
    }

    async fn on_node(
        &self,
        op_id: &OpId,
        rec: &mut DeployRecord,
        remote: &mut Remote,
        env: &NodeEnv,
        secret: &SecretString,
    ) -> Result<Deployed, DeployError> {
        let ssh = &self.settings.ssh;
        let c = &self.cmds;
        if let Some(learned) = remote.connect().await? {
            // TOFU: pin before a single command runs, so a later impostor is caught.
            tracing::info!(op = op_id.as_str(), fingerprint = %kit::ssh::fingerprint(&learned), "host key pinned");
            rec.host_key = Some(learned);
        }
        rec.runs += 1;
        self.save(op_id, rec).await?;

        if !rec.prepared && rec.prep_started_at_ms.is_none() && !rec.cloud_init_ok {
            self.check_cloud_init(op_id, rec, remote).await?;
        }
        if rec.prepared {
            tracing::info!(op = op_id.as_str(), "OS prep already done on this instance; not re-run");
        } else {
            self.prep(op_id, rec, remote).await?;
            rec.prepared = true;
            self.save(op_id, rec).await?;
            remote.prepared().await;
        }
        if !rec.port22_closed {
            self.close_22(op_id, rec, remote).await?;
        }

        self.step(op_id, rec, remote, "mkdir", &c.mkdir(), None, ssh.command_timeout()).await?;
        // The file exists with mode 600 before any secret goes into it.
        self.step(op_id, rec, remote, "env-create", &c.write(".env"), Some(b""), ssh.command_timeout()).await?;
        self.step(op_id, rec, remote, "env-chmod", &c.chmod_600(".env"), None, ssh.command_timeout()).await?;
        let text = env.render();
        self.step(op_id, rec, remote, "env-write", &c.write(".env"), Some(text.expose_secret().as_bytes()), ssh.command_timeout()).await?;
        self.step(op_id, rec, remote, "env-chmod", &c.chmod_600(".env"), None, ssh.command_timeout()).await?;
        for (name, content) in &self.stack.files {
            self.step(op_id, rec, remote, &format!("upload {name}"), &c.write(name), Some(content), ssh.command_timeout()).await?;
        }
        self.step(op_id, rec, remote, "compose-pull", &c.compose_pull(), None, ssh.prep_timeout()).await?;
        self.step(op_id, rec, remote, "compose-up", &c.compose_up(), None, ssh.prep_timeout()).await?;

        let host_key = remote.host_key().unwrap_or_default().to_string();
        let d = Deployed {
            claim_attempt: rec.claim_attempt,
            instance_id: rec.instance_id.clone(),
            deployed_at_ms: kit::now_ms(),
            node_secret_sha256_hex: hex::encode(Sha256::digest(secret.expose_secret().as_bytes())),
            host_key,
            ssh_port: ssh.hardened_port,
            ssh_user: remote.user().to_string(),
        };
        rec.deployed = Some(d.clone());
        self.save(op_id, rec).await?;
        tracing::info!(op = op_id.as_str(), node = env.node_name(), "stack up");
        Ok(d)
    }

    /// Seed 001 §3.c/§3.f: `cloud-init status` before anything runs on the instance. Broken →
    /// `DeployError::Rebuild` (svc-cloud replaces it); running → parked; fine → recorded.
    async fn check_cloud_init(&self, op_id: &OpId, rec: &mut DeployRecord, remote: &mut Remote) -> Result<(), DeployError> {
        let out = remote.query("cloud-init", &self.cmds.cloud_init_status(), self.settings.ssh.command_timeout()).await?;
        match harden::cloud_init_verdict(&out) {
            CloudInit::Fine => {
                rec.cloud_init_ok = true;
                self.save(op_id, rec).await
            }
            CloudInit::Running => Err(DeployError::Waiting { what: "cloud-init on the node".into(), after: Duration::from_secs(3) }),
            CloudInit::Broken(why) => {
                tracing::warn!(op = op_id.as_str(), instance = %rec.instance_id, %why, "the instance came up broken; asking svc-cloud to replace it");
                Err(DeployError::Rebuild(remote.scrub(&why)))
            }
        }
    }

    /// After the prep: the hardened port must answer from outside (here) before 22 is closed
    /// on the node, and 22 is closed only over that session. A node whose hardened port never
    /// answers keeps 22 (reachable) and the operation fails with the reason.
    async fn close_22(&self, op_id: &OpId, rec: &mut DeployRecord, remote: &mut Remote) -> Result<(), DeployError> {
        let ssh = &self.settings.ssh;
        if ssh.fresh_port == ssh.hardened_port {
            rec.port22_closed = true;
            return self.save(op_id, rec).await;
        }
        if let Err(e) = remote.connect_on(ssh.hardened_port, ssh.outside_check_patience()).await {
            return Err(match e {
                RemoteError::HostKeyChanged(m) => DeployError::HostKeyChanged(m),
                other => DeployError::StepFailed(format!(
                    "SSH does not answer on port {} from outside after the prep (a provider firewall?); port {} left open on the node so it stays reachable: {other}",
                    ssh.hardened_port, ssh.fresh_port
                )),
            });
        }
        let script = harden::close_22_script();
        let out = remote.run("close-22", &self.cmds.prep(), Some(&script), ssh.command_timeout()).await?;
        rec.port22_closed = true;
        rec.steps.insert("close-22".into(), kit::now_ms());
        self.save(op_id, rec).await?;
        tracing::info!(op = op_id.as_str(), port = ssh.hardened_port, answer = %out.stdout_str().trim(), "the hardened port answered from outside; port 22 closed on the node");
        Ok(())
    }

    /// `pn.op.rebuild.<op>` for the input's instance (message id `<op>.rebuild.<instance>`, so
    /// asking again is one request), recorded.
    async fn request_rebuild(&self, input: &InstanceReady, reason: &str) -> Result<(), DeployError> {
        let mut op = input.op.clone().unwrap_or_default();
        op.sealed_claim_token.clear();
        let instance = input.instance.clone().unwrap_or_default();
        let mut meta = Meta::outcome(&op.operation_id, &op.sub_id, Stage::Deploy, op.claim_attempt.max(1));
        meta.msg_id = subjects::rebuild_msg_id(&op.operation_id, &instance.instance_id);
        let body = InstanceRebuild { op: Some(op.clone()), instance: Some(instance.clone()), reason: reason.to_string(), requested_at_ms: kit::now_ms() };
        let subject = subjects::op_event(subjects::REBUILD, &op.operation_id);
        self.bus.publish(subject, Body::Rebuild(body), &meta).await.map_err(|e| DeployError::Publish(e.to_string()))?;
        metrics::counter!("pn_rebuilds_requested_total").increment(1);
        tracing::info!(op = %op.operation_id, instance = %instance.instance_id, reason, "pn.op.rebuild published");
        Ok(())
    }

    /// Runbook step 4 as a detached job: launch it (once; the launcher is idempotent), then
    /// watch it on this session for `prep_inline_wait` — enough for a fast node — and past
    /// that, park: `DeployError::Waiting` with the time of the next look. Returns when the
    /// prep finished with 0. A failed prep is launched again up to `step_attempts` times.
    async fn prep(&self, op_id: &OpId, rec: &mut DeployRecord, remote: &mut Remote) -> Result<(), DeployError> {
        let ssh = &self.settings.ssh;
        let c = &self.cmds;
        let inline_until = Instant::now() + ssh.prep_inline_wait();
        let mut pause = Duration::from_millis(50);
        let mut launch = rec.prep_started_at_ms.is_none();
        loop {
            if launch {
                if rec.prep_launches >= ssh.step_attempts.max(1) {
                    return Err(DeployError::StepFailed(format!("step `prep` was started {} times and did not succeed", rec.prep_launches)));
                }
                remote.run("prep-start", &c.prep(), Some(&self.prep_start), ssh.command_timeout()).await?;
                rec.prep_launches += 1;
                rec.prep_started_at_ms = Some(kit::now_ms());
                rec.steps.insert("prep-start".into(), kit::now_ms());
                // Flushed: a crash from here on finds the prep running, not a reason to start it.
                self.save(op_id, rec).await?;
                tracing::info!(op = op_id.as_str(), launch = rec.prep_launches, "OS prep started on the node");
            }
            let out = remote.run("prep-status", &c.prep(), Some(&self.prep_status), ssh.command_timeout()).await?;
            let status = prep::parse_status(&out.stdout_str()).map_err(|e| DeployError::Transient(format!("prep status: {e}")))?;
            let since_start = rec.prep_started_at_ms.map(|t| (kit::now_ms() - t).max(0) as u64).unwrap_or(0);
            match status {
                PrepStatus::Done { rc: 0, ms, .. } => {
                    self.learn_prep(ms);
                    tracing::info!(op = op_id.as_str(), prep_ms = ms, "OS prep finished");
                    return Ok(());
                }
                PrepStatus::Done { rc, tail, .. } => {
                    let tail: String = remote.scrub(&tail).chars().rev().take(400).collect::<Vec<_>>().into_iter().rev().collect();
                    tracing::warn!(op = op_id.as_str(), rc, launch = rec.prep_launches, "OS prep failed on the node");
                    if rec.prep_launches >= ssh.step_attempts.max(1) {
                        return Err(DeployError::StepFailed(format!("step `prep` exited {rc} after {} tries: {tail}", rec.prep_launches)));
                    }
                    launch = true;
                    let backoff = ssh.retry_delay() * 2u32.saturating_pow(rec.prep_launches.saturating_sub(1)).min(8);
                    if Instant::now() + backoff > inline_until {
                        // Relaunch at the next delivery, after the pause.
                        rec.prep_started_at_ms = None;
                        self.save(op_id, rec).await?;
                        return Err(DeployError::Waiting { what: "a new try of the OS prep".into(), after: backoff });
                    }
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                PrepStatus::Absent => {
                    // Started by us but gone (the node rebooted, or the launch never took).
                    tracing::warn!(op = op_id.as_str(), "no OS prep found on the node; starting it");
                    launch = true;
                    continue;
                }
                PrepStatus::Running { ms } => {
                    launch = false;
                    if since_start > ssh.prep_timeout_ms {
                        return Err(DeployError::StepFailed(format!(
                            "step `prep` still running after {} s (PN_SSH__PREP_TIMEOUT_MS)",
                            since_start / 1000
                        )));
                    }
                    let expected = self.expected_prep_ms();
                    let after = match expected {
                        Some(e) => prep::next_check_ms(ms, e, ssh.prep_poll_ms),
                        // Nothing learned yet: look again after half the time it has run.
                        None => (ms / 2).clamp(ssh.prep_poll_ms.max(100), ssh.prep_expected_ms.max(1000)),
                    };
                    // Wait here only for a prep about to end: one expected within the inline
                    // window (or, before anything was learned, any within it), or one a little
                    // late (by less than half the usual time). A long prep or a very late one
                    // parks at once — a session held for it would be wasted.
                    let nap = match expected {
                        Some(e) if ms < e => Some(Duration::from_millis(e - ms).max(pause)),
                        Some(e) if ms - e < (e / 2).max(100) => Some(pause),
                        Some(_) => None,
                        None => Some(pause),
                    };
                    if let Some(nap) = nap.filter(|n| Instant::now() + *n < inline_until) {
                        tokio::time::sleep(nap).await;
                        pause = (pause * 3 / 2).min(Duration::from_secs(1));
                        continue;
                    }
                    return Err(DeployError::Waiting { what: "the OS prep on the node".into(), after: Duration::from_millis(after) });
                }
            }
        }
    }

    /// Folds a finished prep's duration into the expectation: the mean of the first eight,
    /// then a moving average (weight 1/8), so a fleet whose preps get slower is followed.
    fn learn_prep(&self, ms: u64) {
        let mut l = self.prep_learned.lock().unwrap_or_else(|p| p.into_inner());
        let (n, avg) = *l;
        let k = (n + 1).min(8);
        *l = (n + 1, (avg * (k - 1) + ms) / k);
    }

    /// How long a prep takes on this fleet, once some were seen finishing.
    fn expected_prep_ms(&self) -> Option<u64> {
        let l = self.prep_learned.lock().unwrap_or_else(|p| p.into_inner());
        (l.0 > 0).then_some(l.1)
    }

    /// Runs one step and records when it last succeeded. The record is written without a
    /// flush: these steps are re-run on re-entry anyway; what gates behaviour is flushed.
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &self,
        op_id: &OpId,
        rec: &mut DeployRecord,
        remote: &mut Remote,
        name: &str,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), DeployError> {
        remote.run(name, command, stdin, timeout).await?;
        rec.updated_at_ms = kit::now_ms();
        rec.steps.insert(name.to_string(), rec.updated_at_ms);
        self.table.put_nowait(op_id, rec)?;
        Ok(())
    }

    fn claim_token(&self, op: &Operation) -> Result<SecretString, DeployError> {
        if op.sealed_claim_token.is_empty() {
            return Err(DeployError::BadInput("the operation carries no claim token".into()));
        }
        self.seal
            .open_str(&op.sealed_claim_token)
            .map_err(|e| DeployError::BadInput(format!("the claim token does not open with PN_SEAL_KEY ({e})")))
    }
}

fn clip(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}

/// `pn.op.failed` for this operation, with what the claimer and the reaper need.
fn failed_for(input: &InstanceReady, op_id: &OpId, reason: String) -> OpFailed {
    let op = input.op.clone().unwrap_or_default();
    OpFailed::new(op_id.as_str(), Stage::Deploy.as_str(), reason, kit::now_ms())
        .of_op(&op)
        .on_instance(input.instance.as_ref().map(|i| i.instance_id.clone()).unwrap_or_default())
}

/// The `NodeDeployed` of a recorded outcome (the same bytes every time it is published).
pub fn outcome(input: &InstanceReady, d: &Deployed) -> NodeDeployed {
    let mut op = input.op.clone().unwrap_or_default();
    op.sealed_claim_token.clear();
    NodeDeployed {
        node_name: node_name(&op.sub_id),
        sold_bytes: op.traffic_total_bytes,
        node_secret_sha256: hex::decode(&d.node_secret_sha256_hex).unwrap_or_default(),
        host_key: d.host_key.clone(),
        ssh_port: u32::from(d.ssh_port),
        deployed_at_ms: d.deployed_at_ms,
        private_node: true,
        ssh_user: d.ssh_user.clone(),
        instance: input.instance.clone(),
        op: Some(op),
    }
}
