//! Issuing certificates: the mesh root, one intermediate per cluster, and
//! workload leaves from CSRs.
//!
//! A CSR only ever contributes its public key. The identity in a leaf comes
//! from the caller's authenticated identity, which the caller of
//! [`Signer::sign_workload_csr`] passes in; SANs in the CSR are ignored.
//! Every certificate issued here is checked with [`crate::svid`] before it is
//! handed out, so the CA cannot issue what the verifiers would refuse.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::pem;
use crate::spiffe::SpiffeId;
use crate::svid::{self, SvidError, SvidKind};

/// Default workload certificate lifetime.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest workload certificate lifetime the CA grants.
pub const MAX_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of a cluster intermediate.
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Lifetime of a generated root.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating that absorbs clock skew between hosts.
const SKEW: Duration = Duration::from_secs(300);
/// Bigger CSRs are refused before parsing.
const MAX_CSR_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CSR is {0} bytes; at most 16384 are accepted")]
    CsrTooLarge(usize),
    #[error("CSR is not a PEM or DER PKCS#10 request")]
    CsrMalformed,
    #[error("CSR signature does not verify against its own public key")]
    CsrBadSignature,
    #[error("CSR could not be used: {0}")]
    CsrUnusable(String),
    #[error(
        "{0} is reserved for Isthmus's own components (namespace isthmus-system); run the workload under another namespace"
    )]
    ReservedIdentity(SpiffeId),
    #[error("requested lifetime {requested:?} exceeds the maximum of {max:?}")]
    TtlTooLong { requested: Duration, max: Duration },
    #[error("key or certificate could not be loaded: {0}")]
    BadKeyMaterial(String),
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
    #[error("the CA produced a certificate that fails validation: {0}")]
    SelfCheck(#[from] SvidError),
}

/// A certificate the CA issued, with what callers log and store about it.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub der: CertificateDer<'static>,
    pub pem: String,
    pub serial_hex: String,
    pub not_after_unix: i64,
}

/// The CA that signs cluster intermediates: a self-signed root, or an
/// imported signing certificate under an imported root (Istio's plug-in CA
/// layout).
pub struct Authority {
    /// The signing certificate (the root itself when self-signed).
    cert: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    trust_domain: String,
    /// The trust anchor the mesh distributes.
    anchor: CertificateDer<'static>,
    /// Certificates from the signing one up to, not including, the anchor:
    /// what follows a cluster intermediate in a chain. Empty when the signing
    /// certificate is the anchor.
    chain: Vec<CertificateDer<'static>>,
    /// When the first certificate on the way from the signing CA to the
    /// anchor expires: nothing this CA signs may outlive it.
    not_after_unix: i64,
}

impl Authority {
    /// Generates a new ECDSA P-256 root for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        Self::generate_with(trust_domain, &rcgen::PKCS_ECDSA_P256_SHA256)
    }

    /// Generates a new root with a key of the given algorithm; for imports
    /// and tests of other key types.
    pub fn generate_with(
        trust_domain: &str,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(alg)?;
        let mut params = ca_params(
            &format!("Isthmus root CA ({trust_domain})"),
            ROOT_TTL,
            BasicConstraints::Unconstrained,
            &key,
        );
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))?];
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem(), trust_domain)
    }

    /// Signs a subordinate signing CA (as Istio's `ca-cert.pem` is under its
    /// `root-cert.pem`) with a fresh key of `alg`. Returns (cert PEM, key PEM).
    pub fn sign_subordinate(
        &self,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(alg)?;
        let mut params = ca_params(
            "Isthmus subordinate CA",
            ROOT_TTL,
            BasicConstraints::Constrained(1),
            &key,
        );
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{}", self.trust_domain))?];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Loads a self-signed root from PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Self, CaError> {
        Self::from_parts(cert_pem, cert_pem, key_pem, trust_domain)
    }

    /// Loads a signing CA: `anchor_pem` is the root the mesh trusts,
    /// `chain_pem` the signing certificate first, then any certificates up
    /// to the root (the root itself may be included or not), and `key_pem`
    /// the signing key (ECDSA P-256 or P-384, RSA 2048 or 3072; PKCS#8,
    /// SEC1 or PKCS#1). The key must match the signing certificate, and the
    /// chain must lead to the anchor.
    pub fn from_parts(
        anchor_pem: &str,
        chain_pem: &str,
        key_pem: &str,
        trust_domain: &str,
    ) -> Result<Self, CaError> {
        let bad =
            |what: &str, e: &dyn std::fmt::Display| CaError::BadKeyMaterial(format!("{what}: {e}"));
        let anchor = pem::certs(anchor_pem, "root certificate")
            .map_err(|e| bad("root certificate", &e))?
            .remove(0);
        let mut chain =
            pem::certs(chain_pem, "signing certificate").map_err(|e| bad("CA chain", &e))?;
        chain.retain(|c| c != &anchor);
        // The same certificate given twice (ca-cert.pem and cert-chain.pem
        // both hold it) counts once.
        let mut seen = Vec::new();
        chain.retain(|c| {
            let new = !seen.contains(c);
            seen.push(c.clone());
            new
        });
        let cert = chain.first().cloned().unwrap_or_else(|| anchor.clone());
        svid::validate(&anchor, SvidKind::Signing)?;
        svid::validate(&cert, SvidKind::Signing)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad("CA key", &e))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        // Proof by use: a cluster intermediate signed with the key, and a
        // leaf under it, must verify through the chain to the anchor. That
        // fails if the key is not the signing certificate's, if the chain
        // does not lead to the root, or if a pathLen leaves no room for
        // cluster intermediates.
        let probe_ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let probe_ca_params = ca_params(
            "Isthmus import probe",
            Duration::from_secs(600),
            BasicConstraints::Constrained(0),
            &probe_ca_key,
        );
        let probe_ca = probe_ca_params.signed_by(&probe_ca_key, &issuer)?;
        let probe_issuer = Issuer::from_ca_cert_der(probe_ca.der(), probe_ca_key)?;
        let probe_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        set_validity(&mut params, Duration::from_secs(600));
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let probe = params.signed_by(&probe_key, &probe_issuer)?;
        let mut probe_path = vec![probe_ca.der().clone()];
        probe_path.extend(chain.iter().cloned());
        let anchors = [
            webpki::anchor_from_trusted_cert(&anchor).map_err(|e| bad("root certificate", &e))?
        ];
        let ee = webpki::EndEntityCert::try_from(probe.der())
            .map_err(|e| bad("probe certificate", &e))?;
        let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        ee.verify_for_usage(
            algs.all,
            &anchors,
            &probe_path,
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            bad(
                "the CA key does not match the signing certificate, the chain does not lead to the root, or a pathLen leaves no room for cluster intermediates",
                &e,
            )
        })?;
        let not_after_unix = std::iter::once(&anchor)
            .chain(chain.iter())
            .map(|c| svid::inspect(c).map(|i| i.not_after_unix))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .min()
            .unwrap_or(i64::MAX);
        Ok(Self {
            cert_pem: pem::encode("CERTIFICATE", &cert),
            cert,
            key_pem: key_pem.to_string(),
            issuer,
            trust_domain: trust_domain.to_string(),
            anchor,
            chain,
            not_after_unix,
        })
    }

    /// When the signing CA (or a certificate above it) expires. Cluster
    /// intermediates it signs end no later; operators must replace it before.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after_unix
    }

    /// The root the mesh trusts for this CA.
    pub fn anchor(&self) -> &CertificateDer<'static> {
        &self.anchor
    }

    /// PEM of what follows a cluster intermediate in a chain: the signing
    /// certificate and its parents short of the root. Empty for a
    /// self-signed root.
    pub fn chain_pem(&self) -> String {
        pem::encode_certs(&self.chain)
    }

    /// A CRL signed by this CA revoking `revoked` (certificates it issued,
    /// such as a replaced cluster intermediate). `number` must grow with
    /// every CRL issued. Returns PEM.
    pub fn revocation_list(
        &self,
        revoked: &[CertificateDer<'_>],
        number: u64,
    ) -> Result<String, CaError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|c| {
                let serial = svid::serial(c)?;
                Ok(rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::Superseded),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, SvidError>>()?;
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - SKEW,
            next_update: now + INTERMEDIATE_TTL,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            // The CRL's AKI must be the issuer's own SKI, however that was
            // derived (an imported CA's is often a SHA-1 of its key), so a
            // verifier can tie the CRL to exactly this CA.
            key_identifier_method: match svid::subject_key_id(&self.cert) {
                Some(ski) => rcgen::KeyIdMethod::PreSpecified(ski),
                None => rcgen::KeyIdMethod::Sha256,
            },
        };
        let crl = params.signed_by(&self.issuer)?;
        Ok(crl.pem()?)
    }

    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Signs a cluster intermediate (pathLen 0) from the agent's CSR. Only the
    /// CSR's key is used.
    pub fn sign_intermediate(&self, csr: &str, cluster: &str) -> Result<IssuedCert, CaError> {
        let csr = parse_csr(csr)?;
        let mut params = ca_params(
            &format!("Isthmus intermediate CA ({cluster})"),
            INTERMEDIATE_TTL,
            BasicConstraints::Constrained(0),
            &csr.public_key,
        );
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, cluster);
        // Never outlive the CA above: an imported signing CA may be short-lived.
        if let Ok(cap) = OffsetDateTime::from_unix_timestamp(self.not_after_unix) {
            params.not_after = params.not_after.min(cap);
        }
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{}", self.trust_domain))?];
        // A cluster intermediate issues SPIFFE IDs (URI SANs) only. It may
        // not vouch for any DNS name or IP address, so its key cannot mint
        // a certificate that passes for the primary (`isthmus-primary`, or
        // the primary's address) with any client of the primary.
        params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![],
            excluded_subtrees: vec![
                rcgen::GeneralSubtree::DnsName(String::new()),
                rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4([0; 4], [0; 4])),
                rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V6([0; 16], [0; 16])),
            ],
        });
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        finish(cert, &params, SvidKind::Signing)
    }

    /// A TLS server certificate for the primary itself (DNS and IP SANs, not a
    /// SPIFFE SVID), with a fresh key. Returns (certificate PEM, key PEM).
    pub fn issue_server_cert(&self, names: &[String]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = dn("isthmus-primary");
        set_validity(&mut params, INTERMEDIATE_TTL);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A cluster intermediate that signs workload leaves. Agents hold one.
pub struct Signer {
    /// The intermediate first, then anything above it short of the root.
    chain: Vec<CertificateDer<'static>>,
    issuer: Issuer<'static, KeyPair>,
    trust_domain: String,
    not_after_unix: i64,
}

impl Signer {
    /// Loads an intermediate from its certificate PEM (chain allowed) and key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let chain = pem::certs(chain_pem, "intermediate certificate")
            .map_err(|e| CaError::BadKeyMaterial(e.to_string()))?;
        svid::validate(&chain[0], SvidKind::Signing)?;
        let info = svid::inspect(&chain[0])?;
        let trust_domain = info
            .spiffe_id
            .as_ref()
            .map(|id| id.trust_domain().to_string())
            .unwrap_or_else(|| isthmus_api::DEFAULT_TRUST_DOMAIN.to_string());
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::BadKeyMaterial(format!("intermediate key: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)?;
        Ok(Self {
            chain,
            issuer,
            trust_domain,
            not_after_unix: info.not_after_unix,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The intermediate chain to append after a leaf.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Issues a workload leaf for `identity` from a CSR, whatever SANs the
    /// CSR asks for. A TTL of zero means the default; one above the maximum
    /// is refused, and so is a reserved identity ([`SpiffeId::is_reserved`]).
    pub fn sign_workload_csr(
        &self,
        csr: &str,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        if identity.is_reserved() {
            return Err(CaError::ReservedIdentity(identity.clone()));
        }
        let ttl = effective_ttl(ttl)?;
        let csr = parse_csr(csr)?;
        self.sign_leaf(&csr.public_key, identity, ttl)
    }

    /// Issues a workload leaf and a fresh key for `identity` (SDS, tests).
    /// A reserved identity is refused. Returns the certificate and the key
    /// PEM.
    pub fn issue_workload(
        &self,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<(IssuedCert, String), CaError> {
        if identity.is_reserved() {
            return Err(CaError::ReservedIdentity(identity.clone()));
        }
        self.issue_system(identity, ttl)
    }

    /// Issues a leaf and a fresh key for one of Isthmus's own identities
    /// (the agent's), reserved ones included. Only the agent calls this, for
    /// itself; nothing a workload sends reaches it.
    pub fn issue_system(
        &self,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<(IssuedCert, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = self.sign_leaf(&key, identity, effective_ttl(ttl)?)?;
        Ok((cert, key.serialize_pem()))
    }

    /// Issues a leaf for one of Isthmus's own identities over an existing
    /// key (PEM): the agent's identity, over the key whose hash the primary
    /// pinned when the cluster joined.
    pub fn issue_system_with_key(
        &self,
        identity: &SpiffeId,
        key_pem: &str,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::BadKeyMaterial(format!("identity key: {e}")))?;
        self.sign_leaf(&key, identity, effective_ttl(ttl)?)
    }

    fn sign_leaf(
        &self,
        key: &impl rcgen::PublicKeyData,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        set_validity(&mut params, ttl);
        // Never outlive the intermediate.
        if let Ok(cap) = OffsetDateTime::from_unix_timestamp(self.not_after_unix) {
            params.not_after = params.not_after.min(cap);
        }
        params.subject_alt_names = vec![uri_san(identity.as_str())?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(key, &self.issuer)?;
        let issued = finish(cert, &params, SvidKind::Leaf)?;
        tracing::info!(
            serial = %issued.serial_hex,
            identity = %identity,
            not_after = issued.not_after_unix,
            "issued workload certificate"
        );
        Ok(issued)
    }
}

/// Generates an ECDSA P-256 key for an identity that is pinned by its key
/// (the agent's). Returns (key PEM, SHA-256 hex of its SubjectPublicKeyInfo).
pub fn generate_pinned_key() -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    Ok((
        key.serialize_pem(),
        crate::svid::spki_sha256(&rcgen::PublicKeyData::subject_public_key_info(&key)),
    ))
}

/// Generates an ECDSA P-256 key and a CSR for it. The CSR's subject is
/// informative only. Returns (CSR PEM, key PEM).
pub fn generate_csr(common_name: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(common_name);
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

fn effective_ttl(ttl: Duration) -> Result<Duration, CaError> {
    if ttl.is_zero() {
        return Ok(DEFAULT_WORKLOAD_TTL);
    }
    if ttl > MAX_WORKLOAD_TTL {
        return Err(CaError::TtlTooLong {
            requested: ttl,
            max: MAX_WORKLOAD_TTL,
        });
    }
    Ok(ttl)
}

fn parse_csr(csr: &str) -> Result<CertificateSigningRequestParams, CaError> {
    if csr.len() > MAX_CSR_BYTES {
        return Err(CaError::CsrTooLarge(csr.len()));
    }
    CertificateSigningRequestParams::from_pem(csr).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CaError::CsrBadSignature,
        rcgen::Error::CouldNotParseCertificationRequest => CaError::CsrMalformed,
        other => CaError::CsrUnusable(other.to_string()),
    })
}

/// Parameters of a CA certificate for `key`. Its subject ends with the
/// start of the key's identifier (the SKI), so no two CAs share a subject:
/// two roots alive together during a rotation, or an old and a new cluster
/// intermediate, are told apart by name as well as by key. Path building and
/// CRL matching go by name first, and a CRL of the old root matched by name
/// to a new root with the same subject fails its signature check, which is
/// what wedged a root rotation that followed an intermediate rotation.
fn ca_params(
    cn: &str,
    ttl: Duration,
    constraints: BasicConstraints,
    key: &impl rcgen::PublicKeyData,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let key_id = params.key_identifier(key);
    let short = hex::encode(&key_id[..key_id.len().min(8)]);
    params.distinguished_name = dn(&format!("{cn} {short}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Isthmus");
    set_validity(&mut params, ttl);
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn set_validity(params: &mut CertificateParams, ttl: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - SKEW;
    params.not_after = now + ttl;
}

fn uri_san(uri: &str) -> Result<SanType, CaError> {
    Ok(SanType::URI(uri.try_into()?))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    SerialNumber::from_slice(&bytes)
}

fn finish(
    cert: rcgen::Certificate,
    params: &CertificateParams,
    kind: SvidKind,
) -> Result<IssuedCert, CaError> {
    let der = cert.der().clone();
    svid::validate(&der, kind)?;
    Ok(IssuedCert {
        pem: cert.pem(),
        serial_hex: params
            .serial_number
            .as_ref()
            .map(|s| hex::encode(s.to_bytes()))
            .unwrap_or_default(),
        not_after_unix: params.not_after.unix_timestamp(),
        der,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> (Authority, Signer) {
        let root = Authority::generate("cluster.local").unwrap();
        let (csr, key) = generate_csr("east").unwrap();
        let inter = root.sign_intermediate(&csr, "east").unwrap();
        (root, Signer::from_pem(&inter.pem, &key).unwrap())
    }

    #[test]
    fn leaf_carries_only_the_callers_identity() {
        let (_root, signer) = mesh();
        // A CSR asking for someone else's identity.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.subject_alt_names =
            vec![uri_san("spiffe://cluster.local/ns/kube-system/sa/admin").unwrap()];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let caller = SpiffeId::workload("cluster.local", "demo", "client").unwrap();
        let leaf = signer
            .sign_workload_csr(&csr, &caller, Duration::ZERO)
            .unwrap();
        let info = svid::inspect(&leaf.der).unwrap();
        assert_eq!(info.spiffe_id, Some(caller));
        let lifetime = info.not_after_unix - OffsetDateTime::now_utc().unix_timestamp();
        assert!((DEFAULT_WORKLOAD_TTL.as_secs() as i64 - lifetime).abs() < 60);
    }

    #[test]
    fn reserved_identities_are_never_signed_for_workloads() {
        let (_root, signer) = mesh();
        let (csr, _) = generate_csr("x").unwrap();
        for (ns, sa) in [
            ("isthmus-system", "isthmus-agent"),
            ("isthmus-system", "anything"),
        ] {
            let id = SpiffeId::workload("cluster.local", ns, sa).unwrap();
            let err = signer
                .sign_workload_csr(&csr, &id, Duration::ZERO)
                .unwrap_err();
            assert!(matches!(err, CaError::ReservedIdentity(_)), "{err}");
            assert!(err.to_string().contains("reserved"), "{err}");
        }
    }

    #[test]
    fn bad_csrs_are_refused_and_nothing_is_issued() {
        let (_root, signer) = mesh();
        let who = SpiffeId::workload("cluster.local", "demo", "client").unwrap();
        let garbage = signer.sign_workload_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &who,
            Duration::ZERO,
        );
        assert!(matches!(garbage, Err(CaError::CsrMalformed)), "{garbage:?}");
        let not_pem = signer.sign_workload_csr("hello", &who, Duration::ZERO);
        assert!(matches!(not_pem, Err(CaError::CsrMalformed)), "{not_pem:?}");

        // Flip a byte inside the signature of a real CSR.
        let (csr, _) = generate_csr("x").unwrap();
        let mut der = pem::pem_der(&csr).unwrap();
        let n = der.len();
        der[n - 3] ^= 0x55;
        let tampered = pem::encode("CERTIFICATE REQUEST", &der);
        let bad_sig = signer.sign_workload_csr(&tampered, &who, Duration::ZERO);
        assert!(
            matches!(
                bad_sig,
                Err(CaError::CsrBadSignature | CaError::CsrMalformed)
            ),
            "{bad_sig:?}"
        );

        let (csr, _) = generate_csr("x").unwrap();
        let too_long =
            signer.sign_workload_csr(&csr, &who, MAX_WORKLOAD_TTL + Duration::from_secs(1));
        assert!(
            matches!(too_long, Err(CaError::TtlTooLong { .. })),
            "{too_long:?}"
        );
    }

    fn verify(
        bundle: &crate::TrustBundle,
        chain: &[CertificateDer<'static>],
    ) -> Result<SpiffeId, rustls::Error> {
        let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        bundle.verify(
            &chain[0],
            &chain[1..],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            &algs,
        )
    }

    /// A bundle trusting `roots`, with the CRLs in `crls`.
    fn trusting(roots: &[&Authority], crls: &str) -> crate::TrustBundle {
        crate::TrustBundle::from_der(
            "cluster.local",
            roots.iter().map(|r| r.cert().clone()).collect(),
        )
        .unwrap()
        .with_crls_pem(crls)
        .unwrap()
    }

    fn assert_revoked(result: Result<SpiffeId, rustls::Error>) {
        assert!(
            matches!(
                result,
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked
                ))
            ),
            "{result:?}"
        );
    }

    fn leaf_chain(signer: &Signer) -> Vec<CertificateDer<'static>> {
        let who = SpiffeId::workload("cluster.local", "demo", "client").unwrap();
        let (leaf, _) = signer.issue_workload(&who, Duration::ZERO).unwrap();
        let mut chain = vec![leaf.der];
        chain.extend(signer.chain().iter().cloned());
        chain
    }

    /// Istio's plug-in layout: root-cert.pem, ca-cert.pem + ca-key.pem (the
    /// signing CA under it), cert-chain.pem. P-384 and RSA keys work.
    #[test]
    fn imported_plug_in_cas_of_other_key_types_sign_verifiable_chains() {
        for (root_alg, ca_alg) in [
            (&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_RSA_SHA256),
            (&rcgen::PKCS_RSA_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384),
            (
                &rcgen::PKCS_ECDSA_P256_SHA256,
                &rcgen::PKCS_ECDSA_P256_SHA256,
            ),
        ] {
            let root = Authority::generate_with("cluster.local", root_alg).unwrap();
            let (ca_cert, ca_key) = root.sign_subordinate(ca_alg).unwrap();
            let cert_chain = format!("{ca_cert}{}", root.cert_pem());
            let ca = Authority::from_parts(root.cert_pem(), &cert_chain, &ca_key, "cluster.local")
                .unwrap();
            assert_eq!(ca.anchor(), root.cert());
            let (csr, key) = generate_csr("east").unwrap();
            let inter = ca.sign_intermediate(&csr, "east").unwrap();
            let signer =
                Signer::from_pem(&format!("{}{}", inter.pem, ca.chain_pem()), &key).unwrap();
            let bundle =
                crate::TrustBundle::from_der("cluster.local", vec![root.cert().clone()]).unwrap();
            let id = verify(&bundle, &leaf_chain(&signer)).unwrap();
            assert_eq!(id.as_str(), "spiffe://cluster.local/ns/demo/sa/client");
            let jwks = bundle.to_jwks(1, 300);
            let kty = jwks["keys"][0]["kty"].as_str().unwrap();
            assert_eq!(
                kty,
                if root_alg == &rcgen::PKCS_RSA_SHA256 {
                    "RSA"
                } else {
                    "EC"
                }
            );
            assert_eq!(jwks["keys"][0]["use"], "x509-svid");
        }
        // A key that is not the signing certificate's is refused.
        let root = Authority::generate("cluster.local").unwrap();
        let (ca_cert, _) = root
            .sign_subordinate(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap();
        let (_, other_key) = root
            .sign_subordinate(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap();
        let err = Authority::from_parts(root.cert_pem(), &ca_cert, &other_key, "cluster.local")
            .err()
            .unwrap();
        assert!(err.to_string().contains("does not match"), "{err}");
        // A chain that leads to another root is refused.
        let stranger = Authority::generate("cluster.local").unwrap();
        let (ca_cert, ca_key) = root
            .sign_subordinate(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap();
        let err = Authority::from_parts(stranger.cert_pem(), &ca_cert, &ca_key, "cluster.local")
            .err()
            .unwrap();
        assert!(err.to_string().contains("root"), "{err}");
    }

    #[test]
    fn a_revoked_intermediate_no_longer_verifies() {
        let root = Authority::generate("cluster.local").unwrap();
        let signer = |name: &str| {
            let (csr, key) = generate_csr(name).unwrap();
            let inter = root.sign_intermediate(&csr, name).unwrap();
            (Signer::from_pem(&inter.pem, &key).unwrap(), inter)
        };
        let (old, old_cert) = signer("east");
        let (new, _) = signer("east");
        let bundle =
            crate::TrustBundle::from_der("cluster.local", vec![root.cert().clone()]).unwrap();
        assert!(verify(&bundle, &leaf_chain(&old)).is_ok());
        let crl = root.revocation_list(&[old_cert.der], 1).unwrap();
        let revoking = bundle.clone().with_crls_pem(&crl).unwrap();
        assert_eq!(revoking.crls_pem(), crl);
        assert_revoked(verify(&revoking, &leaf_chain(&old)));
        assert!(verify(&revoking, &leaf_chain(&new)).is_ok());
    }

    /// Root and intermediate rotations in sequence: a CRL of the old root
    /// (from an intermediate rotation) must not trip intermediates of the
    /// new root while both are trusted.
    #[test]
    fn a_crl_of_the_old_root_leaves_the_new_roots_chains_alone() {
        let old = Authority::generate("cluster.local").unwrap();
        let new = Authority::generate("cluster.local").unwrap();
        let signer = |root: &Authority, name: &str| {
            let (csr, key) = generate_csr(name).unwrap();
            let inter = root.sign_intermediate(&csr, name).unwrap();
            (Signer::from_pem(&inter.pem, &key).unwrap(), inter)
        };
        let (east_1, east_1_cert) = signer(&old, "east");
        let (east_2, east_2_cert) = signer(&old, "east");
        let (west, _) = signer(&new, "west");
        // Every CA has a subject of its own.
        let subject = |der: &CertificateDer<'_>| {
            use x509_parser::prelude::{FromDer, X509Certificate};
            X509Certificate::from_der(der)
                .unwrap()
                .1
                .subject()
                .to_string()
        };
        assert_ne!(subject(old.cert()), subject(new.cert()));
        assert_ne!(subject(&east_1_cert.der), subject(&east_2_cert.der));
        assert!(subject(old.cert()).contains("Isthmus root CA (cluster.local) "));

        let crl = old.revocation_list(&[east_1_cert.der], 1).unwrap();
        let bundle = trusting(&[&old, &new], &crl);
        assert!(verify(&bundle, &leaf_chain(&west)).is_ok());
        assert!(verify(&bundle, &leaf_chain(&east_2)).is_ok());
        assert_revoked(verify(&bundle, &leaf_chain(&east_1)));
    }

    /// A cluster intermediate's key cannot mint a server certificate for
    /// the primary's name or address, while its SPIFFE leaves still verify.
    #[test]
    fn a_cluster_intermediate_cannot_stand_in_for_the_primary() {
        let (root, signer) = mesh();
        // The forgery: a server certificate for the primary, signed with
        // the intermediate's key.
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["isthmus-primary".to_string(), "192.0.2.1".to_string()])
                .unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, Duration::from_secs(600));
        let forged = params.signed_by(&key, &signer.issuer).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.cert().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        for name in ["isthmus-primary", "192.0.2.1"] {
            let err = rustls::client::danger::ServerCertVerifier::verify_server_cert(
                &*verifier,
                forged.der(),
                signer.chain(),
                &rustls_pki_types::ServerName::try_from(name).unwrap(),
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap_err();
            assert!(
                format!("{err:?}").contains("NameConstraint"),
                "{name}: {err:?}"
            );
        }
        // The primary's own certificate, from the root's CA, still works.
        let (cert_pem, _) = root
            .issue_server_cert(&["isthmus-primary".to_string(), "192.0.2.1".to_string()])
            .unwrap();
        let cert = pem::certs(&cert_pem, "server").unwrap().remove(0);
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &*verifier,
            &cert,
            &[],
            &rustls_pki_types::ServerName::try_from("192.0.2.1").unwrap(),
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .unwrap();
        // And the intermediate's SPIFFE leaves verify as before.
        let bundle =
            crate::TrustBundle::from_der("cluster.local", vec![root.cert().clone()]).unwrap();
        assert!(verify(&bundle, &leaf_chain(&signer)).is_ok());
    }

    /// Roots made before subjects carried a key identifier all share one
    /// subject; their CRLs are still told apart by key identifier.
    #[test]
    fn roots_sharing_a_subject_keep_their_crls_apart() {
        let legacy_root = || {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = dn("Isthmus root CA (cluster.local)");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.subject_alt_names = vec![uri_san("spiffe://cluster.local").unwrap()];
            set_validity(&mut params, ROOT_TTL);
            let cert = params.self_signed(&key).unwrap();
            Authority::from_pem(&cert.pem(), &key.serialize_pem(), "cluster.local").unwrap()
        };
        let (old, new) = (legacy_root(), legacy_root());
        let (csr, key) = generate_csr("east").unwrap();
        let revoked = old.sign_intermediate(&csr, "east").unwrap();
        let (csr, key_west) = generate_csr("west").unwrap();
        let west = new.sign_intermediate(&csr, "west").unwrap();
        let west = Signer::from_pem(&west.pem, &key_west).unwrap();
        let east = Signer::from_pem(&revoked.pem, &key).unwrap();
        let crl = old.revocation_list(&[revoked.der], 1).unwrap();
        let bundle = trusting(&[&old, &new], &crl);
        assert!(verify(&bundle, &leaf_chain(&west)).is_ok());
        assert!(verify(&bundle, &leaf_chain(&east)).is_err());
    }

    /// Multi-mesh: a peer of a federated trust domain verifies against that
    /// domain's roots only; the bundles are never merged.
    #[test]
    fn federated_trust_domains_are_kept_apart() {
        let ours = Authority::generate("cluster.local").unwrap();
        let theirs = Authority::generate("other.mesh").unwrap();
        let signer_of = |root: &Authority| {
            let (csr, key) = generate_csr("x").unwrap();
            let inter = root.sign_intermediate(&csr, "x").unwrap();
            Signer::from_pem(&inter.pem, &key).unwrap()
        };
        let their_signer = signer_of(&theirs);
        let foreign = crate::TrustBundle::from_jwks(
            "other.mesh",
            &crate::TrustBundle::from_der("other.mesh", vec![theirs.cert().clone()])
                .unwrap()
                .to_jwks(1, 60),
        )
        .unwrap();
        let bundle = crate::TrustBundle::from_der("cluster.local", vec![ours.cert().clone()])
            .unwrap()
            .with_federated(vec![foreign]);
        let chain = |signer: &Signer, id: &str| {
            let id = SpiffeId::parse(id).unwrap();
            let leaf = signer
                .sign_leaf(&KeyPair::generate().unwrap(), &id, Duration::from_secs(600))
                .unwrap();
            let mut c = vec![leaf.der];
            c.extend(signer.chain().iter().cloned());
            c
        };
        // Their workload, through their roots.
        let id = verify(
            &bundle,
            &chain(&their_signer, "spiffe://other.mesh/ns/shop/sa/cart"),
        )
        .unwrap();
        assert_eq!(id.as_str(), "spiffe://other.mesh/ns/shop/sa/cart");
        // Their root cannot vouch for our trust domain...
        let err = verify(
            &bundle,
            &chain(&their_signer, "spiffe://cluster.local/ns/demo/sa/client"),
        )
        .unwrap_err();
        assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
        // ...nor ours for theirs.
        let our_signer = signer_of(&ours);
        assert!(
            verify(
                &bundle,
                &chain(&our_signer, "spiffe://other.mesh/ns/shop/sa/cart")
            )
            .is_err()
        );
        // A domain we do not federate with is refused by name.
        let stranger = Authority::generate("stranger.mesh").unwrap();
        let err = verify(
            &bundle,
            &chain(&signer_of(&stranger), "spiffe://stranger.mesh/ns/a/sa/b"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not federate"), "{err}");
    }
}
