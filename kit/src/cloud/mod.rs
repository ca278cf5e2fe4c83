//! Providers behind one trait, chosen by configuration (`PN_PROVIDER`): `center` (Center's
//! brokered cloud tools, the runbook's path) and `hetzner` (the Hetzner Cloud API directly).
//! svc-cloud creates, probes, opens the provider firewall (`open_ports`) and deletes through
//! it; svc-deployer and svc-meter only read (`get`, `login_user`), to check an event against
//! the world before they act on it (`confirm_instance`) and to log in as the image's user.
//! [`Providers`] holds the configured provider and the alternate one (`PN_ALT_PROVIDER`).

pub mod center;
pub mod hetzner;
mod traced;

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

/// A port to open in a provider's firewall: `1022/tcp`, `443/udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port {
    pub port: u16,
    pub udp: bool,
}

impl Port {
    pub const fn tcp(port: u16) -> Port {
        Port { port, udp: false }
    }

    pub fn protocol(&self) -> &'static str {
        if self.udp { "udp" } else { "tcp" }
    }

    /// `1022/tcp`, `443/udp`, or a bare `1022` (tcp).
    pub fn parse(s: &str) -> Result<Port, String> {
        let s = s.trim();
        let (n, proto) = s.split_once('/').unwrap_or((s, "tcp"));
        let port: u16 = n.trim().parse().ok().filter(|p| *p > 0).ok_or_else(|| format!("{s:?} is not a port (1-65535)"))?;
        match proto.trim() {
            "tcp" => Ok(Port { port, udp: false }),
            "udp" => Ok(Port { port, udp: true }),
            _ => Err(format!("{s:?}: the protocol must be tcp or udp")),
        }
    }

    /// A comma-separated list (`22/tcp,1022/tcp,443/tcp,443/udp`); duplicates dropped.
    pub fn parse_list(s: &str) -> Result<Vec<Port>, String> {
        let mut out: Vec<Port> = Vec::new();
        for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let p = Port::parse(p)?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol())
    }
}

/// What `open_ports` achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortsOpened {
    /// The provider's firewall lets these ports in now.
    Opened,
    /// This provider (or this Center) has no way to open ports: the reason. Whether the node
    /// is reachable is then the deployer's outside check to find out.
    Unsupported(String),
}

/// The node's admin user once the prep has run (`PermitRootLogin no`) on an image that let
/// only root in: `provision-node.sh` makes it from root's keys with passwordless sudo (its
/// `ADMIN_USER`), and the Hetzner user-data makes it at first boot (seed 001 §3.a). On images
/// whose user is not root, that user stays the admin.
pub const ADMIN_USER: &str = "pnadmin";

/// The user the deployer reaches a node as after the prep, given the image's `login_user`.
pub fn admin_user(login_user: &str) -> &str {
    if login_user == "root" { ADMIN_USER } else { login_user }
}

/// The OS families `provision-node.sh` supports, and their releases, newest first.
pub const DEBIAN: [&str; 2] = ["13", "12"];

/// Pnp's table of the user a provider's image lets in with the account's key (the runbook's
/// "default keypair"), by the provider's kind (the Center account's `provider`, or
/// `hetzner`) and the image's OS:
///
/// | provider | Ubuntu | Debian | where it comes from |
/// |---|---|---|---|
/// | `lightsail`, `aws`, `ec2` | `ubuntu` | `admin` | AWS's default user names for Lightsail blueprints and EC2 AMIs |
/// | `hetzner`, `vultr`, `digitalocean`, `linode`, `upcloud` | `root` | `root` | their images install the key for root (their docs) |
/// | any other (plain cloud-init images) | `ubuntu` | `debian` | the images' cloud-init `default_user` |
///
/// A provider missing here whose images use another user is configured with `PN_SSH__USER`.
pub fn login_user(provider: &str, os: &str) -> &'static str {
    let provider = provider.to_ascii_lowercase();
    let os = os.to_ascii_lowercase();
    match (provider.as_str(), os.as_str()) {
        ("hetzner" | "vultr" | "digitalocean" | "linode" | "upcloud", _) => "root",
        ("lightsail" | "aws" | "ec2", "debian") => "admin",
        (_, "debian") => "debian",
        _ => "ubuntu",
    }
}

/// The OS an image id or name names, when it says (`ubuntu-24-04`, `debian_12`, `ubuntu-22.04`).
pub fn os_of_image_name(image: &str) -> &'static str {
    let i = image.to_ascii_lowercase();
    if i.contains("debian") { "debian" } else { "ubuntu" }
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
    /// As `choose`, with the OS families to consider in order of preference (`ubuntu`,
    /// `debian`): the newest supported release of the first family the region offers.
    async fn choose_os(&self, region: &str, min_transfer: u64, families: &[String]) -> Result<Choice, ProviderError> {
        let _ = families;
        self.choose(region, min_transfer).await
    }
    /// Opens `ports` in the provider's firewall in front of instance `id` (idempotent). The
    /// default: this provider has no firewall API.
    async fn open_ports(&self, id: &str, ports: &[Port]) -> Result<PortsOpened, ProviderError> {
        let _ = (id, ports);
        Ok(PortsOpened::Unsupported(format!("the {} provider has no firewall API here", self.name())))
    }
    /// The user `vps`'s image lets in with the account's key ([`login_user`]).
    async fn login_user(&self, vps: &Vps) -> Result<String, ProviderError> {
        Ok(login_user(self.name(), os_of_image_name(&vps.image)).to_string())
    }
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
    let p: Arc<dyn Provider> = match kind {
        "center" => Arc::new(center::CenterProvider::new(center, account.to_string())),
        "hetzner" if readonly => Arc::new(hetzner::Hetzner::reader(hetzner)?),
        "hetzner" => Arc::new(hetzner::Hetzner::new(hetzner)?),
        other => return Err(ProviderError::Permanent(format!("PN_PROVIDER: unknown provider {other:?} (center | hetzner)"))),
    };
    // Every call in a span `provider.<method>` of the operation's trace (kit::trace).
    Ok(Arc::new(traced::Traced(p)))
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

/// The newest supported image of the first family in `families` that has one (`ubuntu`:
/// 24.04/22.04/20.04; `debian`: 13/12). `os_of` gives an image's family, `version_of` its
/// release.
pub fn newest_supported<'a, T>(images: &'a [T], families: &[String], os_of: impl Fn(&T) -> String, version_of: impl Fn(&T) -> String) -> Option<&'a T> {
    families.iter().find_map(|fam| {
        let versions: &[&str] = match fam.to_ascii_lowercase().as_str() {
            "ubuntu" => &UBUNTU_LTS,
            "debian" => &DEBIAN,
            _ => &[],
        };
        versions.iter().find_map(|v| images.iter().find(|i| os_of(i).eq_ignore_ascii_case(fam) && version_of(i) == *v))
    })
}

/// The configured provider and, optionally, the alternate one tried when the configured
/// one fails in every sibling region (`PN_ALT_PROVIDER`, svc-cloud). An instance belongs to
/// the first whose name and account match it.
#[derive(Clone)]
pub struct Providers {
    pub primary: Arc<dyn Provider>,
    pub alt: Option<Arc<dyn Provider>>,
}

impl Providers {
    pub fn new(primary: Arc<dyn Provider>, alt: Option<Arc<dyn Provider>>) -> Providers {
        Providers { primary, alt }
    }

    /// Both, the configured one first.
    pub fn all(&self) -> Vec<Arc<dyn Provider>> {
        std::iter::once(self.primary.clone()).chain(self.alt.clone()).collect()
    }

    /// The provider to ask about an event's instance (`provider` is `Instance.provider`, a
    /// hint; `account` its account): the first named `provider` that works with `account`,
    /// else the first that works with `account`, else (no account named) the configured one.
    /// `confirm_instance` then checks the instance there, account included.
    pub fn for_instance(&self, provider: &str, account: &str) -> Option<Arc<dyn Provider>> {
        let all = self.all();
        if account.is_empty() {
            return all.iter().find(|p| p.name() == provider).cloned().or_else(|| Some(self.primary.clone()));
        }
        all.iter().find(|p| p.name() == provider && p.owns_account(account)).or_else(|| all.iter().find(|p| p.owns_account(account))).cloned()
    }
}

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
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn picks_cheapest_covering_plan() {
        let plans = [("a", 1u64 << 40, 5.0), ("b", 2u64 << 40, 10.0), ("c", 3u64 << 40, 9.0)];
        let p = cheapest_covering(&plans, (1u64 << 40) + 1, |p| p.1, |p| p.2);
        assert_eq!(p.map(|p| p.0), Some("c"));
        assert_eq!(cheapest_covering(&plans, 4u64 << 40, |p| p.1, |p| p.2), None);
    }

    #[test]
    fn ports_parse_and_print() {
        assert_eq!(Port::parse("1022/tcp"), Ok(Port::tcp(1022)));
        assert_eq!(Port::parse(" 443/udp "), Ok(Port { port: 443, udp: true }));
        assert_eq!(Port::parse("22"), Ok(Port::tcp(22)));
        assert!(Port::parse("0/tcp").is_err() && Port::parse("70000").is_err() && Port::parse("22/icmp").is_err() && Port::parse("x").is_err());
        let l = Port::parse_list("22/tcp, 1022/tcp,443/tcp,443/udp,22").unwrap();
        assert_eq!(l.iter().map(Port::to_string).collect::<Vec<_>>(), ["22/tcp", "1022/tcp", "443/tcp", "443/udp"]);
        assert!(Port::parse_list("22,nope").is_err());
    }

    #[test]
    fn login_users_by_provider_and_os() {
        assert_eq!(login_user("lightsail", "ubuntu"), "ubuntu");
        assert_eq!(login_user("lightsail", "Debian"), "admin");
        assert_eq!(login_user("hetzner", "ubuntu"), "root");
        assert_eq!(login_user("vultr", "debian"), "root");
        assert_eq!(login_user("openstack", "debian"), "debian");
        assert_eq!(login_user("", "ubuntu"), "ubuntu");
        assert_eq!((os_of_image_name("debian-12"), os_of_image_name("ubuntu-24.04"), os_of_image_name("x")), ("debian", "ubuntu", "ubuntu"));
    }

    #[test]
    fn picks_the_newest_supported_image_of_the_first_family_offered() {
        let imgs = [("debian", "12"), ("debian", "13"), ("ubuntu", "22.04"), ("ubuntu", "23.10")];
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let pick = |fams: &[&str]| newest_supported(&imgs, &f(fams), |i| i.0.to_string(), |i| i.1.to_string()).copied();
        assert_eq!(pick(&["ubuntu"]), Some(("ubuntu", "22.04")));
        assert_eq!(pick(&["debian", "ubuntu"]), Some(("debian", "13")));
        assert_eq!(pick(&["centos"]), None);
        let only_debian = [("debian", "12")];
        assert_eq!(newest_supported(&only_debian, &f(&["ubuntu", "debian"]), |i| i.0.to_string(), |i| i.1.to_string()), Some(&("debian", "12")));
    }

    #[test]
    fn picks_newest_lts_ubuntu_only() {
        let imgs = [("debian", "12"), ("ubuntu", "20.04"), ("ubuntu", "22.04"), ("ubuntu", "23.10")];
        let i = newest_ubuntu(&imgs, |i| i.0 == "ubuntu", |i| i.1.to_string());
        assert_eq!(i, Some(&("ubuntu", "22.04")));
        assert_eq!(newest_ubuntu(&imgs[..1], |i| i.0 == "ubuntu", |i| i.1.to_string()), None);
    }
}
