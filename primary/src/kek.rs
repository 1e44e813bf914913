//! Sealing CA keys at rest under a key-encryption key (KEK).
//!
//! The store (etcd, or the embedded file) only ever holds CA keys sealed
//! with AES-256-GCM under the KEK, which the primary is given as a file or
//! an environment variable and which never enters the store. The sealed
//! form binds the key to the certificate it belongs to, so a sealed key
//! cannot be swapped under another certificate.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("the KEK must be 32 random bytes, base64-encoded (got {0} bytes after decoding)")]
    BadLength(usize),
    #[error("the KEK is not base64: {0}")]
    NotBase64(String),
    #[error(
        "the stored key was sealed under KEK {stored}, but this primary holds KEK {ours}; give it the KEK the mesh was created with"
    )]
    WrongKek { stored: String, ours: String },
    #[error("the sealed key does not open: it was altered, or belongs to another certificate")]
    Corrupt,
    #[error("sealing a CA key under the KEK failed; nothing was stored")]
    SealFailed,
}

pub struct Kek {
    key: LessSafeKey,
    id: String,
}

impl Kek {
    /// From the base64 text of 32 bytes.
    pub fn from_base64(text: &str) -> Result<Self, KekError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| KekError::NotBase64(e.to_string()))?;
        if bytes.len() != 32 {
            return Err(KekError::BadLength(bytes.len()));
        }
        let unbound =
            UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| KekError::BadLength(bytes.len()))?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            id: hex::encode(&Sha256::digest(&bytes)[..8]),
        })
    }

    /// A fresh random KEK, base64.
    pub fn generate() -> String {
        STANDARD.encode(rand::random::<[u8; 32]>())
    }

    /// A short, non-secret name for this KEK.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `secret` for the certificate named by `binding`.
    pub fn seal(&self, secret: &str, binding: &str) -> Result<Sealed, KekError> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut data = secret.as_bytes().to_vec();
        // Sealing fails only for inputs over ~64 GiB; were it ever to, an
        // unsealed or half-sealed key must not reach the store.
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(binding.as_bytes()),
                &mut data,
            )
            .map_err(|_| KekError::SealFailed)?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&data);
        Ok(Sealed {
            kek_id: self.id.clone(),
            ciphertext: STANDARD.encode(out),
        })
    }

    pub fn open(&self, sealed: &Sealed, binding: &str) -> Result<String, KekError> {
        if sealed.kek_id != self.id {
            return Err(KekError::WrongKek {
                stored: sealed.kek_id.clone(),
                ours: self.id.clone(),
            });
        }
        let raw = STANDARD
            .decode(&sealed.ciphertext)
            .map_err(|_| KekError::Corrupt)?;
        if raw.len() < NONCE_LEN {
            return Err(KekError::Corrupt);
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KekError::Corrupt)?;
        let mut data = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(binding.as_bytes()), &mut data)
            .map_err(|_| KekError::Corrupt)?;
        String::from_utf8(plain.to_vec()).map_err(|_| KekError::Corrupt)
    }
}

/// A sealed secret as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sealed {
    pub kek_id: String,
    pub ciphertext: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_refuses_the_wrong_kek_or_binding() {
        let kek = Kek::from_base64(&Kek::generate()).unwrap();
        let sealed = kek
            .seal("-----BEGIN PRIVATE KEY-----\nsecret", "cert-a")
            .unwrap();
        assert!(!sealed.ciphertext.contains("PRIVATE"));
        assert_eq!(
            kek.open(&sealed, "cert-a").unwrap(),
            "-----BEGIN PRIVATE KEY-----\nsecret"
        );
        assert!(matches!(
            kek.open(&sealed, "cert-b"),
            Err(KekError::Corrupt)
        ));
        let other = Kek::from_base64(&Kek::generate()).unwrap();
        assert!(matches!(
            other.open(&sealed, "cert-a"),
            Err(KekError::WrongKek { .. })
        ));
        assert!(matches!(
            Kek::from_base64("c2hvcnQ="),
            Err(KekError::BadLength(5))
        ));
        assert!(matches!(
            Kek::from_base64("!!!"),
            Err(KekError::NotBase64(_))
        ));
    }
}
