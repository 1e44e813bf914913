//! The agent's stream to the primary: a full snapshot on every (re)connect,
//! then deltas (changed and removed services) as discovery changes,
//! heartbeats in between, and jittered
//! exponential backoff while the primary is away. Nothing here stops the
//! workload CA, so the cluster keeps working without the primary.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::pb::sync::sync_client::SyncClient;
use isthmus_api::pb::sync::{
    AgentMessage, Delta, Heartbeat, PrimaryMessage, RenewRequest, Service, ServiceRef, Snapshot,
    agent_message,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::Config;
use crate::join::Live;

const HEARTBEAT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub async fn run(
    config: Config,
    creds: Arc<Live>,
    registry: watch::Receiver<Arc<Vec<Service>>>,
    ready: watch::Sender<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match session(&config, &creds, registry.clone(), &ready).await {
            Ok(()) => {
                tracing::info!("primary closed the sync stream; reconnecting");
                backoff = Duration::from_millis(200);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "sync with the primary failed")
            }
        }
        let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn snapshot(cluster: &str, services: &[Service]) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Snapshot(Snapshot {
            services: services.to_vec(),
            cluster: cluster.to_string(),
        })),
    }
}

/// What changed between two snapshots, or None if nothing did.
fn delta(cluster: &str, before: &[Service], after: &[Service]) -> Option<AgentMessage> {
    let key = |s: &Service| (s.namespace.clone(), s.name.clone());
    let old: HashMap<_, &Service> = before.iter().map(|s| (key(s), s)).collect();
    let new: HashMap<_, &Service> = after.iter().map(|s| (key(s), s)).collect();
    let upserts: Vec<Service> = after
        .iter()
        .filter(|s| old.get(&key(s)) != Some(s))
        .cloned()
        .collect();
    let removed: Vec<ServiceRef> = before
        .iter()
        .filter(|s| !new.contains_key(&key(s)))
        .map(|s| ServiceRef {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
        })
        .collect();
    if upserts.is_empty() && removed.is_empty() {
        return None;
    }
    Some(AgentMessage {
        kind: Some(agent_message::Kind::Delta(Delta {
            cluster: cluster.to_string(),
            upserts,
            removed,
        })),
    })
}

fn heartbeat(live: &Live) -> AgentMessage {
    let creds = live.current();
    AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
            agent_version: crate::VERSION.to_string(),
            intermediate_fingerprint: creds.intermediate_fingerprint(),
            bundle_sequence: creds.bundle_sequence,
        })),
    }
}

/// What to do about a message from the primary. Returns true when the
/// stream must be reopened (a new intermediate means a new identity).
async fn handle(
    live: &Live,
    client: &mut SyncClient<tonic::transport::Channel>,
    tx: &mpsc::Sender<AgentMessage>,
    m: PrimaryMessage,
    ready: &watch::Sender<bool>,
) -> anyhow::Result<bool> {
    if !m.error.is_empty() {
        tracing::warn!(error = %m.error, "primary refused part of the registry");
    }
    if m.applied_revision > 0 {
        ready.send_replace(true);
    }
    if !m.trust_bundle_pem.is_empty()
        && live.update_bundle(
            &m.trust_bundle_pem,
            &m.crls_pem,
            &m.federated_bundles
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            m.bundle_sequence,
        )?
    {
        tracing::info!(
            sequence = m.bundle_sequence,
            roots = live.current().bundle.roots().len(),
            "trust bundle updated"
        );
        // Report at once: a rotation waits for every agent to hold it.
        tx.send(heartbeat(live)).await?;
    }
    if m.renew_intermediate {
        let (csr, key) = isthmus_ca::issue::generate_csr("isthmus-agent")?;
        let resp = client
            .renew_intermediate(RenewRequest { csr_pem: csr })
            .await
            .map_err(|s| anyhow::anyhow!("renewing the intermediate: {}", s.message()))?
            .into_inner();
        live.replace_intermediate(&resp.intermediate_pem, &key)?;
        tracing::info!(
            fingerprint = %live.current().intermediate_fingerprint(),
            "cluster intermediate replaced; reconnecting with the new identity"
        );
        return Ok(true);
    }
    Ok(false)
}

async fn session(
    config: &Config,
    live: &Live,
    mut registry: watch::Receiver<Arc<Vec<Service>>>,
    ready: &watch::Sender<bool>,
) -> anyhow::Result<()> {
    let creds = live.current();
    let identity = creds.agent_identity()?;
    let tls = isthmus_transport::primary_client_config(&creds.bundle.to_pem(), Some(identity))?;
    let mut client = SyncClient::new(isthmus_transport::tls_channel(
        &config.primary,
        Arc::new(tls),
    )?);
    let (tx, rx) = mpsc::channel(4);
    let mut sent = registry.borrow_and_update().clone();
    tx.send(snapshot(&config.cluster, &sent)).await?;
    tx.send(heartbeat(live)).await?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(primary = %config.primary, "sync stream open");
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.tick().await;
    loop {
        tokio::select! {
            changed = registry.changed() => {
                if changed.is_err() { return Ok(()); }
                let next = registry.borrow_and_update().clone();
                if let Some(msg) = delta(&config.cluster, &sent, &next) {
                    tx.send(msg).await?;
                }
                sent = next;
            }
            _ = beat.tick() => {
                tx.send(heartbeat(live)).await?;
            }
            msg = inbound.message() => match msg? {
                Some(m) => {
                    if handle(live, &mut client, &tx, m, ready).await? {
                        return Ok(());
                    }
                }
                None => return Ok(()),
            }
        }
    }
}
