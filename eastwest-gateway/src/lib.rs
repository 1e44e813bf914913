//! The Isthmus east-west gateway: lets mesh traffic into a network without
//! terminating it.
//!
//! It listens on 15443, reads the SNI `outbound_.PORT_.SUBSET_.FQDN` from
//! each ClientHello ([`sni`]), looks the name up among the services its
//! network exports (from xDS), and splices the connection, ClientHello
//! included, to a local endpoint's sidecar. An unknown or malformed SNI is
//! closed before anything is dialled. The gateway holds no private key: it
//! authenticates to the primary with its cluster's gateway credential.

pub mod sni;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use isthmus_api::names::ServiceKey;
use isthmus_xds::{Snapshot, XdsConfig, XdsHandle};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The primary's gRPC address, `https://HOST:15012` (replicas:
    /// comma-separated). Not its REST API on 15014, which is isthmusctl's
    /// (`ISTHMUS_PRIMARY`).
    #[arg(long, env = "ISTHMUS_PRIMARY_GRPC")]
    pub primary: String,
    /// The cluster this gateway serves.
    #[arg(long)]
    pub cluster: String,
    /// File with the cluster's gateway credential (written by its agent).
    #[arg(long)]
    pub token_file: PathBuf,
    /// The mesh roots, to authenticate the primary (written by the agent).
    #[arg(long)]
    pub roots: PathBuf,
    /// Where other networks' sidecars connect: mesh mTLS, routed by SNI
    /// and passed through undecrypted.
    #[arg(long, default_value = "0.0.0.0:15443")]
    pub listen: SocketAddr,
    /// Admin listener: /ready, /healthz, /config_dump. The default stays
    /// clear of the agent's and the sidecar's on the same host.
    #[arg(long, default_value = "127.0.0.1:15100")]
    pub admin: SocketAddr,
    /// Prometheus /metrics listener. The default stays clear of the
    /// sidecar's on the same host.
    #[arg(long, default_value = "127.0.0.1:15190")]
    pub metrics: SocketAddr,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub sni: String,
    pub result: String,
}

struct Gateway {
    xds: XdsHandle,
    connections: Family<ConnLabels, Counter>,
    next: AtomicUsize,
    /// Refusals reach INFO at most 5 per 10 s; the rest are counted (in
    /// `connections` and in the next INFO line) and logged at DEBUG.
    refusals: isthmus_transport::handshake_log::RefusalLog,
}

/// Time a client gets to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(config: Config) -> anyhow::Result<()> {
    isthmus_ca::install_crypto_provider();
    let token = std::fs::read_to_string(&config.token_file)
        .with_context(|| format!("reading gateway credential {}", config.token_file.display()))?;
    let roots = std::fs::read_to_string(&config.roots)
        .with_context(|| format!("reading {}", config.roots.display()))?;
    let tls = Arc::new(isthmus_transport::primary_client_config(&roots, None)?);
    // The agent rewrites the roots file when the mesh's roots change (a
    // rotation); follow it so the primary stays verifiable.
    let (roots_tx, roots_rx) = tokio::sync::watch::channel(isthmus_xds::XdsCredentials {
        tls: tls.clone(),
        metadata: Default::default(),
    });
    tokio::spawn(follow_roots(config.roots.clone(), roots, roots_tx));
    let xds = isthmus_xds::start(
        XdsConfig {
            primary: config.primary.clone(),
            tls,
            bearer: Some(token.trim().to_string()),
            node_id: format!("gateway~{}", config.cluster),
            cluster: config.cluster.clone(),
            metadata: Default::default(),
            route_names: Vec::new(),
        },
        Some(roots_rx),
    );
    let connections = Family::<ConnLabels, Counter>::default();
    let mut registry = Registry::with_prefix("isthmus_gateway");
    registry.register(
        "connections",
        "Connections by SNI and outcome",
        connections.clone(),
    );
    let gw = Arc::new(Gateway {
        xds,
        connections,
        next: AtomicUsize::new(0),
        refusals: isthmus_transport::handshake_log::RefusalLog::new(std::time::Instant::now()),
    });

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    serve_admin(config.admin, config.metrics, gw.clone(), Arc::new(registry)).await?;
    tracing::info!(listen = %config.listen, cluster = %config.cluster, "gateway serving");
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gw = gw.clone();
        tokio::spawn(async move { gw.handle(conn, peer).await });
    }
}

impl Gateway {
    /// Logs a refused connection: `detail` comes from the peer, so it is
    /// escaped and cut, and refusals are rate-limited.
    fn refused(&self, peer: SocketAddr, what: &str, detail: &str) {
        use isthmus_transport::handshake_log::{Admit, escape};
        let detail = escape(detail);
        match self.refusals.admit(std::time::Instant::now()) {
            Admit::Info { suppressed_before } => {
                tracing::info!(%peer, detail, suppressed_before, "closing connection: {what}")
            }
            Admit::Debug => tracing::debug!(%peer, detail, "closing connection: {what}"),
        }
    }

    fn count(&self, sni: &str, result: &str) {
        self.connections
            .get_or_create(&ConnLabels {
                sni: sni.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    async fn handle(&self, mut conn: TcpStream, peer: SocketAddr) {
        let _ = conn.set_nodelay(true);
        let (hello, sni) =
            match tokio::time::timeout(HELLO_TIMEOUT, sni::read_client_hello(&mut conn)).await {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    self.refused(peer, "bad ClientHello", &e.to_string());
                    self.count("", "bad_client_hello");
                    return;
                }
                Err(_) => {
                    self.count("", "hello_timeout");
                    return;
                }
            };
        // Only names that parse as mesh SNIs are even looked up; the label
        // then stays bounded to known services.
        let known = ServiceKey::parse_sni(&sni).is_ok()
            && self.xds.snapshot.load().clusters.contains_key(&sni);
        if !known {
            self.refused(peer, "SNI names no exported service", &sni);
            self.count("", "unknown_sni");
            return;
        }
        let Some(upstream) = self.pick(&self.xds.snapshot.load(), &sni) else {
            self.count(&sni, "no_endpoints");
            return;
        };
        let mut up = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(upstream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(%upstream, error = %e, "upstream dial failed");
                self.count(&sni, "upstream_failed");
                return;
            }
            Err(_) => {
                self.count(&sni, "upstream_failed");
                return;
            }
        };
        let _ = up.set_nodelay(true);
        if up.write_all(&hello).await.is_err() {
            self.count(&sni, "upstream_failed");
            return;
        }
        self.count(&sni, "routed");
        if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut up).await {
            tracing::debug!(%peer, error = %e, "spliced connection ended with an error");
        }
    }

    fn pick(&self, snap: &Snapshot, sni: &str) -> Option<SocketAddr> {
        let eps = snap.endpoints.get(sni)?;
        let best = eps.best();
        if best.is_empty() {
            return None;
        }
        Some(best[self.next.fetch_add(1, Ordering::Relaxed) % best.len()].addr)
    }
}

async fn serve_admin(
    admin: SocketAddr,
    metrics: SocketAddr,
    gw: Arc<Gateway>,
    registry: Arc<Registry>,
) -> anyhow::Result<()> {
    let dump_gw = gw.clone();
    let admin_router = isthmus_transport::admin::router(
        gw.xds.ready.clone(),
        "waiting for config from the primary\n",
    )
    .route(
        "/config_dump",
        get(move || {
            let snap = dump_gw.xds.snapshot.load_full();
            async move { axum::Json(config_dump(&snap)) }
        }),
    );
    let metrics_router = isthmus_transport::admin::metrics_router(move || {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    });
    use isthmus_transport::admin::Listener;
    isthmus_transport::admin::serve(Listener::Admin, admin, admin_router).await?;
    isthmus_transport::admin::serve(Listener::Metrics, metrics, metrics_router).await?;
    Ok(())
}

/// The gateway's routing table, for operators.
pub fn config_dump(snap: &Snapshot) -> serde_json::Value {
    let mut routes: Vec<_> = snap
        .clusters
        .keys()
        .map(|sni| {
            let eps: Vec<String> = snap
                .endpoints
                .get(sni)
                .map(|e| e.best().iter().map(|w| w.addr.to_string()).collect())
                .unwrap_or_default();
            serde_json::json!({ "sni": sni, "endpoints": eps })
        })
        .collect();
    routes.sort_by(|a, b| a["sni"].as_str().cmp(&b["sni"].as_str()));
    serde_json::json!({
        "clusterVersion": snap.cluster_version,
        "endpointVersion": snap.endpoint_version,
        "routes": routes,
    })
}

/// Re-reads the roots file every few seconds and publishes a new xDS client
/// config when it changed. Runs while the xDS client does.
async fn follow_roots(
    path: std::path::PathBuf,
    mut current: String,
    tx: tokio::sync::watch::Sender<isthmus_xds::XdsCredentials>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    while !tx.is_closed() {
        tick.tick().await;
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if text == current {
            continue;
        }
        match isthmus_transport::primary_client_config(&text, None) {
            Ok(tls) => {
                tracing::info!(path = %path.display(), "mesh roots changed");
                tx.send_replace(isthmus_xds::XdsCredentials {
                    tls: Arc::new(tls),
                    metadata: Default::default(),
                });
                current = text;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "roots file unusable; keeping the previous roots")
            }
        }
    }
}
