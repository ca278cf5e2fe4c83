//! The deployer's settings (`PN_*` environment, `__` nests: `PN_SSH__HARDENED_PORT`) and the
//! admin keys they name. Owns parsing and checking them once, at start, so a bad value stops
//! the service with a message that names the key — and never prints a key's content.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kit::config::Common;
use kit::ssh::AdminKeys;
use serde::{Deserialize, Deserializer};

/// The k2 release the node stack runs when `PN_K2_VERSION` is not set: a pin, never `latest`
/// (runbook step 2). Raise it deliberately, after the release is known good.
pub const DEFAULT_K2_VERSION: &str = "1.6.3";

/// The runbook's deploy directory on the node.
pub const DEFAULT_DEPLOY_DIR: &str = "/apps/kaitu-slave";

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct SettingsError(pub String);

/// Everything the deployer is configured with.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    #[serde(flatten)]
    pub common: Common,
    pub ssh: SshSettings,
    /// Where the stack lives on the node (`PN_DEPLOY_DIR`).
    pub deploy_dir: String,
    /// The pinned image tag written as `K2_VERSION` (`PN_K2_VERSION`).
    #[serde(deserialize_with = "string_or_number")]
    pub k2_version: String,
    /// The node images' digest pins (`PN_K2_IMAGES`): comma-separated `repo@sha256:<digest>`
    /// replacing the pins of the shipped `docker-compose.yml` for those repositories. Empty:
    /// the shipped pins, which are `DEFAULT_K2_VERSION`'s; another `k2_version` needs its
    /// digests here for every image (else the node would run the old release's image under
    /// the new tag).
    pub k2_images: String,
    /// Privilege prefix of the node commands (`PN_SUDO`); empty runs them as the SSH user.
    pub sudo: String,
    /// A file to send instead of the embedded `provision-node.sh` (`PN_PREP_SCRIPT`).
    pub prep_script: Option<PathBuf>,
    /// The cloud the instances live in (`PN_PROVIDER`: `center` | `hetzner`, as svc-cloud's):
    /// before any secret moves, the deployer asks it to confirm the event's instance (id,
    /// name `pn-<subId>`, our account, the event's IPv4). Reads only (`get`).
    pub provider: String,
    /// The `center` provider's cloud account (`PN_ACCOUNT`, as svc-cloud's); empty: any
    /// account Center lists (the event's account must still be the instance's).
    pub account: String,
    /// The `hetzner` provider's API (`PN_HETZNER__API_URL`, `PN_HETZNER__TOKEN` — a read-only
    /// token is enough here).
    pub hetzner: kit::cloud::hetzner::HetznerSettings,
    /// The alternate provider svc-cloud may create in (`PN_ALT_PROVIDER`, `PN_ALT_ACCOUNT`,
    /// as svc-cloud's; empty: none): an event whose instance names it is confirmed there.
    pub alt_provider: String,
    pub alt_account: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            common: Common::default(),
            ssh: SshSettings::default(),
            deploy_dir: DEFAULT_DEPLOY_DIR.into(),
            k2_version: DEFAULT_K2_VERSION.into(),
            k2_images: String::new(),
            sudo: "sudo".into(),
            prep_script: None,
            provider: "center".into(),
            account: String::new(),
            hetzner: Default::default(),
            alt_provider: String::new(),
            alt_account: String::new(),
        }
    }
}

/// How the deployer reaches nodes (`PN_SSH__*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SshSettings {
    /// The login user (`PN_SSH__USER`). Empty (the default): the user the instance's image
    /// lets in, from the provider and the image (`kit::cloud::login_user`: `ubuntu` on
    /// Lightsail's Ubuntu, `admin` on its Debian, `root` at Hetzner, …). Set it only to force
    /// one user (a provider the table does not know, a test host).
    pub user: String,
    /// Port of a fresh instance (runbook: 22).
    pub fresh_port: u16,
    /// Port after `provision-node.sh` hardened SSH (runbook: 1022).
    pub hardened_port: u16,
    /// One TCP connect + handshake + auth.
    pub connect_timeout_ms: u64,
    /// One ordinary command (mkdir, tee, chmod).
    pub command_timeout_ms: u64,
    /// The OS prep script (from its start on the node, parked waits included), and
    /// `docker compose pull` / `up -d` (image downloads take minutes).
    pub prep_timeout_ms: u64,
    /// How long a handler waits on the node for a started prep before it parks the operation
    /// (releases session and slot; JetStream brings it back at the next check).
    pub prep_inline_wait_ms: u64,
    /// Until the deployer has seen preps finish (then it expects their average), a parked
    /// prep is looked at again after half the time it has run, at most this long.
    pub prep_expected_ms: u64,
    /// Shortest pause between two looks at a running prep.
    pub prep_poll_ms: u64,
    /// Root-only directory on the node for the detached prep's script, log and exit status.
    pub prep_state_dir: String,
    /// Total time to wait for a node to answer SSH (runbook 001: 60 × 5 s).
    pub reach_patience_ms: u64,
    /// Tries of one step (a dropped link, a non-zero exit) before the handler gives up.
    pub step_attempts: u32,
    /// First pause between tries of a step; it doubles, with jitter, up to 10 s.
    pub retry_delay_ms: u64,
    /// `account=path[,account2=path2]`: each cloud account's admin private key (OpenSSH).
    pub admin_keys: String,
    /// After the OS prep, how long SSH on the hardened port has to answer from outside (a
    /// provider firewall rule may take a moment) before the operation fails with port 22 left
    /// open (`PN_SSH__OUTSIDE_CHECK_PATIENCE_MS`). 22 is closed on the node only after it did.
    pub outside_check_patience_ms: u64,
}

impl Default for SshSettings {
    fn default() -> Self {
        SshSettings {
            user: String::new(),
            fresh_port: 22,
            hardened_port: 1022,
            connect_timeout_ms: 10_000,
            command_timeout_ms: 60_000,
            prep_timeout_ms: 300_000,
            prep_inline_wait_ms: 5_000,
            prep_expected_ms: 120_000,
            prep_poll_ms: 500,
            prep_state_dir: "/var/lib/pnp/prep".into(),
            reach_patience_ms: 300_000,
            step_attempts: 4,
            retry_delay_ms: 1_000,
            admin_keys: String::new(),
            outside_check_patience_ms: 60_000,
        }
    }
}

impl SshSettings {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms.max(1))
    }
    pub fn prep_timeout(&self) -> Duration {
        Duration::from_millis(self.prep_timeout_ms.max(1))
    }
    pub fn prep_inline_wait(&self) -> Duration {
        Duration::from_millis(self.prep_inline_wait_ms)
    }
    pub fn reach_patience(&self) -> Duration {
        Duration::from_millis(self.reach_patience_ms)
    }
    pub fn retry_delay(&self) -> Duration {
        Duration::from_millis(self.retry_delay_ms)
    }
    pub fn outside_check_patience(&self) -> Duration {
        Duration::from_millis(self.outside_check_patience_ms.max(1))
    }

    /// The `account → key file` pairs of `admin_keys`.
    pub fn admin_key_paths(&self) -> Result<BTreeMap<String, PathBuf>, SettingsError> {
        let mut out = BTreeMap::new();
        for part in self.admin_keys.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (account, path) = part
                .split_once('=')
                .map(|(a, p)| (a.trim(), p.trim()))
                .filter(|(a, p)| !a.is_empty() && !p.is_empty())
                .ok_or_else(|| SettingsError(format!("ssh.admin_keys: `{part}` is not account=path")))?;
            if out.insert(account.to_string(), PathBuf::from(path)).is_some() {
                return Err(SettingsError(format!("ssh.admin_keys: account {account} is listed twice")));
            }
        }
        Ok(out)
    }

    /// Reads every admin key file once, so a key that is missing, unreadable, not an OpenSSH
    /// private key or passphrase-protected stops the service at start (named by account and
    /// path only). Returns the keys as `kit::ssh::AdminKeys`, which reads a key again for each
    /// operation — a rotated k8s Secret is picked up without a restart — and the accounts.
    pub fn load_admin_keys(&self) -> Result<(AdminKeys, Vec<String>), SettingsError> {
        let mut accounts = Vec::new();
        for (account, path) in self.admin_key_paths()? {
            read_private_key(&path)
                .map_err(|why| SettingsError(format!("ssh.admin_keys: key of account {account} ({}): {why}", path.display())))?;
            accounts.push(account);
        }
        let keys = AdminKeys::parse(&self.admin_keys).map_err(|e| SettingsError(format!("ssh.admin_keys: {e}")))?;
        Ok((keys, accounts))
    }
}

fn read_private_key(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.kind().to_string())?;
    let key = kit::ssh::parse_private_key(&text).map_err(|_| "not an OpenSSH private key".to_string())?;
    if key.is_encrypted() {
        return Err("the key is passphrase-protected; the deployer needs an unencrypted key".into());
    }
    Ok(())
}

impl Settings {
    /// Checks what serde cannot: the pin, the deploy dir, the ports.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let v = self.k2_version.trim();
        if v.is_empty() || v.eq_ignore_ascii_case("latest") {
            return Err(SettingsError("k2_version must be a pinned release, never empty or `latest`".into()));
        }
        if !v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) || v.len() > 128 {
            return Err(SettingsError("k2_version must be a docker tag ([A-Za-z0-9._-])".into()));
        }
        let images = crate::stack::parse_images(&self.k2_images).map_err(SettingsError)?;
        let shipped = crate::stack::pins(crate::stack::DOCKER_COMPOSE_YML);
        if v != DEFAULT_K2_VERSION && shipped.iter().any(|(repo, _)| !images.iter().any(|(r, _)| r == repo)) {
            return Err(SettingsError(format!(
                "k2_version {v} is not the release the stack's digests pin ({DEFAULT_K2_VERSION}): give its digests for every image in k2_images"
            )));
        }
        let d = &self.deploy_dir;
        if !d.starts_with('/') || d.len() < 2 || d.contains("..") || d.bytes().any(|b| b.is_ascii_control()) {
            return Err(SettingsError("deploy_dir must be an absolute path".into()));
        }
        if self.ssh.fresh_port == 0 || self.ssh.hardened_port == 0 {
            return Err(SettingsError("ssh.fresh_port and ssh.hardened_port must be set".into()));
        }
        let p = &self.ssh.prep_state_dir;
        if !p.starts_with('/') || p.len() < 2 || p.contains("..") || p.bytes().any(|b| b.is_ascii_control()) {
            return Err(SettingsError("ssh.prep_state_dir must be an absolute path".into()));
        }
        if self.sudo.bytes().any(|b| b.is_ascii_control()) {
            return Err(SettingsError("sudo must be one line".into()));
        }
        if !matches!(self.provider.as_str(), "center" | "hetzner") {
            return Err(SettingsError(format!("provider must be center or hetzner, not {:?}", self.provider.chars().take(40).collect::<String>())));
        }
        if !matches!(self.alt_provider.as_str(), "" | "center" | "hetzner") {
            return Err(SettingsError(format!("alt_provider must be empty, center or hetzner, not {:?}", self.alt_provider.chars().take(40).collect::<String>())));
        }
        if self.ssh.user.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(SettingsError("ssh.user must be a user name".into()));
        }
        self.ssh.admin_key_paths()?;
        Ok(())
    }

    /// The deploy dir without a trailing slash.
    pub fn deploy_dir(&self) -> &str {
        let d = self.deploy_dir.trim_end_matches('/');
        if d.is_empty() { "/" } else { d }
    }
}

/// figment reads `PN_K2_VERSION=2` as a number; a tag is text either way.
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        S(String),
        U(u64),
        I(i64),
        F(f64),
    }
    Ok(match V::deserialize(d)? {
        V::S(s) => s,
        V::U(n) => n.to_string(),
        V::I(n) => n.to_string(),
        V::F(n) => n.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn defaults_follow_the_runbook() {
        let s = Settings::default();
        assert_eq!(s.ssh.user, "", "the image's user unless forced");
        assert_eq!(s.ssh.outside_check_patience_ms, 60_000);
        assert_eq!((s.ssh.fresh_port, s.ssh.hardened_port), (22, 1022));
        assert_eq!(s.ssh.command_timeout_ms, 60_000);
        assert_eq!(s.ssh.prep_timeout_ms, 300_000);
        assert_eq!(s.ssh.reach_patience_ms, 300_000);
        assert_eq!(s.deploy_dir, "/apps/kaitu-slave");
        assert_eq!(s.sudo, "sudo");
        assert!(s.validate().is_ok());
        assert_ne!(s.k2_version, "latest");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
    fn environment_names_nest_and_odd_values_survive() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PN_SSH__ADMIN_KEYS", "sim-lightsail=/x/.pn/secrets/ssh-admin-key,aws=/k/aws");
            jail.set_env("PN_SSH__HARDENED_PORT", "10022");
            jail.set_env("PN_SUDO", "");
            jail.set_env("PN_K2_VERSION", "2");
            jail.set_env("PN_DEPLOY_DIR", "/tmp/x/apps/kaitu-slave");
            jail.set_env("PN_PREP_SCRIPT", "/tmp/prep.sh");
            let s: Settings = kit::config::load().map_err(|e| e.0)?;
            assert_eq!(s.ssh.hardened_port, 10022);
            assert_eq!(s.sudo, "");
            assert_eq!(s.k2_version, "2");
            assert_eq!(s.deploy_dir, "/tmp/x/apps/kaitu-slave");
            assert_eq!(s.prep_script.as_deref(), Some(Path::new("/tmp/prep.sh")));
            let keys = s.ssh.admin_key_paths().map_err(|e| e.0)?;
            assert_eq!(keys.get("sim-lightsail").map(PathBuf::as_path), Some(Path::new("/x/.pn/secrets/ssh-admin-key")));
            assert_eq!(keys.get("aws").map(PathBuf::as_path), Some(Path::new("/k/aws")));
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_refused() {
        let mut s = Settings { k2_version: "latest".into(), ..Default::default() };
        assert!(s.validate().is_err());
        s.k2_version = "1.2; rm -rf /".into();
        assert!(s.validate().is_err());
        let s = Settings { deploy_dir: "apps".into(), ..Default::default() };
        assert!(s.validate().is_err());
        let mut s = Settings::default();
        s.ssh.admin_keys = "justapath".into();
        assert!(s.validate().is_err());
        s.ssh.admin_keys = "a=/x,a=/y".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn key_files_are_checked_without_echoing_them() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, _public) = kit::ssh::generate_ed25519().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, &pem).unwrap();
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "not-a-key-SECRETISH").unwrap();
        let mut ssh = SshSettings { admin_keys: format!("acct={}", good.display()), ..Default::default() };
        let (keys, accounts) = ssh.load_admin_keys().unwrap();
        assert_eq!(accounts, vec!["acct".to_string()]);
        assert!(keys.load("acct").is_ok());
        assert!(keys.load("other").unwrap_err().contains("other"));
        ssh.admin_keys = format!("acct={}", bad.display());
        let err = ssh.load_admin_keys().unwrap_err().0;
        assert!(err.contains("acct") && !err.contains("SECRETISH"), "{err}");
        ssh.admin_keys = format!("acct={}", dir.path().join("missing").display());
        assert!(ssh.load_admin_keys().is_err());
    }
}
