#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: svc_verifier::Settings = kit::config::load()?;
    kit::telemetry::init(settings.common.log_format);
    svc_verifier::App::build(settings).await?.run(kit::shutdown::signal()).await
}
