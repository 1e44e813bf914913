//! The agent's stream to the primary: a full snapshot on every (re)connect
//! and on every registry change, heartbeats in between, and jittered
//! exponential backoff while the primary is away. Nothing here stops the
//! workload CA, so the cluster keeps working without the primary.

use std::sync::Arc;
use std::time::Duration;

use isthmus_api::pb::sync::sync_client::SyncClient;
use isthmus_api::pb::sync::{AgentMessage, Heartbeat, Service, Snapshot, agent_message};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::Config;
use crate::join::Credentials;

const HEARTBEAT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub async fn run(
    config: Config,
    creds: Arc<Credentials>,
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

fn heartbeat() -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
            agent_version: crate::VERSION.to_string(),
        })),
    }
}

async fn session(
    config: &Config,
    creds: &Credentials,
    mut registry: watch::Receiver<Arc<Vec<Service>>>,
    ready: &watch::Sender<bool>,
) -> anyhow::Result<()> {
    let identity = creds.agent_identity()?;
    let tls = isthmus_transport::primary_client_config(&creds.bundle.to_pem(), Some(identity))?;
    let mut client = SyncClient::new(isthmus_transport::tls_channel(
        &config.primary,
        Arc::new(tls),
    )?);
    let (tx, rx) = mpsc::channel(4);
    tx.send(snapshot(&config.cluster, &registry.borrow_and_update()))
        .await?;
    tx.send(heartbeat()).await?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(primary = %config.primary, "sync stream open");
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.tick().await;
    loop {
        tokio::select! {
            changed = registry.changed() => {
                if changed.is_err() { return Ok(()); }
                let msg = snapshot(&config.cluster, &registry.borrow_and_update());
                tx.send(msg).await?;
            }
            _ = beat.tick() => {
                tx.send(heartbeat()).await?;
            }
            msg = inbound.message() => match msg? {
                Some(m) => {
                    if !m.error.is_empty() {
                        tracing::warn!(error = %m.error, "primary refused part of the registry");
                    }
                    if m.applied_revision > 0 {
                        ready.send_replace(true);
                    }
                }
                None => return Ok(()),
            }
        }
    }
}
