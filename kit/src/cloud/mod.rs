//! Providers behind one trait, chosen by configuration: `center` (Center's brokered cloud
//! tools, the runbook's path) and `hetzner` (the Hetzner Cloud API directly).

pub mod center;
pub mod hetzner;

/// A VPS as a provider reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Vps {
    pub id: String,
    pub name: String,
    /// `pending`, `running`, `deleted`, … (lower-case)
    pub status: String,
    pub ipv4: Option<String>,
    pub region: String,
    pub plan: String,
    pub image: String,
    pub account: String,
}

impl Vps {
    pub fn is_gone(&self) -> bool {
        matches!(self.status.as_str(), "deleted" | "deleting" | "terminated" | "off_deleted")
    }
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }
}

/// What to create: the result of discovery.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub account: String,
    pub region: String,
    pub plan: String,
    pub plan_transfer_bytes: u64,
    pub image: String,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ProviderError {
    /// Worth trying again later (API outage, rate limit, "plan unavailable" capacity errors).
    #[error("{0}")]
    Transient(String),
    /// Nothing fits (no plan covers the quota, no Ubuntu image, unknown region).
    #[error("{0}")]
    NoFit(String),
    /// Anything else that will not work by retrying.
    #[error("{0}")]
    Permanent(String),
    /// The provider does not know the instance (deleted, or never existed): `get` and `delete`.
    #[error("{0}")]
    NotFound(String),
}

impl From<kit::center::CenterError> for ProviderError {
    fn from(e: kit::center::CenterError) -> Self {
        if e.is_transient() { ProviderError::Transient(e.to_string()) } else { ProviderError::Permanent(e.to_string()) }
    }
}

#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    fn name(&self) -> &str;
    /// Every instance with exactly this name (the `pn-<subId>` idempotency probe).
    async fn find_by_name(&self, name: &str) -> Result<Vec<Vps>, ProviderError>;
    /// Picks account, plan and image for `region`: the cheapest plan whose included transfer
    /// is at least `min_transfer`, the newest Ubuntu LTS among 24.04/22.04/20.04.
    async fn choose(&self, region: &str, min_transfer: u64) -> Result<Choice, ProviderError>;
    async fn create(&self, choice: &Choice, name: &str) -> Result<Vps, ProviderError>;
    /// One instance by id; `NotFound` when the provider does not know it (any more).
    async fn get(&self, id: &str) -> Result<Vps, ProviderError>;
    /// Deletes one instance; `NotFound` when it is already gone.
    async fn delete(&self, id: &str) -> Result<(), ProviderError>;
}

/// The Ubuntu LTS versions the prep script supports, newest first.
pub const UBUNTU_LTS: [&str; 3] = ["24.04", "22.04", "20.04"];

/// Picks the cheapest plan that covers `min_transfer`, ties broken by the larger transfer.
pub fn cheapest_covering<T>(plans: &[T], min_transfer: u64, transfer: impl Fn(&T) -> u64, price: impl Fn(&T) -> f64) -> Option<&T> {
    plans
        .iter()
        .filter(|p| transfer(p) >= min_transfer)
        .min_by(|a, b| price(a).total_cmp(&price(b)).then(transfer(b).cmp(&transfer(a))))
}

/// Picks the newest supported Ubuntu LTS; `version_of` gives e.g. "22.04", `is_ubuntu` the OS.
pub fn newest_ubuntu<T>(images: &[T], is_ubuntu: impl Fn(&T) -> bool, version_of: impl Fn(&T) -> String) -> Option<&T> {
    UBUNTU_LTS.iter().find_map(|v| images.iter().find(|i| is_ubuntu(i) && version_of(i) == *v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_cheapest_covering_plan() {
        let plans = [("a", 1u64 << 40, 5.0), ("b", 2u64 << 40, 10.0), ("c", 3u64 << 40, 9.0)];
        let p = cheapest_covering(&plans, (1u64 << 40) + 1, |p| p.1, |p| p.2);
        assert_eq!(p.map(|p| p.0), Some("c"));
        assert_eq!(cheapest_covering(&plans, 4u64 << 40, |p| p.1, |p| p.2), None);
    }

    #[test]
    fn picks_newest_lts_ubuntu_only() {
        let imgs = [("debian", "12"), ("ubuntu", "20.04"), ("ubuntu", "22.04"), ("ubuntu", "23.10")];
        let i = newest_ubuntu(&imgs, |i| i.0 == "ubuntu", |i| i.1.to_string());
        assert_eq!(i, Some(&("ubuntu", "22.04")));
        assert_eq!(newest_ubuntu(&imgs[..1], |i| i.0 == "ubuntu", |i| i.1.to_string()), None);
    }
}
