//! API keys at rest: ChaCha20-Poly1305 AEAD with a key derived (HKDF-SHA256)
//! from `TENANTLLM_SECRET_KEY`. Each value is bound to its row (scope and provider are the
//! associated data), so a ciphertext copied to another tenant's row does not decrypt.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::error::{config_err, Error, Result};

pub const SECRET_ENV: &str = "TENANTLLM_SECRET_KEY";
const MIN_SECRET_LEN: usize = 16;

/// The cipher for stored keys; absent when no secret is configured.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

/// A sealed value: (nonce, ciphertext with tag).
pub type Sealed = (Vec<u8>, Vec<u8>);

impl Sealer {
    pub fn new(secret: &str) -> Result<Sealer> {
        if secret.chars().count() < MIN_SECRET_LEN {
            return config_err(format!("{SECRET_ENV} must be at least {MIN_SECRET_LEN} characters long"));
        }
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(Some(b"tenantllm"), secret.as_bytes())
            .expand(b"api_configurations v1", &mut key)
            .map_err(|_| Error::Configuration("cannot derive the encryption key".into()))?;
        Ok(Sealer { cipher: ChaCha20Poly1305::new(Key::from_slice(&key)) })
    }

    /// The sealer from the environment, if `TENANTLLM_SECRET_KEY` is set.
    pub fn from_env() -> Result<Option<Sealer>> {
        match std::env::var(SECRET_ENV) {
            Ok(s) if !s.is_empty() => Sealer::new(&s).map(Some),
            _ => Ok(None),
        }
    }

    fn aad(scope: &str, provider: &str) -> Vec<u8> {
        format!("{scope}\u{0}{provider}").into_bytes()
    }

    pub fn seal(&self, scope: &str, provider: &str, value: &str) -> Result<Sealed> {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ct = self
            .cipher
            .encrypt(&nonce, Payload { msg: value.as_bytes(), aad: &Self::aad(scope, provider) })
            .map_err(|_| Error::Configuration("cannot encrypt the API key".into()))?;
        Ok((nonce.to_vec(), ct))
    }

    pub fn open(&self, scope: &str, provider: &str, sealed: &Sealed) -> Result<String> {
        let (nonce, ct) = sealed;
        let wrong = || {
            Error::Configuration(format!(
                "cannot decrypt the stored {provider} API key ({scope}): {SECRET_ENV} is not the one it was stored with, or the row is corrupt"
            ))
        };
        if nonce.len() != 12 {
            return Err(wrong());
        }
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &Self::aad(scope, provider) })
            .map_err(|_| wrong())?;
        String::from_utf8(plain).map_err(|_| wrong())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_secret_or_row() {
        let s = Sealer::new("correct horse battery staple").unwrap();
        let sealed = s.seal("tenant:acme", "openai", "sk-live-123").unwrap();
        assert!(!sealed.1.windows(11).any(|w| w == b"sk-live-123"));
        assert_eq!(s.open("tenant:acme", "openai", &sealed).unwrap(), "sk-live-123");
        let other = Sealer::new("another secret entirely").unwrap();
        let e = other.open("tenant:acme", "openai", &sealed).unwrap_err().to_string();
        assert!(e.contains(SECRET_ENV) && !e.contains("sk-live"));
        assert!(s.open("tenant:globex", "openai", &sealed).is_err());
        assert!(Sealer::new("short").is_err());
    }
}
