//! One trace per operation (W3C trace context, OTLP export when configured).
//!
//! The trace id of an operation is fixed: the first 16 bytes of SHA-256 of `pn-trace:<operationId>`
//! ([`TraceId::for_operation`]). Every stage computes the same id, so the claim, the VPS, the
//! deploy, the verification and the meter's handling of one operation are one trace even when
//! a message was replayed by an operator or published before a restart. Each published event
//! carries `traceparent: 00-<trace id>-<publishing span id>-01`; the consumer loop
//! (`kit::bus::run_loop`) reads it and opens the span `handle` (fields `stage`, `op`,
//! `trace_id`, `span_id`, `parent_span_id`) around the handler. Center calls (`center.call`),
//! SSH (`ssh.connect`, `ssh.exec`) and provider calls (`provider.<method>`) are child spans
//! with their own `span_id` and the operation's `trace_id`.
//!
//! [`TraceLayer`] is the `tracing` layer that gives spans their ids: a span with a `trace_id`
//! field starts (or continues) that trace, any other span inherits its parent's. When an OTLP
//! endpoint is configured (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`), finished spans of a trace are posted in
//! batches as OTLP/HTTP JSON (`ExportTraceServiceRequest`); off by default. The exporter
//! never blocks a handler: a full queue drops spans (counted in
//! `pn_trace_spans_dropped_total`), a failed post is logged once per failure streak.
//! Span fields are what the code puts there: ids, tool and method names, hosts, never a secret.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::span::{Attributes, Id, Record};
use tracing::{Subscriber, field::Field};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// A W3C trace id (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A W3C span id (8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// The operation's trace id: the first 16 bytes of SHA-256 of `pn-trace:<operationId>`.
    pub fn for_operation(operation_id: &str) -> TraceId {
        let h = Sha256::digest(format!("pn-trace:{operation_id}").as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&h[..16]);
        TraceId(b)
    }

    /// A random trace id (work that belongs to no operation).
    pub fn random() -> TraceId {
        loop {
            let b: [u8; 16] = rand::random();
            if b != [0; 16] {
                return TraceId(b);
            }
        }
    }

    pub fn parse(s: &str) -> Option<TraceId> {
        let mut b = [0u8; 16];
        hex::decode_to_slice(s, &mut b).ok()?;
        (b != [0; 16] && s.bytes().all(|c| !c.is_ascii_uppercase())).then_some(TraceId(b))
    }
}

impl SpanId {
    pub fn random() -> SpanId {
        loop {
            let b: [u8; 8] = rand::random();
            if b != [0; 8] {
                return SpanId(b);
            }
        }
    }

    pub fn parse(s: &str) -> Option<SpanId> {
        let mut b = [0u8; 8];
        hex::decode_to_slice(s, &mut b).ok()?;
        (b != [0; 8] && s.bytes().all(|c| !c.is_ascii_uppercase())).then_some(SpanId(b))
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Display for SpanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// `00-<trace id>-<span id>-01`.
pub fn traceparent(trace: TraceId, span: SpanId) -> String {
    format!("00-{trace}-{span}-01")
}

/// Parses a `traceparent` header (version 00, or a later version read as 00 demands); garbage
/// is `None`, never an error: a hostile header only loses its parent link.
pub fn parse_traceparent(s: &str) -> Option<(TraceId, SpanId)> {
    let s = s.trim();
    let mut parts = s.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || flags.len() != 2 || hex::decode(version).is_err() || hex::decode(flags).is_err() {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    Some((TraceId::parse(trace)?, SpanId::parse(span)?))
}

/// The trace context of a span (kept in its extensions by [`TraceLayer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
}

/// The trace context of the current span, if it belongs to a trace (and [`TraceLayer`] is
/// installed).
pub fn current() -> Option<SpanContext> {
    tracing::Span::current()
        .with_subscriber(|(id, dispatch)| {
            let reg = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            let span = reg.span(id)?;
            let ext = span.extensions();
            ext.get::<Data>().map(|d| d.ctx)
        })
        .flatten()
}

/// The `traceparent` to publish an event of `operation_id` with: the operation's trace id and
/// the current span as the parent when it is in that trace, else a new span id.
pub fn traceparent_for(operation_id: &str) -> String {
    let trace = if operation_id.is_empty() { current().map(|c| c.trace_id).unwrap_or_else(TraceId::random) } else { TraceId::for_operation(operation_id) };
    let span = current().filter(|c| c.trace_id == trace).map(|c| c.span_id).unwrap_or_else(SpanId::random);
    traceparent(trace, span)
}

/// A span that starts (or continues) the trace of `operation_id`: what work on an operation
/// outside a consumer loop runs in (the claimer's claim, a lease renewal).
pub fn operation_span(name: &'static str, stage: &'static str, operation_id: &str) -> tracing::Span {
    let trace = TraceId::for_operation(operation_id);
    let parent = current().filter(|c| c.trace_id == trace).map(|c| c.span_id);
    let span_id = SpanId::random();
    tracing::info_span!(
        "op",
        otel.name = name,
        stage,
        op = operation_id,
        trace_id = %trace,
        span_id = %span_id,
        parent_span_id = parent.map(tracing::field::display)
    )
}

/// Records the current trace's `trace_id` into `span` (declared with `trace_id = Empty`), so
/// log lines inside a child span (a Center, SSH or provider call) carry it as the span's own
/// field. The layer links the span to its parent's trace either way.
pub fn with_trace_id(span: tracing::Span) -> tracing::Span {
    if let Some(c) = span.with_subscriber(|(id, dispatch)| {
        let reg = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let s = reg.span(id)?;
        let ext = s.extensions();
        ext.get::<Data>().map(|d| d.ctx)
    }).flatten() {
        span.record("trace_id", tracing::field::display(c.trace_id));
    }
    span
}

// ---------------------------------------------------------------------------------------------
// The layer.

/// What the layer keeps per span in a trace.
struct Data {
    ctx: SpanContext,
    name: String,
    start: SystemTime,
    /// Exported attributes (only collected when exporting).
    attrs: Vec<(String, String)>,
}

/// Gives spans their trace context and, when exporting, sends finished ones to the exporter.
pub struct TraceLayer {
    export: Option<mpsc::Sender<Finished>>,
}

impl TraceLayer {
    /// Without export: ids for the logs and for `traceparent` only.
    pub fn new() -> TraceLayer {
        TraceLayer { export: None }
    }

    /// Exports finished spans through `tx` (see [`spawn_exporter`]).
    pub fn exporting(tx: mpsc::Sender<Finished>) -> TraceLayer {
        TraceLayer { export: Some(tx) }
    }
}

impl Default for TraceLayer {
    fn default() -> Self {
        TraceLayer::new()
    }
}

#[derive(Default)]
struct Fields {
    trace_id: Option<TraceId>,
    span_id: Option<SpanId>,
    parent_span_id: Option<SpanId>,
    otel_name: Option<String>,
    attrs: Vec<(String, String)>,
    collect: bool,
}

const MAX_ATTRS: usize = 24;
const MAX_ATTR_LEN: usize = 256;

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "trace_id" => self.trace_id = TraceId::parse(&value),
            "span_id" => self.span_id = SpanId::parse(&value),
            "parent_span_id" => self.parent_span_id = SpanId::parse(&value),
            "otel.name" => self.otel_name = Some(value),
            name if self.collect && self.attrs.len() < MAX_ATTRS => {
                let v: String = value.chars().take(MAX_ATTR_LEN).collect();
                self.attrs.push((name.to_string(), v));
            }
            _ => {}
        }
    }
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl<S> Layer<S> for TraceLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut f = Fields { collect: self.export.is_some(), ..Default::default() };
        attrs.record(&mut f);
        let parent = span.parent().and_then(|p| p.extensions().get::<Data>().map(|d| d.ctx));
        let (trace_id, parent_span_id) = match (f.trace_id, parent) {
            (Some(t), p) => (t, f.parent_span_id.or(p.filter(|p| p.trace_id == t).map(|p| p.span_id))),
            (None, Some(p)) => (p.trace_id, Some(p.span_id)),
            (None, None) => return,
        };
        let ctx = SpanContext { trace_id, span_id: f.span_id.unwrap_or_else(SpanId::random), parent_span_id };
        let name = f.otel_name.unwrap_or_else(|| span.name().to_string());
        span.extensions_mut().insert(Data { ctx, name, start: SystemTime::now(), attrs: f.attrs });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if self.export.is_none() {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(d) = ext.get_mut::<Data>() else { return };
        let mut f = Fields { collect: true, ..Default::default() };
        values.record(&mut f);
        for (k, v) in f.attrs {
            if let Some(slot) = d.attrs.iter_mut().find(|(n, _)| *n == k) {
                slot.1 = v;
            } else if d.attrs.len() < MAX_ATTRS {
                d.attrs.push((k, v));
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(tx) = &self.export else { return };
        let Some(span) = ctx.span(&id) else { return };
        let Some(d) = span.extensions_mut().remove::<Data>() else { return };
        let kind = match d.name.split('.').next().unwrap_or("") {
            "handle" => SPAN_KIND_CONSUMER,
            "center" | "ssh" | "provider" => SPAN_KIND_CLIENT,
            _ => SPAN_KIND_INTERNAL,
        };
        let finished = Finished { ctx: d.ctx, name: d.name, kind, start: d.start, end: SystemTime::now(), attrs: d.attrs };
        PENDING.fetch_add(1, Ordering::SeqCst);
        if tx.try_send(finished).is_err() {
            PENDING.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!("pn_trace_spans_dropped_total").increment(1);
        }
    }
}

const SPAN_KIND_INTERNAL: u8 = 1;
const SPAN_KIND_CLIENT: u8 = 3;
const SPAN_KIND_CONSUMER: u8 = 5;

/// A finished span on its way to the exporter.
#[derive(Debug, Clone)]
pub struct Finished {
    pub ctx: SpanContext,
    pub name: String,
    kind: u8,
    start: SystemTime,
    end: SystemTime,
    attrs: Vec<(String, String)>,
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).to_string()
}

// ---------------------------------------------------------------------------------------------
// The exporter: OTLP/HTTP with the JSON encoding, batches of finished spans.

static SERVICE: OnceLock<String> = OnceLock::new();

/// Spans handed to the exporter and not yet posted (or dropped).
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Waits until every span handed to the exporter was posted (or dropped), for at most
/// `patience`: what a service does before it exits, so its last spans are not lost.
pub async fn flush(patience: Duration) {
    let deadline = tokio::time::Instant::now() + patience;
    while PENDING.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `service.name` resource attribute of exported spans (`OTEL_SERVICE_NAME` wins; else
/// the service that calls this at start; else the program's file name).
pub fn set_service_name(name: &str) {
    let _ = SERVICE.set(name.to_string());
}

fn service_name() -> String {
    if let Ok(n) = std::env::var("OTEL_SERVICE_NAME")
        && !n.trim().is_empty()
    {
        return n;
    }
    if let Some(n) = SERVICE.get() {
        return n.clone();
    }
    std::env::args()
        .next()
        .and_then(|a| std::path::Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "pnp".into())
}

/// The OTLP/HTTP traces URL from the environment: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as
/// given, else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`; `OTEL_TRACES_EXPORTER=none` turns
/// export off. None: no export (the default).
pub fn endpoint_from_env() -> Option<String> {
    let get = |k: &str| std::env::var(k).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    if get("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none") {
        return None;
    }
    if let Some(u) = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Some(u);
    }
    get("OTEL_EXPORTER_OTLP_ENDPOINT").map(|u| format!("{}/v1/traces", u.trim_end_matches('/')))
}

/// The OTLP/HTTP JSON body (`ExportTraceServiceRequest`) for `spans` of `service`.
pub fn otlp_json(service: &str, spans: &[Finished]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut v = json!({
                "traceId": s.ctx.trace_id.to_string(),
                "spanId": s.ctx.span_id.to_string(),
                "name": s.name,
                "kind": s.kind,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": s.attrs.iter().map(|(k, v)| json!({"key": k, "value": {"stringValue": v}})).collect::<Vec<_>>(),
            });
            if let Some(p) = s.ctx.parent_span_id {
                v["parentSpanId"] = json!(p.to_string());
            }
            v
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
            "scopeSpans": [{"scope": {"name": "pnp", "version": env!("CARGO_PKG_VERSION")}, "spans": spans}]
        }]
    })
}

/// How many finished spans may wait for the exporter before new ones are dropped.
pub const QUEUE: usize = 8192;
const BATCH: usize = 512;
const INTERVAL: Duration = Duration::from_millis(500);

/// Starts the exporter task on the current tokio runtime: batches of up to 512 spans, posted
/// at least every 500 ms to `url` with a 5 s timeout. A failed post drops its batch (tracing
/// must not hold the pipeline) and is logged once per streak of failures.
pub fn spawn_exporter(url: String) -> Option<mpsc::Sender<Finished>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    crate::init_crypto();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().ok()?;
    let (tx, mut rx) = mpsc::channel::<Finished>(QUEUE);
    handle.spawn(async move {
        let mut failing = false;
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let first = match rx.recv().await {
                Some(s) => s,
                None => break,
            };
            batch.push(first);
            let deadline = tokio::time::Instant::now() + INTERVAL;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    Ok(None) | Err(_) => break,
                }
            }
            let body = otlp_json(&service_name(), &batch);
            let res = client.post(&url).json(&body).send().await.map_err(|e| e.to_string()).and_then(|r| {
                if r.status().is_success() { Ok(()) } else { Err(format!("HTTP {}", r.status().as_u16())) }
            });
            match res {
                Ok(()) => failing = false,
                Err(e) => {
                    metrics::counter!("pn_trace_spans_dropped_total").increment(batch.len() as u64);
                    if !failing {
                        // Outside any span: this line is not itself traced.
                        tracing::warn!(error = %e, spans = batch.len(), "OTLP export failed; spans dropped until it works again");
                    }
                    failing = true;
                }
            }
            PENDING.fetch_sub(batch.len(), Ordering::SeqCst);
            batch.clear();
        }
    });
    Some(tx)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn an_operations_trace_id_is_fixed_and_differs_between_operations() {
        let a = TraceId::for_operation("op-1");
        assert_eq!(a, TraceId::for_operation("op-1"));
        assert_ne!(a, TraceId::for_operation("op-2"));
        assert_eq!(a.to_string().len(), 32);
    }

    #[test]
    fn traceparent_round_trips_and_garbage_is_none() {
        let t = TraceId::for_operation("x");
        let s = SpanId::random();
        assert_eq!(parse_traceparent(&traceparent(t, s)), Some((t, s)));
        for bad in [
            "",
            "00",
            "00-xyz-0102030405060708-01",
            "00-00000000000000000000000000000000-0102030405060708-01",
            "00-0102030405060708090a0b0c0d0e0f10-0000000000000000-01",
            "ff-0102030405060708090a0b0c0d0e0f10-0102030405060708-01",
            "00-0102030405060708090A0B0C0D0E0F10-0102030405060708-01",
            "00-0102030405060708090a0b0c0d0e0f10-0102030405060708-01-extra",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn spans_inherit_the_trace_and_export_as_otlp_json() {
        use tracing_subscriber::layer::SubscriberExt;
        let (tx, mut rx) = mpsc::channel(64);
        let sub = tracing_subscriber::registry().with(TraceLayer::exporting(tx));
        let trace = TraceId::for_operation("op-7");
        tracing::subscriber::with_default(sub, || {
            let root = operation_span("claim", "claim", "op-7");
            let _g = root.enter();
            let c = current().unwrap();
            assert_eq!(c.trace_id, trace);
            let tp = traceparent_for("op-7");
            assert_eq!(parse_traceparent(&tp), Some((trace, c.span_id)));
            let child = with_trace_id(tracing::info_span!("center.call", tool = "claim_node_operation", trace_id = tracing::field::Empty));
            let _c = child.enter();
            let cc = current().unwrap();
            assert_eq!((cc.trace_id, cc.parent_span_id), (trace, Some(c.span_id)));
            assert_ne!(cc.span_id, c.span_id);
        });
        let mut got = Vec::new();
        while let Ok(s) = rx.try_recv() {
            got.push(s);
        }
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|s| s.ctx.trace_id == trace));
        let body = otlp_json("svc-test", &got);
        let spans = body["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array().unwrap();
        let names: Vec<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["center.call", "claim"]);
        assert_eq!(spans[0]["kind"], 3);
        assert_eq!(spans[0]["parentSpanId"], spans[1]["spanId"]);
        assert!(spans.iter().all(|s| s["traceId"] == trace.to_string()));
        assert!(spans[0]["attributes"].as_array().unwrap().iter().any(|a| a["key"] == "tool"));
    }

    #[test]
    fn a_span_outside_any_trace_gets_no_context() {
        use tracing_subscriber::layer::SubscriberExt;
        let sub = tracing_subscriber::registry().with(TraceLayer::new());
        tracing::subscriber::with_default(sub, || {
            let s = tracing::info_span!("poll");
            let _g = s.enter();
            assert_eq!(current(), None);
        });
    }
}
