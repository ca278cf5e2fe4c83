//! Tracing set-up: a service's logs on stdout ([`init_stdout`]; a tool's — pnctl, center-sim,
//! pn-ingress, whose stdout is their output — on stderr, [`init`]), human on a terminal, JSON
//! elsewhere (containers, log files), filtered by `RUST_LOG` (default `info`), and the trace context of `kit::trace`
//! (one trace per operation; a JSON line inside a handler carries the operation's `trace_id`
//! in its `span`/`spans`). Finished spans are exported over OTLP/HTTP JSON when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; off by
//! default. Secrets are `SecretString`s or sealed bytes and cannot be formatted into a log
//! line or a span field (their `Debug` is redacted; they have no `Display`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;
use crate::trace::TraceLayer;

/// A tool's logs: on stderr (its stdout is its output). See [`init_stdout`].
pub fn init(format: LogFormat) {
    init_with(format, false)
}

/// A service's logs: on stdout, where a container's logs are collected. Installs the global
/// subscriber once; later calls are no-ops. Call it inside the tokio runtime: the OTLP
/// exporter, when configured, is a task on it.
pub fn init_stdout(format: LogFormat) {
    init_with(format, true)
}

fn init_with(format: LogFormat, stdout: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto if stdout => !std::io::stdout().is_terminal(),
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let endpoint = crate::trace::endpoint_from_env();
    let layer = match endpoint.as_deref().and_then(|u| crate::trace::spawn_exporter(u.to_string())) {
        Some(tx) => TraceLayer::exporting(tx),
        None => TraceLayer::new(),
    };
    let writer = tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || -> Box<dyn std::io::Write> {
        if stdout { Box::new(std::io::stdout()) } else { Box::new(std::io::stderr()) }
    });
    let (json_layer, human_layer) = if json {
        let l = tracing_subscriber::fmt::layer().json().flatten_event(true).with_current_span(true).with_span_list(true).with_writer(writer);
        (Some(l), None)
    } else {
        (None, Some(tracing_subscriber::fmt::layer().with_writer(writer)))
    };
    let installed = tracing_subscriber::registry().with(filter).with(layer).with(json_layer).with(human_layer).try_init().is_ok();
    if installed && let Some(url) = endpoint {
        tracing::info!(endpoint = %redact(&url), "exporting spans over OTLP/HTTP");
    }
}

/// The endpoint without userinfo or query (either may hold a credential).
fn redact(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or("");
    let Some((scheme, rest)) = no_query.split_once("://") else { return no_query.to_string() };
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, String::new()));
    let host = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_logged_endpoint_has_no_credentials() {
        assert_eq!(super::redact("https://u:p@otel:4318/v1/traces?token=x"), "https://otel:4318/v1/traces");
        assert_eq!(super::redact("http://otel:4318/v1/traces"), "http://otel:4318/v1/traces");
    }
}
