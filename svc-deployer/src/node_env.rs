//! The node's `/apps/kaitu-slave/.env` (runbook step 5): its nine variables, each checked
//! before it goes near a node, and the file's text. Owns the value rules (what docker
//! compose's `env_file` reads literally) and the conversions (GiB, ip type).
//!
//! Never: put a value in an error text (values are hostile input, two are secrets), or hand
//! out the rendered file as anything but a `SecretString`.

use proto::SubId;
use secrecy::{ExposeSecret, SecretString};

/// A value that cannot go into `.env`. Names the variable, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var} {why}")]
pub struct EnvError {
    pub var: &'static str,
    pub why: &'static str,
}

fn bad(var: &'static str, why: &'static str) -> EnvError {
    EnvError { var, why }
}

/// `K2_NODE_NAME` cannot be formed from the input's subId.
pub fn bad_sub_id() -> EnvError {
    bad("K2_NODE_NAME", "cannot be formed: subId is not a plain id")
}

/// `K2_IP_TYPE`: what Center accepts (it maps anything else to `unknown`; we do it first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpType {
    Residential,
    NonResidential,
    Unknown,
}

impl IpType {
    /// Case, spaces and `-`/`_` do not matter; anything unrecognised is `unknown`.
    pub fn normalise(raw: &str) -> IpType {
        let s: String = raw.trim().to_ascii_lowercase().chars().filter(|c| !matches!(c, '-' | '_' | ' ')).collect();
        match s.as_str() {
            "residential" => IpType::Residential,
            "nonresidential" => IpType::NonResidential,
            _ => IpType::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IpType::Residential => "residential",
            IpType::NonResidential => "non_residential",
            IpType::Unknown => "unknown",
        }
    }
}

/// `K2_NODE_TRAFFIC_LIMIT_GB` as runbook 000 derives it: `trafficTotalBytes / 1024³`, a whole
/// number of GiB (integer division). It is display and load reporting only — the quota itself
/// travels exactly, as bytes, in `NodeDeployed.sold_bytes`, and the meter enforces bytes — so a
/// quota below 1 GiB shows as `1` rather than an impossible `0`.
pub fn traffic_gb(bytes: u64) -> String {
    (bytes >> 30).max(1).to_string()
}

/// What compose's `env_file` takes literally in an unquoted value: printable ASCII without
/// blanks, quotes, `\`, `#` (comments) or `$` (interpolation).
fn literal_safe(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'`' | b'\\' | b'#' | b'$'))
}

fn token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The checked contents of one node's `.env`.
pub struct NodeEnv {
    node_secret: SecretString,
    claim: SecretString,
    center_url: String,
    domain: String,
    version: String,
    traffic_gb: String,
    node_name: String,
    region: String,
    ip_type: IpType,
}

impl std::fmt::Debug for NodeEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEnv").field("node_name", &self.node_name).finish_non_exhaustive()
    }
}

/// The inputs of a `.env`, before checking.
pub struct EnvInputs<'a> {
    pub node_secret: &'a SecretString,
    pub claim: &'a SecretString,
    pub center_url: &'a str,
    pub domain: &'a str,
    pub version: &'a str,
    pub traffic_total_bytes: u64,
    /// Parsed at the edge: a subject token (`[A-Za-z0-9_-]`, at most 128), which is what
    /// `K2_NODE_NAME` needs too (`bad_sub_id` when it is not).
    pub sub_id: &'a SubId,
    pub region: &'a str,
    pub ip_type: &'a str,
}

impl NodeEnv {
    pub fn new(i: EnvInputs<'_>) -> Result<NodeEnv, EnvError> {
        let secret = i.node_secret.expose_secret();
        if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("K2_NODE_SECRET", "is not 32 bytes of hex"));
        }
        let claim = i.claim.expose_secret();
        if claim.is_empty() {
            return Err(bad("K2_PRIVATE_CLAIM", "is empty (a private node needs its claim)"));
        }
        if claim.len() > 4096 || !literal_safe(claim) {
            return Err(bad("K2_PRIVATE_CLAIM", "has characters a .env value cannot carry"));
        }
        let url = i.center_url.trim();
        let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
        match rest {
            Some(r) if !r.is_empty() && url.len() <= 2048 && literal_safe(url) => {}
            _ => return Err(bad("K2_CENTER_URL", "is not an http(s) URL")),
        }
        let domain = i.domain.trim().to_ascii_lowercase();
        if domain.len() > 253
            || !domain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            || domain.starts_with(['.', '-'])
        {
            return Err(bad("K2_DOMAIN", "is not a host name"));
        }
        let version = i.version.trim();
        if version.is_empty() || version.eq_ignore_ascii_case("latest") || !literal_safe(version) {
            return Err(bad("K2_VERSION", "is not a pinned release"));
        }
        if i.traffic_total_bytes == 0 {
            return Err(bad("K2_NODE_TRAFFIC_LIMIT_GB", "would be 0 (trafficTotalBytes is 0)"));
        }
        if !token(i.region) {
            return Err(bad("K2_NODE_REGION", "is not a plain region id"));
        }
        Ok(NodeEnv {
            node_secret: i.node_secret.clone(),
            claim: i.claim.clone(),
            center_url: url.to_string(),
            domain,
            version: version.to_string(),
            traffic_gb: traffic_gb(i.traffic_total_bytes),
            node_name: i.sub_id.node_name(),
            region: i.region.to_string(),
            ip_type: IpType::normalise(i.ip_type),
        })
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn ip_type(&self) -> IpType {
        self.ip_type
    }

    /// The file's text, in the runbook's order. Goes to the node over SSH stdin only.
    pub fn render(&self) -> SecretString {
        let lines = [
            ("K2_NODE_SECRET", self.node_secret.expose_secret()),
            ("K2_PRIVATE_CLAIM", self.claim.expose_secret()),
            ("K2_CENTER_URL", self.center_url.as_str()),
            ("K2_DOMAIN", self.domain.as_str()),
            ("K2_VERSION", self.version.as_str()),
            ("K2_NODE_TRAFFIC_LIMIT_GB", self.traffic_gb.as_str()),
            ("K2_NODE_NAME", self.node_name.as_str()),
            ("K2_NODE_REGION", self.region.as_str()),
            ("K2_IP_TYPE", self.ip_type.as_str()),
        ];
        let mut out = String::from("# Written by svc-deployer (Pnp). Secrets: K2_NODE_SECRET, K2_PRIVATE_CLAIM.\n");
        for (k, v) in lines {
            out.push_str(k);
            out.push('=');
            out.push_str(v);
            out.push('\n');
        }
        SecretString::from(out)
    }
}

/// `pn-<subId>`: the instance and node name (the idempotency root).
pub fn node_name(sub_id: &str) -> String {
    proto::node_name(sub_id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    static SUB_42: std::sync::LazyLock<SubId> = std::sync::LazyLock::new(|| SubId::parse("sub-42").unwrap());

    fn inputs<'a>(secret: &'a SecretString, claim: &'a SecretString) -> EnvInputs<'a> {
        EnvInputs {
            node_secret: secret,
            claim,
            center_url: "http://127.0.0.1:8080",
            domain: "",
            version: "1.6.3",
            traffic_total_bytes: 950 * (1 << 30),
            sub_id: &SUB_42,
            region: "sg",
            ip_type: "Non-Residential",
        }
    }

    #[test]
    fn renders_every_runbook_variable() {
        let secret = SecretString::from("ab".repeat(32));
        let claim = SecretString::from("clm_abc-123.XYZ");
        let env = NodeEnv::new(inputs(&secret, &claim)).unwrap();
        let text = env.render().expose_secret().to_string();
        for line in [
            format!("K2_NODE_SECRET={}", "ab".repeat(32)),
            "K2_PRIVATE_CLAIM=clm_abc-123.XYZ".into(),
            "K2_CENTER_URL=http://127.0.0.1:8080".into(),
            "K2_DOMAIN=".into(),
            "K2_VERSION=1.6.3".into(),
            "K2_NODE_TRAFFIC_LIMIT_GB=950".into(),
            "K2_NODE_NAME=pn-sub-42".into(),
            "K2_NODE_REGION=sg".into(),
            "K2_IP_TYPE=non_residential".into(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}");
        }
        assert!(!format!("{env:?}").contains("abab"));
    }

    #[test]
    fn hostile_values_are_refused_without_echo() {
        let secret = SecretString::from("ab".repeat(32));
        let claim = SecretString::from("tok\nK2_EVIL=1");
        let e = NodeEnv::new(inputs(&secret, &claim)).unwrap_err();
        assert_eq!(e.var, "K2_PRIVATE_CLAIM");
        assert!(!e.to_string().contains("EVIL"));
        let claim = SecretString::from("ok-token");
        for (field, val) in [("url", "ftp://x"), ("url", "http://a b"), ("domain", "a;b"), ("region", "s g")] {
            let mut i = inputs(&secret, &claim);
            match field {
                "url" => i.center_url = val,
                "domain" => i.domain = val,
                _ => i.region = val,
            }
            assert!(NodeEnv::new(i).is_err(), "{field}={val}");
        }
        // A subId unfit for `K2_NODE_NAME` never becomes a `SubId` (the deployer refuses the
        // input with `bad_sub_id`).
        assert!(SubId::parse("a/b").is_err());
        let mut i = inputs(&secret, &claim);
        i.version = "latest";
        assert!(NodeEnv::new(i).is_err());
        let mut i = inputs(&secret, &claim);
        i.traffic_total_bytes = 0;
        assert!(NodeEnv::new(i).is_err());
        let short = SecretString::from("abc");
        assert!(NodeEnv::new(inputs(&short, &claim)).is_err());
    }

    #[test]
    fn ip_types_normalise() {
        assert_eq!(IpType::normalise("residential"), IpType::Residential);
        assert_eq!(IpType::normalise(" RESIDENTIAL "), IpType::Residential);
        assert_eq!(IpType::normalise("non_residential"), IpType::NonResidential);
        assert_eq!(IpType::normalise("non-residential"), IpType::NonResidential);
        assert_eq!(IpType::normalise(""), IpType::Unknown);
        assert_eq!(IpType::normalise("datacenter"), IpType::Unknown);
    }

    #[test]
    fn traffic_in_gib() {
        assert_eq!(traffic_gb(950 * (1 << 30)), "950");
        assert_eq!(traffic_gb(1 << 40), "1024");
        assert_eq!(traffic_gb(3 * (1 << 29)), "1");
        assert_eq!(traffic_gb(1), "1");
        assert_eq!(traffic_gb(1_000_000_000_000), "931");
        assert_eq!(traffic_gb(u64::MAX), "17179869183");
    }

    proptest! {
        #[test]
        fn traffic_is_a_whole_number_of_gib_at_most_the_quota(bytes in 1u64..u64::MAX) {
            let s = traffic_gb(bytes);
            let v: u64 = s.parse().unwrap();
            prop_assert!(v >= 1 && (v << 30 <= bytes || v == 1) && (v + 1) << 30 > bytes, "{bytes} → {s}");
        }

        #[test]
        fn any_ip_type_maps_to_one_of_three(raw in ".{0,40}") {
            let t = IpType::normalise(&raw).as_str();
            prop_assert!(["residential", "non_residential", "unknown"].contains(&t));
        }
    }
}
