//! The JetStream bus: stream and consumer set-up (idempotent, at start), publishing with
//! `Nats-Msg-Id`, the readable `Pn-*` headers and `traceparent`, and the one consumer loop
//! every stage and every `pn.replay.<stage>` subject runs through.
//!
//! The loop fetches only as many messages as it has free handler slots (a prefetched message's
//! AckWait would run while it waits), sends progress acks while a handler works, confirms
//! successful acks (`double_ack`), naks transient failures with a delay, and turns poison or
//! exhausted messages into `pn.op.failed` — never silence. A consumer that only *reports* an
//! operation's fate (`LoopConfig::reports_only`: svc-claimer's reports to Center) never fails
//! one: its retries back off without limit and a `Fail` is logged and terminated.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use proto::{Body, Event, EventBody, OpFailed, OpId, Stage, headers, subjects};
use tokio::sync::Semaphore;
use tokio_util_shim::CancelOnDrop;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("nats connect to {url}: {msg}")]
    Connect { url: String, msg: String },
    #[error("jetstream {what}: {msg}")]
    JetStream { what: String, msg: String },
    #[error("publish to {subject}: {msg}")]
    Publish { subject: String, msg: String },
}

fn js_err(what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::JetStream { what: what.to_string(), msg: e.to_string() }
}

/// Stream retention for PN_OPS (the audit trail and the source of replay).
pub const OPS_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);

/// A connection to NATS with JetStream.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bus")
    }
}

/// Who published an event, for the readable headers and the deduplication id.
#[derive(Debug, Clone)]
pub struct Meta {
    pub operation_id: String,
    pub sub_id: String,
    pub stage: Stage,
    /// Deduplication id (`Nats-Msg-Id`).
    pub msg_id: String,
}

impl Meta {
    /// Metadata for a stage's outcome: msg id `<operationId>.<stage>.<attempt>`.
    pub fn outcome(operation_id: &str, sub_id: &str, stage: Stage, attempt: u32) -> Meta {
        Meta {
            operation_id: operation_id.to_string(),
            sub_id: sub_id.to_string(),
            stage,
            msg_id: subjects::msg_id(operation_id, stage, attempt),
        }
    }
}

/// How a connection authenticates: a user and password (`PN_NATS_USER`, `PN_NATS_PASSWORD`),
/// and the CA of the server's TLS certificate (`PN_NATS_CA_FILE`). Prints without the password.
#[derive(Clone, Default)]
pub struct NatsAuth {
    pub user: Option<String>,
    pub password: Option<secrecy::SecretString>,
    /// Set: TLS is required and the server's certificate must chain to this CA (PEM).
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "[REDACTED]"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl NatsAuth {
    /// A user and its password.
    pub fn user(user: &str, password: secrecy::SecretString) -> NatsAuth {
        NatsAuth { user: Some(user.to_string()), password: Some(password), ca_file: None }
    }
}

/// Splits `nats://user:password@host:port` into the URL without credentials and them
/// (async-nats ignores credentials in a URL).
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, rest)) = url.split_once("://") else { return (url.to_string(), None) };
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, String::new()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (format!("{scheme}://{host}{path}"), Some((user.to_string(), password.to_string())))
        }
        None => (url.to_string(), None),
    }
}

/// `url` without the password of a `nats://user:password@host` form, for messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, String::new()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_string(),
    }
}

impl Bus {
    /// Connects, retrying for up to `patience` (NATS may start after the service). Credentials,
    /// if any, come from the URL (`nats://user:password@host:port`); see [`Bus::connect_as`].
    pub async fn connect(url: &str, name: &str, patience: Duration) -> Result<Bus, BusError> {
        Bus::connect_as(url, name, patience, &NatsAuth::default()).await
    }

    /// Connects as `auth`'s user, retrying for up to `patience`. With a user, the reply inbox is
    /// `_INBOX_<user>` (`kit::nats_auth::inbox_prefix`): what the server lets that identity
    /// subscribe to. A refused login is retried like an unreachable server and reported with the
    /// server's words at the end; the password is never part of an error.
    pub async fn connect_as(url: &str, name: &str, patience: Duration, auth: &NatsAuth) -> Result<Bus, BusError> {
        use secrecy::ExposeSecret;
        let deadline = tokio::time::Instant::now() + patience;
        let (plain, in_url) = split_credentials(url);
        let creds = match (&auth.user, &auth.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.expose_secret().to_string())),
            _ => in_url,
        };
        loop {
            let mut opts = async_nats::ConnectOptions::new()
                .name(name)
                .connection_timeout(Duration::from_secs(2))
                .max_reconnects(None);
            if let Some((user, password)) = &creds {
                opts = opts
                    .user_and_password(user.clone(), password.clone())
                    .custom_inbox_prefix(crate::nats_auth::inbox_prefix(user));
            }
            if let Some(ca) = &auth.ca_file {
                opts = opts.add_root_certificates(ca.clone()).require_tls(true);
            }
            let res = tokio::time::timeout(Duration::from_secs(3), async {
                let c = opts.connect(plain.as_str()).await.map_err(|e| e.to_string())?;
                c.flush().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(c)
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            match res {
                Ok(client) => {
                    let js = jetstream::new(client.clone());
                    return Ok(Bus { client, js });
                }
                Err(msg) if tokio::time::Instant::now() >= deadline => {
                    return Err(BusError::Connect { url: redact_url(url), msg });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// Creates the three streams of DESIGN.md (one replica) when they do not exist yet; an
    /// existing stream is left as it is. Safe to call any number of times.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        self.ensure_streams_with(1).await
    }

    /// Like `ensure_streams`, with `replicas` JetStream replicas per new stream. What a service
    /// does at start: its NATS identity may create a missing stream but not change one
    /// (`kit::nats_auth`); [`Bus::apply_streams_with`] (the operator) updates them.
    pub async fn ensure_streams_with(&self, replicas: usize) -> Result<(), BusError> {
        for cfg in stream_configs(replicas) {
            let name = cfg.name.clone();
            match self.js.get_stream(&name).await {
                Ok(_) => continue,
                Err(e) => match e.kind() {
                    jetstream::context::GetStreamErrorKind::JetStream(je)
                        if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {}
                    _ => return Err(js_err(&format!("stream {name}"), e)),
                },
            }
            if let Err(e) = self.js.create_stream(cfg).await {
                // Another service may have created it meanwhile: fine if it is there now.
                if self.js.get_stream(&name).await.is_err() {
                    return Err(js_err(&format!("stream {name}"), e));
                }
            }
        }
        Ok(())
    }

    /// Creates or updates the three streams to this code's configuration, with `replicas`
    /// replicas: the operator's (setup identity's) step — `pnctl up` runs it before the
    /// services start. A service's identity is not allowed to update a stream.
    pub async fn apply_streams_with(&self, replicas: usize) -> Result<(), BusError> {
        for cfg in stream_configs(replicas) {
            let name = cfg.name.clone();
            self.js.create_or_update_stream(cfg).await.map_err(|e| js_err(&format!("stream {name}"), e))?;
        }
        Ok(())
    }

    /// True when the three streams exist (readiness).
    pub async fn streams_present(&self) -> bool {
        for s in [subjects::OPS_STREAM, subjects::REPLAY_STREAM, subjects::METER_STREAM] {
            if self.js.get_stream_no_info(s).await.is_err() {
                return false;
            }
        }
        matches!(self.client.connection_state(), async_nats::connection::State::Connected)
    }

    /// Publishes one event and waits for the server's ack. A duplicate `Nats-Msg-Id` within
    /// the stream's window is acknowledged but stored once.
    pub async fn publish(&self, subject: String, body: Body, meta: &Meta) -> Result<(), BusError> {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, meta.msg_id.as_str());
        h.insert(headers::OP, meta.operation_id.as_str());
        if !meta.sub_id.is_empty() {
            h.insert(headers::SUB, meta.sub_id.as_str());
        }
        h.insert(headers::STAGE, meta.stage.as_str());
        h.insert(headers::CONTENT_TYPE, headers::content_type(body.type_name()).as_str());
        // The operation's trace, the current span (the handler's) as the parent: kit::trace.
        h.insert(headers::TRACEPARENT, crate::trace::traceparent_for(&meta.operation_id).as_str());
        let payload = Bytes::from(Event::new(body).to_bytes());
        let fut = self
            .js
            .publish_with_headers(subject.clone(), h, payload)
            .await
            .map_err(|e| BusError::Publish { subject: subject.clone(), msg: e.to_string() })?;
        fut.await.map_err(|e| BusError::Publish { subject, msg: e.to_string() })?;
        Ok(())
    }

    /// Publishes `pn.op.failed.<operationId>`.
    pub async fn publish_failed(&self, failed: OpFailed) -> Result<(), BusError> {
        let stage = Stage::parse(&failed.stage).unwrap_or(Stage::Claim);
        let meta = Meta {
            operation_id: failed.operation_id.clone(),
            sub_id: failed.sub_id.clone(),
            stage,
            msg_id: failed.msg_id(),
        };
        let subject = subjects::op_event(subjects::FAILED, &failed.operation_id);
        let res = self.publish(subject, Body::Failed(failed), &meta).await;
        if res.is_ok() {
            metrics::counter!("pn_ops_failed_total", "stage" => stage.as_str()).increment(1);
        }
        res
    }

    /// Creates or updates a durable pull consumer.
    pub async fn consumer(&self, spec: &ConsumerSpec) -> Result<PullConsumer, BusError> {
        let stream = self.js.get_stream(spec.stream).await.map_err(|e| js_err(spec.stream, e))?;
        let cfg = jetstream::consumer::pull::Config {
            durable_name: Some(spec.durable.clone()),
            filter_subject: spec.filter.clone(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: spec.ack_wait,
            max_deliver: spec.max_deliver,
            max_ack_pending: spec.max_ack_pending,
            ..Default::default()
        };
        stream.create_consumer(cfg).await.map_err(|e| js_err(&format!("consumer {}", spec.durable), e))
    }
}

/// The three streams of DESIGN.md, with `replicas` replicas each.
fn stream_configs(replicas: usize) -> [stream::Config; 3] {
    let mut configs = [
        stream::Config {
            name: subjects::OPS_STREAM.into(),
            subjects: vec![subjects::OPS_ALL.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: OPS_MAX_AGE,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
        stream::Config {
            name: subjects::REPLAY_STREAM.into(),
            subjects: vec![subjects::REPLAY_ALL.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(24 * 3600),
            ..Default::default()
        },
        stream::Config {
            name: subjects::METER_STREAM.into(),
            subjects: vec![subjects::METER_ALL.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(35 * 24 * 3600),
            max_messages_per_subject: 1000,
            ..Default::default()
        },
    ];
    for cfg in &mut configs {
        cfg.num_replicas = replicas.max(1);
    }
    configs
}

/// One durable consumer's shape.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: &'static str,
    pub durable: String,
    pub filter: String,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub max_ack_pending: i64,
}

impl ConsumerSpec {
    /// A consumer of `pn.op.<event>.>` on PN_OPS.
    pub fn ops(durable: &str, event: &str, loop_cfg: &LoopConfig) -> ConsumerSpec {
        ConsumerSpec {
            stream: subjects::OPS_STREAM,
            durable: durable.to_string(),
            filter: subjects::op_filter(event),
            ack_wait: loop_cfg.ack_wait,
            max_deliver: loop_cfg.consumer_max_deliver(),
            max_ack_pending: loop_cfg.consumer_max_ack_pending(),
        }
    }

    /// A consumer of `pn.replay.<stage>` on PN_REPLAY.
    pub fn replay(durable: &str, stage: Stage, loop_cfg: &LoopConfig) -> ConsumerSpec {
        ConsumerSpec {
            stream: subjects::REPLAY_STREAM,
            durable: format!("{durable}-replay"),
            filter: subjects::replay(stage),
            ack_wait: loop_cfg.ack_wait,
            max_deliver: loop_cfg.consumer_max_deliver(),
            max_ack_pending: loop_cfg.consumer_max_ack_pending(),
        }
    }
}

/// How a consumer loop runs.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub stage: Stage,
    pub concurrency: usize,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    /// How many operations may wait parked (`HandleError::Park`) besides the running ones;
    /// 0 = the handler never parks. A parking consumer has no JetStream delivery limit (a
    /// park is a delivery too): its handler keeps the attempt budget in its own records.
    pub parking: i64,
    /// Whether this loop may fail an operation: turn a `Fail`, poison, or a `Retry` whose
    /// deliveries ran out into `pn.op.failed` (true for the stages). False for a consumer that
    /// only reports what happened elsewhere (svc-claimer's reports to Center): a failed report
    /// is not a failed operation, so it has no JetStream delivery limit, its `Retry` is nak'ed
    /// with `retry_backoff` (growing with the delivery count, at most `retry_cap`) for as long
    /// as it takes, and its `Fail` is logged and terminated without any publish.
    pub fails_operations: bool,
    /// The longest nak delay of a reports-only consumer's `Retry`.
    pub retry_cap: Duration,
}

impl LoopConfig {
    pub fn new(stage: Stage, concurrency: usize, ack_wait: Duration) -> LoopConfig {
        LoopConfig {
            stage,
            concurrency: concurrency.max(1),
            ack_wait,
            max_deliver: 8,
            parking: 0,
            fails_operations: true,
            retry_cap: DEFAULT_RETRY_CAP,
        }
    }

    /// A consumer that never fails an operation (see `fails_operations`); its retries back off
    /// up to `retry_cap` between deliveries.
    pub fn reports_only(mut self, retry_cap: Duration) -> LoopConfig {
        self.fails_operations = false;
        self.retry_cap = retry_cap.max(Duration::from_millis(1));
        self
    }

    /// This consumer's handler parks up to `capacity` waiting operations (see `parking`).
    pub fn with_parking(mut self, capacity: i64) -> LoopConfig {
        self.parking = capacity.max(1);
        self
    }

    /// JetStream's delivery limit: none for a parking or a reports-only consumer.
    fn consumer_max_deliver(&self) -> i64 {
        if self.parking > 0 || !self.fails_operations { -1 } else { self.max_deliver }
    }

    /// Unacked messages JetStream lets the consumer hold: the running handlers, a fetch's
    /// worth more, and the parked ones.
    fn consumer_max_ack_pending(&self) -> i64 {
        (self.concurrency as i64).max(1) * 2 + self.parking
    }

    fn progress_every(&self) -> Duration {
        (self.ack_wait / 3).max(Duration::from_millis(100))
    }
}

/// The default `LoopConfig::retry_cap`.
pub const DEFAULT_RETRY_CAP: Duration = Duration::from_secs(60);

/// The nak delay of a reports-only consumer's `Retry` at its `delivered`-th delivery (from 1):
/// the handler's `after` (at least 100 ms) doubled per earlier delivery, never above `cap`.
pub fn retry_backoff(after: Duration, delivered: i64, cap: Duration) -> Duration {
    let base = after.max(Duration::from_millis(100));
    let doublings = delivered.saturating_sub(1).clamp(0, 30) as u32;
    base.saturating_mul(1u32 << doublings).min(cap)
}

/// A message handed to a handler.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub subject: String,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    /// Delivery attempt, from 1.
    pub delivered: i64,
}

impl Incoming {
    /// The last subject token: the operation id for `pn.op.*` and `pn.replay.*` payloads.
    pub fn subject_op_id(&self) -> Option<&str> {
        subjects::op_id_of(&self.subject)
    }

    /// The operation id the subject names (`pn.op.<event>.<operationId>`), checked.
    pub fn op_id(&self) -> Option<OpId> {
        OpId::of_subject(&self.subject)
    }

    /// Decodes the body as a `pn.v1.Event`; garbage is a `Fail` (poison), not a panic.
    pub fn decode(&self) -> Result<Body, HandleError> {
        Event::from_bytes(&self.payload).map_err(|e| HandleError::Fail { reason: format!("undecodable message: {e}"), failed: None })
    }

    /// A stage's input, decoded once into its type: garbage or another message type is a
    /// `Fail` (poison: the operation fails with the reason).
    pub fn decode_as<T: EventBody>(&self) -> Result<T, HandleError> {
        T::from_body(self.decode()?)
            .map_err(|other| HandleError::fail(format!("expected {}, got {}", T::TYPE_NAME, other.type_name())))
    }

    /// An observed event (a consumer that reports or cleans up after others), decoded once into
    /// its type: garbage or another message type is dropped (logged), never a failure.
    pub fn observe_as<T: EventBody>(&self) -> Result<T, HandleError> {
        let body = Event::from_bytes(&self.payload).map_err(|e| HandleError::Drop(format!("undecodable {}: {e}", T::TYPE_NAME)))?;
        T::from_body(body).map_err(|other| HandleError::Drop(format!("expected {}, got {}", T::TYPE_NAME, other.type_name())))
    }

    /// The plain-text operation id of a `pn.replay.<stage>` payload, parsed.
    pub fn replay_op_id(&self) -> Result<OpId, HandleError> {
        let s = std::str::from_utf8(&self.payload).map(str::trim).unwrap_or("");
        OpId::parse(s).map_err(|_| HandleError::Drop("replay payload is not an operation id".into()))
    }
}

/// The record a `pn.replay.<stage>` message names, and the stored protobuf it holds decoded:
/// an unknown operation or an undecodable record is dropped (logged), a store error retried.
pub fn replay_lookup<R: crate::state::Record, M: prost::Message + Default>(
    table: &crate::state::Table<R>,
    msg: &Incoming,
    service: &str,
    stored: impl Fn(&R) -> &[u8],
) -> Result<(OpId, M), HandleError> {
    let id = msg.replay_op_id()?;
    let rec = table.get(id.as_str()).map_err(|e| HandleError::retry(e.to_string(), Duration::from_secs(1)))?;
    let Some(rec) = rec else {
        return Err(HandleError::Drop(format!("replay: operation {id} unknown to {service}")));
    };
    let m = M::decode(stored(&rec)).map_err(|e| HandleError::Drop(format!("replay: stored event undecodable: {e}")))?;
    Ok((id, m))
}

/// What a handler says about a message it could not finish.
#[derive(Debug)]
pub enum HandleError {
    /// The world is flaky: nak and try again after `after`. When deliveries run out the
    /// operation fails with `reason` — except on a reports-only consumer
    /// (`LoopConfig::reports_only`), which retries with a growing delay for as long as it takes.
    Retry { reason: String, after: Duration, failed: Option<OpFailed> },
    /// This input cannot succeed: publish `pn.op.failed` (with `failed` if given, else built
    /// from the subject) and terminate the message. A reports-only consumer terminates it
    /// without publishing (logged, counted in `pn_handler_terminated_total`).
    Fail { reason: String, failed: Option<OpFailed> },
    /// Ignore and terminate (e.g. a replay for an unknown operation). Logged.
    Drop(String),
    /// Nothing is wrong; the operation waits on something slow outside (a node's OS prep, a
    /// booting VPS). Nak with `after` so JetStream redelivers it then: no handler, task or
    /// connection is held meanwhile — a parked operation costs its stored record and its
    /// pending message. Never counts as a failure; a consumer whose handler parks keeps its
    /// own attempt budget (see `LoopConfig::parking`).
    Park { reason: String, after: Duration },
}

impl HandleError {
    pub fn retry(reason: impl Into<String>, after: Duration) -> HandleError {
        HandleError::Retry { reason: reason.into(), after, failed: None }
    }
    pub fn fail(reason: impl Into<String>) -> HandleError {
        HandleError::Fail { reason: reason.into(), failed: None }
    }
}

#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError>;
}

#[async_trait::async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Incoming) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), HandleError>> + Send + 'static,
{
    async fn handle(&self, msg: Incoming) -> Result<(), HandleError> {
        (self)(msg).await
    }
}

/// Runs `handler` over `consumer` until `shutdown` resolves, then drains in-flight handlers.
pub async fn run_loop(
    bus: Bus,
    consumer: PullConsumer,
    cfg: LoopConfig,
    handler: Arc<dyn Handler>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let sem = Arc::new(Semaphore::new(cfg.concurrency));
    let mut shutdown = std::pin::pin!(shutdown);
    let name = consumer.cached_info().config.durable_name.clone().unwrap_or_default();
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let want = 1 + sem.available_permits().min(63);
        let batch = consumer.fetch().max_messages(want).expires(Duration::from_secs(1)).messages();
        let mut batch = tokio::select! {
            _ = &mut shutdown => break,
            b = batch => match b {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "fetch failed; retrying");
                    drop(permit);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        let mut first = Some(permit);
        while let Some(m) = batch.next().await {
            let msg = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(consumer = %name, error = %e, "batch ended with error");
                    break;
                }
            };
            let permit = match first.take() {
                Some(p) => p,
                None => match sem.clone().try_acquire_owned() {
                    Ok(p) => p,
                    // Only this loop takes permits, so this does not happen; be safe anyway.
                    Err(_) => match sem.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                },
            };
            let bus = bus.clone();
            let handler = handler.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move {
                handle_one(bus, msg, cfg, handler).await;
                drop(permit);
            });
        }
    }
    // Drain: wait until every in-flight handler has returned its permit.
    let _ = sem.acquire_many(cfg.concurrency as u32).await;
    tracing::info!(consumer = %name, "consumer loop drained");
}

/// The span `handle` around one handled message: the operation's trace (`kit::trace`), the
/// incoming `traceparent`'s span as the parent when it is in that trace, a new span id.
fn handle_span(msg: &jetstream::Message, stage: Stage) -> tracing::Span {
    use crate::trace::{SpanId, TraceId, parse_traceparent};
    let subject = msg.subject.as_str();
    let op = if subject.starts_with("pn.replay.") {
        std::str::from_utf8(&msg.payload).ok().and_then(|s| OpId::parse(s.trim()).ok())
    } else {
        OpId::of_subject(subject)
    };
    let op = op.as_ref().map(OpId::as_str);
    let incoming = msg.headers.as_ref().and_then(|h| h.get(headers::TRACEPARENT)).and_then(|v| parse_traceparent(v.as_str()));
    let trace_id = match (op, incoming) {
        (Some(op), _) => TraceId::for_operation(op),
        (None, Some((t, _))) => t,
        (None, None) => TraceId::random(),
    };
    let parent = incoming.filter(|(t, _)| *t == trace_id).map(|(_, s)| s);
    tracing::info_span!(
        "handle",
        stage = stage.as_str(),
        op = op.unwrap_or(""),
        subject,
        trace_id = %trace_id,
        span_id = %SpanId::random(),
        parent_span_id = parent.map(tracing::field::display),
    )
}

async fn handle_one(bus: Bus, msg: jetstream::Message, cfg: LoopConfig, handler: Arc<dyn Handler>) {
    use tracing::Instrument;
    let span = handle_span(&msg, cfg.stage);
    handle_one_in_span(bus, msg, cfg, handler).instrument(span).await
}

async fn handle_one_in_span(bus: Bus, msg: jetstream::Message, cfg: LoopConfig, handler: Arc<dyn Handler>) {
    let (delivered, published) = msg.info().map(|i| (i.delivered, i.published)).unwrap_or((1, time::OffsetDateTime::now_utc()));
    if delivered == 1 {
        // Orchestration overhead: from the event's publication to this stage starting on it.
        let lag = (time::OffsetDateTime::now_utc() - published).as_seconds_f64().max(0.0);
        metrics::histogram!("pn_stage_pickup_seconds", "stage" => cfg.stage.as_str()).record(lag);
    }
    let incoming = Incoming {
        subject: msg.subject.to_string(),
        payload: msg.payload.clone(),
        headers: msg.headers.clone(),
        delivered,
    };
    let subject = incoming.subject.clone();
    let msg = Arc::new(msg);
    let progress = {
        let msg = msg.clone();
        let every = cfg.progress_every();
        CancelOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "progress ack failed");
                }
            }
        }))
    };
    // What this process holds, per operation (`kit::ops::held`, `GET /v1/ops/held`).
    let held_op = if subject.starts_with("pn.op.") { OpId::of_subject(&subject) } else { None };
    if let Some(op) = &held_op {
        crate::held::running(cfg.stage.as_str(), op, delivered);
    }
    let started = std::time::Instant::now();
    let res = handler.handle(incoming).await;
    drop(progress);
    if let Some(op) = &held_op {
        match &res {
            Err(HandleError::Park { reason, after }) => crate::held::parked(cfg.stage.as_str(), op, *after, reason, delivered),
            Err(HandleError::Retry { reason, after, .. }) if !(cfg.fails_operations && cfg.parking == 0 && delivered >= cfg.max_deliver) => crate::held::retrying(cfg.stage.as_str(), op, *after, reason, delivered),
            _ => crate::held::released(cfg.stage.as_str(), op),
        }
    }
    metrics::histogram!("pn_handler_seconds", "stage" => cfg.stage.as_str()).record(started.elapsed().as_secs_f64());
    let outcome = match &res {
        Ok(()) => "ok",
        Err(HandleError::Retry { .. }) => "retry",
        Err(HandleError::Fail { .. }) => "fail",
        Err(HandleError::Drop(_)) => "drop",
        Err(HandleError::Park { .. }) => "park",
    };
    // One line per handled message, in its `handle` span (trace_id, span_id): RUST_LOG=kit::bus=debug.
    tracing::debug!(delivered, outcome, elapsed_ms = started.elapsed().as_millis() as u64, "handled");
    match res {
        Ok(()) => {
            for _ in 0..3 {
                match msg.double_ack().await {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(%subject, error = %e, "ack not confirmed; retrying"),
                }
            }
        }
        Err(HandleError::Retry { reason, after, failed }) => {
            metrics::counter!("pn_handler_retries_total", "stage" => cfg.stage.as_str()).increment(1);
            if !cfg.fails_operations {
                // A failed report is not a failed operation: back off and try again, forever.
                let delay = retry_backoff(after, delivered, cfg.retry_cap);
                tracing::warn!(%subject, delivered, %reason, retry_in_ms = delay.as_millis() as u64, "will retry (this consumer never fails an operation)");
                if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(%subject, error = %e, "nak not sent; redelivery after AckWait");
                }
            // A parking consumer's deliveries include its parks: its handler counts attempts.
            } else if cfg.parking == 0 && delivered >= cfg.max_deliver {
                tracing::error!(%subject, delivered, %reason, "deliveries exhausted; failing the operation");
                fail_and_term(&bus, &msg, &subject, &cfg, reason, failed, delivered).await;
            } else {
                tracing::warn!(%subject, delivered, %reason, retry_in_ms = after.as_millis() as u64, "will retry");
                let _ = msg.ack_with(AckKind::Nak(Some(after))).await;
            }
        }
        Err(HandleError::Fail { reason, .. }) if !cfg.fails_operations => {
            metrics::counter!("pn_handler_terminated_total", "stage" => cfg.stage.as_str()).increment(1);
            tracing::error!(%subject, %reason, "message cannot be handled; terminated (this consumer never fails an operation)");
            let _ = msg.ack_with(AckKind::Term).await;
        }
        Err(HandleError::Fail { reason, failed }) => {
            tracing::error!(%subject, %reason, "operation failed");
            fail_and_term(&bus, &msg, &subject, &cfg, reason, failed, delivered).await;
        }
        Err(HandleError::Drop(reason)) => {
            tracing::warn!(%subject, %reason, "message dropped");
            let _ = msg.ack_with(AckKind::Term).await;
        }
        Err(HandleError::Park { reason, after }) => {
            metrics::counter!("pn_handler_parks_total", "stage" => cfg.stage.as_str()).increment(1);
            tracing::debug!(%subject, delivered, %reason, wake_in_ms = after.as_millis() as u64, "parked");
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(after))).await {
                // Without the nak the message comes back after AckWait instead: later, not lost.
                tracing::warn!(%subject, error = %e, "park nak not sent; redelivery after AckWait");
            }
        }
    }
}

async fn fail_and_term(
    bus: &Bus,
    msg: &jetstream::Message,
    subject: &str,
    cfg: &LoopConfig,
    reason: String,
    failed: Option<OpFailed>,
    delivered: i64,
) {
    let failed = match failed {
        Some(mut f) => {
            if f.reason.is_empty() {
                f.reason = reason;
            }
            f
        }
        None => {
            let op = OpId::of_subject(subject).filter(|_| !subject.starts_with("pn.replay."));
            let Some(op) = op else {
                tracing::error!(%subject, %reason, "poison message without an operation; terminated");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            };
            OpFailed::new(op.as_str(), cfg.stage.as_str(), reason, crate::now_ms())
        }
    };
    match bus.publish_failed(failed).await {
        Ok(()) => {
            let _ = msg.ack_with(AckKind::Term).await;
        }
        Err(e) => {
            tracing::error!(%subject, error = %e, delivered, "could not publish pn.op.failed; will retry");
            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(2)))).await;
        }
    }
}

mod tokio_util_shim {
    /// Aborts the task when dropped.
    pub struct CancelOnDrop(pub tokio::task::JoinHandle<()>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn incoming(subject: &str, payload: Vec<u8>) -> Incoming {
        Incoming { subject: subject.into(), payload: Bytes::from(payload), headers: None, delivered: 1 }
    }

    #[test]
    fn reports_only_backoff_doubles_per_delivery_up_to_the_cap() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let cap = s(60);
        assert_eq!(retry_backoff(s(2), 1, cap), s(2));
        assert_eq!(retry_backoff(s(2), 2, cap), s(4));
        assert_eq!(retry_backoff(s(2), 3, cap), s(8));
        assert_eq!(retry_backoff(s(2), 5, cap), s(32));
        assert_eq!(retry_backoff(s(2), 6, cap), cap);
        assert_eq!(retry_backoff(s(2), 7, cap), cap);
        // No overflow however often it was delivered; a delivery count below 1 is the first.
        assert_eq!(retry_backoff(s(2), i64::MAX, cap), cap);
        assert_eq!(retry_backoff(s(2), 0, cap), s(2));
        assert_eq!(retry_backoff(s(2), -5, cap), s(2));
        // A zero `after` still waits (no hot loop); a small cap wins over the base.
        assert_eq!(retry_backoff(Duration::ZERO, 1, cap), ms(100));
        assert_eq!(retry_backoff(Duration::ZERO, 4, cap), ms(800));
        assert_eq!(retry_backoff(s(2), 1, ms(500)), ms(500));
        // Monotone in the delivery count.
        let mut last = Duration::ZERO;
        for d in 1..100 {
            let b = retry_backoff(ms(250), d, cap);
            assert!(b >= last && b <= cap);
            last = b;
        }
    }

    #[test]
    fn only_a_failing_consumer_has_a_delivery_limit() {
        let c = LoopConfig::new(Stage::Deploy, 4, Duration::from_secs(5));
        assert!(c.fails_operations);
        assert_eq!(c.consumer_max_deliver(), 8);
        let r = c.clone().reports_only(Duration::from_secs(3));
        assert!(!r.fails_operations);
        assert_eq!(r.retry_cap, Duration::from_secs(3));
        assert_eq!(r.consumer_max_deliver(), -1);
        assert_eq!(c.with_parking(10).consumer_max_deliver(), -1);
    }

    #[test]
    fn replay_payloads_are_plain_operation_ids() {
        assert_eq!(incoming("pn.replay.deploy", b"op-1\n".to_vec()).replay_op_id().ok().map(OpId::into_string), Some("op-1".to_string()));
        for bad in [&b""[..], b"a b", b"pn.op.>", b"\xff\xfe", b"op*"] {
            assert!(incoming("pn.replay.deploy", bad.to_vec()).replay_op_id().is_err());
        }
    }

    #[test]
    fn inputs_decode_once_into_their_type() {
        let failed = Event::new(Body::Failed(OpFailed::new("op-1", "cloud", "r", 1))).to_bytes();
        let m = incoming("pn.op.failed.op-1", failed);
        assert_eq!(m.decode_as::<OpFailed>().map(|f| f.operation_id).ok(), Some("op-1".to_string()));
        assert_eq!(m.op_id().map(|o| o.to_string()), Some("op-1".to_string()));
        assert!(matches!(m.decode_as::<proto::NodeDeployed>(), Err(HandleError::Fail { reason, .. }) if reason == "expected pn.v1.NodeDeployed, got pn.v1.OpFailed"));
        assert!(matches!(m.observe_as::<proto::NodeDeployed>(), Err(HandleError::Drop(_))));
        let junk = incoming("pn.op.failed.a b", vec![0xff, 0xff]);
        assert!(matches!(junk.decode_as::<OpFailed>(), Err(HandleError::Fail { .. })));
        assert!(matches!(junk.observe_as::<OpFailed>(), Err(HandleError::Drop(_))));
        assert_eq!(junk.op_id(), None);
    }

    proptest! {
        #[test]
        fn any_payload_decodes_or_errors(bytes in prop::collection::vec(any::<u8>(), 0..512), subject in "[a-z.>*]{0,30}") {
            let m = incoming(&subject, bytes);
            let _ = m.decode();
            let _ = m.replay_op_id();
            let _ = m.subject_op_id();
        }
    }
}
