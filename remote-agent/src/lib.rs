//! The Isthmus remote agent: runs inside (or beside) one cluster.
//!
//! - [`join`]: trades the one-time join token and a CSR for the cluster's
//!   intermediate CA; the key never leaves the agent and is kept in a 0600
//!   file so restarts need no new token.
//! - [`registry`]: discovers services and workloads from a watched YAML file
//!   (VMs, `isthmusctl up`); [`kubernetes`]: from a cluster's API server.
//! - [`sync`]: streams snapshots and heartbeats to the primary, reconnecting
//!   with jittered backoff.
//! - [`ca_server`]: signs workload certificates over a Unix socket, for the
//!   identity the caller's credential names. It needs no primary, so new
//!   workloads get certificates while the primary is down; a refused
//!   credential is logged, rate-limited ([`refusal_log`]).

pub mod ca_server;
pub mod join;
pub mod kubernetes;
pub mod refusal_log;
pub mod registry;
pub mod sds;
pub mod sync;
pub mod tokenreview;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

/// Everything the agent is told at start-up.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The primary's gRPC address, `https://HOST:15012` (replicas:
    /// comma-separated). Not its REST API on 15014, which is isthmusctl's
    /// (`ISTHMUS_PRIMARY`).
    #[arg(long, env = "ISTHMUS_PRIMARY_GRPC")]
    pub primary: String,
    /// One-time join token from `isthmusctl cluster register`. Not needed
    /// once the agent has joined (its state dir holds its credentials).
    /// Prefer --join-token-file: a command line is visible to every local
    /// user in `ps`.
    #[arg(long, env = "ISTHMUS_JOIN_TOKEN", conflicts_with = "join_token_file")]
    pub join_token: Option<String>,
    /// A file (mode 0600) holding the one-time join token.
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// This cluster's registered name.
    #[arg(long)]
    pub cluster: String,
    /// Where the agent keeps its intermediate key (0600), chain and bundle.
    #[arg(long, default_value = "./isthmus-agent")]
    pub state_dir: PathBuf,
    /// Discover from this file registry (YAML): VMs and `isthmusctl up`.
    #[arg(
        long,
        conflicts_with = "kubernetes",
        required_unless_present = "kubernetes"
    )]
    pub registry: Option<PathBuf>,
    /// Discover from the Kubernetes API (in-cluster config or KUBECONFIG).
    /// Workloads then authenticate with projected service-account tokens.
    #[arg(long)]
    pub kubernetes: bool,
    /// The audience workloads' projected tokens must be bound to
    /// (Kubernetes mode).
    #[arg(long, default_value = "isthmus-ca")]
    pub token_audience: String,
    /// Unix socket for the workload CA. Default: STATE_DIR/ca.sock.
    #[arg(long)]
    pub ca_socket: Option<PathBuf>,
    /// Directory for the per-workload SDS sockets Envoy sidecars use
    /// (`<workload>.sock`; file-registry mode). Default: STATE_DIR/sds.
    #[arg(long)]
    pub sds_dir: Option<PathBuf>,
    /// Admin listener: /ready, /healthz, /metrics. The default (Istio's
    /// agent port) stays clear of the gateway's and the sidecar's.
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
    /// Workload certificate requests each identity may make per second...
    #[arg(long, default_value = "5", value_parser = clap::value_parser!(NonZeroU32))]
    pub ca_rate_limit: NonZeroU32,
    /// ...and in a burst.
    #[arg(long, default_value = "20", value_parser = clap::value_parser!(NonZeroU32))]
    pub ca_rate_burst: NonZeroU32,
}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs the agent until the process is stopped.
pub async fn run(config: Config) -> anyhow::Result<()> {
    isthmus_ca::install_crypto_provider();
    isthmus_transport::create_private_dir(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let creds = Arc::new(join::Live::new(
        &config.state_dir,
        join::ensure_joined(&config).await?,
    ));
    tracing::info!(cluster = %config.cluster, trust_domain = %creds.current().signer.trust_domain(), "agent holds its cluster intermediate");

    let (snap_tx, snap_rx) = watch::channel(Arc::new(Vec::new()));
    // Workload credentials: tokens in the file registry, or projected
    // service-account tokens checked by TokenReview.
    let auth = match &config.registry {
        Some(path) => {
            let initial = registry::Registry::load(path)?;
            snap_tx.send_replace(Arc::new(initial.snapshot()));
            let (reg_tx, reg_rx) = watch::channel(Arc::new(initial));
            tokio::spawn(watch_registry(path.clone(), reg_tx));
            tokio::spawn(publish_registry(reg_rx.clone(), snap_tx));
            let sds_dir = config
                .sds_dir
                .clone()
                .unwrap_or_else(|| config.state_dir.join("sds"));
            tokio::spawn(sds::run(sds_dir, creds.clone(), reg_rx.clone()));
            ca_server::WorkloadAuth::Registry(reg_rx)
        }
        None => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            tokio::spawn(kubernetes::run(client.clone(), snap_tx));
            ca_server::WorkloadAuth::Kubernetes(Arc::new(tokenreview::TokenReviewer::new(
                client,
                &config.token_audience,
            )))
        }
    };

    let socket = config
        .ca_socket
        .clone()
        .unwrap_or_else(|| config.state_dir.join("ca.sock"));
    let ca_metrics = ca_server::Metrics::default();
    let mut registry = prometheus_client::registry::Registry::with_prefix("isthmus_agent");
    ca_metrics.register(&mut registry);
    let registry = Arc::new(registry);
    let ca = ca_server::serve(
        socket,
        creds.clone(),
        auth,
        config.cluster.clone(),
        ca_server::Limits::per_second(config.ca_rate_limit, config.ca_rate_burst),
        ca_metrics,
    )?;

    let (ready_tx, ready_rx) = watch::channel(false);
    isthmus_transport::admin::serve(
        isthmus_transport::admin::Listener::Admin,
        config.admin,
        isthmus_transport::admin::router(ready_rx, "not synced with the primary yet\n").merge(
            isthmus_transport::admin::metrics_router(move || {
                let mut out = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                out
            }),
        ),
    )
    .await?;

    let sync = sync::run(config.clone(), creds, snap_rx, ready_tx);
    tokio::select! {
        r = ca => r.context("workload CA server failed"),
        () = sync => Ok(()),
    }
}

/// Turns each registry version into the services the primary wants.
async fn publish_registry(
    mut reg: watch::Receiver<Arc<registry::Registry>>,
    tx: watch::Sender<Arc<Vec<isthmus_api::pb::sync::Service>>>,
) {
    while reg.changed().await.is_ok() {
        let services = reg.borrow_and_update().snapshot();
        tx.send_replace(Arc::new(services));
    }
}

/// Reloads the registry when the file's content changes. A broken file is
/// reported and the last good registry stays in force.
async fn watch_registry(path: PathBuf, tx: watch::Sender<Arc<registry::Registry>>) {
    let mut last = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        match registry::Registry::load(&path) {
            Ok(reg) => {
                tracing::info!(path = %path.display(), services = reg.services.len(), workloads = reg.workloads.len(), "registry reloaded");
                tx.send_replace(Arc::new(reg));
            }
            Err(e) => {
                tracing::error!(error = %e, "registry not reloaded; keeping the last good one")
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}
