//! X.509-SVID conformance (spiffe `standards/X509-SVID.md`), checked with
//! x509-parser. Leaves carry exactly one URI SAN holding a workload SPIFFE ID,
//! `cA=false` and a critical keyUsage with `digitalSignature` and without
//! `keyCertSign`/`cRLSign`; signing certificates carry `cA=true` and
//! `keyCertSign`.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeError, SpiffeId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidKind {
    /// A workload certificate.
    Leaf,
    /// A root or intermediate that signs others.
    Signing,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("certificate has {0} URI SANs; an SVID has exactly one")]
    UriSanCount(usize),
    #[error("certificate URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(#[from] SpiffeError),
    #[error("leaf certificate has cA=true")]
    LeafIsCa,
    #[error("signing certificate lacks cA=true")]
    SigningNotCa,
    #[error("certificate has no keyUsage extension")]
    MissingKeyUsage,
    #[error("leaf keyUsage is not marked critical")]
    KeyUsageNotCritical,
    #[error("leaf keyUsage lacks digitalSignature")]
    MissingDigitalSignature,
    #[error("leaf keyUsage grants keyCertSign or cRLSign")]
    LeafCanSign,
    #[error("signing certificate keyUsage lacks keyCertSign")]
    MissingKeyCertSign,
    #[error("certificate has duplicate or conflicting extensions: {0}")]
    BadExtensions(String),
}

/// What Isthmus reads out of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub spiffe_id: Option<SpiffeId>,
    pub is_ca: bool,
    pub serial_hex: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub subject: String,
}

/// Reads the fields Isthmus cares about, without judging them.
pub fn inspect(der: &[u8]) -> Result<CertInfo, SvidError> {
    let cert = parse(der)?;
    let uris = uri_sans(&cert)?;
    let spiffe_id = match uris.as_slice() {
        [one] => SpiffeId::parse(one).ok(),
        _ => None,
    };
    Ok(CertInfo {
        spiffe_id,
        is_ca: cert.is_ca(),
        serial_hex: hex::encode(cert.raw_serial()),
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
        subject: cert.subject().to_string(),
    })
}

/// Checks SVID conformance; for a leaf, returns its SPIFFE ID.
pub fn validate(der: &[u8], kind: SvidKind) -> Result<Option<SpiffeId>, SvidError> {
    let cert = parse(der)?;
    let uris = uri_sans(&cert)?;
    let bc = cert
        .basic_constraints()
        .map_err(|e| SvidError::BadExtensions(e.to_string()))?;
    let is_ca = bc.map(|b| b.value.ca).unwrap_or(false);
    let ku = cert
        .key_usage()
        .map_err(|e| SvidError::BadExtensions(e.to_string()))?
        .ok_or(SvidError::MissingKeyUsage)?;
    match kind {
        SvidKind::Leaf => {
            if uris.len() != 1 {
                return Err(SvidError::UriSanCount(uris.len()));
            }
            let id = SpiffeId::parse_workload(uris[0])?;
            if is_ca {
                return Err(SvidError::LeafIsCa);
            }
            if !ku.critical {
                return Err(SvidError::KeyUsageNotCritical);
            }
            if !ku.value.digital_signature() {
                return Err(SvidError::MissingDigitalSignature);
            }
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(SvidError::LeafCanSign);
            }
            Ok(Some(id))
        }
        SvidKind::Signing => {
            if uris.len() > 1 {
                return Err(SvidError::UriSanCount(uris.len()));
            }
            if let Some(uri) = uris.first() {
                SpiffeId::parse(uri)?;
            }
            if !is_ca {
                return Err(SvidError::SigningNotCa);
            }
            if !ku.value.key_cert_sign() {
                return Err(SvidError::MissingKeyCertSign);
            }
            Ok(None)
        }
    }
}

/// SHA-256 (lowercase hex) of the certificate's SubjectPublicKeyInfo DER:
/// how the primary pins an agent's key.
pub fn public_key_sha256(der: &[u8]) -> Option<String> {
    let cert = parse(der).ok()?;
    Some(spki_sha256(cert.public_key().raw))
}

/// SHA-256 (lowercase hex) of a SubjectPublicKeyInfo DER.
pub fn spki_sha256(spki_der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(spki_der))
}

/// The authority key identifier of a CRL (PEM), if it carries one.
pub fn crl_authority_key_id(crl_pem: &str) -> Option<Vec<u8>> {
    use x509_parser::prelude::{CertificateRevocationList, ParsedExtension};
    let der = ::pem::parse(crl_pem).ok()?.into_contents();
    let (_, crl) = CertificateRevocationList::from_der(&der).ok()?;
    crl.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

/// The certificate's subject key identifier, if it carries one.
pub fn subject_key_id(der: &[u8]) -> Option<Vec<u8>> {
    let cert = parse(der).ok()?;
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

/// The certificate's serial number, as its DER INTEGER bytes.
pub fn serial(der: &[u8]) -> Result<Vec<u8>, SvidError> {
    Ok(parse(der)?.raw_serial().to_vec())
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(SvidError::Malformed(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(SvidError::Malformed(e.to_string())),
    }
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::BadExtensions(e.to_string()))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};

    fn cert(f: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
        )];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.is_ca = IsCa::ExplicitNoCa;
        f(&mut p);
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn conformant_leaf_passes() {
        let id = validate(&cert(|_| {}), SvidKind::Leaf).unwrap();
        assert_eq!(id.unwrap().as_str(), "spiffe://cluster.local/ns/a/sa/b");
    }

    #[test]
    fn nonconformant_svids_get_typed_errors() {
        let two = cert(|p| {
            p.subject_alt_names.push(SanType::URI(
                "spiffe://cluster.local/ns/a/sa/c".try_into().unwrap(),
            ))
        });
        assert_eq!(
            validate(&two, SvidKind::Leaf),
            Err(SvidError::UriSanCount(2))
        );
        let none =
            cert(|p| p.subject_alt_names = vec![SanType::DnsName("a.b".try_into().unwrap())]);
        assert_eq!(
            validate(&none, SvidKind::Leaf),
            Err(SvidError::UriSanCount(0))
        );
        let ca = cert(|p| p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
        assert_eq!(validate(&ca, SvidKind::Leaf), Err(SvidError::LeafIsCa));
        let no_ku = cert(|p| p.key_usages.clear());
        assert_eq!(
            validate(&no_ku, SvidKind::Leaf),
            Err(SvidError::MissingKeyUsage)
        );
        let no_ds = cert(|p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]);
        assert_eq!(
            validate(&no_ds, SvidKind::Leaf),
            Err(SvidError::MissingDigitalSignature)
        );
        let root_path = cert(|p| {
            p.subject_alt_names = vec![SanType::URI("spiffe://cluster.local".try_into().unwrap())]
        });
        assert!(matches!(
            validate(&root_path, SvidKind::Leaf),
            Err(SvidError::BadSpiffeId(SpiffeError::NoPath(_)))
        ));
        let scheme = cert(|p| {
            p.subject_alt_names = vec![SanType::URI(
                "https://cluster.local/ns/a".try_into().unwrap(),
            )]
        });
        assert_eq!(
            validate(&scheme, SvidKind::Leaf),
            Err(SvidError::BadSpiffeId(SpiffeError::WrongScheme))
        );
        for bad in [
            "spiffe://Cluster.local/ns/a",
            "spiffe://td/%2e/a",
            "spiffe://td/a/../b",
            "spiffe://td/a/",
        ] {
            let c = cert(|p| p.subject_alt_names = vec![SanType::URI(bad.try_into().unwrap())]);
            assert!(
                matches!(validate(&c, SvidKind::Leaf), Err(SvidError::BadSpiffeId(_))),
                "{bad}"
            );
        }
        let long = format!("spiffe://td/{}", "a".repeat(2040));
        let c =
            cert(|p| p.subject_alt_names = vec![SanType::URI(long.as_str().try_into().unwrap())]);
        assert_eq!(
            validate(&c, SvidKind::Leaf),
            Err(SvidError::BadSpiffeId(SpiffeError::TooLong(long.len())))
        );
        assert!(matches!(
            validate(b"garbage", SvidKind::Leaf),
            Err(SvidError::Malformed(_))
        ));
    }
}
