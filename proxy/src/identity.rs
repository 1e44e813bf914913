//! The proxy's own SVID: fetched from the local agent, checked against the
//! trust bundle before use, renewed at half its lifetime (with jitter), and
//! published on a `watch` channel so new connections pick it up while
//! existing ones carry on. If renewal fails, the still-valid certificate
//! keeps serving and renewal retries with backoff.
//!
//! The agent also says when to renew early: its `Watch` stream reports a
//! new generation whenever the cluster intermediate or the trust bundle
//! changed (a rotation), and the proxy then fetches a new certificate, with
//! the new bundle, at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use isthmus_api::pb::ca::certificate_service_client::CertificateServiceClient;
use isthmus_api::pb::ca::{CreateCertificateRequest, WatchRequest};
use isthmus_ca::{SpiffeId, TrustBundle};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::sync::watch;

/// A certificate this proxy holds, with everything needed to use it.
pub struct Svid {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Roots and CRLs.
    pub bundle: TrustBundle,
    /// The primary's sequence number of `bundle`.
    pub bundle_sequence: u64,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// When this proxy received it. Lifetimes are measured from here, not
    /// from `not_before`, which the CA backdates to absorb clock skew.
    pub received_unix: i64,
}

impl Svid {
    pub fn identity(&self) -> isthmus_transport::Identity {
        isthmus_transport::Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentClient {
    pub socket: PathBuf,
    pub token: String,
    /// Requested lifetime; zero means the CA's default.
    pub ttl: Duration,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl AgentClient {
    /// Asks the agent for a certificate and checks what comes back.
    pub async fn fetch(&self) -> anyhow::Result<Svid> {
        let (csr, key_pem) = isthmus_ca::issue::generate_csr("isthmus-proxy")?;
        let mut client =
            CertificateServiceClient::new(isthmus_transport::uds_channel(self.socket.clone()));
        let mut request = tonic::Request::new(CreateCertificateRequest {
            csr,
            validity_duration: self.ttl.as_secs() as i64,
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse()?);
        let resp = client
            .create_certificate(request)
            .await
            .map_err(|s| anyhow::anyhow!("agent refused the certificate request: {}", s.message()))?
            .into_inner();
        let chain_pem: String = resp.cert_chain.concat();
        let chain = isthmus_ca::pem::certs(&chain_pem, "issued chain")?;
        let leaf = isthmus_ca::svid::inspect(&chain[0])?;
        let id = leaf
            .spiffe_id
            .clone()
            .context("issued certificate has no SPIFFE ID")?;
        let federated = resp
            .federated_bundles
            .iter()
            .map(|(td, pem)| TrustBundle::from_pem(td, pem))
            .collect::<Result<Vec<_>, _>>()?;
        let bundle = TrustBundle::from_pem(id.trust_domain(), &resp.trust_bundle.concat())?
            .with_crls_pem(&resp.crls)?
            .with_federated(federated);
        // Check the certificate with the same verifier peers will use.
        let provider = isthmus_ca::crypto_provider();
        let verified = bundle
            .verify(
                &chain[0],
                &chain[1..],
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                &provider.signature_verification_algorithms,
            )
            .map_err(|e| {
                anyhow::anyhow!("issued certificate does not verify against the trust bundle: {e}")
            })?;
        if verified != id {
            bail!("issued certificate names {verified}, expected {id}");
        }
        Ok(Svid {
            id,
            chain,
            key: isthmus_ca::pem::private_key(&key_pem, "proxy key")?,
            bundle,
            bundle_sequence: resp.bundle_sequence,
            not_before_unix: leaf.not_before_unix,
            received_unix: now_unix(),
            not_after_unix: leaf.not_after_unix,
        })
    }
}

impl AgentClient {
    /// Follows the agent's `Watch` stream in the background, reconnecting
    /// when it breaks. The channel changes whenever the agent reports a new
    /// generation after the first one seen.
    fn watch_generations(&self) -> watch::Receiver<(u64, String)> {
        let (tx, rx) = watch::channel((0u64, String::new()));
        let agent = self.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                match agent.follow(&tx, &mut last).await {
                    Ok(()) => tracing::info!("the agent closed its watch stream; reopening"),
                    Err(e) => tracing::debug!(error = %e, "agent watch failed; retrying"),
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        rx
    }

    async fn follow(
        &self,
        tx: &watch::Sender<(u64, String)>,
        last: &mut Option<u64>,
    ) -> anyhow::Result<()> {
        let mut client =
            CertificateServiceClient::new(isthmus_transport::uds_channel(self.socket.clone()));
        let mut request = tonic::Request::new(WatchRequest {});
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse()?);
        let mut events = client.watch(request).await?.into_inner();
        while let Some(event) = events.message().await? {
            // The first event after (re)connecting is the current state; it
            // means a change only if it differs from what we saw before (an
            // agent restart also counts).
            if last.is_some_and(|g| g != event.generation) {
                tx.send_replace((event.generation, event.reason.clone()));
            }
            *last = Some(event.generation);
        }
        Ok(())
    }
}

/// Fetches the first certificate (retrying until the agent answers), then
/// keeps it renewed in the background.
pub async fn start(agent: AgentClient) -> anyhow::Result<watch::Receiver<Arc<Svid>>> {
    let mut delay = Duration::from_millis(100);
    let first = loop {
        match agent.fetch().await {
            Ok(svid) => break svid,
            Err(e) => {
                tracing::info!(error = %e, "waiting for a certificate from the agent");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    tracing::info!(identity = %first.id, not_after = first.not_after_unix, "certificate issued");
    let (tx, rx) = watch::channel(Arc::new(first));
    let mut generations = agent.watch_generations();
    tokio::spawn(async move {
        loop {
            let (received, not_after) = {
                let cur = tx.borrow();
                (cur.received_unix, cur.not_after_unix)
            };
            // Renew at 50% of the lifetime, minus up to 10% jitter so a
            // fleet started together does not renew together.
            let lifetime = (not_after - received).max(1) as f64;
            let at = received as f64 + lifetime * (0.5 - rand::random::<f64>() * 0.1);
            let wait = (at - now_unix() as f64).max(0.0);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs_f64(wait)) => {}
                Ok(()) = generations.changed() => {
                    let (generation, reason) = generations.borrow_and_update().clone();
                    tracing::info!(generation, %reason, "the agent's credentials changed; renewing now");
                }
            }
            let mut backoff = Duration::from_millis(500);
            loop {
                match agent.fetch().await {
                    Ok(svid) => {
                        tracing::info!(identity = %svid.id, not_after = svid.not_after_unix, "certificate renewed");
                        tx.send_replace(Arc::new(svid));
                        break;
                    }
                    Err(e) => {
                        let left = tx.borrow().not_after_unix - now_unix();
                        tracing::warn!(error = %e, seconds_left = left, "renewal failed; still serving the current certificate");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(rx)
}
