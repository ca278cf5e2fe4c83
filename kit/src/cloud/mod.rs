//! Providers behind one trait, chosen by configuration (`PN_PROVIDER`): `center` (Center's
//! brokered cloud tools, the runbook's path) and `hetzner` (the Hetzner Cloud API directly).
//! svc-cloud creates, probes and deletes through it; svc-deployer and svc-meter only read
//! (`get`), to check an event against the world before they act on it (`confirm_instance`).

pub mod center;
pub mod hetzner;

use std::sync::Arc;

use crate::center::Center;

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

impl From<crate::center::CenterError> for ProviderError {
    fn from(e: crate::center::CenterError) -> Self {
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
    /// Whether an instance the provider shows under `account` is in an account this service
    /// works with (the configured one, when one is configured).
    fn owns_account(&self, account: &str) -> bool {
        !account.is_empty()
    }
}

/// Builds the provider `kind` names (`PN_PROVIDER`: `center` | `hetzner`). `account` is the
/// `center` provider's cloud account (`PN_ACCOUNT`; empty = the first with a default
/// keypair). `create` needs the Hetzner admin public key; a service that only reads
/// (`readonly`) may leave it unset and should be given a read-only Hetzner token.
pub fn build(kind: &str, account: &str, hetzner: &hetzner::HetznerSettings, center: Arc<dyn Center>, readonly: bool) -> Result<Arc<dyn Provider>, ProviderError> {
    match kind {
        "center" => Ok(Arc::new(center::CenterProvider::new(center, account.to_string()))),
        "hetzner" if readonly => Ok(Arc::new(hetzner::Hetzner::reader(hetzner)?)),
        "hetzner" => Ok(Arc::new(hetzner::Hetzner::new(hetzner)?)),
        other => Err(ProviderError::Permanent(format!("PN_PROVIDER: unknown provider {other:?} (center | hetzner)"))),
    }
}

/// What an event says about an instance, to be checked against the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim<'a> {
    pub instance_id: &'a str,
    /// `pn-<subId>` of the operation.
    pub name: &'a str,
    pub ipv4: &'a str,
    /// The account the event names; empty when it names none.
    pub account: &'a str,
}

/// The provider's verdict on a `Claim`.
#[derive(Debug, Clone, PartialEq)]
pub enum Confirmation {
    /// The provider shows the instance: this id, this name, one of our accounts, this IPv4.
    Confirmed(Vps),
    /// The provider contradicts the event (or does not know the instance): never act on it.
    Mismatch(String),
    /// The provider did not answer: nothing may be concluded; ask again later.
    Unanswered(String),
}

/// "Check the world before a secret moves" (DESIGN.md, Safety rules): asks the provider for
/// `claim.instance_id` and confirms that it exists (not deleted), is named `claim.name`, is in
/// an account this service works with (and the event's, when it names one) and has the
/// public IPv4 `claim.ipv4`. Reasons name ids and addresses only.
pub async fn confirm_instance(p: &dyn Provider, claim: &Claim<'_>) -> Confirmation {
    let id = claim.instance_id.trim();
    if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control() || c == '/') {
        return Confirmation::Mismatch(format!("instance id {:?} is not one a provider issues", clip(id)));
    }
    let v = match p.get(id).await {
        Ok(v) => v,
        Err(ProviderError::NotFound(_)) => return Confirmation::Mismatch(format!("the provider ({}) does not know instance {}", p.name(), clip(id))),
        Err(e) => return Confirmation::Unanswered(format!("provider ({}): get {} failed ({})", p.name(), clip(id), clip(&e.to_string()))),
    };
    let why = if v.id != id {
        Some(format!("the provider answered instance {} for {}", clip(&v.id), clip(id)))
    } else if v.is_gone() {
        Some(format!("instance {} is {}", clip(id), clip(&v.status)))
    } else if v.name != claim.name {
        Some(format!("instance {} is named {:?}, not {:?}", clip(id), clip(&v.name), clip(claim.name)))
    } else if !p.owns_account(&v.account) || (!claim.account.is_empty() && v.account != claim.account) {
        Some(format!("instance {} is in account {:?}, not ours{}", clip(id), clip(&v.account), if claim.account.is_empty() { String::new() } else { format!(" ({:?})", clip(claim.account)) }))
    } else if v.ipv4.as_deref().map(str::trim) != Some(claim.ipv4.trim()) {
        Some(format!("instance {} has IPv4 {}, not {}", clip(id), v.ipv4.as_deref().map(clip).unwrap_or_else(|| "none".into()), clip(claim.ipv4)))
    } else {
        None
    };
    match why {
        Some(w) => Confirmation::Mismatch(w),
        None => Confirmation::Confirmed(v),
    }
}

fn clip(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
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
