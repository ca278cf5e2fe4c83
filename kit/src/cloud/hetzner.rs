//! The `hetzner` provider: the Hetzner Cloud API (`/v1/servers`, `/v1/server_types`,
//! `/v1/images`, `/v1/ssh_keys`) with a bearer token. A server is created with the account's
//! admin SSH key registered (`ssh_keys` in the create call: the key is found among the
//! project's keys by its material, or registered once under `admin_key_name`), so Hetzner
//! sets no root password and mails none (seed 001 §3.a); the cloud-init user-data installs the
//! same *public* key for the login user and turns password logins off — never a private key,
//! never a password. Ports are opened with a Hetzner Cloud Firewall (`/v1/firewalls`) named
//! `firewall_name`, found or created once, whose inbound rules are the union of what was asked
//! (22/tcp always among them), applied to each server: Hetzner combines every firewall applied
//! to a server, so this one opens its ports whatever else a project applies. The server's
//! login user is the admin user the user-data makes ([`super::ADMIN_USER`], passwordless
//! sudo); Hetzner also installs the key for root, which the prep then shuts out
//! (`PermitRootLogin no`).

use std::time::Duration;

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;

use super::{Choice, Port, PortsOpened, Provider, ProviderError, Vps, cheapest_covering, newest_supported};

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HetznerSettings {
    pub api_url: String,
    /// `PN_HETZNER__TOKEN`. svc-cloud needs a read & write token; svc-deployer and svc-meter
    /// only read (`GET /servers/<id>`), so give them a read-only token.
    pub token: Option<SecretString>,
    /// The admin public key (`ssh-ed25519 …`): registered at Hetzner for new servers and
    /// installed by cloud-init. Needed by svc-cloud only.
    pub admin_public_key: String,
    /// The name the admin key is registered under when the project does not hold it yet
    /// (`PN_HETZNER__ADMIN_KEY_NAME`). A key already registered (under any name) is reused.
    pub admin_key_name: String,
    /// The Hetzner Cloud Firewall Pnp opens node ports in (`PN_HETZNER__FIREWALL_NAME`).
    pub firewall_name: String,
    pub timeout_ms: u64,
}

impl Default for HetznerSettings {
    fn default() -> Self {
        HetznerSettings {
            api_url: "https://api.hetzner.cloud/v1".into(),
            token: None,
            admin_public_key: String::new(),
            admin_key_name: "pnp-admin".into(),
            firewall_name: "pnp-node".into(),
            timeout_ms: 15_000,
        }
    }
}

pub struct Hetzner {
    http: reqwest::Client,
    base: String,
    token: SecretString,
    /// The admin public key line; empty for a reader (which cannot create).
    public_key: String,
    key_name: String,
    firewall_name: String,
    user_data: String,
    /// The id of the admin key at Hetzner, once found or registered.
    key_id: tokio::sync::Mutex<Option<u64>>,
}

/// The part of an OpenSSH public key line that identifies the key: type and base64 blob
/// (the comment is free text and may differ between copies of one key).
pub fn key_material(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

impl Hetzner {
    /// A provider that can create servers: needs the token and the admin public key.
    pub fn new(s: &HetznerSettings) -> Result<Hetzner, ProviderError> {
        if s.admin_public_key.trim().is_empty() {
            return Err(ProviderError::Permanent("PN_HETZNER__ADMIN_PUBLIC_KEY must be an OpenSSH public key line".into()));
        }
        Hetzner::reader(s)
    }

    /// A provider for `get`/`find_by_name` only (svc-deployer, svc-meter): the admin public
    /// key may be absent (then `create` refuses), but if given it must be a public key.
    pub fn reader(s: &HetznerSettings) -> Result<Hetzner, ProviderError> {
        crate::init_crypto();
        let token = s.token.clone().ok_or_else(|| ProviderError::Permanent("PN_HETZNER__TOKEN is missing".into()))?;
        let key = s.admin_public_key.trim();
        if !key.is_empty() && (!(key.starts_with("ssh-") || key.starts_with("ecdsa-")) || key.contains("PRIVATE") || key.split_whitespace().count() < 2 || key.contains('\n')) {
            return Err(ProviderError::Permanent("PN_HETZNER__ADMIN_PUBLIC_KEY must be an OpenSSH public key line".into()));
        }
        let name = s.admin_key_name.trim();
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
            return Err(ProviderError::Permanent("PN_HETZNER__ADMIN_KEY_NAME must be a short, non-empty name".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(s.timeout_ms))
            .build()
            .map_err(|e| ProviderError::Permanent(e.to_string()))?;
        Ok(Hetzner {
            http,
            base: s.api_url.trim_end_matches('/').to_string(),
            token,
            public_key: key.to_string(),
            key_name: name.to_string(),
            firewall_name: if s.firewall_name.trim().is_empty() { "pnp-node".into() } else { s.firewall_name.trim().to_string() },
            user_data: if key.is_empty() { String::new() } else { cloud_init(key) },
            key_id: tokio::sync::Mutex::new(None),
        })
    }

    /// The admin key's id at Hetzner: found among the project's keys by its material, else
    /// registered once (`POST /ssh_keys`). Remembered for the life of the process.
    async fn admin_key_id(&self) -> Result<u64, ProviderError> {
        #[derive(Deserialize)]
        struct Key {
            id: u64,
            #[serde(default)]
            public_key: String,
        }
        #[derive(Deserialize)]
        struct Keys {
            ssh_keys: Vec<Key>,
            #[serde(default)]
            meta: Option<Meta>,
        }
        #[derive(Deserialize)]
        struct Meta {
            pagination: Pagination,
        }
        #[derive(Deserialize)]
        struct Pagination {
            #[serde(default)]
            next_page: Option<u32>,
        }
        #[derive(Deserialize)]
        struct Created {
            ssh_key: Key,
        }
        let mut cached = self.key_id.lock().await;
        if let Some(id) = *cached {
            return Ok(id);
        }
        let ours = key_material(&self.public_key);
        let mut page = 1u32;
        loop {
            let l: Keys = self.req(reqwest::Method::GET, &format!("/ssh_keys?per_page=50&page={page}"), None).await?;
            if let Some(k) = l.ssh_keys.iter().find(|k| key_material(&k.public_key) == ours) {
                *cached = Some(k.id);
                return Ok(k.id);
            }
            match l.meta.and_then(|m| m.pagination.next_page) {
                Some(next) if next > page && page < 100 => page = next,
                _ => break,
            }
        }
        let body = json!({"name": self.key_name, "public_key": self.public_key, "labels": {"managed-by": "pnp"}});
        let c: Created = self.req(reqwest::Method::POST, "/ssh_keys", Some(body)).await.map_err(|e| match e {
            ProviderError::Permanent(m) => ProviderError::Permanent(format!("registering the admin SSH key as {:?} (PN_HETZNER__ADMIN_KEY_NAME): {m}", self.key_name)),
            other => other,
        })?;
        tracing::info!(key_id = c.ssh_key.id, name = %self.key_name, "admin SSH key registered at Hetzner");
        *cached = Some(c.ssh_key.id);
        Ok(c.ssh_key.id)
    }

    async fn req<T: for<'de> Deserialize<'de>>(&self, method: reqwest::Method, path: &str, body: Option<serde_json::Value>) -> Result<T, ProviderError> {
        let mut r = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(self.token.expose_secret());
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.map_err(|e| ProviderError::Transient(format!("hetzner {path}: {}", if e.is_timeout() { "timed out".into() } else { e.without_url().to_string() })))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| ProviderError::Transient(e.without_url().to_string()))?;
        if !status.is_success() {
            #[derive(Deserialize, Default)]
            struct ErrBody {
                #[serde(default)]
                error: ErrInner,
            }
            #[derive(Deserialize, Default)]
            struct ErrInner {
                #[serde(default)]
                code: String,
                #[serde(default)]
                message: String,
            }
            let e: ErrBody = serde_json::from_str(&text).unwrap_or_default();
            let msg = format!("hetzner {path}: HTTP {status} {} {}", e.error.code, e.error.message.chars().take(160).collect::<String>());
            let transient = status == StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error()
                || matches!(e.error.code.as_str(), "resource_unavailable" | "placement_error" | "rate_limit_exceeded" | "conflict" | "locked");
            return Err(if transient {
                ProviderError::Transient(msg)
            } else if status == StatusCode::NOT_FOUND {
                ProviderError::NotFound(msg)
            } else {
                ProviderError::Permanent(msg)
            });
        }
        serde_json::from_str(&text).map_err(|e| ProviderError::Permanent(format!("hetzner {path}: malformed answer: {e}")))
    }
}

/// One inbound rule of a Hetzner firewall.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
struct Rule {
    direction: String,
    protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<String>,
    #[serde(default)]
    source_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
}

impl Rule {
    fn inbound(p: &Port) -> Rule {
        Rule {
            direction: "in".into(),
            protocol: p.protocol().into(),
            port: Some(p.port.to_string()),
            source_ips: vec!["0.0.0.0/0".into(), "::/0".into()],
            description: Some(format!("pnp {p}")),
        }
    }

    /// Whether this rule lets `p` in from anywhere.
    fn opens(&self, p: &Port) -> bool {
        let in_range = |r: &str| match r.split_once('-') {
            Some((a, b)) => a.parse::<u16>().is_ok_and(|a| a <= p.port) && b.parse::<u16>().is_ok_and(|b| p.port <= b),
            None => r.parse::<u16>().is_ok_and(|x| x == p.port),
        };
        self.direction == "in"
            && self.protocol == p.protocol()
            && self.port.as_deref().is_some_and(in_range)
            && self.source_ips.iter().any(|s| s == "0.0.0.0/0")
    }
}

#[derive(Debug, Deserialize)]
struct Firewall {
    id: u64,
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    applied_to: Vec<Applied>,
}

#[derive(Debug, Deserialize)]
struct Applied {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    server: Option<IdOnly>,
}

#[derive(Debug, Deserialize)]
struct IdOnly {
    id: u64,
}

impl Hetzner {
    /// The firewall named `firewall_name`, if the project has it.
    async fn find_firewall(&self) -> Result<Option<Firewall>, ProviderError> {
        #[derive(Deserialize)]
        struct L {
            firewalls: Vec<Firewall>,
        }
        let l: L = self.req(reqwest::Method::GET, &format!("/firewalls?name={}", urlencode(&self.firewall_name)), None).await?;
        Ok(l.firewalls.into_iter().next())
    }
}

/// cloud-init user-data (seed 001 §3.a): the admin user [`super::ADMIN_USER`] with the admin
/// public key and passwordless sudo, its password locked; password logins off. The deployer
/// logs in as that user; root (which Hetzner gives the registered key) stops getting in once
/// the prep sets `PermitRootLogin no`.
pub fn cloud_init(public_key: &str) -> String {
    let user = super::ADMIN_USER;
    format!(
        "#cloud-config\nssh_pwauth: false\nusers:\n  - name: {user}\n    shell: /bin/bash\n    lock_passwd: true\n    \
         sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n    ssh_authorized_keys:\n      - {public_key}\n"
    )
}

#[derive(Debug, Deserialize)]
struct Server {
    id: u64,
    name: String,
    status: String,
    #[serde(default)]
    public_net: PublicNet,
    #[serde(default)]
    server_type: Named,
    #[serde(default)]
    datacenter: Datacenter,
    #[serde(default)]
    image: Option<Named>,
}

#[derive(Debug, Deserialize, Default)]
struct PublicNet {
    ipv4: Option<Ip>,
}

#[derive(Debug, Deserialize)]
struct Ip {
    ip: String,
}

#[derive(Debug, Deserialize, Default)]
struct Named {
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize, Default)]
struct Datacenter {
    #[serde(default)]
    location: Named,
}

impl From<Server> for Vps {
    fn from(s: Server) -> Vps {
        Vps {
            id: s.id.to_string(),
            name: s.name,
            status: s.status.to_lowercase(),
            ipv4: s.public_net.ipv4.map(|i| i.ip).filter(|i| !i.is_empty() && i != "0.0.0.0"),
            region: s.datacenter.location.name,
            plan: s.server_type.name,
            image: s.image.map(|i| i.name).unwrap_or_default(),
            account: "hetzner".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ServerTypes {
    server_types: Vec<ServerType>,
}

#[derive(Debug, Deserialize)]
struct ServerType {
    name: String,
    #[serde(default)]
    deprecated: Option<bool>,
    prices: Vec<Price>,
}

#[derive(Debug, Deserialize)]
struct Price {
    location: String,
    price_monthly: Amount,
    #[serde(default)]
    included_traffic: u64,
}

#[derive(Debug, Deserialize)]
struct Amount {
    gross: String,
}

#[derive(Debug, Deserialize)]
struct Images {
    images: Vec<Image>,
}

#[derive(Debug, Deserialize)]
struct Image {
    name: String,
    #[serde(default)]
    os_flavor: String,
    #[serde(default)]
    os_version: Option<String>,
}

#[async_trait::async_trait]
impl Provider for Hetzner {
    fn name(&self) -> &str {
        "hetzner"
    }

    async fn find_by_name(&self, name: &str) -> Result<Vec<Vps>, ProviderError> {
        #[derive(Deserialize)]
        struct L {
            servers: Vec<Server>,
        }
        let l: L = self.req(reqwest::Method::GET, &format!("/servers?name={}", urlencode(name)), None).await?;
        Ok(l.servers.into_iter().filter(|s| s.name == name).map(Vps::from).collect())
    }

    async fn choose(&self, region: &str, min_transfer: u64) -> Result<Choice, ProviderError> {
        self.choose_os(region, min_transfer, &["ubuntu".to_string()]).await
    }

    async fn choose_os(&self, region: &str, min_transfer: u64, families: &[String]) -> Result<Choice, ProviderError> {
        let types: ServerTypes = self.req(reqwest::Method::GET, "/server_types?per_page=50", None).await?;
        let offers: Vec<(String, u64, f64)> = types
            .server_types
            .iter()
            .filter(|t| t.deprecated != Some(true))
            .filter_map(|t| {
                t.prices
                    .iter()
                    .find(|p| p.location == region)
                    .map(|p| (t.name.clone(), p.included_traffic, p.price_monthly.gross.parse::<f64>().unwrap_or(f64::MAX)))
            })
            .collect();
        if offers.is_empty() {
            return Err(ProviderError::NoFit(format!("no Hetzner server type is offered in {region}")));
        }
        let plan = cheapest_covering(&offers, min_transfer, |o| o.1, |o| o.2)
            .ok_or_else(|| ProviderError::NoFit(format!("no Hetzner server type in {region} includes {} GiB of transfer", min_transfer >> 30)))?;
        let images: Images = self.req(reqwest::Method::GET, "/images?type=system&architecture=x86&per_page=50", None).await?;
        let image = newest_supported(&images.images, families, |i| i.os_flavor.clone(), |i| i.os_version.clone().unwrap_or_default())
            .ok_or_else(|| ProviderError::NoFit(format!("no supported system image ({})", families.join(", "))))?;
        Ok(Choice { account: "hetzner".into(), region: region.to_string(), plan: plan.0.clone(), plan_transfer_bytes: plan.1, image: image.name.clone() })
    }

    async fn create(&self, c: &Choice, name: &str) -> Result<Vps, ProviderError> {
        #[derive(Deserialize)]
        struct Created {
            server: Server,
        }
        if self.public_key.is_empty() {
            return Err(ProviderError::Permanent("no admin public key (PN_HETZNER__ADMIN_PUBLIC_KEY): cannot create a server".into()));
        }
        // With a key registered Hetzner sets no root password (and mails none).
        let key_id = self.admin_key_id().await?;
        let body = json!({
            "name": name,
            "server_type": c.plan,
            "location": c.region,
            "image": c.image,
            "ssh_keys": [key_id],
            "user_data": self.user_data,
            "start_after_create": true,
            "labels": {"managed-by": "pnp"},
        });
        let r: Created = self.req(reqwest::Method::POST, "/servers", Some(body)).await.inspect_err(|_| {
            // The key may have been deleted at Hetzner since: look it up again next time.
            if let Ok(mut k) = self.key_id.try_lock() {
                *k = None;
            }
        })?;
        Ok(r.server.into())
    }

    async fn get(&self, id: &str) -> Result<Vps, ProviderError> {
        #[derive(Deserialize)]
        struct G {
            server: Server,
        }
        let g: G = self.req(reqwest::Method::GET, &format!("/servers/{}", urlencode(id)), None).await?;
        Ok(g.server.into())
    }

    async fn delete(&self, id: &str) -> Result<(), ProviderError> {
        let _: serde_json::Value = self.req(reqwest::Method::DELETE, &format!("/servers/{}", urlencode(id)), None).await?;
        Ok(())
    }

    /// The token is the project: every server it shows is ours.
    fn owns_account(&self, account: &str) -> bool {
        account == "hetzner"
    }

    /// The firewall `firewall_name`: created with the rules and the server when missing; else
    /// its rules extended (`set_rules`, the union) where one is missing, and applied to the
    /// server (`apply_to_resources`) when it is not yet. 22/tcp is always among the rules: a
    /// firewall on a server blocks every port it does not open.
    async fn open_ports(&self, id: &str, ports: &[Port]) -> Result<PortsOpened, ProviderError> {
        let server: u64 = id.trim().parse().map_err(|_| ProviderError::NotFound(format!("hetzner: {id:?} is not a server id")))?;
        let mut want: Vec<Port> = vec![Port::tcp(22)];
        for p in ports {
            if !want.contains(p) {
                want.push(*p);
            }
        }
        let apply = json!([{"type": "server", "server": {"id": server}}]);
        let Some(fw) = self.find_firewall().await? else {
            let rules: Vec<Rule> = want.iter().map(Rule::inbound).collect();
            let body = json!({"name": self.firewall_name, "labels": {"managed-by": "pnp"}, "rules": rules, "apply_to": apply});
            let _: serde_json::Value = self.req(reqwest::Method::POST, "/firewalls", Some(body)).await?;
            tracing::info!(server, firewall = %self.firewall_name, "hetzner firewall created and applied");
            return Ok(PortsOpened::Opened);
        };
        let missing: Vec<&Port> = want.iter().filter(|p| !fw.rules.iter().any(|r| r.opens(p))).collect();
        if !missing.is_empty() {
            let mut rules = fw.rules.clone();
            rules.extend(missing.iter().map(|p| Rule::inbound(p)));
            let _: serde_json::Value = self.req(reqwest::Method::POST, &format!("/firewalls/{}/actions/set_rules", fw.id), Some(json!({"rules": rules}))).await?;
        }
        let applied = fw.applied_to.iter().any(|a| a.kind == "server" && a.server.as_ref().is_some_and(|s| s.id == server));
        if !applied {
            let res: Result<serde_json::Value, _> =
                self.req(reqwest::Method::POST, &format!("/firewalls/{}/actions/apply_to_resources", fw.id), Some(json!({"apply_to": apply}))).await;
            match res {
                Ok(_) => {}
                Err(ProviderError::Permanent(m)) if m.contains("firewall_already_applied") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(PortsOpened::Opened)
    }

    /// The admin user our cloud-init makes on every server we create ([`cloud_init`]).
    async fn login_user(&self, _vps: &Vps) -> Result<String, ProviderError> {
        Ok(super::ADMIN_USER.into())
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}
