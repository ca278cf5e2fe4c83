//! The meter's core: the registry of private nodes (by name and by ipv4), one async mutex per
//! node (so concurrent reports of one node are applied one at a time and cannot double count),
//! and the operations on it — ingest a report, register a deployment, set a quota, answer
//! admission and usage queries. HTTP and NATS live elsewhere; this module speaks `Result`s.
//!
//! Invariant: a report is answered 2xx only after its ledger write is durable (`put_nowait`
//! then the store's group-commit `flush`). The in-memory ledger never runs ahead of sled.
//!
//! Hostile input is bounded before it costs anything: a source that spent its budget of
//! failed authentications gets 429 before its credentials are parsed or hashed and before any
//! node's lock (`auth::FailureLimiter`); the credentials are compared outside the node's lock;
//! wrong-secret warnings are one line per node per interval. A `pn.op.deployed` changes a known
//! node's address or secret hash (or takes an address another node holds) only when the
//! provider confirms the instance (`needs_confirmation`, `register(.., confirmed)`).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use kit::cloud::{Claim, Confirmation, Provider};
use kit::state::{StateError, Store, Table};
use serde::Serialize;
use tokio::sync::Notify;

use crate::auth;
use crate::delta::{Epoch, Outcome, Refusal};
use crate::ledger::{Deployment, LastReport, NodeLedger};
use crate::quota::{State, Thresholds};
use crate::report::{BodyError, FutureAt, UsageReport};
use crate::settings::Settings;

/// The sled table of ledgers, keyed by node name.
pub const LEDGER_TABLE: &str = "ledger";

/// Compared against when the ipv4 is unknown, so that an unknown node costs the same hash
/// and comparison as a wrong secret.
const UNKNOWN_NODE_HASH: [u8; 32] = [0x5a; 32];

/// Why a report was not accepted. Each maps to one HTTP status upstream.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Missing or bad credentials, unknown node or wrong secret — indistinguishable by design.
    #[error("unauthorized")]
    Unauthorized,
    #[error(transparent)]
    BadRequest(#[from] BodyError),
    #[error("reports of one node must be {min_interval:?} apart")]
    TooFast { min_interval: Duration, retry_after: Duration },
    /// The source spent its budget of failed authentications: refused unread.
    #[error("too many failed authentications from this address")]
    Flooded { retry_after: Duration },
    #[error(transparent)]
    FutureAt(#[from] FutureAt),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
}

/// What an accepted report did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ingested {
    pub node: String,
    pub outcome: &'static str,
    pub delta_bytes: u64,
    pub used_bytes: u64,
    pub sold_bytes: u64,
    pub state: State,
    pub epoch: u32,
}

/// What a deployed event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    New,
    Updated,
    Unchanged,
    /// It would change a node's address or secret hash, or take another node's address,
    /// without the provider's confirmation: nothing changed.
    Refused,
}

/// The answer of `GET /v1/admission/<node>`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Admission {
    pub node: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer of `GET /v1/nodes/<node>/usage`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageView {
    pub node: String,
    pub ipv4: Ipv4Addr,
    pub provider: String,
    pub count_mode: &'static str,
    pub used_bytes: u64,
    pub sold_bytes: u64,
    pub state: State,
    pub reports: u64,
    pub epochs: Vec<Epoch>,
    pub earlier_epochs: u32,
    pub earlier_bytes: u64,
    pub last_report: Option<LastReport>,
    pub quota_seq: u64,
    pub published_quota_seq: u64,
    /// Center has confirmed the node hidden.
    pub hidden_at_center: bool,
    pub usage_announced: bool,
}

/// One line of `GET /v1/nodes`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSummary {
    pub node: String,
    pub ipv4: Ipv4Addr,
    pub used_bytes: u64,
    pub sold_bytes: u64,
    pub state: State,
}

/// One node's in-memory state, behind its own async mutex.
pub(crate) struct SlotState {
    pub ledger: NodeLedger,
    /// When the last report was accepted (for the 429 rule; not durable, on purpose).
    pub last_accepted: Option<Instant>,
    /// Billed bytes not yet published on `meter.usage.<node>`.
    pub pending_delta: u64,
    pub last_usage_pub: Option<Instant>,
    pub hide_retry_at: Option<Instant>,
    pub hide_failures: u32,
}

pub(crate) struct Slot {
    pub name: String,
    /// The node's address and secret hash, readable without the node's lock (the credentials
    /// are checked before it is taken); written together with the ledger's.
    auth: RwLock<(Ipv4Addr, Option<[u8; 32]>)>,
    pub st: tokio::sync::Mutex<SlotState>,
}

impl Slot {
    fn new(ledger: NodeLedger) -> Arc<Slot> {
        let name = ledger.node.clone();
        Arc::new(Slot {
            name,
            auth: RwLock::new((ledger.ipv4, ledger.secret_hash())),
            st: tokio::sync::Mutex::new(SlotState {
                ledger,
                last_accepted: None,
                pending_delta: 0,
                last_usage_pub: None,
                hide_retry_at: None,
                hide_failures: 0,
            }),
        })
    }
}

/// Nodes with something to publish or to tell Center, and the wake-ups of the tasks that do it.
#[derive(Default)]
pub(crate) struct Outbox {
    usage: Mutex<HashSet<String>>,
    pub usage_wake: Notify,
    quota: Mutex<HashSet<String>>,
    pub quota_wake: Notify,
}

impl Outbox {
    pub fn usage_dirty(&self, node: &str, urgent: bool) {
        let inserted = {
            let mut set = lock(&self.usage);
            !set.contains(node) && set.insert(node.to_string())
        };
        if urgent && inserted {
            self.usage_wake.notify_one();
        }
    }

    pub fn quota_dirty(&self, node: &str) {
        lock(&self.quota).insert(node.to_string());
        self.quota_wake.notify_one();
    }

    /// Keeps a node queued without waking the task (it retries at its next tick).
    pub fn requeue_quota(&self, node: &str) {
        lock(&self.quota).insert(node.to_string());
    }

    pub fn take_usage(&self) -> Vec<String> {
        lock(&self.usage).drain().collect()
    }

    pub fn take_quota(&self) -> Vec<String> {
        lock(&self.quota).drain().collect()
    }
}

/// A poisoned lock only means another thread panicked mid-update of a plain set or map; the
/// data is still usable, and the meter must not stop answering because of it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// The meter. Shared as `Arc<Meter>` by the HTTP handlers, the consumer and the outbox tasks.
pub struct Meter {
    pub(crate) settings: Arc<Settings>,
    pub(crate) thresholds: Thresholds,
    pub(crate) table: Table<NodeLedger>,
    pub(crate) store: Store,
    by_name: RwLock<HashMap<String, Arc<Slot>>>,
    /// Address → node, with the deployment time that claimed it: when an address is reused,
    /// the newest deployment owns it, whatever order the events arrive in.
    by_ip: RwLock<HashMap<Ipv4Addr, (i64, Arc<Slot>)>>,
    pub(crate) outbox: Outbox,
    min_interval: Duration,
    register_lock: tokio::sync::Mutex<()>,
    counters: Counters,
    /// Failed authentications per source (429 before any work once spent).
    failures: auth::FailureLimiter,
    trusted: auth::TrustedProxies,
    wrong_secret_log: auth::WarnEvery,
    /// Asked before a deployment changes a known node's identity (`set_provider`).
    provider: OnceLock<Arc<dyn Provider>>,
}

/// Metric handles, registered once (a `counter!` per report would hash its key every time).
struct Counters {
    accepted: metrics::Counter,
    unauthorized: metrics::Counter,
    malformed: metrics::Counter,
    too_fast: metrics::Counter,
    refused: metrics::Counter,
    stale: metrics::Counter,
    flooded: metrics::Counter,
    future: metrics::Counter,
    /// The ledger could not be written or flushed: 503, nothing acknowledged.
    unavailable: metrics::Counter,
    billed_bytes: metrics::Counter,
}

impl Counters {
    fn new() -> Counters {
        let r = |result: &'static str| metrics::counter!("pn_meter_reports_total", "result" => result);
        Counters {
            accepted: r("accepted"),
            unauthorized: r("unauthorized"),
            malformed: r("malformed"),
            too_fast: r("too_fast"),
            refused: r("refused"),
            stale: r("stale"),
            flooded: r("flooded"),
            future: r("future_at"),
            unavailable: r("unavailable"),
            billed_bytes: metrics::counter!("pn_meter_billed_bytes_total"),
        }
    }
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Meter({} nodes)", read(&self.by_name).len())
    }
}

impl Meter {
    /// Loads every ledger from `store`, re-evaluates quota states against the current ratios,
    /// and queues whatever was not yet published or confirmed by Center.
    pub async fn open(store: &Store, settings: Settings) -> Result<Arc<Meter>, StateError> {
        let table: Table<NodeLedger> = store.table(LEDGER_TABLE)?;
        let thresholds = settings.thresholds();
        let min_interval = Duration::from_millis(settings.min_report_interval_ms);
        let failures = auth::FailureLimiter::new(settings.auth_fail_burst, settings.auth_fail_per_sec, settings.auth_fail_sources);
        let trusted = auth::TrustedProxies::parse(&settings.trusted_proxies).map_err(|e| StateError::Store(format!("PN_TRUSTED_PROXIES: {e}")))?;
        let wrong_secret_log = auth::WarnEvery::new(Duration::from_millis(settings.wrong_secret_log_interval_ms));
        let meter = Meter {
            settings: Arc::new(settings),
            thresholds,
            table: table.clone(),
            store: store.clone(),
            by_name: RwLock::new(HashMap::new()),
            by_ip: RwLock::new(HashMap::new()),
            outbox: Outbox::default(),
            min_interval,
            register_lock: tokio::sync::Mutex::new(()),
            counters: Counters::new(),
            failures,
            trusted,
            wrong_secret_log,
            provider: OnceLock::new(),
        };
        let now = kit::now_ms();
        let mut ledgers = Vec::new();
        for item in table.iter() {
            let (_, mut l) = item?;
            if l.evaluate(&meter.thresholds, now).is_some() {
                table.put_nowait(&l.node, &l)?;
            }
            ledgers.push(l);
        }
        // The newest deployment owns an address that was reused.
        ledgers.sort_by_key(|l| l.deployed_at_ms);
        {
            let mut by_name = write(&meter.by_name);
            let mut by_ip = write(&meter.by_ip);
            for l in ledgers {
                if l.has_outbox_work() {
                    meter.outbox.quota_dirty(&l.node);
                }
                let unannounced = l.usage.used_bytes > 0 && !l.usage_announced;
                let name = l.node.clone();
                let ip = l.ipv4;
                let deployed_at = l.deployed_at_ms;
                let slot = Slot::new(l);
                if unannounced {
                    // Never published: the whole usage goes out as the first message.
                    if let Ok(mut st) = slot.st.try_lock() {
                        st.pending_delta = st.ledger.usage.used_bytes;
                    }
                    meter.outbox.usage_dirty(&name, true);
                }
                claim_ip(&mut by_ip, ip, deployed_at, &slot);
                by_name.insert(name, slot);
            }
        }
        store.flush().await?;
        tracing::info!(nodes = read(&meter.by_name).len(), "ledger loaded");
        Ok(Arc::new(meter))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The provider that confirms identity changes (set once, at start).
    pub fn set_provider(&self, provider: Arc<dyn Provider>) {
        let _ = self.provider.set(provider);
    }

    /// Where a request comes from: the peer, or what a trusted proxy says it forwarded.
    pub fn source(&self, peer: IpAddr, forwarded_for: Option<&[u8]>) -> IpAddr {
        auth::source_of(peer, forwarded_for, &self.trusted)
    }

    fn unauthorized(&self, source: Option<IpAddr>) -> IngestError {
        self.counters.unauthorized.increment(1);
        if let Some(src) = source {
            self.failures.charge(src, Instant::now());
        }
        IngestError::Unauthorized
    }

    pub(crate) fn slot(&self, node: &str) -> Option<Arc<Slot>> {
        read(&self.by_name).get(node).cloned()
    }

    pub(crate) fn slots(&self) -> Vec<Arc<Slot>> {
        read(&self.by_name).values().cloned().collect()
    }

    pub fn node_count(&self) -> usize {
        read(&self.by_name).len()
    }

    /// Applies one `POST /slave/usage` from `source` (None: not over the network, no source
    /// budget): the source's failure budget, authenticate, parse, the clock bound, rate-limit,
    /// bill, write, flush.
    pub async fn ingest(&self, source: Option<IpAddr>, authorization: Option<&[u8]>, body: &[u8]) -> Result<Ingested, IngestError> {
        if let Some(src) = source
            && let Err(retry_after) = self.failures.check(src, Instant::now())
        {
            self.counters.flooded.increment(1);
            return Err(IngestError::Flooded { retry_after });
        }
        let creds = match auth::parse_basic(authorization) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(reason = %e, "usage report without usable credentials");
                return Err(self.unauthorized(source));
            }
        };
        let presented = auth::secret_sha256(&creds.secret);
        drop(creds.secret);
        let slot = read(&self.by_ip).get(&creds.ipv4).map(|(_, s)| s.clone());
        let Some(slot) = slot else {
            let _ = auth::hashes_match(&presented, &UNKNOWN_NODE_HASH);
            tracing::debug!(ipv4 = %creds.ipv4, "usage report from an unknown address");
            return Err(self.unauthorized(source));
        };
        // Checked before the node's lock: a flood of wrong secrets does not queue behind (or
        // in front of) the node's own reports.
        let authentic = |ip: Ipv4Addr, hash: Option<[u8; 32]>| auth::hashes_match(&presented, &hash.unwrap_or(UNKNOWN_NODE_HASH)) && ip == creds.ipv4;
        let (ip, hash) = *read(&slot.auth);
        if !authentic(ip, hash) {
            if let Some(count) = self.wrong_secret_log.hit(&slot.name, Instant::now()) {
                tracing::warn!(node = %slot.name, count, source = ?source, "usage reports with a wrong secret (one line per node per PN_WRONG_SECRET_LOG_INTERVAL_MS)");
            }
            return Err(self.unauthorized(source));
        }
        let report = UsageReport::parse(body).inspect_err(|e| {
            tracing::debug!(node = %slot.name, error = %e, "malformed usage report");
            self.counters.malformed.increment(1);
        })?;
        let max_ahead = i64::try_from(self.settings.max_clock_ahead_ms).unwrap_or(i64::MAX);
        report.check_at(kit::now_ms(), max_ahead).inspect_err(|e| {
            tracing::debug!(node = %slot.name, error = %e, "usage report from the future refused");
            self.counters.future.increment(1);
        })?;
        let mut st = slot.st.lock().await;
        // A deployment may have changed the credentials meanwhile.
        if !authentic(st.ledger.ipv4, st.ledger.secret_hash()) {
            return Err(self.unauthorized(source));
        }
        let now = Instant::now();
        if let Some(t) = st.last_accepted {
            let since = now.saturating_duration_since(t);
            if since < self.min_interval {
                self.counters.too_fast.increment(1);
                return Err(IngestError::TooFast { min_interval: self.min_interval, retry_after: self.min_interval - since });
            }
        }
        let now_ms = kit::now_ms();
        let mode = self.settings.count_mode(&st.ledger.provider);
        // A node time accepted from the future before such reports were refused is forgotten.
        st.ledger.usage.forget_future(now_ms.saturating_add(max_ahead));
        // Applied in place (no copy of the ledger per report): `apply` changes nothing when it
        // refuses, and a failed write puts back what sled holds.
        let outcome = st.ledger.usage.apply(&report.reading(), mode, now_ms, self.settings.max_link_bytes_per_sec).inspect_err(|r| {
            tracing::warn!(node = %slot.name, reason = %r, "usage report refused");
            self.counters.refused.increment(1);
        })?;
        if outcome == Outcome::Stale {
            tracing::debug!(node = %slot.name, boot_id = %report.boot_id, "stale usage report ignored");
            self.counters.stale.increment(1);
            return Ok(ingested(&st.ledger, outcome));
        }
        st.ledger.record_report(&report, outcome, now_ms);
        let change = st.ledger.evaluate(&self.thresholds, now_ms);
        if let Err(e) = self.table.put_nowait(&slot.name, &st.ledger) {
            tracing::error!(node = %slot.name, error = %e, "ledger write failed; report not acknowledged");
            if let Ok(Some(stored)) = self.table.get(&slot.name) {
                st.ledger = stored;
            } else {
                tracing::error!(node = %slot.name, "could not re-read the ledger after a failed write");
            }
            self.counters.unavailable.increment(1);
            return Err(IngestError::Unavailable(e.to_string()));
        }
        st.last_accepted = Some(now);
        let delta = outcome.delta();
        if delta > 0 {
            st.pending_delta = st.pending_delta.saturating_add(delta);
            self.counters.billed_bytes.increment(delta);
        }
        let first_usage = !st.ledger.usage_announced;
        let answer = ingested(&st.ledger, outcome);
        // Released before the flush: the next report of this node may be applied while this
        // one waits for the disk; the flush it then waits for covers both writes.
        drop(st);
        if let Err(e) = self.store.flush().await {
            tracing::error!(node = %slot.name, error = %e, "ledger flush failed; report not acknowledged");
            self.counters.unavailable.increment(1);
            return Err(IngestError::Unavailable(e.to_string()));
        }
        if delta > 0 {
            self.outbox.usage_dirty(&slot.name, first_usage);
        }
        if let Some(c) = change {
            tracing::info!(node = %slot.name, from = c.from.as_str(), to = c.to.as_str(), used = c.used_bytes, sold = c.sold_bytes, "quota state changed");
            self.outbox.quota_dirty(&slot.name);
        }
        self.counters.accepted.increment(1);
        Ok(answer)
    }

    /// Why `d` may only be applied with the provider's confirmation, if it may: it changes a
    /// known node's address or secret hash, or a new node takes an address another node holds.
    pub async fn needs_confirmation(&self, d: &Deployment) -> Option<String> {
        match self.slot(&d.node) {
            Some(slot) => {
                let (ip, hash) = *read(&slot.auth);
                if ip != d.ipv4 {
                    Some(format!("it moves {} from {ip} to {}", d.node, d.ipv4))
                } else if hash != Some(d.secret_sha256) {
                    Some(format!("it changes the secret of {}", d.node))
                } else {
                    None
                }
            }
            None => read(&self.by_ip).get(&d.ipv4).map(|(_, other)| format!("{} is {}'s address", d.ipv4, other.name)),
        }
    }

    /// Asks the provider whether `instance` (the event's) is named `d.node` and holds `d.ipv4`.
    pub async fn confirm(&self, d: &Deployment, instance_id: &str, account: &str) -> Confirmation {
        let Some(p) = self.provider.get() else {
            return Confirmation::Mismatch("no provider configured to confirm it".into());
        };
        let ip = d.ipv4.to_string();
        let claim = Claim { instance_id, name: &d.node, ipv4: &ip, account };
        let verdict = kit::cloud::confirm_instance(p.as_ref(), &claim).await;
        let result = match &verdict {
            Confirmation::Confirmed(_) => "confirmed",
            Confirmation::Mismatch(_) => "mismatch",
            Confirmation::Unanswered(_) => "unanswered",
        };
        metrics::counter!("pn_instance_checks_total", "service" => "svc-meter", "result" => result).increment(1);
        verdict
    }

    /// Learns (or updates) a node from its deployment. Idempotent. Without `confirmed` (the
    /// provider's word, see `needs_confirmation`) a deployment that would change a known node's
    /// address or secret hash, or take another node's address, changes nothing (`Refused`).
    pub async fn register(&self, d: &Deployment, confirmed: bool) -> Result<Registered, StateError> {
        if self.slot(&d.node).is_none() {
            // New nodes are created one at a time: two deliveries racing must not both write
            // a fresh ledger (the second would overwrite reports accepted in between).
            let _guard = self.register_lock.lock().await;
            if !confirmed && self.slot(&d.node).is_none() && read(&self.by_ip).contains_key(&d.ipv4) {
                tracing::warn!(node = %d.node, ipv4 = %d.ipv4, "deployment takes another node's address without the provider's confirmation; refused");
                return Ok(Registered::Refused);
            }
            if self.slot(&d.node).is_none() {
                let now = kit::now_ms();
                let mut l = NodeLedger::new(d, now);
                let change = l.evaluate(&self.thresholds, now);
                self.table.put_nowait(&d.node, &l)?;
                self.store.flush().await?;
                let slot = Slot::new(l);
                write(&self.by_name).insert(d.node.clone(), slot.clone());
                claim_ip(&mut write(&self.by_ip), d.ipv4, d.deployed_at_ms, &slot);
                if change.is_some() {
                    self.outbox.quota_dirty(&d.node);
                }
                tracing::info!(node = %d.node, ipv4 = %d.ipv4, sold = d.sold_bytes, provider = %d.provider, "node registered");
                return Ok(Registered::New);
            }
        }
        let Some(slot) = self.slot(&d.node) else {
            return Err(StateError::Store(format!("node {} vanished during registration", d.node)));
        };
        let mut st = slot.st.lock().await;
        if !confirmed && (st.ledger.ipv4 != d.ipv4 || st.ledger.secret_hash() != Some(d.secret_sha256)) {
            tracing::warn!(node = %d.node, "deployment changes the node's address or secret without the provider's confirmation; refused");
            return Ok(Registered::Refused);
        }
        let mut next = st.ledger.clone();
        next.redeploy(d);
        let change = next.evaluate(&self.thresholds, kit::now_ms());
        if next == st.ledger {
            return Ok(Registered::Unchanged);
        }
        self.table.put_nowait(&d.node, &next)?;
        let old_ip = st.ledger.ipv4;
        let new_ip = next.ipv4;
        let deployed_at = next.deployed_at_ms;
        tracing::info!(node = %d.node, ipv4 = %new_ip, sold = next.sold_bytes, state = next.state.as_str(), "node updated by a deployment");
        *write(&slot.auth) = (next.ipv4, next.secret_hash());
        // The address index moves with the credentials, before anyone can see the new ledger:
        // a report from the new address is never refused for a moment (seen under load).
        if old_ip != new_ip {
            let mut by_ip = write(&self.by_ip);
            if by_ip.get(&old_ip).is_some_and(|(_, s)| Arc::ptr_eq(s, &slot)) {
                by_ip.remove(&old_ip);
            }
            claim_ip(&mut by_ip, new_ip, deployed_at, &slot);
        }
        st.ledger = next;
        drop(st);
        self.store.flush().await?;
        if change.is_some() {
            self.outbox.quota_dirty(&d.node);
        }
        Ok(Registered::Updated)
    }

    /// An operator's quota change (`PUT /v1/nodes/<node>/quota`). `None` for an unknown node.
    pub async fn set_quota(&self, node: &str, sold_bytes: u64) -> Result<Option<UsageView>, StateError> {
        let Some(slot) = self.slot(node) else { return Ok(None) };
        let mut st = slot.st.lock().await;
        let now = kit::now_ms();
        let mut next = st.ledger.clone();
        next.sold_bytes = sold_bytes;
        next.quota_set_at_ms = now.max(next.quota_set_at_ms);
        let change = next.evaluate(&self.thresholds, now);
        self.table.put_nowait(node, &next)?;
        st.ledger = next;
        let view = self.view(&st.ledger);
        drop(st);
        self.store.flush().await?;
        tracing::info!(node, sold = sold_bytes, "quota set by an operator");
        if change.is_some() {
            self.outbox.quota_dirty(node);
        }
        Ok(Some(view))
    }

    /// Admission for a node: `None` when unknown.
    pub async fn admission(&self, node: &str) -> Option<Admission> {
        let slot = self.slot(node)?;
        let st = slot.st.lock().await;
        let l = &st.ledger;
        let reason = (l.state == State::Cutoff).then(|| {
            format!(
                "quota exhausted: {} of {} sold bytes used (cutoff at {}%)",
                l.usage.used_bytes,
                l.sold_bytes,
                (self.settings.cutoff_ratio * 1000.0).round() / 10.0
            )
        });
        Some(Admission { node: node.to_string(), state: l.state, reason })
    }

    pub async fn usage(&self, node: &str) -> Option<UsageView> {
        let slot = self.slot(node)?;
        let st = slot.st.lock().await;
        Some(self.view(&st.ledger))
    }

    pub async fn list(&self) -> Vec<NodeSummary> {
        let mut out = Vec::new();
        for slot in self.slots() {
            let st = slot.st.lock().await;
            let l = &st.ledger;
            out.push(NodeSummary { node: l.node.clone(), ipv4: l.ipv4, used_bytes: l.usage.used_bytes, sold_bytes: l.sold_bytes, state: l.state });
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    fn view(&self, l: &NodeLedger) -> UsageView {
        UsageView {
            node: l.node.clone(),
            ipv4: l.ipv4,
            provider: l.provider.clone(),
            count_mode: self.settings.count_mode(&l.provider).as_str(),
            used_bytes: l.usage.used_bytes,
            sold_bytes: l.sold_bytes,
            state: l.state,
            reports: l.usage.reports,
            epochs: l.usage.epochs.clone(),
            earlier_epochs: l.usage.earlier_epochs,
            earlier_bytes: l.usage.earlier_bytes,
            last_report: l.last_report.clone(),
            quota_seq: l.quota_seq,
            published_quota_seq: l.published_quota_seq,
            hidden_at_center: l.hidden_synced,
            usage_announced: l.usage_announced,
        }
    }
}

/// Points `ip` at `slot` unless a newer deployment already owns it.
fn claim_ip(by_ip: &mut HashMap<Ipv4Addr, (i64, Arc<Slot>)>, ip: Ipv4Addr, deployed_at_ms: i64, slot: &Arc<Slot>) {
    match by_ip.get(&ip) {
        Some((at, other)) if *at > deployed_at_ms && !Arc::ptr_eq(other, slot) => {
            tracing::warn!(%ip, node = %slot.name, owner = %other.name, "address already owned by a newer deployment");
        }
        _ => {
            by_ip.insert(ip, (deployed_at_ms, slot.clone()));
        }
    }
}

fn ingested(l: &NodeLedger, outcome: Outcome) -> Ingested {
    Ingested {
        node: l.node.clone(),
        outcome: outcome.as_str(),
        delta_bytes: outcome.delta(),
        used_bytes: l.usage.used_bytes,
        sold_bytes: l.sold_bytes,
        state: l.state,
        epoch: l.usage.current_epoch(),
    }
}
