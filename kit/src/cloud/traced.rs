//! Every provider call in a span `provider.<method>` (kit::trace): the provider's name and the
//! call's ids or names, never a token. `build` wraps each provider it makes in [`Traced`].

use std::sync::Arc;

use tracing::Instrument;

use super::{Choice, PortsOpened, Port, Provider, ProviderError, Vps};

/// A provider whose calls are traced; behaves exactly as the provider it wraps.
pub struct Traced(pub Arc<dyn Provider>);

fn span(method: &'static str, provider: &str, target: &str) -> tracing::Span {
    crate::trace::with_trace_id(tracing::info_span!(
        "provider.call",
        otel.name = method,
        method,
        provider,
        target,
        trace_id = tracing::field::Empty
    ))
}

#[async_trait::async_trait]
impl Provider for Traced {
    fn name(&self) -> &str {
        self.0.name()
    }
    async fn find_by_name(&self, name: &str) -> Result<Vec<Vps>, ProviderError> {
        self.0.find_by_name(name).instrument(span("provider.find_by_name", self.0.name(), name)).await
    }
    async fn choose(&self, region: &str, min_transfer: u64) -> Result<Choice, ProviderError> {
        self.0.choose(region, min_transfer).instrument(span("provider.choose", self.0.name(), region)).await
    }
    async fn create(&self, choice: &Choice, name: &str) -> Result<Vps, ProviderError> {
        self.0.create(choice, name).instrument(span("provider.create", self.0.name(), name)).await
    }
    async fn get(&self, id: &str) -> Result<Vps, ProviderError> {
        self.0.get(id).instrument(span("provider.get", self.0.name(), id)).await
    }
    async fn delete(&self, id: &str) -> Result<(), ProviderError> {
        self.0.delete(id).instrument(span("provider.delete", self.0.name(), id)).await
    }
    async fn choose_os(&self, region: &str, min_transfer: u64, families: &[String]) -> Result<Choice, ProviderError> {
        self.0.choose_os(region, min_transfer, families).instrument(span("provider.choose", self.0.name(), region)).await
    }
    async fn open_ports(&self, id: &str, ports: &[Port]) -> Result<PortsOpened, ProviderError> {
        self.0.open_ports(id, ports).instrument(span("provider.open_ports", self.0.name(), id)).await
    }
    async fn login_user(&self, vps: &Vps) -> Result<String, ProviderError> {
        self.0.login_user(vps).instrument(span("provider.login_user", self.0.name(), &vps.id)).await
    }
    fn owns_account(&self, account: &str) -> bool {
        self.0.owns_account(account)
    }
}
