//! The xDS client of Isthmus's data planes (isthmus-proxy and
//! isthmus-gateway): State-of-the-World ADS over gRPC for the subset of Envoy
//! v3 the primary generates (Cluster and ClusterLoadAssignment, and for a
//! sidecar its outbound routes and the authorization rules of its inbound
//! route configurations), as gRPC's proxyless clients do.
//!
//! Responses are decoded outside any lock into a new immutable [`Snapshot`],
//! which is swapped in whole (`ArcSwap`), so the request path never waits on
//! config. A response that fails to decode is NACKed with the reason and the
//! previous config stays in force; a rejected version is never ACKed. After a
//! disconnect the client reconnects with backoff and keeps serving its last
//! good config meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub mod path;
pub mod rbac;
pub mod routes;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Node, address, socket_address, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::RbacPerRoute;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use isthmus_api::config::mesh::{
    PATH_NORMALIZATION_FIELD, PATH_NORMALIZATION_METADATA, PathNormalization,
};
use isthmus_api::type_urls;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// One upstream cluster, as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    pub name: String,
    /// SNI for mesh mTLS; None for plain clusters (gateways).
    pub sni: Option<String>,
    /// Exact SPIFFE IDs the server may present; empty means any in the
    /// trust domain.
    pub allowed_sans: Vec<String>,
    /// Passive health checking, when the cluster asks for it.
    pub outlier: Option<OutlierPolicy>,
    /// How to pick among a priority's endpoints.
    pub lb: LbPolicy,
    /// Circuit breakers, from a DestinationRule's connection pool.
    pub limits: Limits,
}

/// Endpoint choice within a priority, from the cluster's `lb_policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LbPolicy {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// The less loaded of two endpoints picked at random (Envoy's default
    /// for LEAST_REQUEST).
    LeastRequest,
    Random,
}

/// The cluster's default-priority circuit breakers; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Connections to the cluster, which for HTTP/1.1 bound the requests
    /// in flight.
    pub max_connections: Option<u32>,
    /// Requests that may wait for a connection when all are busy.
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    pub max_requests: Option<u32>,
    /// Retries in flight.
    pub max_retries: Option<u32>,
}

/// When to eject an endpoint, from the cluster's `outlier_detection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Consecutive errors (connect failures and 5xx) that eject.
    pub consecutive_errors: u32,
    pub ejection: Duration,
    pub max_ejection_percent: u32,
}

/// Endpoints of one cluster, grouped by priority (index 0 first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSet {
    pub priorities: Vec<Vec<WeightedEndpoint>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightedEndpoint {
    pub addr: SocketAddr,
    pub weight: u32,
}

impl EndpointSet {
    /// The endpoints of the best priority that has any.
    pub fn best(&self) -> &[WeightedEndpoint] {
        self.priorities
            .iter()
            .find(|p| !p.is_empty())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// Everything the data plane knows, swapped whole on every change.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub clusters: HashMap<String, Arc<ClusterInfo>>,
    pub endpoints: HashMap<String, Arc<EndpointSet>>,
    pub cluster_version: String,
    pub endpoint_version: String,
    /// Each inbound app port, from the virtual host `inbound|PORT` of the
    /// subscribed route configurations. A port missing here has no rules
    /// yet.
    pub inbound: HashMap<u16, InboundPort>,
    /// The `outbound` route configuration: VirtualService routing.
    pub outbound: Arc<routes::OutboundRoutes>,
    pub route_version: String,
    /// How request paths are normalised, from the route configurations'
    /// metadata (the mesh's `pathNormalization`); the default until they
    /// say otherwise.
    pub path_normalization: PathNormalization,
}

/// The route configuration of a sidecar's outbound HTTP traffic.
pub const OUTBOUND_ROUTE: &str = "outbound";

/// How an inbound app port takes requests.
#[derive(Debug, Clone, Default)]
pub struct InboundPort {
    /// AuthorizationPolicy's rules; `None` where no policy applies.
    pub rules: Option<Arc<rbac::Rbac>>,
    /// Whether it takes mesh mTLS: its own route configuration exists
    /// (PeerAuthentication STRICT or PERMISSIVE).
    pub mtls: bool,
    /// Whether it takes plaintext: the `inbound|plaintext` configuration
    /// has a virtual host for it (PERMISSIVE or DISABLE).
    pub plaintext: bool,
}

/// The route configuration of the inbound plaintext chain.
pub const PLAINTEXT_ROUTE: &str = "inbound|plaintext";

/// The virtual host of inbound app port `port`, as the primary names it.
pub fn inbound_route_name(port: u16) -> String {
    format!("inbound|{port}")
}

/// The RBAC filter under which virtual hosts carry their rules.
const RBAC_FILTER: &str = "envoy.filters.http.rbac";

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("resource {index} of {type_url}: {reason}")]
    Resource {
        type_url: String,
        index: usize,
        reason: String,
    },
}

/// How to reach the primary and who we are.
#[derive(Clone)]
pub struct XdsConfig {
    pub primary: String,
    pub tls: Arc<rustls::ClientConfig>,
    /// Gateways authenticate with a bearer credential instead of a certificate.
    pub bearer: Option<String>,
    pub node_id: String,
    pub cluster: String,
    /// Extra node metadata (string values), e.g. `INSTANCE_IP` and `APPS`.
    pub metadata: BTreeMap<String, String>,
    /// Route configurations to subscribe to (a sidecar's inbound ones);
    /// none for a gateway.
    pub route_names: Vec<String>,
}

/// New credentials for the stream. When they change the client reconnects
/// at once, so the primary sees the certificate the proxy holds now.
#[derive(Clone)]
pub struct XdsCredentials {
    pub tls: Arc<rustls::ClientConfig>,
    pub metadata: BTreeMap<String, String>,
}

/// A running xDS client.
#[derive(Clone)]
pub struct XdsHandle {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// True once every subscribed type has been ACKed at least once.
    pub ready: watch::Receiver<bool>,
}

/// Starts the client in the background.
pub fn start(config: XdsConfig, updates: Option<watch::Receiver<XdsCredentials>>) -> XdsHandle {
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let (ready_tx, ready) = watch::channel(false);
    let shared = snapshot.clone();
    tokio::spawn(async move {
        let mut config = config;
        let mut backoff = Duration::from_millis(100);
        let mut updates = updates;
        loop {
            if let Some(updates) = &mut updates {
                let current = updates.borrow_and_update().clone();
                config.tls = current.tls;
                config.metadata.extend(current.metadata);
            }
            match session(&config, &shared, &ready_tx, updates.as_mut()).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(primary = %config.primary, error = %e, "xDS stream failed; keeping the last good config")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
    XdsHandle { snapshot, ready }
}

fn node(config: &XdsConfig) -> Node {
    let mut fields = HashMap::new();
    for (k, v) in &config.metadata {
        fields.insert(
            k.clone(),
            Value {
                kind: Some(Kind::StringValue(v.clone())),
            },
        );
    }
    fields.insert(
        "CLUSTER_ID".to_string(),
        Value {
            kind: Some(Kind::StringValue(config.cluster.clone())),
        },
    );
    Node {
        id: config.node_id.clone(),
        cluster: config.cluster.clone(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

async fn session(
    config: &XdsConfig,
    shared: &ArcSwap<Snapshot>,
    ready: &watch::Sender<bool>,
    mut updates: Option<&mut watch::Receiver<XdsCredentials>>,
) -> anyhow_lite::Result<()> {
    let channel = isthmus_transport::tls_channel(&config.primary, config.tls.clone())?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: Some(node(config)),
        type_url: type_urls::CLUSTER.to_string(),
        ..Default::default()
    })
    .await?;
    if !config.route_names.is_empty() {
        tx.send(DiscoveryRequest {
            type_url: type_urls::ROUTE.to_string(),
            resource_names: config.route_names.clone(),
            ..Default::default()
        })
        .await?;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = &config.bearer {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    let mut inbound = client
        .stream_aggregated_resources(request)
        .await?
        .into_inner();
    let mut eds_names: Option<BTreeSet<String>> = None;
    let mut acked: BTreeSet<String> = BTreeSet::new();
    loop {
        let changed = async {
            match updates.as_mut() {
                Some(u) => u.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let resp = tokio::select! {
            msg = inbound.message() => match msg? {
                Some(resp) => resp,
                None => break,
            },
            true = changed => {
                tracing::info!("credentials changed; reopening the xDS stream");
                return Ok(());
            }
        };
        let current = shared.load_full();
        let outcome = apply(&current, &resp);
        let mut ack = DiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        match outcome {
            Ok(next) => {
                ack.version_info = resp.version_info.clone();
                if resp.type_url == type_urls::CLUSTER {
                    let names: BTreeSet<String> = next.clusters.keys().cloned().collect();
                    ack.resource_names = vec![];
                    shared.store(Arc::new(next));
                    tx.send(ack).await?;
                    if eds_names.as_ref() != Some(&names) {
                        // Subscribe EDS to exactly the clusters we know.
                        tx.send(DiscoveryRequest {
                            type_url: type_urls::ENDPOINT.to_string(),
                            resource_names: names.iter().cloned().collect(),
                            version_info: current.endpoint_version.clone(),
                            response_nonce: String::new(),
                            ..Default::default()
                        })
                        .await?;
                        eds_names = Some(names);
                    }
                } else {
                    ack.resource_names = subscribed(config, &eds_names, &resp.type_url);
                    shared.store(Arc::new(next));
                    tx.send(ack).await?;
                }
                acked.insert(resp.type_url.clone());
                let eds_done = acked.contains(type_urls::ENDPOINT)
                    || eds_names.as_ref().is_some_and(BTreeSet::is_empty);
                let rds_done = acked.contains(type_urls::ROUTE) || config.route_names.is_empty();
                if acked.contains(type_urls::CLUSTER) && eds_done && rds_done {
                    ready.send_replace(true);
                }
            }
            Err(e) => {
                tracing::warn!(type_url = %resp.type_url, version = %resp.version_info, error = %e, "NACKing xDS response");
                // Keep the version we last accepted; report why.
                ack.version_info = match resp.type_url.as_str() {
                    type_urls::CLUSTER => current.cluster_version.clone(),
                    type_urls::ROUTE => current.route_version.clone(),
                    _ => current.endpoint_version.clone(),
                };
                ack.resource_names = subscribed(config, &eds_names, &resp.type_url);
                ack.error_detail = Some(RpcStatus {
                    code: 3,
                    message: e.to_string(),
                    details: vec![],
                });
                tx.send(ack).await?;
            }
        }
    }
    Ok(())
}

/// The names a State-of-the-World request of `type_url` restates.
fn subscribed(
    config: &XdsConfig,
    eds_names: &Option<BTreeSet<String>>,
    type_url: &str,
) -> Vec<String> {
    match type_url {
        type_urls::ENDPOINT => eds_names.iter().flatten().cloned().collect(),
        type_urls::ROUTE => config.route_names.clone(),
        _ => Vec::new(),
    }
}

/// Builds the next snapshot from a response, or says why it cannot.
pub fn apply(current: &Snapshot, resp: &DiscoveryResponse) -> Result<Snapshot, DecodeError> {
    let err = |index: usize, reason: String| DecodeError::Resource {
        type_url: resp.type_url.clone(),
        index,
        reason,
    };
    match resp.type_url.as_str() {
        type_urls::CLUSTER => {
            let mut clusters = HashMap::new();
            for (i, any) in resp.resources.iter().enumerate() {
                if any.type_url != type_urls::CLUSTER {
                    return Err(err(i, format!("unexpected type {}", any.type_url)));
                }
                let c = Cluster::decode(any.value.as_slice()).map_err(|e| err(i, e.to_string()))?;
                if is_static(&c) {
                    // A sidecar's inbound clusters name its own apps, which
                    // isthmus-proxy already knows from `--app`.
                    continue;
                }
                let info = cluster_info(&c).map_err(|e| err(i, e))?;
                clusters.insert(info.name.clone(), Arc::new(info));
            }
            let endpoints = current
                .endpoints
                .iter()
                .filter(|(k, _)| clusters.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Ok(Snapshot {
                clusters,
                endpoints,
                cluster_version: resp.version_info.clone(),
                endpoint_version: current.endpoint_version.clone(),
                inbound: current.inbound.clone(),
                outbound: current.outbound.clone(),
                route_version: current.route_version.clone(),
                path_normalization: current.path_normalization,
            })
        }
        type_urls::ENDPOINT => {
            let mut endpoints = HashMap::new();
            for (i, any) in resp.resources.iter().enumerate() {
                if any.type_url != type_urls::ENDPOINT {
                    return Err(err(i, format!("unexpected type {}", any.type_url)));
                }
                let cla = ClusterLoadAssignment::decode(any.value.as_slice())
                    .map_err(|e| err(i, e.to_string()))?;
                let set = endpoint_set(&cla).map_err(|e| err(i, e))?;
                endpoints.insert(cla.cluster_name.clone(), Arc::new(set));
            }
            Ok(Snapshot {
                clusters: current.clusters.clone(),
                endpoints,
                cluster_version: current.cluster_version.clone(),
                endpoint_version: resp.version_info.clone(),
                inbound: current.inbound.clone(),
                outbound: current.outbound.clone(),
                route_version: current.route_version.clone(),
                path_normalization: current.path_normalization,
            })
        }
        type_urls::ROUTE => {
            // The primary sends every subscribed route configuration in
            // each response, so this one replaces what we had.
            let mut inbound: HashMap<u16, InboundPort> = HashMap::new();
            let mut outbound = Arc::default();
            let mut path_normalization = PathNormalization::default();
            for (i, any) in resp.resources.iter().enumerate() {
                if any.type_url != type_urls::ROUTE {
                    return Err(err(i, format!("unexpected type {}", any.type_url)));
                }
                let rc = RouteConfiguration::decode(any.value.as_slice())
                    .map_err(|e| err(i, e.to_string()))?;
                if let Some(p) =
                    path_normalization_of(&rc).map_err(|e| err(i, format!("{}: {e}", rc.name)))?
                {
                    path_normalization = p;
                }
                if rc.name == OUTBOUND_ROUTE {
                    outbound = Arc::new(
                        routes::OutboundRoutes::decode(&rc)
                            .map_err(|e| err(i, format!("{}: {e}", rc.name)))?,
                    );
                    continue;
                }
                for vh in &rc.virtual_hosts {
                    let Some(port) = vh
                        .name
                        .strip_prefix("inbound|")
                        .and_then(|p| p.parse::<u16>().ok())
                    else {
                        continue;
                    };
                    let rules = vh
                        .typed_per_filter_config
                        .get(RBAC_FILTER)
                        .map(inbound_rules)
                        .transpose()
                        .map_err(|e| err(i, format!("{}: virtual host {}: {e}", rc.name, vh.name)))?
                        .flatten();
                    let entry = inbound.entry(port).or_default();
                    entry.rules = rules.map(Arc::new);
                    if rc.name == PLAINTEXT_ROUTE {
                        entry.plaintext = true;
                    } else {
                        entry.mtls = true;
                    }
                }
            }
            Ok(Snapshot {
                clusters: current.clusters.clone(),
                endpoints: current.endpoints.clone(),
                cluster_version: current.cluster_version.clone(),
                endpoint_version: current.endpoint_version.clone(),
                inbound,
                outbound,
                route_version: resp.version_info.clone(),
                path_normalization,
            })
        }
        other => Err(err(
            0,
            format!("type {other} is not supported by this client"),
        )),
    }
}

/// The mesh's path normalisation, as the primary states it in a route
/// configuration's metadata; `None` if it does not.
fn path_normalization_of(rc: &RouteConfiguration) -> Result<Option<PathNormalization>, String> {
    let Some(fields) = rc
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(PATH_NORMALIZATION_METADATA))
        .and_then(|s| s.fields.get(PATH_NORMALIZATION_FIELD))
    else {
        return Ok(None);
    };
    match &fields.kind {
        Some(Kind::StringValue(name)) => PathNormalization::parse(name)
            .map(Some)
            .ok_or_else(|| format!("unknown path normalization {name:?}")),
        _ => Err("path normalization is not a string".into()),
    }
}

fn is_static(c: &Cluster) -> bool {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    c.cluster_discovery_type == Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32))
}

/// A virtual host's per-route RBAC: `None` if it sets no rules.
fn inbound_rules(
    any: &envoy_types::pb::google::protobuf::Any,
) -> Result<Option<rbac::Rbac>, String> {
    let per_route = RbacPerRoute::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
    per_route
        .rbac
        .and_then(|filter| filter.rules)
        .map(|rules| rbac::Rbac::from_proto(&rules))
        .transpose()
}

fn cluster_info(c: &Cluster) -> Result<ClusterInfo, String> {
    if c.name.is_empty() {
        return Err("cluster has no name".into());
    }
    use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy as Proto;
    let lb = match Proto::try_from(c.lb_policy) {
        Ok(Proto::RoundRobin) => LbPolicy::RoundRobin,
        Ok(Proto::LeastRequest) => LbPolicy::LeastRequest,
        Ok(Proto::Random) => LbPolicy::Random,
        _ => {
            return Err(format!(
                "cluster {}: load balancing policy {} is not supported",
                c.name, c.lb_policy
            ));
        }
    };
    let limits = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0))
        .map(|t| Limits {
            max_connections: t.max_connections.as_ref().map(|v| v.value),
            max_pending_requests: t.max_pending_requests.as_ref().map(|v| v.value),
            max_requests: t.max_requests.as_ref().map(|v| v.value),
            max_retries: t.max_retries.as_ref().map(|v| v.value),
        })
        .unwrap_or_default();
    let mut info = ClusterInfo {
        name: c.name.clone(),
        sni: None,
        allowed_sans: vec![],
        lb,
        limits,
        outlier: c.outlier_detection.as_ref().map(|o| OutlierPolicy {
            consecutive_errors: o
                .consecutive_5xx
                .as_ref()
                .map(|v| v.value)
                .unwrap_or(5)
                .max(1),
            ejection: o
                .base_ejection_time
                .as_ref()
                .map(|d| {
                    Duration::from_secs(d.seconds.max(0) as u64)
                        + Duration::from_nanos(d.nanos.max(0) as u64)
                })
                .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: o
                .max_ejection_percent
                .as_ref()
                .map(|v| v.value.min(100))
                .unwrap_or(10),
        }),
    };
    if let Some(ts) = &c.transport_socket {
        let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
            return Err(format!(
                "cluster {}: transport socket has no typed config",
                c.name
            ));
        };
        if any.type_url != type_urls::UPSTREAM_TLS {
            return Err(format!(
                "cluster {}: unsupported transport socket {}",
                c.name, any.type_url
            ));
        }
        let tls = UpstreamTlsContext::decode(any.value.as_slice())
            .map_err(|e| format!("cluster {}: {e}", c.name))?;
        info.sni = Some(tls.sni.clone());
        if let Some(common) = &tls.common_tls_context
            && let Some(common_tls_context::ValidationContextType::CombinedValidationContext(v)) =
                &common.validation_context_type
        {
            for m in v
                .default_validation_context
                .iter()
                .flat_map(|d| d.match_typed_subject_alt_names.iter())
            {
                match m.matcher.as_ref().and_then(|s| s.match_pattern.as_ref()) {
                    Some(MatchPattern::Exact(san)) => info.allowed_sans.push(san.clone()),
                    _ => {
                        return Err(format!(
                            "cluster {}: only exact SAN matchers are supported",
                            c.name
                        ));
                    }
                }
            }
        }
    }
    Ok(info)
}

fn endpoint_set(cla: &ClusterLoadAssignment) -> Result<EndpointSet, String> {
    let mut set = EndpointSet::default();
    for group in &cla.endpoints {
        let p = group.priority as usize;
        if p > 16 {
            return Err(format!("priority {p} is higher than 16"));
        }
        if set.priorities.len() <= p {
            set.priorities.resize(p + 1, Vec::new());
        }
        for lb in &group.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                return Err("endpoint without an address".into());
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                return Err("endpoint address is not a socket address".into());
            };
            let ip: IpAddr = sa
                .address
                .parse()
                .map_err(|_| format!("endpoint address {:?} is not an IP", sa.address))?;
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                return Err("endpoint has no port value".into());
            };
            let port =
                u16::try_from(port).map_err(|_| format!("endpoint port {port} is out of range"))?;
            let weight = lb
                .load_balancing_weight
                .as_ref()
                .map(|w| w.value)
                .unwrap_or(1)
                .max(1);
            set.priorities[p].push(WeightedEndpoint {
                addr: SocketAddr::new(ip, port),
                weight,
            });
        }
    }
    Ok(set)
}

/// Errors of the session loop, boxed: they are only logged.
mod anyhow_lite {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use envoy_types::pb::envoy::config::rbac::v3::{
        Permission, Policy, Principal, Rbac, permission, principal,
    };
    use envoy_types::pb::envoy::config::route::v3::VirtualHost;
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;
    use envoy_types::pb::google::protobuf::Any;

    use super::*;

    fn route_response(version: &str, principal: principal::Identifier) -> DiscoveryResponse {
        let rules = RbacPerRoute {
            rbac: Some(RbacFilter {
                rules: Some(Rbac {
                    policies: HashMap::from([(
                        "p".to_string(),
                        Policy {
                            permissions: vec![Permission {
                                rule: Some(permission::Rule::Any(true)),
                            }],
                            principals: vec![Principal {
                                identifier: Some(principal),
                            }],
                            ..Default::default()
                        },
                    )]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let host = |port: u16, rbac: bool| VirtualHost {
            name: inbound_route_name(port),
            typed_per_filter_config: if rbac {
                HashMap::from([(
                    RBAC_FILTER.to_string(),
                    Any {
                        type_url:
                            "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
                                .into(),
                        value: rules.encode_to_vec(),
                    },
                )])
            } else {
                HashMap::new()
            },
            ..Default::default()
        };
        let rc = RouteConfiguration {
            name: "inbound|plaintext".into(),
            virtual_hosts: vec![host(8080, true), host(9090, false)],
            ..Default::default()
        };
        DiscoveryResponse {
            version_info: version.into(),
            type_url: type_urls::ROUTE.into(),
            resources: vec![Any {
                type_url: type_urls::ROUTE.into(),
                value: rc.encode_to_vec(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn inbound_rules_come_per_port_and_unknown_rules_are_refused() {
        let first = apply(
            &Snapshot::default(),
            &route_response("v1", principal::Identifier::Any(true)),
        )
        .unwrap();
        assert_eq!(first.route_version, "v1");
        let (p8080, p9090) = (&first.inbound[&8080], &first.inbound[&9090]);
        assert!(p8080.rules.is_some(), "8080 has rules");
        assert!(p9090.rules.is_none(), "no policy applies to 9090");
        assert!(
            p8080.plaintext && !p8080.mtls,
            "only the plaintext configuration names it"
        );
        let e = apply(
            &first,
            &route_response(
                "v2",
                principal::Identifier::DirectRemoteIp(Default::default()),
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("inbound|plaintext: virtual host inbound|8080")
                && e.contains("principal is not supported"),
            "{e}"
        );
    }
}
