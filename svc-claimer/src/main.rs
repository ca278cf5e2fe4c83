#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: svc_claimer::Settings = kit::config::load()?;
    kit::telemetry::init(settings.common.log_format);
    svc_claimer::App::build(settings).await?.run(kit::shutdown::signal()).await
}
