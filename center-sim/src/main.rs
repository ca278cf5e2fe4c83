//! `center-sim`: see the library. Prints `center-sim listening on http://ADDR` as its first
//! stdout line (scripts and tests read it), then serves until SIGTERM/Ctrl-C.

use std::io::Write;

use kit::config::LogFormat;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let format = match std::env::var("PN_LOG_FORMAT").unwrap_or_default().as_str() {
        "json" => LogFormat::Json,
        "human" => LogFormat::Human,
        _ => LogFormat::Auto,
    };
    kit::telemetry::init(format);
    let settings = center_sim::Settings::load();
    let app = center_sim::App::build(settings).await?;
    let mut out = std::io::stdout();
    writeln!(out, "center-sim listening on {}", app.base_url())?;
    out.flush()?;
    app.run(kit::shutdown::signal()).await
}
