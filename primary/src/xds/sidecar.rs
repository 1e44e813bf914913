//! Listeners, routes and inbound clusters for Envoy sidecars.
//!
//! - `outbound_15001` on the sidecar's address: HTTP from the local app
//!   (plain, or in proxy form as `curl -x` sends it), routed by the `outbound`
//!   route table: one virtual host per service port (`FQDN:PORT`, and `FQDN`
//!   for port 80). Without a VirtualService it goes to `outbound|PORT||FQDN`
//!   with retries on connection failures, so an endpoint that dies
//!   mid-failover costs no request. With one, its `http` routes: URI, header
//!   and method matches, weighted destinations (subsets are the
//!   DestinationRule's clusters), timeout, retries, fault injection (delay,
//!   abort) and mirroring.
//! - `inbound_15006` on the sidecar's address: mesh mTLS (certificate and
//!   roots from the agent's SDS, a client SPIFFE certificate required),
//!   one filter chain per local app port, chosen by the SNI
//!   `outbound_.PORT_._.FQDN` callers send, forwarding to the app with
//!   `x-forwarded-client-cert` set (`By`, `Hash`, `URI`), as isthmus-proxy
//!   does. Ports that PeerAuthentication makes PERMISSIVE or DISABLE also
//!   take plaintext on one more chain (DISABLE: only plaintext), routed by
//!   the port in `:authority`, with any XFCC a caller sent removed.
//! - `inbound|PORT` and `inbound|plaintext` route configurations (RDS) for
//!   those chains, carrying each port's AuthorizationPolicy rules (see
//!   [`super::authz`]).
//! - `inbound|PORT||` clusters: the local apps, from the node's `APPS`.
//!
//! Every HTTP connection manager, outbound and inbound, normalises request
//! paths as the mesh's `pathNormalization` says (Istio's fields:
//! `normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`),
//! so authorisation, routing and the app all see one path. Every route
//! configuration states the same option in its metadata for isthmus-proxy.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::{Metadata, TransportSocket, transport_socket};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::RetryPolicy;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, retry_policy::RetryBackOff,
    route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SubjectAltNameMatcher,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::{BoolValue, Duration, UInt32Value};
use isthmus_api::config::istio;
use isthmus_api::config::mesh::{
    PATH_NORMALIZATION_FIELD, PATH_NORMALIZATION_METADATA, PathNormalization,
};
use isthmus_api::ports;
use isthmus_api::type_urls;

use super::authz::{self, MtlsMode};
use super::generate::{NodeInfo, Resources, SDS_CERT, SDS_ROOT, ads, any, sds, service_ports};
use crate::model::Model;
use crate::records::ClusterRecord;

pub const OUTBOUND_ROUTE: &str = "outbound";

fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

pub fn inbound_clusters(node: &NodeInfo) -> Resources {
    node.apps
        .iter()
        .filter_map(|(port, addr)| {
            let addr: std::net::SocketAddr = addr.parse().ok()?;
            let name = inbound_cluster_name(*port);
            let cluster = Cluster {
                name: name.clone(),
                cluster_discovery_type: Some(ClusterDiscoveryType::Type(
                    DiscoveryType::Static as i32,
                )),
                connect_timeout: Some(Duration {
                    seconds: 5,
                    nanos: 0,
                }),
                load_assignment: Some(ClusterLoadAssignment {
                    cluster_name: name.clone(),
                    endpoints: vec![LocalityLbEndpoints {
                        lb_endpoints: vec![super::generate::lb_endpoint(
                            &addr.ip().to_string(),
                            addr.port(),
                            1,
                        )],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            };
            Some((name, any(type_urls::CLUSTER, &cluster)))
        })
        .collect()
}

fn router() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            type_urls::ROUTER,
            &Router::default(),
        ))),
        ..Default::default()
    }
}

fn hcm_filter(hcm: &HttpConnectionManager) -> Filter {
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(
            type_urls::HTTP_CONNECTION_MANAGER,
            hcm,
        ))),
    }
}

/// The mesh's path normalisation on an HTTP connection manager, field for
/// field as Istio sets it: BASE is `normalize_path`, MERGE_SLASHES adds
/// `merge_slashes`, DECODE_AND_MERGE_SLASHES adds `UNESCAPE_AND_FORWARD`
/// for `%2F` and `%5C`; NONE turns normalisation off explicitly.
fn normalize_paths(hcm: &mut HttpConnectionManager, mode: PathNormalization) {
    use http_connection_manager::PathWithEscapedSlashesAction;
    hcm.normalize_path = Some(BoolValue {
        value: mode.normalizes(),
    });
    hcm.merge_slashes = mode.merges_slashes();
    hcm.path_with_escaped_slashes_action = if mode.decodes_slashes() {
        PathWithEscapedSlashesAction::UnescapeAndForward
    } else {
        PathWithEscapedSlashesAction::KeepUnchanged
    } as i32;
}

/// The same choice as route configuration metadata, for isthmus-proxy,
/// which reads route configurations but no listeners.
fn path_metadata(mode: PathNormalization) -> Metadata {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let fields = [(
        PATH_NORMALIZATION_FIELD.to_string(),
        Value {
            kind: Some(Kind::StringValue(mode.as_str().into())),
        },
    )];
    Metadata {
        filter_metadata: [(
            PATH_NORMALIZATION_METADATA.to_string(),
            Struct {
                fields: fields.into_iter().collect(),
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

/// SNIs of the service ports this sidecar's address serves, by port.
fn served_snis(model: &Model, me: &ClusterRecord, ip: &str) -> BTreeMap<u16, Vec<String>> {
    let mut out: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for (key, _, per_cluster) in service_ports(model) {
        let mine = per_cluster.get(&me.name).is_some_and(|s| {
            s.ports.iter().any(|p| p.port == key.port)
                && s.endpoints.iter().any(|e| e.address == ip)
        });
        if mine {
            // Callers of a subset name it in the SNI too.
            for (k, _) in super::generate::with_subsets(model, &key) {
                out.entry(key.port).or_default().push(k.sni());
            }
        }
    }
    out
}

pub fn listeners(model: &Model, me: &ClusterRecord, node: &NodeInfo) -> Resources {
    let Some(ip) = node.instance_ip.as_deref() else {
        return Resources::new();
    };
    let mut out = Resources::new();

    let mut outbound = HttpConnectionManager {
        stat_prefix: "outbound".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: OUTBOUND_ROUTE.into(),
        })),
        http_filters: vec![fault_filter(), router()],
        ..Default::default()
    };
    normalize_paths(&mut outbound, model.path_normalization);
    let name = format!("outbound_{}", ports::OUTBOUND);
    let listener = Listener {
        name: name.clone(),
        address: Some(super::generate::socket(ip, ports::OUTBOUND)),
        filter_chains: vec![FilterChain {
            filters: vec![hcm_filter(&outbound)],
            ..Default::default()
        }],
        ..Default::default()
    };
    out.insert(name, any(type_urls::LISTENER, &listener));

    if node.apps.is_empty() {
        return out;
    }
    let td = &me.trust_domain;
    let tls = DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(SDS_CERT)],
            validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        // Any workload of the mesh; authorization comes later.
                        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                            san_type: SanType::Uri as i32,
                            matcher: Some(StringMatcher {
                                match_pattern: Some(MatchPattern::Prefix(format!(
                                    "spiffe://{td}/"
                                ))),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(SDS_ROOT)),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    let tls_socket = TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(
            type_urls::DOWNSTREAM_TLS,
            &tls,
        ))),
    };
    let snis = served_snis(model, me, ip);
    let modes: Vec<(u16, MtlsMode)> = node
        .apps
        .iter()
        .map(|(port, _)| (*port, authz::mtls_mode(model, me, node, *port)))
        .collect();
    let mut chains: Vec<FilterChain> = modes
        .iter()
        .filter(|(_, mode)| *mode != MtlsMode::Disable)
        .map(|(port, _)| {
            let mut hcm = HttpConnectionManager {
                stat_prefix: format!("inbound_{port}"),
                route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                    config_source: Some(ads()),
                    route_config_name: inbound_route_name(*port),
                })),
                http_filters: vec![authz::filter(), router()],
                forward_client_cert_details:
                    http_connection_manager::ForwardClientCertDetails::SanitizeSet as i32,
                set_current_client_cert_details: Some(
                    http_connection_manager::SetCurrentClientCertDetails {
                        uri: true,
                        ..Default::default()
                    },
                ),
                ..Default::default()
            };
            normalize_paths(&mut hcm, model.path_normalization);
            FilterChain {
                filter_chain_match: Some(FilterChainMatch {
                    server_names: snis.get(port).cloned().unwrap_or_default(),
                    transport_protocol: "tls".into(),
                    ..Default::default()
                }),
                filters: vec![hcm_filter(&hcm)],
                transport_socket: Some(tls_socket.clone()),
                ..Default::default()
            }
        })
        .collect();
    // PERMISSIVE and DISABLE ports also take plaintext, on one chain that
    // tells them apart by the port in `:authority`.
    let plain: Vec<u16> = modes
        .iter()
        .filter(|(_, mode)| *mode != MtlsMode::Strict)
        .map(|(port, _)| *port)
        .collect();
    if !plain.is_empty() {
        chains.push(plaintext_chain(model.path_normalization));
    }

    let name = format!("inbound_{}", ports::INBOUND);
    let listener = Listener {
        name: name.clone(),
        address: Some(super::generate::socket(ip, ports::INBOUND)),
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                type_urls::TLS_INSPECTOR,
                &TlsInspector::default(),
            ))),
            ..Default::default()
        }],
        filter_chains: chains,
        ..Default::default()
    };
    out.insert(name, any(type_urls::LISTENER, &listener));
    out
}

/// The inbound chain for plaintext: routes from `inbound|plaintext` (one
/// virtual host per app port, `*:PORT`), and any `x-forwarded-client-cert`
/// a caller sent removed, since no certificate stands behind it.
fn plaintext_chain(paths: PathNormalization) -> FilterChain {
    let mut hcm = HttpConnectionManager {
        stat_prefix: "inbound_plaintext".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: PLAINTEXT_ROUTE.into(),
        })),
        http_filters: vec![authz::filter(), router()],
        forward_client_cert_details: http_connection_manager::ForwardClientCertDetails::Sanitize
            as i32,
        ..Default::default()
    };
    normalize_paths(&mut hcm, paths);
    FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            transport_protocol: "raw_buffer".into(),
            ..Default::default()
        }),
        filters: vec![hcm_filter(&hcm)],
        ..Default::default()
    }
}

const PLAINTEXT_ROUTE: &str = "inbound|plaintext";

fn inbound_route_name(port: u16) -> String {
    format!("inbound|{port}")
}

/// The inbound route configurations of a sidecar: `inbound|PORT` for each
/// app port's mTLS chain, and `inbound|plaintext` if any port takes
/// plaintext. Each virtual host carries its port's authorization rules.
pub fn inbound_routes(model: &Model, me: &ClusterRecord, node: &NodeInfo) -> Resources {
    let host = |port: u16, domains: Vec<String>| VirtualHost {
        name: inbound_route_name(port),
        domains,
        routes: vec![route_to(&inbound_cluster_name(port), None)],
        typed_per_filter_config: authz::route_config(model, me, node, port),
        ..Default::default()
    };
    let mut out = Resources::new();
    let mut plain = Vec::new();
    for (port, _) in &node.apps {
        let mode = authz::mtls_mode(model, me, node, *port);
        if mode != MtlsMode::Disable {
            let rc = RouteConfiguration {
                name: inbound_route_name(*port),
                virtual_hosts: vec![host(*port, vec!["*".into()])],
                metadata: Some(path_metadata(model.path_normalization)),
                ..Default::default()
            };
            out.insert(rc.name.clone(), any(type_urls::ROUTE, &rc));
        }
        if mode != MtlsMode::Strict {
            plain.push(host(*port, vec![format!("*:{port}")]));
        }
    }
    if !plain.is_empty() {
        let rc = RouteConfiguration {
            name: PLAINTEXT_ROUTE.into(),
            virtual_hosts: plain,
            metadata: Some(path_metadata(model.path_normalization)),
            ..Default::default()
        };
        out.insert(rc.name.clone(), any(type_urls::ROUTE, &rc));
    }
    out
}

fn route_to(cluster: &str, retry: Option<RetryPolicy>) -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
            retry_policy: retry,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Requests without side effects (GET, HEAD, OPTIONS) may also be retried
/// when the connection breaks after they were sent, as isthmus-proxy does
/// for requests without a body: an endpoint killed mid-request costs none.
fn safe_method_route(cluster: &str) -> Route {
    use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
    let mut retry = default_retries();
    retry.retry_on = format!("{},reset", retry.retry_on);
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            headers: vec![HeaderMatcher {
                name: ":method".into(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    StringMatcher {
                        match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                            regex: "GET|HEAD|OPTIONS".into(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
            retry_policy: Some(retry),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Retries on a failed connection or a reset before any response, the
/// cases where the request never reached an app: safe for any method. A
/// retry avoids the hosts already tried, and the third attempt leaves their
/// priority, so a dead local endpoint sends the request on to the next
/// locality (another network's gateway) before outlier detection has even
/// ejected it.
fn default_retries() -> RetryPolicy {
    use envoy_types::pb::envoy::config::route::v3::retry_policy::{
        RetryHostPredicate, RetryPriority, retry_host_predicate, retry_priority,
    };
    use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
    use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
    RetryPolicy {
        retry_on: "connect-failure,refused-stream,reset-before-request".into(),
        num_retries: Some(UInt32Value { value: 3 }),
        retry_host_predicate: vec![RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(retry_host_predicate::ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
                &PreviousHostsPredicate {},
            ))),
        }],
        host_selection_retry_max_attempts: 5,
        retry_priority: Some(RetryPriority {
            name: "envoy.retry_priorities.previous_priorities".into(),
            config_type: Some(retry_priority::ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                &PreviousPrioritiesConfig {
                    update_frequency: 1,
                },
            ))),
        }),
        retry_back_off: Some(RetryBackOff {
            base_interval: Some(Duration {
                seconds: 0,
                nanos: 25_000_000,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Envoy's `retry_on` and retriable status codes from Istio's `retryOn`,
/// as Istio reads it: numbers in the list are status codes to retry; without
/// a list, Istio's default, which retries a 503.
fn retry_conditions(retry_on: Option<&str>) -> (String, Vec<u32>) {
    let Some(text) = retry_on else {
        return (
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes".into(),
            vec![503],
        );
    };
    let (mut on, mut codes) = (Vec::new(), Vec::new());
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u32>() {
            Ok(code) => codes.push(code),
            Err(_) => on.push(part),
        }
    }
    if !codes.is_empty() && !on.contains(&"retriable-status-codes") {
        on.push("retriable-status-codes");
    }
    (on.join(","), codes)
}

/// A fraction of a million, from Istio's percentage (0 to 100).
fn fraction(percent: Option<f64>) -> envoy_types::pb::envoy::r#type::v3::FractionalPercent {
    let p = percent.unwrap_or(100.0).clamp(0.0, 100.0);
    envoy_types::pb::envoy::r#type::v3::FractionalPercent {
        numerator: (p * 10_000.0).round() as u32,
        denominator:
            envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType::Million as i32,
    }
}

fn proto_duration(text: &Option<String>) -> Option<Duration> {
    let d = isthmus_api::config::istio::parse_duration(text.as_deref()?)?;
    Some(Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

fn string_matcher(m: &istio::StringMatch) -> Option<StringMatcher> {
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
    let pattern = if let Some(e) = &m.exact {
        MatchPattern::Exact(e.clone())
    } else if let Some(p) = &m.prefix {
        MatchPattern::Prefix(p.clone())
    } else if let Some(r) = &m.regex {
        MatchPattern::SafeRegex(RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        })
    } else {
        return None;
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    })
}

fn header(
    name: &str,
    m: &istio::StringMatch,
) -> Option<envoy_types::pb::envoy::config::route::v3::HeaderMatcher> {
    use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
    Some(HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            string_matcher(m)?,
        )),
        ..Default::default()
    })
}

fn http_match(m: Option<&istio::HttpMatch>) -> RouteMatch {
    use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
    let mut out = RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
        ..Default::default()
    };
    let Some(m) = m else { return out };
    if let Some(uri) = &m.uri {
        let spec = if let Some(e) = &uri.exact {
            Some(route_match::PathSpecifier::Path(e.clone()))
        } else if let Some(p) = &uri.prefix {
            Some(route_match::PathSpecifier::Prefix(p.clone()))
        } else {
            uri.regex.as_ref().map(|r| {
                route_match::PathSpecifier::SafeRegex(RegexMatcher {
                    regex: r.clone(),
                    ..Default::default()
                })
            })
        };
        if spec.is_some() {
            out.path_specifier = spec;
        }
    }
    for (name, sm) in &m.headers {
        out.headers.extend(header(name, sm));
    }
    if let Some(method) = &m.method {
        out.headers.extend(header(":method", method));
    }
    out
}

const FAULT_FILTER: &str = "envoy.filters.http.fault";
const FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

/// The fault filter, inert unless a route configures it.
fn fault_filter() -> HttpFilter {
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
    HttpFilter {
        name: FAULT_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            FAULT_TYPE,
            &HttpFault::default(),
        ))),
        ..Default::default()
    }
}

/// The routes of one VirtualService `http` entry, for service port `port`:
/// one per match (or one matching everything), with weighted destinations,
/// timeout, retries, fault injection and mirroring.
fn vs_routes(http: &istio::HttpRoute, vs_ns: &str, port: u16) -> Vec<Route> {
    use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
    use envoy_types::pb::envoy::config::route::v3::route_action::RequestMirrorPolicy;
    use envoy_types::pb::envoy::config::route::v3::{
        WeightedCluster, weighted_cluster::ClusterWeight,
    };
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
        FaultAbort, HttpFault, fault_abort,
    };

    let cluster_of = |d: &istio::Destination| {
        isthmus_api::names::ServiceKey {
            fqdn: super::generate::resolve_host(&d.host, vs_ns),
            port: d
                .port
                .as_ref()
                .and_then(|p| u16::try_from(p.number).ok())
                .unwrap_or(port),
            subset: d.subset.clone().unwrap_or_default(),
        }
        .cluster_name()
    };
    let single = http.route.len() == 1;
    let destinations: Vec<(String, u32)> = http
        .route
        .iter()
        .filter_map(|r| {
            let d = r.destination.as_ref()?;
            let weight = r.weight.and_then(|w| u32::try_from(w).ok());
            Some((
                cluster_of(d),
                weight.unwrap_or(if single { 100 } else { 0 }),
            ))
        })
        .filter(|(_, w)| *w > 0 || single)
        .collect();
    let cluster_specifier = match destinations.as_slice() {
        [] => return vec![],
        [(only, _)] => route_action::ClusterSpecifier::Cluster(only.clone()),
        many => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .map(|(name, w)| ClusterWeight {
                    name: name.clone(),
                    weight: Some(UInt32Value { value: *w }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let retry_policy = match &http.retries {
        None => Some(default_retries()),
        Some(r) if r.attempts == Some(0) => None,
        Some(r) => {
            let (retry_on, retriable_status_codes) = retry_conditions(r.retry_on.as_deref());
            Some(RetryPolicy {
                retry_on,
                retriable_status_codes,
                num_retries: Some(UInt32Value {
                    value: r.attempts.and_then(|a| u32::try_from(a).ok()).unwrap_or(2),
                }),
                per_try_timeout: proto_duration(&r.per_try_timeout),
                ..default_retries()
            })
        }
    };
    let request_mirror_policies = http
        .mirror
        .as_ref()
        .map(|m| RequestMirrorPolicy {
            cluster: cluster_of(m),
            runtime_fraction: Some(RuntimeFractionalPercent {
                default_value: Some(fraction(http.mirror_percentage.as_ref().map(|p| p.value))),
                ..Default::default()
            }),
            ..Default::default()
        })
        .into_iter()
        .collect();
    let action = RouteAction {
        cluster_specifier: Some(cluster_specifier),
        timeout: proto_duration(&http.timeout),
        retry_policy,
        request_mirror_policies,
        ..Default::default()
    };
    let mut per_filter = std::collections::HashMap::new();
    if let Some(f) = &http.fault {
        let fault = HttpFault {
            delay: f.delay.as_ref().map(|d| FaultDelay {
                percentage: Some(fraction(d.percentage.as_ref().map(|p| p.value))),
                fault_delay_secifier: proto_duration(&d.fixed_delay)
                    .map(fault_delay::FaultDelaySecifier::FixedDelay),
            }),
            abort: f.abort.as_ref().map(|a| FaultAbort {
                percentage: Some(fraction(a.percentage.as_ref().map(|p| p.value))),
                error_type: a
                    .http_status
                    .and_then(|s| u32::try_from(s).ok())
                    .map(fault_abort::ErrorType::HttpStatus),
                ..Default::default()
            }),
            ..Default::default()
        };
        per_filter.insert(FAULT_FILTER.to_string(), any(FAULT_TYPE, &fault));
    }
    let matches: Vec<Option<&istio::HttpMatch>> = if http.matches.is_empty() {
        vec![None]
    } else {
        http.matches
            .iter()
            .filter(|m| m.port.is_none_or(|p| p == u32::from(port)))
            .map(Some)
            .collect()
    };
    matches
        .into_iter()
        .map(|m| Route {
            name: http.name.clone().unwrap_or_default(),
            r#match: Some(http_match(m)),
            action: Some(route::Action::Route(action.clone())),
            typed_per_filter_config: per_filter.clone(),
            ..Default::default()
        })
        .collect()
}

/// The VirtualService that routes `fqdn` for sidecars (`gateways` empty or
/// naming `mesh`), the first by namespace and name.
fn virtual_service<'a>(
    model: &'a Model,
    fqdn: &str,
) -> Option<(&'a str, &'a istio::VirtualService)> {
    model
        .virtual_services
        .iter()
        .find(|(ns, vs)| {
            (vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh"))
                && vs
                    .hosts
                    .iter()
                    .any(|h| super::generate::resolve_host(h, ns) == fqdn)
        })
        .map(|(ns, vs)| (ns.as_str(), vs))
}

/// The names a request's Host may use for a service, as Istio's sidecars
/// take them: the full name, `NAME.NS.svc` and `NAME.NS` for every Kubernetes
/// service, and `NAME` alone for those in the proxy's own namespace. Each
/// with `:PORT`; without a port only for port 80, since all ports share one
/// route configuration here.
fn host_domains(fqdn: &str, port: u16, proxy_namespace: Option<&str>) -> Vec<String> {
    let mut names = vec![fqdn.to_string()];
    let mut labels = fqdn.splitn(4, '.');
    if let (Some(name), Some(ns), Some("svc"), Some(_)) =
        (labels.next(), labels.next(), labels.next(), labels.next())
    {
        names.push(format!("{name}.{ns}.svc"));
        names.push(format!("{name}.{ns}"));
        if proxy_namespace == Some(ns) {
            names.push(name.to_string());
        }
    }
    names
        .into_iter()
        .flat_map(|n| {
            let with_port = format!("{n}:{port}");
            if port == 80 {
                vec![with_port, n]
            } else {
                vec![with_port]
            }
        })
        .collect()
}

pub fn routes(
    model: &Model,
    scope: &super::generate::Scope,
    proxy_namespace: Option<&str>,
) -> Resources {
    let virtual_hosts = service_ports(model)
        .filter(|(key, ns, _)| scope.sees(ns, &key.fqdn))
        .map(|(key, _, _)| {
            let fqdn = key.fqdn.clone();
            let domains = host_domains(&fqdn, key.port, proxy_namespace);
            let routes = match virtual_service(model, &fqdn) {
                Some((ns, vs)) => vs
                    .http
                    .iter()
                    .flat_map(|h| vs_routes(h, ns, key.port))
                    .collect(),
                None => vec![
                    safe_method_route(&key.cluster_name()),
                    route_to(&key.cluster_name(), Some(default_retries())),
                ],
            };
            VirtualHost {
                name: format!("{fqdn}:{}", key.port),
                domains,
                routes,
                ..Default::default()
            }
        })
        .collect();
    let rc = RouteConfiguration {
        name: OUTBOUND_ROUTE.into(),
        virtual_hosts,
        metadata: Some(path_metadata(model.path_normalization)),
        ..Default::default()
    };
    Resources::from([(OUTBOUND_ROUTE.to_string(), any(type_urls::ROUTE, &rc))])
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn cluster() -> ClusterRecord {
        serde_json::from_value(serde_json::json!({
            "name": "east", "network": "net-east", "region": "r", "zone": "z",
            "gateways": [], "trustDomain": "cluster.local", "registeredUnix": 0,
            "joinTokenExpiresUnix": 0, "intermediates": [],
        }))
        .unwrap()
    }

    fn model(mode: PathNormalization) -> Model {
        let permissive =
            serde_json::from_value(serde_json::json!({"mtls": {"mode": "PERMISSIVE"}}));
        Model {
            path_normalization: mode,
            peer_authentications: vec![("demo".into(), "default".into(), permissive.unwrap())],
            ..Default::default()
        }
    }

    fn node() -> NodeInfo {
        NodeInfo {
            instance_ip: Some("192.0.2.10".into()),
            apps: vec![(8080, "127.0.0.1:8080".into())],
            namespace: Some("demo".into()),
        }
    }

    /// Every HTTP connection manager of a sidecar's listeners, by stat prefix.
    fn managers(model: &Model) -> BTreeMap<String, HttpConnectionManager> {
        listeners(model, &cluster(), &node())
            .values()
            .flat_map(|any| {
                Listener::decode(any.value.as_slice())
                    .unwrap()
                    .filter_chains
            })
            .flat_map(|chain| chain.filters)
            .filter_map(|f| match f.config_type {
                Some(filter::ConfigType::TypedConfig(any)) => {
                    Some(HttpConnectionManager::decode(any.value.as_slice()).unwrap())
                }
                _ => None,
            })
            .map(|hcm| (hcm.stat_prefix.clone(), hcm))
            .collect()
    }

    #[test]
    fn hosts_take_istios_short_names_within_the_proxys_namespace() {
        let fqdn = "echo.demo.svc.cluster.local";
        assert_eq!(
            host_domains(fqdn, 8080, Some("demo")),
            [
                "echo.demo.svc.cluster.local:8080",
                "echo.demo.svc:8080",
                "echo.demo:8080",
                "echo:8080"
            ]
        );
        // From another namespace the bare name is not this service.
        assert!(
            !host_domains(fqdn, 8080, Some("shop"))
                .iter()
                .any(|d| d == "echo:8080")
        );
        assert!(host_domains(fqdn, 80, None).contains(&"echo.demo".to_string()));
        // A name that is not a Kubernetes service keeps only itself.
        assert_eq!(
            host_domains("api.example.com", 443, Some("demo")),
            ["api.example.com:443"]
        );
    }

    #[test]
    fn every_http_connection_manager_normalizes_paths_as_the_mesh_says() {
        use http_connection_manager::PathWithEscapedSlashesAction::{
            KeepUnchanged, UnescapeAndForward,
        };
        for (mode, normalize, merge, escaped) in [
            (PathNormalization::None, false, false, KeepUnchanged),
            (PathNormalization::Base, true, false, KeepUnchanged),
            (PathNormalization::MergeSlashes, true, true, KeepUnchanged),
            (
                PathNormalization::DecodeAndMergeSlashes,
                true,
                true,
                UnescapeAndForward,
            ),
        ] {
            let hcms = managers(&model(mode));
            let prefixes: Vec<&str> = hcms.keys().map(String::as_str).collect();
            assert_eq!(
                prefixes,
                ["inbound_8080", "inbound_plaintext", "outbound"],
                "{mode:?}"
            );
            for (prefix, hcm) in &hcms {
                assert_eq!(
                    hcm.normalize_path,
                    Some(BoolValue { value: normalize }),
                    "{prefix} {mode:?}"
                );
                assert_eq!(hcm.merge_slashes, merge, "{prefix} {mode:?}");
                assert_eq!(
                    hcm.path_with_escaped_slashes_action, escaped as i32,
                    "{prefix} {mode:?}"
                );
            }
            // isthmus-proxy reads the same choice from the route configurations.
            for (name, any) in inbound_routes(&model(mode), &cluster(), &node()) {
                let rc = RouteConfiguration::decode(any.value.as_slice()).unwrap();
                assert_eq!(rc.metadata, Some(path_metadata(mode)), "{name}");
            }
        }
        assert_eq!(
            Model::default().path_normalization,
            PathNormalization::DecodeAndMergeSlashes
        );
    }
}
