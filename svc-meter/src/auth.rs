//! Node credentials: `Authorization: Basic base64(ipv4:secret)` parsed into typed parts, the
//! secret hashed with SHA-256 and compared in constant time with the hash from the deployer.
//!
//! The meter never stores or logs a node secret: it sees it only for the length of one
//! request, inside a `SecretString`. Every failure here becomes the same 401 upstream.

use std::net::Ipv4Addr;

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
