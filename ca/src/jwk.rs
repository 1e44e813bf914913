//! JWKs for the SPIFFE bundle format (spiffe `standards/SPIFFE_Trust_Domain_and_Bundle.md`):
//! one key per root, `use: x509-svid`, the certificate in `x5c`.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::svid::SvidError;

const P256: &str = "1.2.840.10045.3.1.7";
const P384: &str = "1.3.132.0.34";

/// The JWK of a root certificate's public key.
pub fn x509_svid_key(der: &[u8]) -> Result<serde_json::Value, SvidError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let spki = cert.public_key();
    let x5c = vec![STANDARD.encode(der)];
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    match spki
        .parsed()
        .map_err(|e| SvidError::Malformed(e.to_string()))?
    {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            let (crv, len) = match curve.as_str() {
                P256 => ("P-256", 32),
                P384 => ("P-384", 48),
                other => {
                    return Err(SvidError::Malformed(format!(
                        "unsupported EC curve {other}"
                    )));
                }
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err(SvidError::Malformed("EC point is not uncompressed".into()));
            }
            Ok(serde_json::json!({
                "use": "x509-svid", "kty": "EC", "crv": crv,
                "x": b64(&data[1..1 + len]), "y": b64(&data[1 + len..]),
                "x5c": x5c,
            }))
        }
        PublicKey::RSA(rsa) => {
            let trim = |b: &[u8]| -> Vec<u8> {
                let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                b[start..].to_vec()
            };
            Ok(serde_json::json!({
                "use": "x509-svid", "kty": "RSA",
                "n": b64(&trim(rsa.modulus)), "e": b64(&trim(rsa.exponent)),
                "x5c": x5c,
            }))
        }
        _ => Err(SvidError::Malformed("unsupported public key type".into())),
    }
}
