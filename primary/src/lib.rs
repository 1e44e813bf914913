//! The Isthmus primary: the control plane that runs outside the clusters.
//!
//! It keeps the mesh's state in a [`store`] (embedded here; etcd for several
//! replicas), rebuilds an immutable [`model`] from store events, and serves:
//! - on 15012, gRPC over TLS: agent join and sync ([`sync`]), and Envoy v3
//!   ADS for proxies and gateways ([`xds`]);
//! - on 15014, HTTPS: the REST API under `/api/v1` ([`api`]), `/healthz` and
//!   `/metrics`.
//!
//! It holds the mesh root ([`ca`]) and signs one intermediate per cluster;
//! workload certificates are signed by the agents, never here.

pub mod api;
pub mod auth;
pub mod ca;
pub mod config_api;
pub mod kek;
pub mod leader;
pub mod model;
pub mod openapi;
pub mod records;
pub mod rotation;
pub mod store;
pub mod sync;
pub mod tokens;
pub mod xds;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use isthmus_api::pb::sync::sync_server::SyncServer;
use isthmus_transport::Identity;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ca::CaState;
use crate::model::Model;
use crate::store::Store;

/// The names the serving certificate holds: localhost, `isthmus-primary`,
/// the listen addresses, the `--advertise` names, and, for a wildcard
/// listener, the addresses of this host's interfaces (`interfaces`). With a
/// wildcard listener and no `--advertise`, also a warning for the log:
/// clients that reach the primary by a DNS name or through a NAT would
/// fail to verify it.
pub fn serving_names(
    config: &Config,
    interfaces: &[std::net::IpAddr],
) -> (Vec<String>, Option<String>) {
    let mut names: Vec<String> = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "isthmus-primary".into(),
    ];
    let mut wildcard = Vec::new();
    for addr in [config.grpc_listen, config.http_listen] {
        if addr.ip().is_unspecified() {
            wildcard.push(addr.to_string());
            // 0.0.0.0 takes IPv4 only; [::] takes both.
            names.extend(
                interfaces
                    .iter()
                    .filter(|ip| addr.is_ipv6() || ip.is_ipv4())
                    .map(|ip| ip.to_string()),
            );
        } else {
            names.push(addr.ip().to_string());
        }
    }
    names.extend(config.advertise.iter().cloned());
    names.sort();
    names.dedup();
    let warning = (!wildcard.is_empty() && config.advertise.is_empty()).then(|| {
        format!(
            "listening on {} without --advertise: the serving certificate names only {}; \
             clients that reach this primary by another name or address (a DNS name, a NAT, \
             a load balancer) will refuse it. Start the primary with --advertise HOST[,HOST...] \
             naming what clients dial",
            wildcard.join(" and "),
            names.join(", ")
        )
    });
    (names, warning)
}

/// This host's interface addresses (IPv6 link-local ones left out: they
/// need a scope a URL cannot carry).
fn interface_addresses() -> Vec<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut ips: Vec<std::net::IpAddr> = addrs
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6()
                    .map(|v6| std::net::IpAddr::V6(v6.ip()))
                    .filter(
                        |ip| !matches!(ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local()),
                    )
            }
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Everything the primary is told at start-up, validated once.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Directory for the embedded store and the files clients need
    /// (root-cert.pem, admin-token).
    #[arg(long, default_value = "./isthmus-data", env = "ISTHMUS_DATA_DIR")]
    pub data_dir: PathBuf,
    /// gRPC over TLS: agent sync, xDS.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub grpc_listen: SocketAddr,
    /// HTTPS: REST API, health, metrics.
    #[arg(long, default_value = "0.0.0.0:15014")]
    pub http_listen: SocketAddr,
    /// Host names and IPs clients use to reach this primary; they go into its
    /// serving certificate. Localhost and the listen IPs are always added
    /// (for a wildcard listen address, this host's interface addresses at
    /// start); a name or address a client dials must be one of these.
    #[arg(long = "advertise", value_delimiter = ',')]
    pub advertise: Vec<String>,
    /// Also serve the REST API (same TLS and token) on this Unix socket, for
    /// local tools that cannot reach the primary's network.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// File holding the admin bearer token; created with a random token if
    /// it does not exist.
    #[arg(long, env = "ISTHMUS_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The mesh's SPIFFE trust domain: workload IDs read
    /// `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
    #[arg(long, default_value = isthmus_api::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// File with the key-encryption key (32 random bytes, base64) that seals
    /// CA keys in the store. The environment variable ISTHMUS_KEK may hold it
    /// instead. With neither, DATA_DIR/kek is created (mode 0600): fine for a
    /// laptop; in production keep the KEK in a secret store.
    #[arg(long, env = "ISTHMUS_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Use etcd at these endpoints (`http://HOST:2379`, comma-separated)
    /// instead of the embedded store. Needed for more than one replica.
    #[arg(long, value_delimiter = ',', env = "ISTHMUS_ETCD")]
    pub etcd: Vec<String>,
    /// This replica's name in leader election and in `GET /api/v1/leader`.
    /// Defaults to the host name and process id.
    #[arg(long, env = "ISTHMUS_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// How long the leader's etcd lease outlives its last renewal: the
    /// longest a dead leader's jobs stay unowned.
    #[arg(long, default_value_t = 10)]
    pub leader_ttl_seconds: u64,
    /// Proxies being pushed config at once (Istio's PILOT_PUSH_THROTTLE).
    /// A proxy holds its slot until it ACKs (or for 5 s at most), so this
    /// bounds the bytes queued towards slow proxies during a fleet-wide
    /// push, and the memory the primary needs for it.
    #[arg(long, default_value_t = 100)]
    pub max_concurrent_pushes: usize,
}

pub struct Metrics {
    pub registry: Registry,
    pub joins: Family<Vec<(String, String)>, Counter>,
    pub sync_refusals: Family<Vec<(String, String)>, Counter>,
    pub xds_pushes: Family<Vec<(String, String)>, Counter>,
    pub xds_nacks: Family<Vec<(String, String)>, Counter>,
    pub xds_connections: Gauge,
    pub leader: Gauge,
    pub leader_elections_won: Counter,
    pub intermediates_issued: Family<Vec<(String, String)>, Counter>,
    /// Set at each scrape; see [`api`]'s metrics handler.
    pub ca_signer_expiry_seconds: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("isthmus_primary");
        let joins = Family::default();
        let sync_refusals = Family::default();
        let xds_pushes = Family::default();
        let xds_nacks = Family::default();
        let xds_connections = Gauge::default();
        let leader = Gauge::default();
        let intermediates_issued = Family::default();
        registry.register(
            "intermediates_issued",
            "Cluster intermediates signed, by cluster",
            intermediates_issued.clone(),
        );
        let leader_elections_won = Counter::default();
        let ca_signer_expiry_seconds = Gauge::default();
        registry.register(
            "ca_signer_expiry_seconds",
            "Seconds until the CA that signs cluster intermediates (or a certificate above it) expires; alert well before 0",
            ca_signer_expiry_seconds.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica leads, else 0",
            leader.clone(),
        );
        registry.register(
            "leader_elections_won",
            "Times this replica became the leader",
            leader_elections_won.clone(),
        );
        registry.register("joins", "Cluster join attempts by result", joins.clone());
        registry.register(
            "sync_refusals",
            "Agent-reported entries refused, by cluster",
            sync_refusals.clone(),
        );
        registry.register(
            "xds_pushes",
            "xDS responses sent, by type",
            xds_pushes.clone(),
        );
        registry.register(
            "xds_nacks",
            "xDS NACKs received, by type",
            xds_nacks.clone(),
        );
        registry.register(
            "xds_connections",
            "Connected xDS streams",
            xds_connections.clone(),
        );
        Metrics {
            registry,
            joins,
            sync_refusals,
            xds_pushes,
            xds_nacks,
            xds_connections,
            leader,
            leader_elections_won,
            intermediates_issued,
            ca_signer_expiry_seconds,
        }
    }
}

/// State every handler shares.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub model: watch::Receiver<Arc<Model>>,
    /// The CA as this replica holds it now; see [`ca::follow`].
    pub ca_state: Arc<arc_swap::ArcSwap<CaState>>,
    pub kek: Arc<kek::Kek>,
    /// See [`tokens::admin_digest`].
    pub admin_token_sha256: String,
    pub metrics: Metrics,
    pub proxies: xds::status::Tracker,
    pub crypto: Arc<rustls::crypto::CryptoProvider>,
    /// This replica's name in leader election.
    pub replica: String,
    /// Generated xDS resources, shared by proxies that get the same.
    pub xds_cache: xds::generate::Cache,
    /// Interned resource names.
    pub names: std::sync::Mutex<std::collections::HashSet<Arc<str>>>,
    /// Delta subscription sets, shared between streams.
    pub subscriptions: xds::delta::Subscriptions,
    /// See [`Config::max_concurrent_pushes`].
    pub push_slots: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    /// One shared copy of a resource name (see [`xds::delta`]).
    pub fn intern(&self, name: &str) -> Arc<str> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        // Bounded: names come from subscriptions, which only matter when
        // they name resources; past this many, stop sharing.
        if names.len() < 1_000_000 {
            names.insert(n.clone());
        }
        n
    }

    /// The current CA, as this replica last loaded it.
    pub fn ca(&self) -> Arc<CaState> {
        self.ca_state.load_full()
    }

    /// The CA as stored right now: for signing, which must use the signer
    /// the store names even if this replica has not caught up yet.
    pub async fn ca_fresh(&self) -> anyhow::Result<Arc<CaState>> {
        let current = self.ca();
        let Some(kv) = self.store.get(store::keys::CA).await? else {
            return Ok(current);
        };
        let stored: ca::CaRecord = serde_json::from_slice(&kv.value)?;
        if stored == current.record {
            return Ok(current);
        }
        Ok(Arc::new(CaState::from_record(stored, &self.kek)?))
    }
}

/// The serving identity for the gRPC and HTTPS listeners, issued by the
/// current signing CA. The chain carries the signing CA's certificates and
/// every trusted root, so a client that pins a root by fingerprint finds it.
fn serving_identity(ca: &CaState, names: &[String]) -> anyhow::Result<Identity> {
    let (cert_pem, key_pem) = ca.authority.issue_server_cert(names)?;
    let chain = format!("{cert_pem}{}{}", ca.authority.chain_pem(), ca.bundle_pem());
    Ok(Identity::from_pem(&chain, &key_pem)?)
}

/// TLS for the gRPC listener (client certificates optional: gateways use a
/// bearer token) and for the HTTPS API.
fn server_configs(
    ca: &CaState,
    names: &[String],
    crypto: &Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<(rustls::ServerConfig, rustls::ServerConfig)> {
    let identity = serving_identity(ca, names)?;
    let client_verifier =
        Arc::new(isthmus_ca::SpiffeClientVerifier::new(ca.bundle.clone(), crypto).optional());
    let grpc = isthmus_transport::server_config(identity.clone(), Some(client_verifier))?;
    let http = isthmus_transport::server_config(identity, None)?;
    Ok((grpc, http))
}

/// Reads the admin token, creating it (mode 0600) on first start. A token
/// made here has the join-token form `ist1.<secret>.<root sha256>`, so a
/// client given only the token can pin the primary's root.
fn admin_token(path: &Path, ca: &CaState) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => anyhow::bail!("admin token file {} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token =
                isthmus_api::join_token::format(&tokens::generate(), &ca.root_fingerprint());
            isthmus_transport::write_private(path, &token)
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(path = %path.display(), "created admin token");
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading admin token {}", path.display())),
    }
}

/// The KEK: from --kek-file, ISTHMUS_KEK, or DATA_DIR/kek (created).
fn load_kek(config: &Config) -> anyhow::Result<kek::Kek> {
    let text = if let Some(path) = &config.kek_file {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the KEK from {}", path.display()))?
    } else if let Ok(text) = std::env::var("ISTHMUS_KEK") {
        text
    } else {
        let path = config.data_dir.join("kek");
        if !path.exists() {
            isthmus_transport::write_private(&path, &kek::Kek::generate())
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::warn!(path = %path.display(), "created a KEK beside the data; in production pass --kek-file or ISTHMUS_KEK from a secret store");
        }
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
    };
    Ok(kek::Kek::from_base64(&text)?)
}

/// Serves the REST router on every TLS stream that arrives.
async fn serve_http<IO>(
    mut incoming: tokio_stream::wrappers::ReceiverStream<
        Result<tokio_rustls::server::TlsStream<IO>, std::io::Error>,
    >,
    router: axum::Router,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio_stream::StreamExt;
    while let Some(Ok(tls)) = incoming.next().await {
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

/// The TLS client chain of the connection a gRPC request came on.
#[derive(Clone)]
pub(crate) struct PeerChain(pub Arc<Vec<rustls::pki_types::CertificateDer<'static>>>);

/// The certificates a gRPC peer presented, if any.
pub(crate) fn peer_certs<T>(
    request: &tonic::Request<T>,
) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
    request
        .extensions()
        .get::<PeerChain>()
        .map(|c| c.0.as_slice())
        .filter(|c| !c.is_empty())
}

/// Serves gRPC over HTTP/2 on TLS connections.
///
/// hyper, not tonic's server, so that the per-stream send buffer is bounded:
/// by default h2 buffers up to 400 KiB per stream ahead of a slow reader,
/// which at a thousand proxies taking their first snapshot at once is
/// 400 MB of transient heap that the allocator then keeps. Each request
/// carries the connection's client chain as a `PeerChain` extension.
async fn serve_grpc<IO>(
    mut incoming: tokio_stream::wrappers::ReceiverStream<
        Result<tokio_rustls::server::TlsStream<IO>, std::io::Error>,
    >,
    routes: tonic::service::Routes,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio_stream::StreamExt;
    while let Some(Ok(tls)) = incoming.next().await {
        let chain = PeerChain(Arc::new(
            tls.get_ref()
                .1
                .peer_certificates()
                .unwrap_or_default()
                .to_vec(),
        ));
        let routes = routes.clone();
        let service = tower::ServiceBuilder::new()
            .map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(chain.clone());
                req
            })
            .service(routes);
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .max_send_buf_size(GRPC_SEND_BUFFER)
                .keep_alive_interval(std::time::Duration::from_secs(30))
                .keep_alive_timeout(std::time::Duration::from_secs(10));
            let service = TowerToHyperService::new(service);
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(error = %e, "gRPC connection ended with an error");
            }
        });
    }
}

/// Bytes h2 may hold per stream ahead of the peer reading them; the xDS
/// and sync streams hold the rest as ungenerated work, not as buffers.
const GRPC_SEND_BUFFER: usize = 64 * 1024;

/// Runs the primary until the process is stopped.
pub async fn run(config: Config) -> anyhow::Result<()> {
    isthmus_ca::install_crypto_provider();
    isthmus_transport::create_private_dir(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let store: Arc<dyn Store> = if config.etcd.is_empty() {
        Arc::new(
            store::embedded::EmbeddedStore::open(&config.data_dir.join("store.redb"))
                .context("opening the embedded store")?,
        )
    } else {
        Arc::new(
            store::etcd::EtcdStore::connect(&config.etcd)
                .await
                .with_context(|| format!("connecting to etcd at {}", config.etcd.join(",")))?,
        )
    };
    let kek = Arc::new(load_kek(&config)?);
    let ca = CaState::load_or_create(&store, &config.trust_domain, &kek).await?;
    let token_path = config
        .admin_token_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("admin-token"));
    let admin = admin_token(&token_path, &ca)?;
    let files = ca::Files {
        roots: config.data_dir.join("root-cert.pem"),
        admin_token: token_path.clone(),
    };
    ca::write_files(&files, &ca, true);

    let (names, warning) = serving_names(&config, &interface_addresses());
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    let crypto = isthmus_ca::crypto_provider();
    let (grpc_tls, http_tls) = server_configs(&ca, &names, &crypto)?;
    let replica = config.replica_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "primary".into());
        format!("{host}-{}", std::process::id())
    });

    let (model_tx, model_rx) = watch::channel(Arc::new(Model::default()));
    tokio::spawn(model::run(store.clone(), model_tx));

    let ca_state = Arc::new(arc_swap::ArcSwap::from_pointee(ca));
    let (grpc_cfg_tx, grpc_cfg) = watch::channel(Arc::new(grpc_tls));
    let (http_cfg_tx, http_cfg) = watch::channel(Arc::new(http_tls));
    {
        let crypto = crypto.clone();
        tokio::spawn(ca::follow(
            ca_state.clone(),
            model_rx.clone(),
            kek.clone(),
            files,
            move |state| match server_configs(state, &names, &crypto) {
                Ok((grpc, http)) => {
                    grpc_cfg_tx.send_replace(Arc::new(grpc));
                    http_cfg_tx.send_replace(Arc::new(http));
                }
                Err(e) => tracing::error!(error = %e, "cannot re-issue the serving certificate"),
            },
        ));
    }

    let shared = Arc::new(Shared {
        store,
        model: model_rx,
        ca_state,
        kek,
        admin_token_sha256: tokens::admin_digest(&admin),
        metrics: Metrics::new(),
        proxies: Default::default(),
        crypto,
        replica: replica.clone(),
        xds_cache: Default::default(),
        names: Default::default(),
        subscriptions: Default::default(),
        push_slots: Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_pushes.max(1),
        )),
    });
    tokio::spawn(xds::status::publish(shared.clone()));
    tokio::spawn(leader::run(
        shared.clone(),
        leader::LeaderRecord {
            replica,
            api: format!("https://{}", config.http_listen),
            grpc: format!("https://{}", config.grpc_listen),
            since_unix: 0,
        },
        std::time::Duration::from_secs(config.leader_ttl_seconds.max(2)),
    ));

    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC listener {}", config.grpc_listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding HTTP listener {}", config.http_listen))?;
    tracing::info!(grpc = %config.grpc_listen, http = %config.http_listen, "primary serving");

    let grpc = tonic::service::Routes::new(SyncServer::new(sync::SyncService::new(shared.clone())))
        .add_service(xds::server::AdsServer(Arc::new(xds::ads::AdsService {
            shared: shared.clone(),
        })));
    let grpc = serve_grpc(
        isthmus_transport::tls_incoming(grpc_listener, grpc_cfg),
        grpc,
    );

    let router = api::router(shared.clone());
    if let Some(path) = &config.api_socket {
        let _ = std::fs::remove_file(path);
        let unix = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("binding API socket {}", path.display()))?;
        tokio::spawn(serve_http(
            isthmus_transport::tls_incoming(unix, http_cfg.clone()),
            router.clone(),
        ));
    }
    let http = serve_http(
        isthmus_transport::tls_incoming(http_listener, http_cfg),
        router,
    );
    tokio::select! {
        () = grpc => {},
        () = http => {},
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn config(args: &[&str]) -> Config {
        Cli::try_parse_from(std::iter::once("isthmus-primary").chain(args.iter().copied()))
            .expect("the arguments parse")
            .config
    }

    #[test]
    fn a_wildcard_listener_names_the_hosts_addresses_and_warns_without_advertise() {
        let host: Vec<std::net::IpAddr> = vec![
            "127.0.0.1".parse().expect("an IP"),
            "198.51.100.4".parse().expect("an IP"),
            "2001:db8::4".parse().expect("an IP"),
        ];
        // The defaults listen on 0.0.0.0: IPv4 interface addresses only.
        let (names, warning) = serving_names(&config(&[]), &host);
        assert!(names.contains(&"198.51.100.4".to_string()), "{names:?}");
        assert!(!names.contains(&"2001:db8::4".to_string()), "{names:?}");
        let warning = warning.expect("a warning");
        assert!(
            warning.starts_with("listening on 0.0.0.0:15012 and 0.0.0.0:15014 without --advertise"),
            "{warning}"
        );
        assert!(warning.contains("--advertise HOST"), "{warning}");
        assert!(warning.contains("198.51.100.4"), "{warning}");

        // [::] takes both families.
        let (names, _) = serving_names(&config(&["--grpc-listen", "[::]:15012"]), &host);
        assert!(names.contains(&"2001:db8::4".to_string()), "{names:?}");

        // With --advertise, no warning, and the names are in.
        let (names, warning) = serving_names(
            &config(&["--advertise", "primary.example,203.0.113.9"]),
            &host,
        );
        assert_eq!(warning, None);
        assert!(names.contains(&"primary.example".to_string()), "{names:?}");
        assert!(names.contains(&"203.0.113.9".to_string()), "{names:?}");

        // Specific listen addresses: named, no warning, no interfaces.
        let (names, warning) = serving_names(
            &config(&[
                "--grpc-listen",
                "192.0.2.1:15012",
                "--http-listen",
                "192.0.2.1:15014",
            ]),
            &host,
        );
        assert_eq!(warning, None);
        assert!(names.contains(&"192.0.2.1".to_string()), "{names:?}");
        assert!(!names.contains(&"198.51.100.4".to_string()), "{names:?}");
    }

    #[test]
    fn this_hosts_addresses_include_loopback() {
        let ips = interface_addresses();
        assert!(
            ips.contains(&std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            "{ips:?}"
        );
    }
}
