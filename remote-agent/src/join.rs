//! Joining the primary, and the credentials that result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use anyhow::{Context, bail};
use isthmus_api::pb::sync::JoinRequest;
use isthmus_api::pb::sync::sync_client::SyncClient;
use isthmus_ca::issue::generate_csr;
use isthmus_ca::{Signer, SpiffeId, TrustBundle};

use crate::Config;

/// What an agent holds after joining.
pub struct Credentials {
    pub signer: Signer,
    /// Roots and CRLs.
    pub bundle: TrustBundle,
    /// The intermediate and any CA certificates above it short of the root.
    pub intermediate_pem: String,
    /// The primary's sequence number of `bundle` (0 before the first update).
    pub bundle_sequence: u64,
    /// The key of the agent's own identity (PEM), made at join; the primary
    /// pinned its hash, so only certificates over it speak for the cluster.
    pub agent_key_pem: Arc<str>,
}

impl Credentials {
    pub fn intermediate_fingerprint(&self) -> String {
        self.signer
            .chain()
            .first()
            .map(|c| isthmus_ca::pem::fingerprint(c))
            .unwrap_or_default()
    }
}

/// The agent's credentials as they are now, replaced in place when the
/// primary sends a new trust bundle or a new intermediate. Every change
/// bumps `generation`, which workloads watch to fetch new certificates.
pub struct Live {
    dir: PathBuf,
    current: ArcSwap<Credentials>,
    pub generation: watch::Sender<(u64, &'static str)>,
}

impl Live {
    pub fn new(dir: &Path, creds: Credentials) -> Self {
        Self {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(creds),
            generation: watch::channel((1, "start")).0,
        }
    }

    pub fn current(&self) -> Arc<Credentials> {
        self.current.load_full()
    }

    /// Takes a newer trust bundle from the primary. Returns whether it was
    /// newer.
    pub fn update_bundle(
        &self,
        roots_pem: &str,
        crls_pem: &str,
        federated: &BTreeMap<String, String>,
        sequence: u64,
    ) -> anyhow::Result<bool> {
        let cur = self.current();
        if sequence <= cur.bundle_sequence {
            return Ok(false);
        }
        let bundle = bundle(cur.signer.trust_domain(), roots_pem, crls_pem, federated)?;
        std::fs::write(self.dir.join(ROOTS), roots_pem)?;
        std::fs::write(self.dir.join(CRLS), crls_pem)?;
        std::fs::write(self.dir.join(FEDERATED), serde_json::to_vec(federated)?)?;
        std::fs::write(self.dir.join(BUNDLE_SEQUENCE), sequence.to_string())?;
        let signer = Signer::from_pem(
            &cur.intermediate_pem,
            &std::fs::read_to_string(self.dir.join(INTERMEDIATE_KEY))?,
        )?;
        self.current.store(Arc::new(Credentials {
            signer,
            bundle,
            intermediate_pem: cur.intermediate_pem.clone(),
            bundle_sequence: sequence,
            agent_key_pem: cur.agent_key_pem.clone(),
        }));
        self.bump("trust bundle");
        Ok(true)
    }

    /// Installs a new intermediate and its key (written 0600 first, so a
    /// crash leaves the old pair or the new one, never a mix).
    pub fn replace_intermediate(
        &self,
        intermediate_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<()> {
        let cur = self.current();
        let signer = Signer::from_pem(intermediate_pem, key_pem)?;
        let tmp_key = self.dir.join(format!("{INTERMEDIATE_KEY}.new"));
        let tmp_cert = self.dir.join(format!("{INTERMEDIATE}.new"));
        isthmus_transport::write_private(&tmp_key, key_pem)?;
        std::fs::write(&tmp_cert, intermediate_pem)?;
        std::fs::rename(&tmp_cert, self.dir.join(INTERMEDIATE))?;
        std::fs::rename(&tmp_key, self.dir.join(INTERMEDIATE_KEY))?;
        self.current.store(Arc::new(Credentials {
            signer,
            bundle: cur.bundle.clone(),
            intermediate_pem: intermediate_pem.to_string(),
            bundle_sequence: cur.bundle_sequence,
            agent_key_pem: cur.agent_key_pem.clone(),
        }));
        self.bump("intermediate");
        Ok(())
    }

    fn bump(&self, reason: &'static str) {
        self.generation.send_modify(|(g, r)| {
            *g += 1;
            *r = reason;
        });
    }
}

const INTERMEDIATE: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate-key.pem";
/// The agent's identity key, made at join; its hash is pinned by the primary.
const AGENT_KEY: &str = "agent-key.pem";
const ROOTS: &str = "roots.pem";
const CRLS: &str = "crls.pem";
const BUNDLE_SEQUENCE: &str = "bundle-sequence";
/// Federated trust domains' roots, JSON: name -> PEM.
const FEDERATED: &str = "federated.json";

/// Our roots and CRLs, with the federated domains' bundles beside them.
fn bundle(
    trust_domain: &str,
    roots_pem: &str,
    crls_pem: &str,
    federated: &BTreeMap<String, String>,
) -> anyhow::Result<TrustBundle> {
    let federated = federated
        .iter()
        .map(|(td, pem)| TrustBundle::from_pem(td, pem))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TrustBundle::from_pem(trust_domain, roots_pem)?
        .with_crls_pem(crls_pem)?
        .with_federated(federated))
}
/// The gateway's bearer credential for xDS, for the cluster's gateway to read.
pub const GATEWAY_TOKEN: &str = "gateway-token";

/// Loads credentials from the state dir, or joins with the token.
pub async fn ensure_joined(config: &Config) -> anyhow::Result<Credentials> {
    let dir = &config.state_dir;
    if dir.join(INTERMEDIATE_KEY).exists() {
        return load(dir).context("loading the agent's saved credentials");
    }
    let from_file = match &config.join_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the join token from {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let token = from_file.as_deref().or(config.join_token.as_deref()).context(
        "this agent has not joined yet: pass --join-token-file (or --join-token) with the token from `isthmusctl cluster register`",
    )?;
    let (_, root_fp) = isthmus_api::join_token::parse(token)
        .context("join token is malformed; expected ist1.<secret>.<root sha256>")?;
    let (csr, key) = generate_csr(&format!("isthmus-agent {}", config.cluster))?;
    let (agent_key, agent_key_sha256) = isthmus_ca::issue::generate_pinned_key()?;
    let tls = isthmus_transport::pinned_root_client_config(root_fp)?;
    let channel = isthmus_transport::tls_channel(&config.primary, std::sync::Arc::new(tls))?;
    let mut client = SyncClient::new(channel);
    let request = JoinRequest {
        cluster: config.cluster.clone(),
        token: token.to_string(),
        csr_pem: csr,
        agent_version: crate::VERSION.to_string(),
        agent_key_sha256,
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
            Err(s) => match isthmus_transport::grpc_wrong_port(&config.primary, &s) {
                Some(wrong) => bail!("joining: {wrong}"),
                None => bail!("join refused by the primary: {}", s.message()),
            },
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
    isthmus_transport::write_private(&dir.join(AGENT_KEY), &agent_key)?;
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
    let crls = std::fs::read_to_string(dir.join(CRLS)).unwrap_or_default();
    let federated: BTreeMap<String, String> = match std::fs::read(dir.join(FEDERATED)) {
        Ok(raw) => serde_json::from_slice(&raw)
            .with_context(|| format!("{} is corrupt", dir.join(FEDERATED).display()))?,
        Err(_) => BTreeMap::new(),
    };
    let bundle = bundle(signer.trust_domain(), &read(ROOTS)?, &crls, &federated)?;
    let bundle_sequence = std::fs::read_to_string(dir.join(BUNDLE_SEQUENCE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    // An agent that joined before identity keys were pinned has none; it
    // makes one now (its primary pinned nothing for it either).
    let agent_key_pem = match std::fs::read_to_string(dir.join(AGENT_KEY)) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (pem, _) = isthmus_ca::issue::generate_pinned_key()?;
            isthmus_transport::write_private(&dir.join(AGENT_KEY), &pem)?;
            pem
        }
        Err(e) => {
            return Err(e).with_context(|| format!("reading {}", dir.join(AGENT_KEY).display()));
        }
    };
    Ok(Credentials {
        signer,
        bundle,
        intermediate_pem,
        bundle_sequence,
        agent_key_pem: agent_key_pem.into(),
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
        let cert = self.signer.issue_system_with_key(
            &id,
            &self.agent_key_pem,
            Duration::from_secs(24 * 3600),
        )?;
        Ok(isthmus_transport::Identity::from_pem(
            &format!("{}{}", cert.pem, self.intermediate_pem),
            &self.agent_key_pem,
        )?)
    }
}
