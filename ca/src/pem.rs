//! PEM helpers over rustls-pki-types, with errors that say what was wrong.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: malformed PEM: {source}")]
    Malformed {
        what: String,
        source: rustls_pki_types::pem::Error,
    },
}

/// Every certificate in a PEM bundle, in order; at least one.
pub fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PemError::Malformed {
            what: what.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate {
            what: what.to_string(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM document.
pub fn private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| PemError::Malformed {
        what: what.to_string(),
        source,
    })
}

/// PEM-encodes DER certificates.
pub fn encode_certs(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| encode("CERTIFICATE", c.as_ref()))
        .collect()
}

/// PEM-encodes one DER object under `label`.
pub fn encode(label: &str, der: &[u8]) -> String {
    ::pem::encode_config(
        &::pem::Pem::new(label, der.to_vec()),
        ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF),
    )
}

/// SHA-256 of DER bytes, lowercase hex: how Isthmus names a certificate.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

/// The DER body of the first PEM block, whatever its label.
pub fn pem_der(text: &str) -> Option<Vec<u8>> {
    ::pem::parse(text).ok().map(|p| p.into_contents())
}
