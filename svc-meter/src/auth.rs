//! Node credentials: `Authorization: Basic base64(ipv4:secret)` parsed into typed parts, the
//! secret hashed with SHA-256 and compared in constant time with the hash from the deployer.
//!
//! The meter never stores or logs a node secret: it sees it only for the length of one
//! request, inside a `SecretString`. Every failure here becomes the same 401 upstream.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Longest `Authorization` value considered (an ipv4 and a 64-hex-digit secret need ~110).
pub const MAX_HEADER_LEN: usize = 1024;

/// Why credentials could not be read. Never shown to the client (every case is one 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no Authorization header")]
    Missing,
    #[error("Authorization header too long")]
    TooLong,
    #[error("not Basic credentials")]
    Scheme,
    #[error("credentials are not base64")]
    Base64,
    #[error("credentials are not UTF-8")]
    Utf8,
    #[error("credentials have no ':'")]
    NoColon,
    #[error("user is not an IPv4 address")]
    BadIpv4,
    #[error("empty secret")]
    EmptySecret,
}

/// A node's claimed identity.
#[derive(Debug)]
pub struct Credentials {
    pub ipv4: Ipv4Addr,
    pub secret: SecretString,
}

/// Parses an `Authorization` header value.
pub fn parse_basic(value: Option<&[u8]>) -> Result<Credentials, AuthError> {
    let value = value.ok_or(AuthError::Missing)?;
    if value.len() > MAX_HEADER_LEN {
        return Err(AuthError::TooLong);
    }
    let value = std::str::from_utf8(value).map_err(|_| AuthError::Scheme)?.trim();
    let (scheme, rest) = value.split_once(' ').ok_or(AuthError::Scheme)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::Scheme);
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).map_err(|_| AuthError::Base64)?;
    let decoded = String::from_utf8(decoded).map_err(|_| AuthError::Utf8)?;
    let (user, secret) = decoded.split_once(':').ok_or(AuthError::NoColon)?;
    let ipv4: Ipv4Addr = user.parse().map_err(|_| AuthError::BadIpv4)?;
    if secret.is_empty() {
        return Err(AuthError::EmptySecret);
    }
    Ok(Credentials { ipv4, secret: SecretString::from(secret.to_string()) })
}

/// SHA-256 of the secret's text (as the deployer computes `node_secret_sha256`).
pub fn secret_sha256(secret: &SecretString) -> [u8; 32] {
    Sha256::digest(secret.expose_secret().as_bytes()).into()
}

/// Constant-time equality of two hashes.
pub fn hashes_match(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// The `Authorization` value for a node (used by the bench and tests).
pub fn basic_header(ipv4: Ipv4Addr, secret: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{ipv4}:{secret}")))
}

// ---------- who is knocking: the source address, and a budget of failures per source ----------

/// Networks whose connections are proxies (Traefik, `pn-ingress`, a mesh sidecar): for them the
/// source is read from `X-Forwarded-For` (`PN_TRUSTED_PROXIES`, e.g. `127.0.0.0/8,::1,10.42.0.0/16`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses a comma-separated list of addresses and CIDR networks.
    pub fn parse(list: &str) -> Result<TrustedProxies, String> {
        let mut nets = Vec::new();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (addr, len) = match part.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (part, None),
            };
            let ip: IpAddr = addr.parse().map_err(|_| format!("{part:?} is not an address or network"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = match len {
                Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| format!("{part:?}: bad prefix length"))?,
                None => max,
            };
            nets.push((ip, len));
        }
        Ok(TrustedProxies(nets))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|(net, len)| match (canonical(*net), ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), *len),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), *len),
            _ => false,
        })
    }
}

fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
    let (full, rest) = (usize::from(len / 8), len % 8);
    if a[..full] != b[..full] {
        return false;
    }
    rest == 0 || (a[full] ^ b[full]) >> (8 - rest) == 0
}

/// An IPv4-mapped IPv6 address as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The address a request comes from: the TCP peer, or — when the peer is a trusted proxy — the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy (entries further left
/// were written by the client and prove nothing). A malformed entry met on the way ends the
/// walk at the peer.
pub fn source_of(peer: IpAddr, forwarded_for: Option<&[u8]>, trusted: &TrustedProxies) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.contains(peer) {
        return peer;
    }
    let Some(list) = forwarded_for.and_then(|v| std::str::from_utf8(v).ok()) else { return peer };
    let mut last = peer;
    for entry in list.rsplit(',').map(str::trim).take(16) {
        let Ok(ip) = entry.parse::<IpAddr>() else { return peer };
        let ip = canonical(ip);
        if !trusted.contains(ip) {
            return ip;
        }
        last = ip;
    }
    last
}

/// The key a source is budgeted under: an IPv4 address, or an IPv6 /64 (one host's usual share).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A budget of failed authentications per source: `burst` at once, refilled at `per_sec`.
/// A source that spent it gets 429 *before* its credentials are parsed, hashed or compared and
/// before any node's lock — an unauthenticated flood costs a map lookup. Successful requests
/// spend nothing, so a good node is limited only by sharing a source with a flood. The map
/// holds at most `max_sources` sources; past that (after dropping the ones whose budget is
/// whole again), new sources share one overflow budget.
#[derive(Debug)]
pub struct FailureLimiter {
    burst: f64,
    per_sec: f64,
    max_sources: usize,
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    buckets: HashMap<IpAddr, Bucket>,
    last_prune: Option<Instant>,
}

/// Where the sources beyond `max_sources` are budgeted together.
const OVERFLOW: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

impl FailureLimiter {
    /// `burst == 0` or `per_sec <= 0` turns the limit off.
    pub fn new(burst: u32, per_sec: f64, max_sources: usize) -> FailureLimiter {
        FailureLimiter {
            burst: f64::from(burst),
            per_sec: if per_sec.is_finite() { per_sec } else { 0.0 },
            max_sources: max_sources.max(1),
            state: Mutex::new(LimiterState { buckets: HashMap::new(), last_prune: None }),
        }
    }

    fn enabled(&self) -> bool {
        self.burst >= 1.0 && self.per_sec > 0.0
    }

    fn refill(&self, b: &Bucket, now: Instant) -> f64 {
        (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.per_sec).min(self.burst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LimiterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(retry_after)` when `source` has no failure left to spend.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let key = source_key(source);
        let st = self.lock();
        let b = match st.buckets.get(&key) {
            Some(b) => b,
            None if st.buckets.len() >= self.max_sources => match st.buckets.get(&OVERFLOW) {
                Some(b) => b,
                None => return Ok(()),
            },
            None => return Ok(()),
        };
        let tokens = self.refill(b, now);
        if tokens >= 1.0 { Ok(()) } else { Err(Duration::from_secs_f64(((1.0 - tokens) / self.per_sec).clamp(0.001, 3600.0))) }
    }

    /// Spends one failure of `source`'s budget.
    pub fn charge(&self, source: IpAddr, now: Instant) {
        if !self.enabled() {
            return;
        }
        let mut key = source_key(source);
        let mut st = self.lock();
        if !st.buckets.contains_key(&key) && st.buckets.len() >= self.max_sources {
            // Drop sources whose budget is whole again (at most once a second: O(n)).
            if st.last_prune.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                st.last_prune = Some(now);
                let (burst, per_sec) = (self.burst, self.per_sec);
                st.buckets.retain(|k, b| *k == OVERFLOW || b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < burst);
            }
            if st.buckets.len() >= self.max_sources {
                key = OVERFLOW;
            }
        }
        let fresh = Bucket { tokens: self.burst, at: now };
        let b = st.buckets.get(&key).copied().unwrap_or(fresh);
        let tokens = (self.refill(&b, now) - 1.0).max(0.0);
        st.buckets.insert(key, Bucket { tokens, at: now });
    }

    /// Sources currently tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.lock().buckets.len()
    }
}

/// One warning line per node per interval for wrong secrets, with the count since the last
/// line: a flood of bad credentials for a known node does not flood the logs.
#[derive(Debug)]
pub struct WarnEvery {
    every: Duration,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl WarnEvery {
    pub fn new(every: Duration) -> WarnEvery {
        WarnEvery { every, seen: Mutex::new(HashMap::new()) }
    }

    /// Counts one event of `key`; `Some(count)` when a line is due now (the events since the
    /// last line, this one included).
    pub fn hit(&self, key: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get_mut(key) {
            Some((last, n)) if now.saturating_duration_since(*last) < self.every => {
                *n += 1;
                None
            }
            Some((last, n)) => {
                let count = *n + 1;
                (*last, *n) = (now, 0);
                Some(count)
            }
            None => {
                seen.insert(key.to_string(), (now, 0));
                Some(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_source_is_the_peer_unless_a_trusted_proxy_forwards() {
        let t = TrustedProxies::parse("127.0.0.0/8, ::1, 10.42.0.0/16").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Not a proxy: its X-Forwarded-For is ignored.
        assert_eq!(source_of(ip("203.0.113.9"), Some(b"198.51.100.1"), &t), ip("203.0.113.9"));
        // Through the proxies: the right-most untrusted entry; what the client wrote to the left
        // of it proves nothing.
        assert_eq!(source_of(ip("10.42.3.4"), Some(b"1.1.1.1, 198.51.100.7, 10.42.0.9"), &t), ip("198.51.100.7"));
        assert_eq!(source_of(ip("127.0.0.1"), None, &t), ip("127.0.0.1"));
        assert_eq!(source_of(ip("127.0.0.1"), Some(b"garbage, 198.51.100.7"), &t), ip("198.51.100.7"));
        assert_eq!(source_of(ip("127.0.0.1"), Some(b"198.51.100.7, garbage"), &t), ip("127.0.0.1"));
        assert_eq!(source_of(ip("::ffff:127.0.0.1"), Some(b"::ffff:198.51.100.8"), &t), ip("198.51.100.8"));
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err() && TrustedProxies::parse("nope").is_err());
        assert!(TrustedProxies::parse("").unwrap().0.is_empty());
        let t = TrustedProxies::parse("10.42.128.0/17").unwrap();
        assert!(t.contains(ip("10.42.200.1")) && !t.contains(ip("10.42.127.255")));
        assert_eq!(source_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn a_source_spends_its_failures_then_waits() {
        let l = FailureLimiter::new(3, 2.0, 100);
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(a, t0).is_ok());
            l.charge(a, t0);
        }
        let wait = l.check(a, t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
        assert!(l.check(b, t0).is_ok(), "another source is not affected");
        assert!(l.check(a, t0 + Duration::from_millis(500)).is_ok(), "refilled at per_sec");
        assert!(FailureLimiter::new(0, 1.0, 10).check(a, t0).is_ok());
    }

    #[test]
    fn the_map_stays_bounded_under_many_sources() {
        let l = FailureLimiter::new(1, 0.001, 64);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            l.charge(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), t0);
        }
        assert!(l.tracked() <= 65, "{}", l.tracked());
        // Past the bound, new sources share the overflow budget (spent by now).
        assert!(l.check(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), t0).is_err());
    }

    #[test]
    fn wrong_secret_warnings_are_one_line_per_interval_with_a_count() {
        let w = WarnEvery::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(w.hit("pn-a", t0), Some(1));
        for _ in 0..99 {
            assert_eq!(w.hit("pn-a", t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(w.hit("pn-b", t0), Some(1));
        assert_eq!(w.hit("pn-a", t0 + Duration::from_secs(61)), Some(100));
        assert_eq!(w.hit("pn-a", t0 + Duration::from_secs(62)), None);
    }

    #[test]
    fn parses_good_credentials() -> Result<(), AuthError> {
        let h = basic_header(Ipv4Addr::new(127, 0, 1, 7), "ab:cd");
        let c = parse_basic(Some(h.as_bytes()))?;
        assert_eq!(c.ipv4, Ipv4Addr::new(127, 0, 1, 7));
        assert_eq!(c.secret.expose_secret(), "ab:cd", "only the first ':' separates");
        let lower = h.replacen("Basic", "basic", 1);
        assert!(parse_basic(Some(lower.as_bytes())).is_ok());
        Ok(())
    }

    #[test]
    fn typed_errors_for_bad_credentials() {
        let b64 = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        assert_eq!(parse_basic(None).err(), Some(AuthError::Missing));
        assert_eq!(parse_basic(Some(b"Bearer x")).err(), Some(AuthError::Scheme));
        assert_eq!(parse_basic(Some(b"Basic")).err(), Some(AuthError::Scheme));
        assert_eq!(parse_basic(Some(b"Basic !!!")).err(), Some(AuthError::Base64));
        assert_eq!(parse_basic(Some(b64("nocolon").as_bytes())).err(), Some(AuthError::NoColon));
        assert_eq!(parse_basic(Some(b64("host:secret").as_bytes())).err(), Some(AuthError::BadIpv4));
        assert_eq!(parse_basic(Some(b64("::1:secret").as_bytes())).err(), Some(AuthError::BadIpv4));
        assert_eq!(parse_basic(Some(b64("1.2.3.4:").as_bytes())).err(), Some(AuthError::EmptySecret));
        assert_eq!(parse_basic(Some(&[b'x'; 2000])).err(), Some(AuthError::TooLong));
        let bad_utf8 = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode([0xff, 0xfe, b':', b'a']));
        assert_eq!(parse_basic(Some(bad_utf8.as_bytes())).err(), Some(AuthError::Utf8));
    }

    #[test]
    fn the_hash_is_of_the_hex_text() {
        let s = SecretString::from("00ff".to_string());
        let h = secret_sha256(&s);
        assert_eq!(hex::encode(h), "8909cde2f411a84e86e7a39c8a3916b7cda6a9d977778030b6f6a491401400bc");
        assert!(hashes_match(&h, &Sha256::digest(b"00ff").into()));
        assert!(!hashes_match(&h, &[0; 32]));
    }

    proptest! {
        #[test]
        fn any_header_gives_credentials_or_a_typed_error(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_basic(Some(&bytes));
        }

        #[test]
        fn any_basic_payload_gives_credentials_or_a_typed_error(payload in prop::collection::vec(any::<u8>(), 0..200), sp in "[ \t]{0,3}") {
            let h = format!("Basic{sp} {}", base64::engine::general_purpose::STANDARD.encode(&payload));
            match parse_basic(Some(h.as_bytes())) {
                Ok(c) => {
                    let text = String::from_utf8(payload).unwrap_or_default();
                    let prefix = format!("{}:", c.ipv4);
                    prop_assert!(text.starts_with(&prefix));
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn round_trip(a in any::<[u8; 4]>(), secret in "[0-9a-f]{1,64}") {
            let ip = Ipv4Addr::from(a);
            let c = parse_basic(Some(basic_header(ip, &secret).as_bytes()));
            prop_assert!(c.as_ref().is_ok_and(|c| c.ipv4 == ip && c.secret.expose_secret() == secret));
        }
    }
}
