//! Listeners, routes and inbound clusters for Envoy sidecars.
//!
//! - `outbound_15001` on the sidecar's address: HTTP from the local app
//!   (plain, or in proxy form as `curl -x` sends it), routed by the `outbound`
//!   route table: one virtual host per service port (`FQDN:PORT`, and `FQDN`
//!   for port 80) to `outbound|PORT||FQDN`, with retries on connection
//!   failures so an endpoint that dies mid-failover costs no request.
//! - `inbound_15006` on the sidecar's address: mesh mTLS (certificate and
//!   roots from the agent's SDS, a client SPIFFE certificate required),
//!   one filter chain per local app port, chosen by the SNI
//!   `outbound_.PORT_._.FQDN` callers send, forwarding to the app with
//!   `x-forwarded-client-cert` set (`By`, `Hash`, `URI`), as isthmus-proxy
//!   does.
//! - `inbound|PORT||` clusters: the local apps, from the node's `APPS`.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket};
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
use isthmus_api::ports;
use isthmus_api::type_urls;

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

/// SNIs of the service ports this sidecar's address serves, by port.
fn served_snis(model: &Model, me: &ClusterRecord, ip: &str) -> BTreeMap<u16, Vec<String>> {
    let mut out: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for (key, _, per_cluster) in service_ports(model) {
        let mine = per_cluster.get(&me.name).is_some_and(|s| {
            s.ports.iter().any(|p| p.port == key.port)
                && s.endpoints.iter().any(|e| e.address == ip)
        });
        if mine {
            out.entry(key.port).or_default().push(key.sni());
        }
    }
    out
}

pub fn listeners(model: &Model, me: &ClusterRecord, node: &NodeInfo) -> Resources {
    let Some(ip) = node.instance_ip.as_deref() else {
        return Resources::new();
    };
    let mut out = Resources::new();

    let outbound = HttpConnectionManager {
        stat_prefix: "outbound".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: OUTBOUND_ROUTE.into(),
        })),
        http_filters: vec![router()],
        ..Default::default()
    };
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
    let chains = node
        .apps
        .iter()
        .map(|(port, _)| {
            let cluster = inbound_cluster_name(*port);
            let hcm = HttpConnectionManager {
                stat_prefix: format!("inbound_{port}"),
                route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
                    RouteConfiguration {
                        name: format!("inbound|{port}"),
                        virtual_hosts: vec![VirtualHost {
                            name: format!("inbound|{port}"),
                            domains: vec!["*".into()],
                            routes: vec![route_to(&cluster, None)],
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                )),
                http_filters: vec![router()],
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
            FilterChain {
                filter_chain_match: Some(FilterChainMatch {
                    server_names: snis.get(port).cloned().unwrap_or_default(),
                    ..Default::default()
                }),
                filters: vec![hcm_filter(&hcm)],
                transport_socket: Some(tls_socket.clone()),
                ..Default::default()
            }
        })
        .collect();
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

pub fn routes(model: &Model) -> Resources {
    let virtual_hosts = service_ports(model)
        .map(|(key, _, _)| {
            let fqdn = key.fqdn.clone();
            let mut domains = vec![format!("{fqdn}:{}", key.port)];
            if key.port == 80 {
                domains.push(fqdn.clone());
            }
            VirtualHost {
                name: format!("{fqdn}:{}", key.port),
                domains,
                routes: vec![
                    safe_method_route(&key.cluster_name()),
                    route_to(&key.cluster_name(), Some(default_retries())),
                ],
                ..Default::default()
            }
        })
        .collect();
    let rc = RouteConfiguration {
        name: OUTBOUND_ROUTE.into(),
        virtual_hosts,
        ..Default::default()
    };
    Resources::from([(OUTBOUND_ROUTE.to_string(), any(type_urls::ROUTE, &rc))])
}
