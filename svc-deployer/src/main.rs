use svc_deployer::{App, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings: Settings = kit::config::load()?;
    kit::telemetry::init(settings.common.log_format);
    App::build(settings).await?.run(kit::shutdown::signal()).await
}
