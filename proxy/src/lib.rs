//! The Isthmus sidecar proxy.
//!
//! - [`identity`] keeps the proxy's SVID, from the local agent, renewed.
//! - [`outbound`] (15001) routes the app's HTTP requests to mesh services
//!   over mTLS, following VirtualService routes and using clusters and
//!   endpoints from xDS ([`isthmus_xds`]); [`pool`] applies a
//!   DestinationRule's load balancing and connection pool.
//! - [`inbound`] (15006) terminates mTLS from other sidecars, checks their
//!   SPIFFE identity, applies AuthorizationPolicy and hands the request to
//!   the local app.
//! - The admin listener (15000) serves `/ready` and `/config_dump`; 15090
//!   serves `/metrics`.
//!
//! Config lives in an `ArcSwap` and certificates on `watch` channels, so the
//! request path takes no lock.

pub mod health;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The primary's gRPC address, `https://HOST:15012` (replicas:
    /// comma-separated). Not its REST API on 15014, which is isthmusctl's
    /// (`ISTHMUS_PRIMARY`).
    #[arg(long, env = "ISTHMUS_PRIMARY_GRPC")]
    pub primary: String,
    /// The cluster this workload runs in.
    #[arg(long)]
    pub cluster: String,
    /// The local agent's workload CA socket.
    #[arg(long)]
    pub agent_socket: PathBuf,
    /// File holding this workload's credential for the agent.
    #[arg(long)]
    pub token_file: PathBuf,
    /// The xDS node id, as `isthmusctl proxy-status` lists it. Default:
    /// Istio's `sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local`, from
    /// the instance IP, the pod name and the namespace of the workload's
    /// SPIFFE ID.
    #[arg(long)]
    pub node_id: Option<String>,
    /// The workload's name in the default node id (Istio's POD_NAME).
    /// Default: this host's name, followed by `-PORT` when the inbound port
    /// is not 15006, so the sidecars on one host differ.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Outbound listener: the app sends plain HTTP here (proxy form, as
    /// `curl -x` sends it, or with a Host header) to reach mesh services.
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub outbound: SocketAddr,
    /// Inbound listener: other sidecars and gateways connect here with mesh
    /// mTLS; its address and port are what the registry lists for this
    /// workload.
    #[arg(long, default_value = "0.0.0.0:15006")]
    pub inbound: SocketAddr,
    /// Admin listener: /ready, /healthz, /config_dump (Istio's port). Two
    /// sidecars on one host need their own.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Prometheus /metrics listener (Istio's port). Two sidecars on one host
    /// need their own.
    #[arg(long, default_value = "127.0.0.1:15090")]
    pub metrics: SocketAddr,
    /// This workload's address, which the primary matches against the
    /// registry to find its labels (and so the AuthorizationPolicies that
    /// select it). Defaults to the inbound listener's address when that is
    /// not a wildcard.
    #[arg(long, env = "INSTANCE_IP")]
    pub instance_ip: Option<std::net::IpAddr>,
    /// Local apps by service port, `PORT=IP:PORT` (repeatable): inbound
    /// requests for that port go there.
    #[arg(long = "app", value_parser = parse_app)]
    pub apps: Vec<(u16, SocketAddr)>,
    /// Requested certificate lifetime in seconds; 0 means the CA default.
    #[arg(long, default_value_t = 0)]
    pub cert_ttl_seconds: u64,
}

/// Istio's sidecar node id, `sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN`
/// (the primary checks its namespace against the SVID's). Without an
/// instance IP, the IP part reads 0.0.0.0. A `~` in the pod name would
/// split the id, so it becomes `-`.
pub fn istio_node_id(ip: Option<std::net::IpAddr>, pod: &str, namespace: &str) -> String {
    let ip = ip.map_or_else(|| "0.0.0.0".to_string(), |ip| ip.to_string());
    let pod = pod.replace('~', "-");
    format!(
        "sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.{}",
        isthmus_api::DEFAULT_CLUSTER_DOMAIN
    )
}

/// The pod name of a sidecar not given one: the host's name, plus the
/// inbound port when it is not the default one.
fn default_pod_name(host: &str, inbound_port: u16) -> String {
    if inbound_port == isthmus_api::ports::INBOUND {
        host.to_string()
    } else {
        format!("{host}-{inbound_port}")
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The workload credential in `path`, as
/// [`isthmus_api::workload_credential`] defines it. Its hash is logged, to
/// compare with the registry's `tokenSha256` when the agent refuses it.
fn read_credential(path: &std::path::Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading workload credential {}", path.display()))?;
    let credential = isthmus_api::workload_credential::from_file_bytes(&bytes)
        .with_context(|| format!("workload credential {}", path.display()))?;
    tracing::info!(
        file = %path.display(),
        token_sha256 = %isthmus_api::workload_credential::sha256_hex(credential),
        "workload credential read; the registry's tokenSha256 must be this hash"
    );
    Ok(credential.to_string())
}

fn parse_app(s: &str) -> Result<(u16, SocketAddr), String> {
    let (port, addr) = s.split_once('=').ok_or("expected PORT=IP:PORT")?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{port:?} is not a port"))?;
    let addr = addr
        .parse::<SocketAddr>()
        .map_err(|_| format!("{addr:?} is not IP:PORT"))?;
    Ok((port, addr))
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    isthmus_ca::install_crypto_provider();
    let token = read_credential(&config.token_file)?;
    let svid = identity::start(identity::AgentClient {
        socket: config.agent_socket.clone(),
        token,
        ttl: Duration::from_secs(config.cert_ttl_seconds),
    })
    .await?;

    // TLS configs follow the certificate: rebuilt on every renewal.
    let (server_tx, server_rx) = watch::channel(Arc::new(tls::server_config(&svid.borrow())?));
    let (xds_tls_tx, xds_tls_rx) = watch::channel(xds_credentials(&svid.borrow())?);
    let mut renewals = svid.clone();
    tokio::spawn(async move {
        while renewals.changed().await.is_ok() {
            let current = renewals.borrow_and_update().clone();
            let built = tls::server_config(&current)
                .map_err(anyhow::Error::from)
                .and_then(|s| Ok((s, xds_credentials(&current)?)));
            match built {
                Ok((s, x)) => {
                    server_tx.send_replace(Arc::new(s));
                    xds_tls_tx.send_replace(x);
                }
                Err(e) => {
                    tracing::error!(error = %e, "renewed certificate unusable; keeping the previous one")
                }
            }
        }
    });

    let instance_ip = config
        .instance_ip
        .or(Some(config.inbound.ip()).filter(|ip| !ip.is_unspecified()));
    let node_id = match &config.node_id {
        Some(id) => id.clone(),
        None => {
            let pod = config
                .pod_name
                .clone()
                .unwrap_or_else(|| default_pod_name(&host_name(), config.inbound.port()));
            let namespace = svid
                .borrow()
                .id
                .namespace_and_account()
                .map(|(ns, _)| ns.to_string())
                .unwrap_or_else(|| "default".into());
            istio_node_id(instance_ip, &pod, &namespace)
        }
    };
    let initial = xds_tls_rx.borrow().clone();
    // What the primary needs to write this workload's inbound rules: its
    // address (for its labels) and its app ports.
    let mut metadata = initial.metadata;
    if let Some(ip) = instance_ip {
        metadata.insert("INSTANCE_IP".into(), ip.to_string());
    }
    if !config.apps.is_empty() {
        let apps: Vec<String> = config
            .apps
            .iter()
            .map(|(port, addr)| format!("{port}={addr}"))
            .collect();
        metadata.insert("APPS".into(), apps.join(","));
    }
    let xds = isthmus_xds::start(
        isthmus_xds::XdsConfig {
            primary: config.primary.clone(),
            tls: initial.tls,
            bearer: None,
            node_id,
            cluster: config.cluster.clone(),
            metadata,
            route_names: std::iter::once(isthmus_xds::OUTBOUND_ROUTE.to_string())
                .chain(
                    config
                        .apps
                        .iter()
                        .map(|(port, _)| isthmus_xds::inbound_route_name(*port)),
                )
                .chain((!config.apps.is_empty()).then(|| isthmus_xds::PLAINTEXT_ROUTE.to_string()))
                .collect(),
        },
        Some(xds_tls_rx),
    );

    let metrics = Arc::new(metrics::Metrics::new());
    let outbound = TcpListener::bind(config.outbound)
        .await
        .with_context(|| format!("binding outbound {}", config.outbound))?;
    let inbound = TcpListener::bind(config.inbound)
        .await
        .with_context(|| format!("binding inbound {}", config.inbound))?;
    let router = Arc::new(outbound::Outbound::new(
        xds.snapshot.clone(),
        svid.clone(),
        metrics.clone(),
    ));
    tokio::spawn(outbound::serve(outbound, router));
    let apps: HashMap<u16, SocketAddr> = config.apps.iter().copied().collect();
    tokio::spawn(inbound::serve(
        inbound,
        server_rx,
        svid.clone(),
        Arc::new(apps),
        xds.snapshot.clone(),
        metrics.clone(),
    ));
    serve_admin(&config, xds, svid, metrics).await?;
    tracing::info!(outbound = %config.outbound, inbound = %config.inbound, "proxy serving");
    std::future::pending::<()>().await;
    Ok(())
}

/// The xDS stream's credentials: our SVID against the mesh roots, and the
/// trust bundle sequence we hold, which the primary tracks for rotations.
fn xds_credentials(svid: &identity::Svid) -> anyhow::Result<isthmus_xds::XdsCredentials> {
    let tls =
        isthmus_transport::primary_client_config(&svid.bundle.to_pem(), Some(svid.identity()))?;
    Ok(isthmus_xds::XdsCredentials {
        tls: Arc::new(tls),
        metadata: [(
            "BUNDLE_SEQUENCE".to_string(),
            svid.bundle_sequence.to_string(),
        )]
        .into(),
    })
}

async fn serve_admin(
    config: &Config,
    xds: isthmus_xds::XdsHandle,
    svid: watch::Receiver<Arc<identity::Svid>>,
    metrics: Arc<metrics::Metrics>,
) -> anyhow::Result<()> {
    let snapshot = xds.snapshot.clone();
    let admin = isthmus_transport::admin::router(
        xds.ready.clone(),
        "waiting for config from the primary\n",
    )
    .route(
        "/config_dump",
        get(move || {
            let snap = snapshot.load_full();
            let s = svid.borrow().clone();
            async move { axum::Json(config_dump(&snap, &s)) }
        }),
    );
    use isthmus_transport::admin::Listener;
    isthmus_transport::admin::serve(Listener::Admin, config.admin, admin).await?;
    isthmus_transport::admin::serve(
        Listener::Metrics,
        config.metrics,
        isthmus_transport::admin::metrics_router(move || metrics.encode()),
    )
    .await?;
    Ok(())
}

/// Every outbound route, by authority and then in match order, as
/// `isthmusctl proxy-config routes` shows it.
fn route_views(routes: &isthmus_xds::routes::OutboundRoutes) -> Vec<serde_json::Value> {
    let secs = |d: Duration| format!("{}s", d.as_secs_f64());
    let share = |per_million: u32| f64::from(per_million) / 10_000.0;
    let mut domains: Vec<_> = routes.domains().collect();
    domains.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::new();
    for (authority, routes) in domains {
        for r in routes {
            let a = &r.action;
            let total: u64 = a.clusters.iter().map(|(_, w)| u64::from(*w)).sum();
            let destinations: Vec<_> = a
                .clusters
                .iter()
                .map(|(cluster, weight)| {
                    let percent = if total == 0 {
                        0.0
                    } else {
                        f64::from(*weight) * 100.0 / total as f64
                    };
                    let mut view = isthmus_api::names::destination_view(cluster, percent);
                    view["weight"] = serde_json::json!(weight);
                    view
                })
                .collect();
            out.push(serde_json::json!({
                "authority": authority,
                "name": r.name,
                "match": r.match_text(),
                "destinations": destinations,
                "timeout": a.timeout.map(secs),
                "retries": a.retry.as_ref().map(|t| serde_json::json!({
                    "attempts": t.retries,
                    "perTryTimeout": t.per_try_timeout.map(secs),
                    "on": t.conditions(),
                })),
                "mirror": a.mirror.as_ref().map(|(cluster, ppm)| serde_json::json!({
                    "cluster": cluster,
                    "percent": share(*ppm),
                })),
                "fault": serde_json::json!({
                    "delay": a.fault.delay.map(|(d, ppm)| serde_json::json!({"delay": secs(d), "percent": share(ppm)})),
                    "abort": a.fault.abort.map(|(status, ppm)| serde_json::json!({"status": status, "percent": share(ppm)})),
                }),
            }));
        }
    }
    out
}

fn config_dump(snap: &isthmus_xds::Snapshot, svid: &identity::Svid) -> serde_json::Value {
    let mut clusters: Vec<_> = snap
        .clusters
        .values()
        .map(|c| {
            let eps = snap.endpoints.get(&c.name);
            serde_json::json!({
                "name": c.name,
                "sni": c.sni,
                "allowedSans": c.allowed_sans,
                "priorities": eps.map(|e| e.priorities.iter().map(|p| p.iter().map(|w| serde_json::json!({"address": w.addr.to_string(), "weight": w.weight})).collect::<Vec<_>>()).collect::<Vec<_>>()).unwrap_or_default(),
            })
        })
        .collect();
    clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    serde_json::json!({
        "identity": svid.id.to_string(),
        "certificateNotAfter": svid.not_after_unix,
        "clusterVersion": snap.cluster_version,
        "endpointVersion": snap.endpoint_version,
        "routeVersion": snap.route_version,
        // Per service authority: its routes' names, in match order.
        "outboundRoutes": snap.outbound.domains().map(|(d, routes)| (d.to_string(), routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
        // The same routes in full: match, destinations with subsets and
        // weights, timeout, retries, mirror and faults.
        "routes": route_views(&snap.outbound),
        "clusters": clusters,
        // Per app port: what it takes (PeerAuthentication) and whether an
        // AuthorizationPolicy applies to it.
        "inboundPorts": snap.inbound.iter().map(|(port, p)| (port.to_string(), serde_json::json!({
            "mtls": p.mtls,
            "plaintext": p.plaintext,
            "authorization": if p.rules.is_some() { "rules" } else { "none apply" },
        }))).collect::<BTreeMap<_, _>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_node_id_is_istios() {
        let ip = "198.51.100.11".parse().ok();
        assert_eq!(
            istio_node_id(ip, "echo-1", "demo"),
            "sidecar~198.51.100.11~echo-1.demo~demo.svc.cluster.local"
        );
        // The parts the primary reads: four, the last naming the namespace.
        let id = istio_node_id(ip, "a~b", "demo");
        let parts: Vec<&str> = id.split('~').collect();
        assert_eq!(parts.len(), 4, "{id}");
        assert_eq!(parts[2], "a-b.demo");
        assert_eq!(parts[3].split('.').next(), Some("demo"));
        assert_eq!(
            istio_node_id(None, "vm", "demo"),
            "sidecar~0.0.0.0~vm.demo~demo.svc.cluster.local"
        );
    }

    #[test]
    fn sidecars_on_one_host_get_distinct_pod_names() {
        assert_eq!(default_pod_name("vm-1", 15006), "vm-1");
        assert_eq!(default_pod_name("vm-1", 15016), "vm-1-15016");
    }
}
