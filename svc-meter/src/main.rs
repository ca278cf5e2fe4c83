//! svc-meter: usage ingest, quota ledger and the 95 % cutoff. Configured only by `PN_*`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: svc_meter::Settings = kit::config::load()?;
    kit::telemetry::init(settings.common.log_format);
    svc_meter::App::build(settings).await?.run(kit::shutdown::signal()).await
}
