//! Turning the model into Envoy v3 resources for one proxy.
//!
//! Sidecars get one EDS cluster per service port (`outbound|PORT||FQDN`)
//! with mesh mTLS: the SNI `outbound_.PORT_._.FQDN`, certificates from SDS,
//! and the service's SPIFFE identities as the allowed server SANs. Their
//! endpoints are split-horizon: endpoints on the proxy's own network are
//! listed directly; each other network is one locality holding its gateways,
//! weighted by how many endpoints stand behind them. Priorities follow
//! locality: same zone, same region, same network, then other networks.
//! A DestinationRule adds one cluster per subset (`outbound|PORT|SUBSET|FQDN`,
//! SNI `outbound_.PORT_.SUBSET_.FQDN`, only endpoints with the subset's
//! labels) and its traffic policy: load balancer, connection pool (as
//! circuit breakers) and outlier detection, which replaces the implicit one.
//!
//! Gateways get one plain EDS cluster per exported service port and subset,
//! named by the SNI it answers to, holding only their own network's endpoints, and (for
//! Envoy) one passthrough listener on 15443 that reads the SNI with the TLS
//! inspector and sends the connection to the cluster of that name, Istio's
//! AUTO_PASSTHROUGH. isthmus-gateway does the same without asking for it.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, OutlierDetection};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiConfigSource, ApiVersion, ConfigSource, GrpcService,
    HealthStatus, Locality, SocketAddress, TransportSocket, address, api_config_source::ApiType,
    config_source::ConfigSourceSpecifier, grpc_service, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    UpstreamTlsContext,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use isthmus_api::config::istio::{DestinationRule, TrafficPolicy};
use isthmus_api::names::{ServiceKey, check_label, service_fqdn};
use isthmus_api::{DEFAULT_CLUSTER_DOMAIN, type_urls};
use prost::Message;

use crate::model::Model;
use crate::records::{ClusterRecord, ServiceRecord};

/// Name of the SDS cluster in an Envoy bootstrap (the agent's Unix socket),
/// and the secret names Istio uses.
pub const SDS_CLUSTER: &str = "sds-grpc";
pub const SDS_CERT: &str = "default";
pub const SDS_ROOT: &str = "ROOTCA";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Sidecar,
    Gateway,
}

/// What a sidecar says about itself in its node metadata, which its inbound
/// config needs: `INSTANCE_IP` (its address) and `APPS` (`PORT=IP:PORT`,
/// comma-separated: the local app behind each inbound port). Envoy uses
/// them all; isthmus-proxy subscribes to no listeners, only to its inbound
/// route configurations, for their authorization rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    pub instance_ip: Option<String>,
    pub apps: Vec<(u16, String)>,
    /// The namespace of the proxy's SVID: which AuthorizationPolicies apply.
    pub namespace: Option<String>,
}

impl NodeInfo {
    pub fn parse_apps(text: &str) -> Vec<(u16, String)> {
        text.split(',')
            .filter_map(|pair| {
                let (port, addr) = pair.trim().split_once('=')?;
                let port = port.parse().ok()?;
                addr.parse::<std::net::SocketAddr>().ok()?;
                Some((port, addr.to_string()))
            })
            .collect()
    }
}

/// Resources of one type for one proxy, by name.
pub type Resources = BTreeMap<String, Any>;

/// Resources generated once for every proxy that would get the same ones
/// (same config revision, role, cluster and node info), each with its
/// version: a thousand sidecars of a cluster cost one generation per
/// change, not a thousand.
pub struct Generated {
    /// Unique among generations; what `parent` refers to.
    pub id: u64,
    /// Name → (resource, version).
    pub resources: BTreeMap<String, (Any, String)>,
    /// A digest of every name and version: the version of the generation.
    pub digest: String,
    /// The generation of the previous config revision for the same proxies,
    /// and what differs from it: a proxy that holds the parent is sent just
    /// these, without comparing a thousand versions per proxy.
    pub parent: Option<u64>,
    /// Names added or whose version moved since the parent.
    pub changed: Vec<String>,
    /// Names the parent had and this generation does not.
    pub removed: Vec<String>,
}

impl Generated {
    fn new(resources: BTreeMap<String, (Any, String)>, parent: Option<&Generated>) -> Self {
        use sha2::{Digest, Sha256};
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut h = Sha256::new();
        for (name, (_, version)) in &resources {
            h.update(name.as_bytes());
            h.update(version.as_bytes());
        }
        let (changed, removed) = match parent {
            Some(p) => (
                resources
                    .iter()
                    .filter(|(n, (_, v))| p.resources.get(*n).map(|(_, pv)| pv) != Some(v))
                    .map(|(n, _)| n.clone())
                    .collect(),
                p.resources
                    .keys()
                    .filter(|n| !resources.contains_key(*n))
                    .cloned()
                    .collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        Self {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            digest: hex::encode(&h.finalize()[..8]),
            parent: parent.map(|p| p.id),
            resources,
            changed,
            removed,
        }
    }
}

/// What generated resources depend on besides the config revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    role: Role,
    cluster: String,
    node: NodeInfo,
    type_url: String,
}

type Entries = std::collections::HashMap<CacheKey, std::sync::Arc<Generated>>;

/// The generation cache: entries of the newest config revision, and those
/// of the one before it (the parents of the new ones).
#[derive(Default)]
pub struct Cache {
    inner: std::sync::Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    revision: i64,
    current: Entries,
    previous: Entries,
}

impl Cache {
    pub fn get(
        &self,
        model: &Model,
        role: Role,
        me: &ClusterRecord,
        node: &NodeInfo,
        type_url: &str,
    ) -> std::sync::Arc<Generated> {
        let key = CacheKey {
            role,
            cluster: me.name.clone(),
            node: node.clone(),
            type_url: type_url.to_string(),
        };
        let revision = model.config_revision;
        let parent = {
            let mut inner = self.lock();
            if revision > inner.revision {
                inner.previous = std::mem::take(&mut inner.current);
                inner.revision = revision;
            }
            if revision == inner.revision
                && let Some(hit) = inner.current.get(&key)
            {
                return hit.clone();
            }
            inner.previous.get(&key).cloned()
        };
        let resources = generate(model, role, me, node, type_url)
            .into_iter()
            .map(|(name, any)| {
                let version = resource_version(&any);
                (name, (any, version))
            })
            .collect();
        let generated = std::sync::Arc::new(Generated::new(resources, parent.as_deref()));
        let mut inner = self.lock();
        if revision == inner.revision {
            // Two streams may have generated the same; the first one stays.
            return inner.current.entry(key).or_insert(generated).clone();
        }
        generated
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A resource's version: the first 8 bytes of the SHA-256 of its encoding.
pub fn resource_version(any: &Any) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(&any.value)[..8])
}

pub fn generate(
    model: &Model,
    role: Role,
    me: &ClusterRecord,
    node: &NodeInfo,
    type_url: &str,
) -> Resources {
    match (role, type_url) {
        (Role::Sidecar, type_urls::CLUSTER) => {
            let mut clusters = sidecar_clusters(model, &Scope::of(model, me, node));
            clusters.extend(crate::xds::sidecar::inbound_clusters(node));
            clusters
        }
        (Role::Sidecar, type_urls::ENDPOINT) => {
            sidecar_endpoints(model, me, &Scope::of(model, me, node))
        }
        (Role::Sidecar, type_urls::LISTENER) => crate::xds::sidecar::listeners(model, me, node),
        (Role::Sidecar, type_urls::ROUTE) => {
            let mut routes = crate::xds::sidecar::routes(
                model,
                &Scope::of(model, me, node),
                node.namespace.as_deref(),
            );
            routes.extend(crate::xds::sidecar::inbound_routes(model, me, node));
            routes
        }
        (Role::Gateway, type_urls::CLUSTER) => gateway_clusters(model, me),
        (Role::Gateway, type_urls::ENDPOINT) => gateway_endpoints(model, me),
        (Role::Gateway, type_urls::LISTENER) => gateway_listeners(node),
        _ => Resources::new(),
    }
}

pub(crate) fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

/// A host as a VirtualService or DestinationRule in namespace `ns` names
/// it: `echo` and `echo.demo` are short for `echo.demo.svc.cluster.local`.
pub(crate) fn resolve_host(host: &str, ns: &str) -> String {
    match host.matches('.').count() {
        0 => service_fqdn(host, ns, DEFAULT_CLUSTER_DOMAIN),
        1 => format!("{host}.svc.{DEFAULT_CLUSTER_DOMAIN}"),
        _ => host.to_string(),
    }
}

/// The DestinationRule for a service, if any (the first by namespace and
/// name, as stored).
pub(crate) fn destination_rule<'a>(model: &'a Model, fqdn: &str) -> Option<&'a DestinationRule> {
    model
        .destination_rules
        .iter()
        .find(|(ns, dr)| resolve_host(&dr.host, ns) == fqdn)
        .map(|(_, dr)| dr)
}

/// The service key with each of its DestinationRule's subsets (and their
/// labels); the plain key first, with no labels.
pub(crate) fn with_subsets(
    model: &Model,
    key: &ServiceKey,
) -> Vec<(ServiceKey, BTreeMap<String, String>)> {
    let mut out = vec![(key.clone(), BTreeMap::new())];
    if let Some(dr) = destination_rule(model, &key.fqdn) {
        for s in dr.subsets.iter().filter(|s| check_label(&s.name).is_ok()) {
            let mut k = key.clone();
            k.subset = s.name.clone();
            out.push((k, s.labels.clone()));
        }
    }
    out
}

fn matches_labels(have: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// A DestinationRule's traffic policy on a cluster: load balancing, the
/// connection pool (as circuit breakers), and outlier detection, which
/// replaces the implicit one.
fn apply_policy(cluster: &mut Cluster, p: &TrafficPolicy) {
    use envoy_types::pb::envoy::config::cluster::v3::CircuitBreakers;
    use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
    if let Some(simple) = p.load_balancer.as_ref().and_then(|l| l.simple.as_deref()) {
        cluster.lb_policy = match simple {
            "LEAST_REQUEST" | "LEAST_CONN" => LbPolicy::LeastRequest,
            "RANDOM" => LbPolicy::Random,
            _ => LbPolicy::RoundRobin,
        } as i32;
    }
    if let Some(pool) = &p.connection_pool {
        let u = |v: Option<i64>| {
            v.and_then(|v| u32::try_from(v).ok())
                .map(|value| UInt32Value { value })
        };
        cluster.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: u(pool.tcp.as_ref().and_then(|t| t.max_connections)),
                max_pending_requests: u(pool
                    .http
                    .as_ref()
                    .and_then(|h| h.http1_max_pending_requests)),
                max_requests: u(pool.http.as_ref().and_then(|h| h.http2_max_requests)),
                max_retries: u(pool.http.as_ref().and_then(|h| h.max_retries)),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    if let Some(o) = &p.outlier_detection {
        let dur = |s: &Option<String>, default: i64| {
            let d = s
                .as_deref()
                .and_then(isthmus_api::config::istio::parse_duration)
                .unwrap_or(std::time::Duration::from_secs(default as u64));
            Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }
        };
        let u = |v: Option<i64>, d: u32| UInt32Value {
            value: v.and_then(|v| u32::try_from(v).ok()).unwrap_or(d),
        };
        cluster.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: Some(u(o.consecutive_5xx_errors, 5)),
            consecutive_gateway_failure: o.consecutive_gateway_errors.map(|v| u(Some(v), 0)),
            interval: Some(dur(&o.interval, 10)),
            base_ejection_time: Some(dur(&o.base_ejection_time, 30)),
            max_ejection_percent: Some(u(o.max_ejection_percent, 10)),
            ..Default::default()
        });
    }
}

/// Each service port in the mesh, with everything reported for it.
/// Which services a sidecar sees: what the egress hosts of the Sidecar
/// that applies to it name, or everything if none does. The Sidecar that
/// applies is the first (by name) in the proxy's namespace whose
/// `workloadSelector` its workload's labels hold, else the one there
/// without a selector, else the root namespace's one without a selector.
pub struct Scope {
    /// (namespace, host) patterns; None sees everything.
    hosts: Option<Vec<(String, String)>>,
}

impl Scope {
    pub fn of(model: &Model, me: &ClusterRecord, node: &NodeInfo) -> Self {
        let everything = Scope { hosts: None };
        let Some(namespace) = node.namespace.as_deref() else {
            return everything;
        };
        let labels = crate::xds::authz::workload_labels(model, me, node, namespace);
        let [workload, in_namespace, root] =
            crate::xds::authz::most_specific(&model.sidecars, namespace, &labels, |sc| {
                sc.workload_selector.as_ref().map(|s| &s.labels)
            });
        let Some((sidecar_ns, _, sidecar)) = workload.or(in_namespace).or(root) else {
            return everything;
        };
        let hosts = sidecar
            .egress
            .iter()
            .flat_map(|e| e.hosts.iter())
            .filter_map(|h| h.split_once('/'))
            .map(|(ns, host)| {
                let ns = if ns == "." { sidecar_ns.as_str() } else { ns };
                (ns.to_string(), host.to_string())
            })
            .collect();
        Scope { hosts: Some(hosts) }
    }

    pub fn sees(&self, namespace: &str, fqdn: &str) -> bool {
        let Some(hosts) = &self.hosts else {
            return true;
        };
        let name = fqdn.split('.').next().unwrap_or(fqdn);
        hosts.iter().any(|(ns, host)| {
            (ns == "*" || ns == namespace)
                && (host == "*"
                    || host == fqdn
                    || host == name
                    || host
                        .strip_prefix('*')
                        .is_some_and(|suffix| fqdn.ends_with(suffix)))
        })
    }
}

pub(crate) fn service_ports(
    model: &Model,
) -> impl Iterator<Item = (ServiceKey, &str, &BTreeMap<String, ServiceRecord>)> {
    model.services.iter().flat_map(|((ns, name), per_cluster)| {
        let fqdn = service_fqdn(name, ns, DEFAULT_CLUSTER_DOMAIN);
        let ports: BTreeSet<u16> = per_cluster
            .values()
            .flat_map(|s| s.ports.iter().map(|p| p.port))
            .collect();
        ports.into_iter().map(move |port| {
            (
                ServiceKey::new(fqdn.clone(), port),
                ns.as_str(),
                per_cluster,
            )
        })
    })
}

pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

pub(crate) fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ConfigSource {
            config_source_specifier: Some(ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: ApiType::Grpc as i32,
                    transport_api_version: ApiVersion::V3 as i32,
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: SDS_CLUSTER.to_string(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            resource_api_version: ApiVersion::V3 as i32,
            ..Default::default()
        }),
    }
}

fn eds_cluster(name: String, transport_socket: Option<TransportSocket>) -> Cluster {
    Cluster {
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.clone(),
        }),
        name,
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        connect_timeout: Some(Duration {
            seconds: 5,
            nanos: 0,
        }),
        lb_policy: LbPolicy::RoundRobin as i32,
        transport_socket,
        ..Default::default()
    }
}

fn sidecar_clusters(model: &Model, scope: &Scope) -> Resources {
    let td = model
        .clusters
        .values()
        .next()
        .map(|c| c.trust_domain.clone())
        .unwrap_or_else(|| isthmus_api::DEFAULT_TRUST_DOMAIN.to_string());
    service_ports(model)
        .filter(|(key, ns, _)| scope.sees(ns, &key.fqdn))
        .flat_map(|(key, ns, per_cluster)| {
            let sans: BTreeSet<String> = per_cluster
                .values()
                .flat_map(|s| s.endpoints.iter().map(|e| e.service_account.clone()))
                .map(|sa| format!("spiffe://{td}/ns/{ns}/sa/{sa}"))
                .collect();
            let dr = destination_rule(model, &key.fqdn);
            let failover = failover_applies(per_cluster, key.port);
            with_subsets(model, &key)
                .into_iter()
                .map(|(key, _)| {
                    let mut cluster = mesh_cluster(&key, &sans, failover);
                    if let Some(p) = dr.and_then(|d| d.traffic_policy.as_ref()) {
                        apply_policy(&mut cluster, p);
                    }
                    let subset_policy = dr.and_then(|d| {
                        d.subsets
                            .iter()
                            .find(|s| s.name == key.subset)
                            .and_then(|s| s.traffic_policy.as_ref())
                    });
                    if let Some(p) = subset_policy {
                        apply_policy(&mut cluster, p);
                    }
                    (key.cluster_name(), any(type_urls::CLUSTER, &cluster))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// An outbound cluster with mesh mTLS: the key's SNI, certificates from
/// SDS, and the service's SPIFFE identities as the allowed server SANs.
fn mesh_cluster(key: &ServiceKey, sans: &BTreeSet<String>, failover: bool) -> Cluster {
    {
        {
            let tls = UpstreamTlsContext {
                sni: key.sni(),
                common_tls_context: Some(CommonTlsContext {
                    tls_certificate_sds_secret_configs: vec![sds(SDS_CERT)],
                    validation_context_type: Some(
                        ValidationContextType::CombinedValidationContext(
                            CombinedCertificateValidationContext {
                                default_validation_context: Some(CertificateValidationContext {
                                    match_typed_subject_alt_names: sans
                                        .iter()
                                        .cloned()
                                        .map(|san| SubjectAltNameMatcher {
                                            san_type: SanType::Uri as i32,
                                            matcher: Some(StringMatcher {
                                                match_pattern: Some(MatchPattern::Exact(san)),
                                                ..Default::default()
                                            }),
                                            ..Default::default()
                                        })
                                        .collect(),
                                    ..Default::default()
                                }),
                                validation_context_sds_secret_config: Some(sds(SDS_ROOT)),
                                ..Default::default()
                            },
                        ),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let socket = TransportSocket {
                name: "envoy.transport_sockets.tls".to_string(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(any(
                    type_urls::UPSTREAM_TLS,
                    &tls,
                ))),
            };
            let mut cluster = eds_cluster(key.cluster_name(), Some(socket));
            if failover {
                cluster.outlier_detection = Some(implicit_outlier_detection());
            }
            cluster
        }
    }
}

/// Failover applies when a service port has endpoints in more than one
/// place (zone, region or network), so there is somewhere to fail over to.
fn failover_applies(per_cluster: &BTreeMap<String, ServiceRecord>, port: u16) -> bool {
    per_cluster
        .values()
        .filter(|s| s.ports.iter().any(|p| p.port == port) && s.endpoints.iter().any(|e| e.ready))
        .count()
        > 1
}

/// Outlier detection that Isthmus turns on by itself wherever failover
/// applies (Istio makes users add it): eject an endpoint after 3
/// consecutive errors for 10 s, up to all of a priority, so traffic can move
/// to the next one. A DestinationRule will be able to override it.
pub fn implicit_outlier_detection() -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: Some(UInt32Value { value: 3 }),
        interval: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        base_ejection_time: Some(Duration {
            seconds: 10,
            nanos: 0,
        }),
        max_ejection_percent: Some(UInt32Value { value: 100 }),
        ..Default::default()
    }
}

pub(crate) fn socket(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

pub(crate) fn lb_endpoint(ip: &str, port: u16, weight: u32) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket(ip, port)),
            ..Default::default()
        })),
        health_status: HealthStatus::Healthy as i32,
        load_balancing_weight: Some(UInt32Value {
            value: weight.max(1),
        }),
        ..Default::default()
    }
}

fn locality(c: &ClusterRecord) -> Locality {
    Locality {
        region: c.region.clone(),
        zone: c.zone.clone(),
        sub_zone: String::new(),
    }
}

/// Raw priority of a cluster's endpoints as seen from `me`.
fn raw_priority(me: &ClusterRecord, other: &ClusterRecord) -> u32 {
    if other.network != me.network {
        3
    } else if other.region == me.region && other.zone == me.zone {
        0
    } else if other.region == me.region {
        1
    } else {
        2
    }
}

fn sidecar_endpoints(model: &Model, me: &ClusterRecord, scope: &Scope) -> Resources {
    service_ports(model)
        .filter(|(key, ns, _)| scope.sees(ns, &key.fqdn))
        .flat_map(|(key, _, per_cluster)| {
            with_subsets(model, &key)
                .into_iter()
                .map(|(key, labels)| assignment(model, me, &key, per_cluster, &labels))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The endpoints of one cluster (a service port, or a subset of it: only
/// endpoints carrying `labels`) as `me` sees them.
fn assignment(
    model: &Model,
    me: &ClusterRecord,
    key: &ServiceKey,
    per_cluster: &BTreeMap<String, ServiceRecord>,
    labels: &BTreeMap<String, String>,
) -> (String, Any) {
    {
        {
            let mut groups: Vec<(u32, LocalityLbEndpoints)> = Vec::new();
            // Remote networks: network → (endpoint count, gateways, locality).
            let mut remote: BTreeMap<&str, (u32, BTreeSet<&str>, Locality)> = BTreeMap::new();
            for (cluster_name, svc) in per_cluster {
                let Some(c) = model.clusters.get(cluster_name) else {
                    continue;
                };
                if !svc.ports.iter().any(|p| p.port == key.port) {
                    continue;
                }
                let ready: Vec<_> = svc
                    .endpoints
                    .iter()
                    .filter(|e| e.ready && matches_labels(&e.labels, labels))
                    .collect();
                if ready.is_empty() {
                    continue;
                }
                if c.network == me.network {
                    groups.push((
                        raw_priority(me, c),
                        LocalityLbEndpoints {
                            locality: Some(locality(c)),
                            lb_endpoints: ready
                                .iter()
                                .map(|e| lb_endpoint(&e.address, e.inbound_port, 1))
                                .collect(),
                            load_balancing_weight: Some(UInt32Value {
                                value: ready.len() as u32,
                            }),
                            ..Default::default()
                        },
                    ));
                } else {
                    let entry = remote
                        .entry(c.network.as_str())
                        .or_insert_with(|| (0, BTreeSet::new(), locality(c)));
                    entry.0 += ready.len() as u32;
                }
            }
            // Any gateway of a network reaches every endpoint in it.
            for c in model.clusters.values() {
                if let Some(entry) = remote.get_mut(c.network.as_str()) {
                    entry.1.extend(c.gateways.iter().map(String::as_str));
                }
            }
            for (network, (count, gateways, loc)) in remote {
                if gateways.is_empty() {
                    tracing::warn!(network, service = %key, "network has endpoints but no gateway; they are unreachable from here");
                    continue;
                }
                groups.push((
                    3,
                    LocalityLbEndpoints {
                        locality: Some(loc),
                        lb_endpoints: gateways
                            .iter()
                            .map(|g| lb_endpoint(g, isthmus_api::ports::GATEWAY, count))
                            .collect(),
                        load_balancing_weight: Some(UInt32Value { value: count }),
                        ..Default::default()
                    },
                ));
            }
            // Envoy wants priorities numbered from 0 without gaps.
            let levels: BTreeSet<u32> = groups.iter().map(|(p, _)| *p).collect();
            let endpoints = groups
                .into_iter()
                .map(|(p, mut g)| {
                    g.priority = levels.iter().position(|l| *l == p).unwrap_or(0) as u32;
                    g
                })
                .collect();
            let name = key.cluster_name();
            let cla = ClusterLoadAssignment {
                cluster_name: name.clone(),
                endpoints,
                ..Default::default()
            };
            (name, any(type_urls::ENDPOINT, &cla))
        }
    }
}

/// Service ports with ready endpoints on the gateway's network, by SNI.
fn gateway_targets<'a>(
    model: &'a Model,
    me: &ClusterRecord,
) -> BTreeMap<String, Vec<(&'a str, u16)>> {
    let mut out: BTreeMap<String, Vec<(&str, u16)>> = BTreeMap::new();
    for (key, _, per_cluster) in service_ports(model) {
        // Subsets too, by their own SNI, as Istio's AUTO_PASSTHROUGH does.
        for (key, labels) in with_subsets(model, &key) {
            for (cluster_name, svc) in per_cluster {
                let on_my_network = model
                    .clusters
                    .get(cluster_name)
                    .is_some_and(|c| c.network == me.network);
                if !on_my_network || !svc.ports.iter().any(|p| p.port == key.port) {
                    continue;
                }
                for e in svc
                    .endpoints
                    .iter()
                    .filter(|e| e.ready && matches_labels(&e.labels, &labels))
                {
                    out.entry(key.sni())
                        .or_default()
                        .push((&e.address, e.inbound_port));
                }
            }
        }
    }
    out
}

fn gateway_clusters(model: &Model, me: &ClusterRecord) -> Resources {
    gateway_targets(model, me)
        .into_keys()
        .map(|sni| {
            (
                sni.clone(),
                any(type_urls::CLUSTER, &eds_cluster(sni, None)),
            )
        })
        .collect()
}

fn gateway_endpoints(model: &Model, me: &ClusterRecord) -> Resources {
    gateway_targets(model, me)
        .into_iter()
        .map(|(sni, eps)| {
            let cla = ClusterLoadAssignment {
                cluster_name: sni.clone(),
                endpoints: vec![LocalityLbEndpoints {
                    locality: Some(locality(me)),
                    lb_endpoints: eps
                        .iter()
                        .map(|(ip, port)| lb_endpoint(ip, *port, 1))
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            (sni, any(type_urls::ENDPOINT, &cla))
        })
        .collect()
}

/// The gateway's listener: TLS inspector, then `sni_cluster` picks the
/// cluster named by the SNI and `tcp_proxy` splices to it. A name with no
/// such cluster is closed before anything is dialled.
fn gateway_listeners(node: &NodeInfo) -> Resources {
    use envoy_types::pb::envoy::config::listener::v3::{
        Filter, FilterChain, Listener, ListenerFilter, filter, listener_filter,
    };
    use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
    use envoy_types::pb::envoy::extensions::filters::network::sni_cluster::v3::SniCluster;
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
        TcpProxy, tcp_proxy::ClusterSpecifier,
    };

    let name = format!("gateway_{}", isthmus_api::ports::GATEWAY);
    let tcp = TcpProxy {
        stat_prefix: "gateway".into(),
        // Replaced per connection by sni_cluster; this name never exists.
        cluster_specifier: Some(ClusterSpecifier::Cluster("no-such-service".into())),
        ..Default::default()
    };
    let listener = Listener {
        name: name.clone(),
        address: Some(socket(
            node.instance_ip.as_deref().unwrap_or("0.0.0.0"),
            isthmus_api::ports::GATEWAY,
        )),
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                type_urls::TLS_INSPECTOR,
                &TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        filter_chains: vec![FilterChain {
            filters: vec![
                Filter {
                    name: "envoy.filters.network.sni_cluster".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(any(
                        type_urls::SNI_CLUSTER,
                        &SniCluster::default(),
                    ))),
                },
                Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(any(
                        type_urls::TCP_PROXY,
                        &tcp,
                    ))),
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resources::from([(name, any(type_urls::LISTENER, &listener))])
}
