//! The `center` provider: Center's cloud tools (runbook steps 2–3).

use std::sync::Arc;

use crate::center::{Center, CloudInstance, CreateInstance};

use super::{Choice, Port, PortsOpened, Provider, ProviderError, Vps, cheapest_covering, newest_supported};

pub struct CenterProvider {
    center: Arc<dyn Center>,
    /// Account to use; empty picks the first account that has a default keypair.
    account: String,
}

impl CenterProvider {
    pub fn new(center: Arc<dyn Center>, account: String) -> CenterProvider {
        CenterProvider { center, account }
    }

    async fn account(&self) -> Result<String, ProviderError> {
        let accounts = self.center.list_cloud_accounts().await?;
        let found = if self.account.is_empty() {
            accounts.iter().find(|a| a.default_key_name.is_some())
        } else {
            accounts.iter().find(|a| a.account_name == self.account)
        };
        found
            .map(|a| a.account_name.clone())
            .ok_or_else(|| ProviderError::NoFit(format!("no cloud account {} with a default keypair", if self.account.is_empty() { "(any)" } else { &self.account })))
    }
}

fn vps(i: CloudInstance) -> Vps {
    Vps {
        id: i.id,
        name: i.name,
        status: i.status.to_lowercase(),
        ipv4: i.ipv4.filter(|s| !s.is_empty()),
        region: i.region,
        plan: i.plan,
        image: i.image_id,
        account: i.account_name,
    }
}

#[async_trait::async_trait]
impl Provider for CenterProvider {
    fn name(&self) -> &str {
        "center"
    }

    async fn find_by_name(&self, name: &str) -> Result<Vec<Vps>, ProviderError> {
        let all = self.center.list_cloud_instances(Some(name)).await?;
        Ok(all.into_iter().filter(|i| i.name == name).map(vps).collect())
    }

    async fn choose(&self, region: &str, min_transfer: u64) -> Result<Choice, ProviderError> {
        self.choose_os(region, min_transfer, &["ubuntu".to_string()]).await
    }

    async fn choose_os(&self, region: &str, min_transfer: u64, families: &[String]) -> Result<Choice, ProviderError> {
        let account = self.account().await?;
        let regions = self.center.list_cloud_regions(&account).await?;
        if !regions.iter().any(|r| r.id == region && r.available) {
            return Err(ProviderError::NoFit(format!("region {region} is not offered by account {account}")));
        }
        let plans = self.center.list_cloud_plans(&account, region).await?;
        let in_region: Vec<_> = plans.into_iter().filter(|p| p.regions.is_empty() || p.regions.iter().any(|r| r == region)).collect();
        let plan = cheapest_covering(&in_region, min_transfer, |p| p.transfer_bytes, |p| p.price_monthly).ok_or_else(|| {
            let best = in_region.iter().map(|p| p.transfer_bytes).max().unwrap_or(0);
            ProviderError::NoFit(format!(
                "no plan in {region} includes {} GiB of transfer (largest: {} GiB)",
                min_transfer >> 30,
                best >> 30
            ))
        })?;
        let images = self.center.list_cloud_images(&account, region).await?;
        let image = newest_supported(&images, families, |i| i.os.clone(), |i| i.version.clone()).ok_or_else(|| {
            ProviderError::NoFit(format!("no supported image ({}) in {region}", if families.is_empty() { "none asked".into() } else { families.join(", ") }))
        })?;
        Ok(Choice {
            account,
            region: region.to_string(),
            plan: plan.id.clone(),
            plan_transfer_bytes: plan.transfer_bytes,
            image: image.id.clone(),
        })
    }

    async fn create(&self, c: &Choice, name: &str) -> Result<Vps, ProviderError> {
        let req = CreateInstance {
            account_name: c.account.clone(),
            region: c.region.clone(),
            plan: c.plan.clone(),
            image_id: c.image.clone(),
            name: name.to_string(),
        };
        Ok(vps(self.center.create_cloud_instance(&req).await?))
    }

    async fn get(&self, id: &str) -> Result<Vps, ProviderError> {
        self.center.get_cloud_instance(id).await.map(vps).map_err(not_found)
    }

    async fn delete(&self, id: &str) -> Result<(), ProviderError> {
        self.center.delete_cloud_instance(id).await.map_err(not_found)
    }

    fn owns_account(&self, account: &str) -> bool {
        !account.is_empty() && (self.account.is_empty() || self.account == account)
    }

    /// One `open_cloud_instance_port` call a port (an assumed Center tool; a Center without
    /// it makes this `Unsupported`).
    async fn open_ports(&self, id: &str, ports: &[Port]) -> Result<PortsOpened, ProviderError> {
        for p in ports {
            match self.center.open_cloud_instance_port(id, p.port, p.protocol()).await {
                Ok(_) => {}
                Err(e) if e.is_unsupported() => return Ok(PortsOpened::Unsupported(e.to_string())),
                Err(e) => return Err(not_found(e)),
            }
        }
        Ok(PortsOpened::Opened)
    }

    /// From the account's provider (`list_cloud_accounts`) and the image's OS
    /// (`list_cloud_images` of its region; the image id's wording when it is not listed).
    async fn login_user(&self, vps: &Vps) -> Result<String, ProviderError> {
        let accounts = self.center.list_cloud_accounts().await?;
        let provider = accounts.iter().find(|a| a.account_name == vps.account).map(|a| a.provider.clone()).unwrap_or_default();
        let images = self.center.list_cloud_images(&vps.account, &vps.region).await?;
        let os = images.iter().find(|i| i.id == vps.image).map(|i| i.os.clone()).unwrap_or_else(|| super::os_of_image_name(&vps.image).to_string());
        Ok(super::login_user(&provider, &os).to_string())
    }
}

/// Center answers an unknown or deleted instance with 404, which `kit::center` files under
/// `Conflict` (with 409/410); for one instance by id it means "not there".
fn not_found(e: crate::center::CenterError) -> ProviderError {
    if e.is_conflict() { ProviderError::NotFound(e.to_string()) } else { e.into() }
}
