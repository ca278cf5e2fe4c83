//! The data dir's layout and the dev secrets (generated once, mode 600; read back by the tools).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};


// ---------------------------------------------------------------------------------------------
// layout, secrets, binaries, ports

/// The directories under the data dir (absolute).
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub secrets: PathBuf,
    pub logs: PathBuf,
    pub nats: PathBuf,
    pub sim: PathBuf,
    pub data: PathBuf,
}

impl Layout {
    pub fn create(data_dir: &Path) -> anyhow::Result<Layout> {
        fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
        let root = data_dir.canonicalize().with_context(|| format!("resolve {}", data_dir.display()))?;
        let l = Layout {
            secrets: root.join("secrets"),
            logs: root.join("logs"),
            nats: root.join("nats"),
            sim: root.join("sim"),
            data: root.join("data"),
            root,
        };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&l.secrets)?;
        fs::set_permissions(&l.secrets, fs::Permissions::from_mode(0o700))?;
        for d in [&l.logs, &l.nats.join("js"), &l.sim, &l.data] {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        Ok(l)
    }

    pub(super) fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
}

/// The dev secrets, generated once into `<data_dir>/secrets/` (mode 600).
pub struct Secrets {
    pub center_token: SecretString,
    pub seal_key: SecretString,
    pub admin_key: PathBuf,
    pub admin_pub: PathBuf,
    /// One NATS password per identity (`kit::nats_auth::all`), from `secrets/nats/<user>`.
    pub nats: BTreeMap<String, SecretString>,
    /// svc-meter's internal listener token (`PN_INTERNAL_TOKEN`).
    pub meter_internal_token: SecretString,
    /// The operator token of svc-cloud's and svc-claimer's mutating ops routes
    /// (`PN_OPS_TOKEN`, `secrets/ops-token`); `pnctl reap --confirm` and `ops abandon` send it.
    pub ops_token: SecretString,
}

impl Secrets {
    /// The NATS password of `user` (a service name or `pn-operator`).
    pub fn nats_password(&self, user: &str) -> anyhow::Result<SecretString> {
        self.nats.get(user).cloned().with_context(|| format!("no NATS password for {user}"))
    }
}

/// Where the dev stack keeps the operator token (`PN_OPS_TOKEN`): `<secrets>/ops-token`.
pub fn ops_token_file(secrets_dir: &Path) -> PathBuf {
    secrets_dir.join("ops-token")
}

/// Where the dev stack keeps `user`'s NATS password: `<secrets>/nats/<user>` (mode 600).
pub fn nats_password_file(secrets_dir: &Path, user: &str) -> PathBuf {
    secrets_dir.join("nats").join(user)
}

/// The operator's NATS identity of the stack in `data_dir` (what `pnctl` connects as).
pub fn operator_auth(data_dir: &Path) -> anyhow::Result<kit::bus::NatsAuth> {
    let f = nats_password_file(&data_dir.join("secrets"), kit::nats_auth::OPERATOR);
    Ok(kit::bus::NatsAuth::user(kit::nats_auth::OPERATOR, read_secret(&f)?))
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets(admin_key={})", self.admin_key.display())
    }
}

pub(super) fn write_secret(path: &Path, content: &str) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

pub(super) fn read_secret(path: &Path) -> anyhow::Result<SecretString> {
    // A secret left readable by others (copied in, restored from a backup) is tightened.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).with_context(|| format!("chmod {}", path.display()))?;
    let s = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let s = s.trim();
    if s.is_empty() {
        bail!("{} is empty; delete it and run `pnctl up` again to regenerate it", path.display());
    }
    Ok(SecretString::from(s.to_string()))
}

/// Generates the missing dev secrets, then loads them.
pub fn ensure_secrets(dir: &Path) -> anyhow::Result<Secrets> {
    let token = dir.join("center-token");
    if !token.exists() {
        let bytes: [u8; 32] = rand::random();
        write_secret(&token, &hex::encode(bytes))?;
    }
    let seal = dir.join("seal-key");
    if !seal.exists() {
        write_secret(&seal, kit::seal::SealKey::generate_hex().expose_secret())?;
    }
    let key = dir.join("ssh-admin-key");
    let public = dir.join("ssh-admin-key.pub");
    if !key.exists() || !public.exists() {
        let _ = fs::remove_file(&key);
        let _ = fs::remove_file(&public);
        let (pem, pub_line) = kit::ssh::generate_ed25519().context("generate the ssh admin key")?;
        write_secret(&key, &pem)?;
        write_secret(&public, &(pub_line + "\n"))?;
    }
    // One NATS password per identity; nats-server reads them from its environment.
    let nats_dir = dir.join("nats");
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&nats_dir)?;
    fs::set_permissions(&nats_dir, fs::Permissions::from_mode(0o700))?;
    let mut nats = BTreeMap::new();
    for id in kit::nats_auth::all() {
        let f = nats_password_file(dir, &id.user);
        if !f.exists() {
            write_secret(&f, &hex::encode(rand::random::<[u8; 24]>()))?;
        }
        nats.insert(id.user.clone(), read_secret(&f)?);
    }
    let internal = dir.join("meter-internal-token");
    if !internal.exists() {
        write_secret(&internal, &hex::encode(rand::random::<[u8; 24]>()))?;
    }
    let ops = ops_token_file(dir);
    if !ops.exists() {
        write_secret(&ops, &hex::encode(rand::random::<[u8; 24]>()))?;
    }
    let seal_key = read_secret(&seal)?;
    kit::seal::SealKey::parse(&seal_key).with_context(|| format!("{} holds no valid seal key", seal.display()))?;
    let _ = read_secret(&key)?;
    let _ = read_secret(&public)?;
    Ok(Secrets {
        center_token: read_secret(&token)?,
        seal_key,
        admin_key: key,
        admin_pub: public,
        nats,
        meter_internal_token: read_secret(&internal)?,
        ops_token: read_secret(&ops)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_are_generated_once_with_mode_600() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s1 = ensure_secrets(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
        let s2 = ensure_secrets(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(s1.center_token.expose_secret(), s2.center_token.expose_secret());
        assert_eq!(s1.seal_key.expose_secret(), s2.seal_key.expose_secret());
        for f in ["center-token", "seal-key", "ssh-admin-key", "ssh-admin-key.pub", "meter-internal-token", "nats/pn-operator", "nats/svc-meter"] {
            let mode = fs::metadata(dir.path().join(f)).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
            assert_eq!(mode, 0o600, "{f}");
        }
        assert!(!format!("{s1:?}").contains(s1.center_token.expose_secret()));
        let mode = fs::metadata(dir.path().join("nats")).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
        assert_eq!(mode, 0o700, "secrets/nats");
        assert_eq!(s1.nats.len(), kit::nats_auth::all().len(), "one password per identity");
        let pw = |s: &Secrets, u: &str| s.nats_password(u).map(|p| p.expose_secret().to_string()).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(pw(&s1, "svc-claimer"), pw(&s2, "svc-claimer"));
        assert_ne!(pw(&s1, "svc-claimer"), pw(&s1, "svc-cloud"));
    }
}
