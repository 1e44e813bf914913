//! Isthmus's certificate authority and identity checks.
//!
//! It owns everything about X.509 in the mesh: parsing and validating SPIFFE
//! IDs ([`spiffe`]), issuing roots, per-cluster intermediates and workload
//! leaves from CSRs ([`issue`]), checking an imported CA in Istio's plug-in
//! layout ([`plugin`]), checking that a certificate is a conformant
//! X.509-SVID ([`svid`]), and the rustls verifiers that proxies, gateways and
//! the primary use to authenticate peers ([`verifier`]). The same checks run on
//! what the CA issues and on what peers present, so the two cannot drift.
//!
//! It does no I/O: callers decide where keys and certificates live.

pub mod issue;
pub mod jwk;
pub mod pem;
pub mod plugin;
pub mod spiffe;
pub mod svid;
pub mod verifier;

pub use issue::{Authority, CaError, IssuedCert, Signer};
pub use plugin::{ImportError, PluginFiles};
pub use spiffe::{SpiffeError, SpiffeId};
pub use svid::{SvidError, SvidKind};
pub use verifier::{SpiffeClientVerifier, SpiffeServerVerifier, TrustBundle};

/// The crypto provider the whole mesh uses (aws-lc-rs).
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process-wide rustls provider; harmless if one is
/// already installed. Binaries call this first thing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
