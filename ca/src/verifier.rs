//! rustls verifiers that authenticate mesh peers by SPIFFE identity.
//!
//! Web PKI checks host names; the mesh checks SPIFFE IDs. Both verifiers
//! validate the chain with rustls-webpki against the trust bundle (every root
//! the mesh trusts, several during a rotation), then require the peer's leaf to
//! be a conformant X.509-SVID in the bundle's trust domain. The server-side
//! check can further pin the peer to a set of allowed identities, which is how
//! a client makes sure it reached the service it asked for.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use crate::pem::{self, PemError};
use crate::spiffe::SpiffeId;
use crate::svid::{self, SvidKind};

/// The roots of one trust domain, and the CRLs its CAs issued (a replaced
/// cluster intermediate is revoked by one).
#[derive(Clone)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    /// The CRLs, each with the name and key identifier of the CA that
    /// issued it. See [`TrustBundle::with_crls_pem`].
    crls: Arc<Vec<(webpki::CertRevocationList<'static>, CaName)>>,
    /// Each root's name and key identifier (`root_names[i]` is `roots[i]`'s),
    /// read once when CRLs are added, not at every handshake.
    root_names: Arc<Vec<Option<CaName>>>,
    crl_ders: Vec<Vec<u8>>,
    /// Other trust domains this one federates with, each with its own
    /// roots. A peer is verified only against the bundle of the trust domain
    /// its SPIFFE ID names: bundles are never merged, so a foreign root
    /// cannot vouch for an identity in this trust domain, nor ours for theirs.
    federated: Arc<std::collections::BTreeMap<String, TrustBundle>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("root certificate {index} is not a usable trust anchor: {reason}")]
    BadRoot { index: usize, reason: String },
    #[error("CRL {index} is malformed: {reason}")]
    BadCrl { index: usize, reason: String },
}

impl TrustBundle {
    pub fn from_pem(trust_domain: &str, pem_text: &str) -> Result<Self, BundleError> {
        Self::from_der(trust_domain, pem::certs(pem_text, "trust bundle")?)
    }

    pub fn from_der(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::BadRoot {
                        index,
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            roots,
            anchors: Arc::new(anchors),
            crls: Arc::new(Vec::new()),
            root_names: Arc::new(Vec::new()),
            crl_ders: Vec::new(),
            federated: Arc::new(Default::default()),
        })
    }

    /// The same bundle, also trusting peers of other trust domains, each
    /// only through its own roots.
    pub fn with_federated(mut self, federated: Vec<TrustBundle>) -> Self {
        self.federated = Arc::new(
            federated
                .into_iter()
                .filter(|b| b.trust_domain != self.trust_domain)
                .map(|b| (b.trust_domain.clone(), b))
                .collect(),
        );
        self
    }

    /// The federated trust domains and their bundles.
    pub fn federated(&self) -> impl Iterator<Item = &TrustBundle> {
        self.federated.values()
    }

    /// Reads a SPIFFE bundle (a JWK set, as `to_jwks` writes) for
    /// `trust_domain`: the roots are the `x5c` of its `x509-svid` keys.
    pub fn from_jwks(trust_domain: &str, jwks: &serde_json::Value) -> Result<Self, BundleError> {
        use base64::Engine;
        let keys = jwks["keys"]
            .as_array()
            .ok_or_else(|| BundleError::BadRoot {
                index: 0,
                reason: "a SPIFFE bundle needs a \"keys\" array".into(),
            })?;
        let mut roots = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            if key["use"] != "x509-svid" {
                continue;
            }
            let der = key["x5c"][0]
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .ok_or_else(|| BundleError::BadRoot {
                    index,
                    reason: "keys[].x5c[0] is not base64 DER".into(),
                })?;
            roots.push(CertificateDer::from(der));
        }
        if roots.is_empty() {
            return Err(BundleError::BadRoot {
                index: 0,
                reason: "the bundle has no x509-svid key".into(),
            });
        }
        Self::from_der(trust_domain, roots)
    }

    /// The same bundle, also refusing what the CRLs in `pem_text` revoke.
    /// Their signatures are checked when a chain is verified.
    ///
    /// webpki picks the CRL for a certificate by issuer name alone, and CAs
    /// can share a name: roots made before subjects carried the key
    /// identifier, or two CAs made by the same tooling (every CA made by
    /// Istio's `tools/certs` is `O=Istio, CN=Root CA` over `CN=Intermediate
    /// CA`). A CRL of one such CA would then be checked against the other's
    /// key and fail its signature, refusing chains that are fine. So each
    /// CRL keeps its issuer's name and key identifier (its AKI), and a chain
    /// is checked only against the CRLs of the CAs on its own path.
    pub fn with_crls_pem(mut self, pem_text: &str) -> Result<Self, BundleError> {
        let ders: Vec<Vec<u8>> = ::pem::parse_many(pem_text)
            .map_err(|e| BundleError::BadCrl {
                index: 0,
                reason: e.to_string(),
            })?
            .into_iter()
            .filter(|p| p.tag() == "X509 CRL")
            .map(|p| p.into_contents())
            .collect();
        let crls = ders
            .iter()
            .enumerate()
            .map(|(index, der)| {
                let bad = |reason: String| BundleError::BadCrl { index, reason };
                let crl = webpki::OwnedCertRevocationList::from_der(der)
                    .map_err(|e| bad(e.to_string()))?;
                let issuer =
                    CaName::of_crl(der).ok_or_else(|| bad("not a parseable CRL".into()))?;
                Ok((webpki::CertRevocationList::from(crl), issuer))
            })
            .collect::<Result<Vec<_>, BundleError>>()?;
        self.crls = Arc::new(crls);
        self.root_names = Arc::new(self.roots.iter().map(|r| CaName::of_cert(r)).collect());
        self.crl_ders = ders;
        Ok(self)
    }

    /// The CRLs, PEM.
    pub fn crls_pem(&self) -> String {
        self.crl_ders
            .iter()
            .map(|d| pem::encode("X509 CRL", d))
            .collect()
    }

    /// The bundle in the SPIFFE bundle format (a JWK set whose keys have
    /// `use: x509-svid` and carry the root in `x5c`), for federation.
    /// `sequence` is `spiffe_sequence`; it grows with every change.
    pub fn to_jwks(&self, sequence: u64, refresh_hint_secs: u64) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .roots
            .iter()
            .filter_map(|r| crate::jwk::x509_svid_key(r).ok())
            .collect();
        serde_json::json!({
            "keys": keys,
            "spiffe_sequence": sequence,
            "spiffe_refresh_hint": refresh_hint_secs,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn to_pem(&self) -> String {
        pem::encode_certs(&self.roots)
    }

    /// Validates a peer's chain and returns its SPIFFE ID. A peer of a
    /// federated trust domain is verified against that domain's bundle.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        algs: &WebPkiSupportedAlgorithms,
    ) -> Result<SpiffeId, rustls::Error> {
        let claimed = svid::inspect(end_entity)
            .ok()
            .and_then(|i| i.spiffe_id)
            .map(|id| id.trust_domain().to_string());
        if let Some(td) = claimed.filter(|td| *td != self.trust_domain) {
            return match self.federated.get(&td) {
                Some(foreign) => foreign.verify(end_entity, intermediates, now, usage, algs),
                None => Err(other(format!(
                    "peer is in trust domain {td}, which {} does not federate with",
                    self.trust_domain
                ))),
            };
        }
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        let path = ee
            .verify_for_usage(
                algs.all,
                &self.anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(webpki_error)?;
        if !self.crls.is_empty() {
            // The CAs on the path found, and only their CRLs.
            let mut on_path: Vec<CaName> = path
                .intermediate_certificates()
                .filter_map(|c| CaName::of_cert(c.der().as_ref()))
                .collect();
            let anchor = path.anchor();
            let root = self.anchors.iter().position(|a| {
                a.subject == anchor.subject
                    && a.subject_public_key_info == anchor.subject_public_key_info
            });
            if let Some(name) = root.and_then(|i| self.root_names.get(i)?.clone()) {
                on_path.push(name);
            }
            let crls: Vec<&webpki::CertRevocationList<'_>> = self
                .crls
                .iter()
                .filter(|(_, issuer)| on_path.iter().any(|ca| ca.issued(issuer)))
                .map(|(crl, _)| crl)
                .collect();
            if !crls.is_empty() {
                // The same path again, now with revocation: every
                // certificate on it is checked against its issuer's CRL,
                // and one whose issuer published none is not revoked.
                let path_intermediates: Vec<CertificateDer<'_>> =
                    path.intermediate_certificates().map(|c| c.der()).collect();
                let anchors = match root {
                    Some(i) => &self.anchors[i..=i],
                    None => &self.anchors[..],
                };
                let revocation = webpki::RevocationOptionsBuilder::new(&crls).ok().map(|b| {
                    b.with_depth(webpki::RevocationCheckDepth::Chain)
                        .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                        .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                        .build()
                });
                ee.verify_for_usage(
                    algs.all,
                    anchors,
                    &path_intermediates,
                    now,
                    usage,
                    revocation,
                    None,
                )
                .map_err(webpki_error)?;
            }
        }
        let id = svid::validate(end_entity, SvidKind::Leaf)
            .map_err(|e| other(format!("peer certificate is not a valid SVID: {e}")))?
            .ok_or_else(|| other("peer certificate has no SPIFFE ID".to_string()))?;
        if id.trust_domain() != self.trust_domain {
            return Err(other(format!(
                "peer {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(id)
    }
}

/// What ties a CRL to the CA that issued it: the issuer's name, and its key
/// identifier where the certificate or CRL carries one.
#[derive(Debug, Clone)]
struct CaName {
    name: Vec<u8>,
    key_id: Option<Vec<u8>>,
}

impl CaName {
    fn of_cert(der: &[u8]) -> Option<Self> {
        use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let key_id = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        Some(Self {
            name: cert.subject().as_raw().to_vec(),
            key_id,
        })
    }

    fn of_crl(der: &[u8]) -> Option<Self> {
        use x509_parser::prelude::{CertificateRevocationList, FromDer, ParsedExtension};
        let (_, crl) = CertificateRevocationList::from_der(der).ok()?;
        let key_id = crl
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        Some(Self {
            name: crl.issuer().as_raw().to_vec(),
            key_id,
        })
    }

    /// Whether `crl_issuer` (a CRL's) names this CA.
    fn issued(&self, crl_issuer: &CaName) -> bool {
        self.name == crl_issuer.name
            && match (&self.key_id, &crl_issuer.key_id) {
                (Some(ours), Some(theirs)) => ours == theirs,
                _ => true,
            }
    }
}

fn other(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(VerifyError(
        msg,
    )))))
}

#[derive(Debug)]
struct VerifyError(String);
impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for VerifyError {}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::CertRevoked => CertificateError::Revoked,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// Server side of mesh mTLS: requires a client SVID from the trust bundle.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: TrustBundle,
    algs: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: TrustBundle, provider: &CryptoProvider) -> Self {
        Self {
            bundle,
            algs: provider.signature_verification_algorithms,
            mandatory: true,
        }
    }

    /// Lets clients without certificates through the handshake; the
    /// application must then authenticate them some other way.
    pub fn optional(mut self) -> Self {
        self.mandatory = false;
        self
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            &self.algs,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client side of mesh mTLS: requires a server SVID from the trust bundle
/// and, when `allowed` is not empty, one of those identities.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: TrustBundle,
    algs: WebPkiSupportedAlgorithms,
    allowed: Vec<SpiffeId>,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: TrustBundle, provider: &CryptoProvider, allowed: Vec<SpiffeId>) -> Self {
        Self {
            bundle,
            algs: provider.signature_verification_algorithms,
            allowed,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The SNI names the service, not the peer; identity is the SPIFFE ID.
        let id = self.bundle.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            &self.algs,
        )?;
        if !self.allowed.is_empty() && !self.allowed.contains(&id) {
            return Err(other(format!(
                "server identity {id} is not one of the {} identities allowed for this service",
                self.allowed.len()
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The SPIFFE ID of the first certificate a peer presented, if any.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| svid::inspect(leaf).ok())
        .and_then(|info| info.spiffe_id)
}
