//! Joining the primary, and the credentials that result.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use isthmus_api::pb::sync::JoinRequest;
use isthmus_api::pb::sync::sync_client::SyncClient;
use isthmus_ca::issue::generate_csr;
use isthmus_ca::{Signer, SpiffeId, TrustBundle};

use crate::Config;

/// What an agent holds after joining.
pub struct Credentials {
    pub signer: Signer,
    pub bundle: TrustBundle,
    pub intermediate_pem: String,
}

const INTERMEDIATE: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate-key.pem";
const ROOTS: &str = "roots.pem";
/// The gateway's bearer credential for xDS, for the cluster's gateway to read.
pub const GATEWAY_TOKEN: &str = "gateway-token";

/// Loads credentials from the state dir, or joins with the token.
pub async fn ensure_joined(config: &Config) -> anyhow::Result<Credentials> {
    let dir = &config.state_dir;
    if dir.join(INTERMEDIATE_KEY).exists() {
        return load(dir).context("loading the agent's saved credentials");
    }
    let token = config.join_token.as_deref().context(
        "this agent has not joined yet: pass --join-token from `isthmusctl cluster register`",
    )?;
    let (_, root_fp) = isthmus_api::join_token::parse(token)
        .context("join token is malformed; expected ist1.<secret>.<root sha256>")?;
    let (csr, key) = generate_csr(&format!("isthmus-agent {}", config.cluster))?;
    let tls = isthmus_transport::pinned_root_client_config(root_fp)?;
    let channel = isthmus_transport::tls_channel(&config.primary, std::sync::Arc::new(tls))?;
    let mut client = SyncClient::new(channel);
    let request = JoinRequest {
        cluster: config.cluster.clone(),
        token: token.to_string(),
        csr_pem: csr,
        agent_version: crate::VERSION.to_string(),
    };
    // The primary may still be starting; refusals are final, outages are not.
    let mut delay = Duration::from_millis(200);
    let response = loop {
        match client.join(request.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {
                tracing::info!(error = %s.message(), "primary not reachable yet; retrying join");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(s) => bail!("join refused by the primary: {}", s.message()),
        }
    };
    let bundle = TrustBundle::from_pem(&response.trust_domain, &response.trust_bundle_pem)?;
    if !bundle
        .roots()
        .iter()
        .any(|r| isthmus_ca::pem::fingerprint(r) == root_fp)
    {
        bail!("the primary's trust bundle does not hold the root named by the join token");
    }
    isthmus_transport::write_private(&dir.join(INTERMEDIATE_KEY), &key)?;
    std::fs::write(dir.join(INTERMEDIATE), &response.intermediate_pem)?;
    std::fs::write(dir.join(ROOTS), &response.trust_bundle_pem)?;
    isthmus_transport::write_private(&dir.join(GATEWAY_TOKEN), &response.gateway_token)?;
    load(dir)
}

fn load(dir: &Path) -> anyhow::Result<Credentials> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("reading {}", dir.join(name).display()))
    };
    let intermediate_pem = read(INTERMEDIATE)?;
    let signer = Signer::from_pem(&intermediate_pem, &read(INTERMEDIATE_KEY)?)?;
    let bundle = TrustBundle::from_pem(signer.trust_domain(), &read(ROOTS)?)?;
    Ok(Credentials {
        signer,
        bundle,
        intermediate_pem,
    })
}

impl Credentials {
    /// A fresh certificate for the agent itself, `[leaf, intermediate]`.
    pub fn agent_identity(&self) -> anyhow::Result<isthmus_transport::Identity> {
        let id = SpiffeId::workload(
            self.signer.trust_domain(),
            "isthmus-system",
            "isthmus-agent",
        )?;
        let (cert, key) = self
            .signer
            .issue_workload(&id, Duration::from_secs(24 * 3600))?;
        Ok(isthmus_transport::Identity::from_pem(
            &format!("{}{}", cert.pem, self.intermediate_pem),
            &key,
        )?)
    }
}
