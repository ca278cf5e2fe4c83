//! Sealing of secrets at rest and in flight: XChaCha20-Poly1305 with the key from
//! `PN_SEAL_KEY` (32 bytes, hex or base64). A sealed blob is `0x01 ‖ nonce(24) ‖ ciphertext`.
//! Opening yields a `SecretString`; nothing here ever formats a plaintext.

use base64::Engine;
use chacha20poly1305::aead::{Aead, Generate, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use secrecy::{ExposeSecret, SecretString};

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the key must be 32 bytes as 64 hex digits or base64")]
    BadKey,
    #[error("sealed blob is malformed")]
    Malformed,
    #[error("sealed blob does not open with this key (wrong key or tampered)")]
    Open,
    #[error("sealed secret is not UTF-8")]
    NotUtf8,
}

/// The sealing key. Its `Debug` is redacted.
#[derive(Clone)]
pub struct SealKey(XChaCha20Poly1305);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey([REDACTED])")
    }
}

impl SealKey {
    pub fn parse(s: &SecretString) -> Result<SealKey, SealError> {
        let s = s.expose_secret().trim();
        let bytes = if s.len() == 64 {
            hex::decode(s).map_err(|_| SealError::BadKey)?
        } else {
            base64::engine::general_purpose::STANDARD.decode(s).map_err(|_| SealError::BadKey)?
        };
        let key = Key::try_from(bytes.as_slice()).map_err(|_| SealError::BadKey)?;
        Ok(SealKey(XChaCha20Poly1305::new(&key)))
    }

    /// A fresh random key as 64 hex digits (for `pnctl up`'s dev secrets).
    pub fn generate_hex() -> SecretString {
        let key = Key::generate();
        SecretString::from(hex::encode(key))
    }

    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let nonce = XNonce::generate();
        // Encryption with a valid key and a 24-byte nonce cannot fail for in-memory buffers.
        let ct = self.0.encrypt(&nonce, plain).unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn seal_str(&self, secret: &SecretString) -> Vec<u8> {
        self.seal(secret.expose_secret().as_bytes())
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != VERSION {
            return Err(SealError::Malformed);
        }
        let nonce = XNonce::try_from(&sealed[1..1 + NONCE_LEN]).map_err(|_| SealError::Malformed)?;
        self.0.decrypt(&nonce, &sealed[1 + NONCE_LEN..]).map_err(|_| SealError::Open)
    }

    pub fn open_str(&self, sealed: &[u8]) -> Result<SecretString, SealError> {
        let bytes = self.open(sealed)?;
        String::from_utf8(bytes).map(SecretString::from).map_err(|_| SealError::NotUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let key = SealKey::parse(&SealKey::generate_hex()).unwrap_or_else(|e| panic!("{e}"));
        let sealed = key.seal_str(&SecretString::from("claim-abc"));
        assert!(!sealed.windows(9).any(|w| w == b"claim-abc"));
        assert_eq!(key.open_str(&sealed).map(|s| s.expose_secret().to_string()), Ok("claim-abc".into()));
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(key.open(&bad), Err(SealError::Open));
        let other = SealKey::parse(&SealKey::generate_hex()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(other.open(&sealed), Err(SealError::Open));
        assert_eq!(key.open(b"xx"), Err(SealError::Malformed));
    }

    /// The format does not move with the cipher crate: a blob sealed before (version byte, nonce,
    /// XChaCha20-Poly1305 ciphertext + tag; computed outside Rust from draft-irtf-cfrg-xchacha,
    /// checked there against the draft's test vector A.3.1) still opens.
    #[test]
    fn blob_sealed_before_still_opens() {
        let key = SealKey::parse(&SecretString::from("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"))
            .unwrap_or_else(|e| panic!("{e}"));
        let sealed = hex::decode(
            "016465666768696a6b6c6d6e6f707172737475767778797a7b1f1f98d99203fdedec55f312c01dd2a476d937178b5eaf8b0f778bf715b90b448c1a00104ba294",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(key.open_str(&sealed).map(|s| s.expose_secret().to_string()), Ok("claim-token-from-before".into()));
        let fresh = key.seal(b"claim-token-from-before");
        assert_eq!((fresh.len(), fresh[0]), (sealed.len(), 1), "same layout: 1 + 24 + plaintext + 16");
        assert_ne!(fresh[1..25], sealed[1..25], "a fresh random nonce per seal");
    }

    #[test]
    fn bad_keys_are_refused_without_echo() {
        for k in ["", "abc", "zz".repeat(32).as_str(), "AAAA"] {
            let e = SealKey::parse(&SecretString::from(k)).err();
            assert_eq!(e, Some(SealError::BadKey));
        }
        assert_eq!(format!("{:?}", SealKey::parse(&SealKey::generate_hex()).ok()), "Some(SealKey([REDACTED]))");
    }
}
