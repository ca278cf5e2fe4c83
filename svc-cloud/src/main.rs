#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: svc_cloud::Settings = kit::config::load()?;
    kit::telemetry::init(settings.common.log_format);
    svc_cloud::App::build(settings).await?.run(kit::shutdown::signal()).await
}
