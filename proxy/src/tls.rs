//! rustls configs for mesh mTLS, built from the current SVID.

use std::sync::Arc;

use isthmus_ca::{SpiffeClientVerifier, SpiffeId, SpiffeServerVerifier};
use rustls::{ClientConfig, ServerConfig};

use crate::identity::Svid;

/// Inbound: present our SVID, require a client SVID from the bundle.
pub fn server_config(svid: &Svid) -> Result<ServerConfig, rustls::Error> {
    let provider = isthmus_ca::crypto_provider();
    let verifier = Arc::new(SpiffeClientVerifier::new(svid.bundle.clone(), &provider));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain.clone(), svid.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Outbound: present our SVID, require the server to be one of `allowed`.
pub fn client_config(svid: &Svid, allowed: &[String]) -> Result<ClientConfig, rustls::Error> {
    let provider = isthmus_ca::crypto_provider();
    let allowed: Vec<SpiffeId> = allowed
        .iter()
        .filter_map(|s| SpiffeId::parse(s).ok())
        .collect();
    let verifier = Arc::new(SpiffeServerVerifier::new(
        svid.bundle.clone(),
        &provider,
        allowed,
    ));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(svid.chain.clone(), svid.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
