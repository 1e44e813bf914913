//! A sidecar's outbound routes, from the `outbound` route configuration the
//! primary writes for VirtualServices (`primary/src/xds/sidecar.rs`): per
//! service port, ordered routes with path and header matches, weighted
//! destinations, a timeout, retries, fault injection and mirroring.
//!
//! Only what the primary writes is understood; anything else in a route is
//! a decode error, so the response is NACKed and the last good routes stay.
//! Header matches share the matchers of [`crate::rbac`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::{
    Route as RouteProto, RouteConfiguration, RouteMatch, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{HttpFault, fault_abort};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use prost::Message;
use regex::Regex;

use crate::rbac::{self, Rule};

/// The fault filter's name, under which routes carry their faults.
const FAULT_FILTER: &str = "envoy.filters.http.fault";

/// Routes by the authority they serve (`HOST:PORT`, and `HOST` for port 80).
#[derive(Debug, Default)]
pub struct OutboundRoutes {
    by_domain: HashMap<String, Arc<[Route]>>,
}

impl OutboundRoutes {
    /// The routes of service `host` (an FQDN) on `port`, if any are known.
    pub fn of(&self, host: &str, port: u16) -> Option<&[Route]> {
        self.by_domain
            .get(&format!("{host}:{port}"))
            .or_else(|| (port == 80).then(|| self.by_domain.get(host)).flatten())
            .map(|r| &r[..])
    }

    /// Every authority with its routes.
    pub fn domains(&self) -> impl Iterator<Item = (&str, &[Route])> {
        self.by_domain.iter().map(|(d, r)| (d.as_str(), &r[..]))
    }

    pub fn decode(rc: &RouteConfiguration) -> Result<Self, String> {
        let mut by_domain = HashMap::new();
        for vh in &rc.virtual_hosts {
            let routes: Arc<[Route]> = vh
                .routes
                .iter()
                .map(|r| Route::decode(r).map_err(|e| format!("virtual host {}: {e}", vh.name)))
                .collect::<Result<Vec<_>, _>>()?
                .into();
            for d in &vh.domains {
                by_domain.insert(d.to_ascii_lowercase(), routes.clone());
            }
        }
        Ok(Self { by_domain })
    }
}

/// One route: its match and what to do.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    path: PathMatch,
    headers: Vec<Rule>,
    pub action: Action,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

/// Where a matched request goes and how.
#[derive(Debug)]
pub struct Action {
    /// Clusters with their weights (one cluster: weight 1).
    pub clusters: Vec<(String, u32)>,
    pub timeout: Option<Duration>,
    pub retry: Option<Retry>,
    /// A cluster that gets a copy, and the share of requests copied, per
    /// million.
    pub mirror: Option<(String, u32)>,
    pub fault: Fault,
}

/// Envoy's `retry_on` conditions, as far as isthmus-proxy can tell them
/// apart.
#[derive(Debug, Clone, Default)]
pub struct Retry {
    pub retries: u32,
    pub per_try_timeout: Option<Duration>,
    /// Retry when the connection failed or was refused, or reset before a
    /// response began: the request never reached an app.
    pub on_connect_failure: bool,
    /// Retry on any 5xx.
    pub on_5xx: bool,
    /// Retry on 502, 503 and 504.
    pub on_gateway_error: bool,
    /// Retry on these statuses (`retriable-status-codes`).
    pub status_codes: Vec<u16>,
}

impl Retry {
    /// The conditions retried on, in Envoy's words (`connect-failure`,
    /// `5xx`, `gateway-error`, the status codes).
    pub fn conditions(&self) -> Vec<String> {
        let mut on = Vec::new();
        if self.on_connect_failure {
            on.push("connect-failure".to_string());
        }
        if self.on_5xx {
            on.push("5xx".into());
        }
        if self.on_gateway_error {
            on.push("gateway-error".into());
        }
        on.extend(self.status_codes.iter().map(u16::to_string));
        on
    }

    /// Whether a response with `status` is worth another attempt.
    pub fn on_status(&self, status: u16) -> bool {
        (self.on_5xx && status >= 500)
            || (self.on_gateway_error && (502..=504).contains(&status))
            || self.status_codes.contains(&status)
    }
}

/// Faults to inject, each with its share of requests per million.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fault {
    pub delay: Option<(Duration, u32)>,
    pub abort: Option<(u16, u32)>,
}

impl Route {
    /// Whether a request matches: its path (without the query) and headers.
    pub fn matches(&self, req: &rbac::Request) -> bool {
        let path = match &self.path {
            PathMatch::Prefix(p) => req.path.starts_with(p.as_str()),
            PathMatch::Exact(p) => req.path == p,
            PathMatch::Regex(r) => r.is_match(req.path),
        };
        path && self.headers.iter().all(|h| h.holds(req))
    }

    /// How the route matches, for operators: `prefix /api`, `exact /x` or
    /// `regex ^/v[0-9]+$`, then `header NAME` (`!header NAME` when
    /// inverted) for each header it requires.
    pub fn match_text(&self) -> String {
        let mut text = match &self.path {
            PathMatch::Prefix(p) => format!("prefix {p}"),
            PathMatch::Exact(p) => format!("exact {p}"),
            PathMatch::Regex(r) => format!("regex {}", r.as_str()),
        };
        for h in &self.headers {
            match h {
                Rule::Header { name, invert, .. } => {
                    text.push_str(if *invert { ", !header " } else { ", header " });
                    text.push_str(name);
                }
                _ => text.push_str(", header match"),
            }
        }
        text
    }

    fn decode(r: &RouteProto) -> Result<Self, String> {
        let name = if r.name.is_empty() {
            "(unnamed)"
        } else {
            &r.name
        };
        let named = |e: String| format!("route {name}: {e}");
        let m = r.r#match.as_ref().ok_or_else(|| named("no match".into()))?;
        let Some(route::Action::Route(action)) = &r.action else {
            return Err(named("only route actions are supported".into()));
        };
        Ok(Self {
            name: r.name.clone(),
            path: path_match(m).map_err(named)?,
            headers: m
                .headers
                .iter()
                .map(rbac::header_rule)
                .collect::<Result<_, _>>()
                .map_err(named)?,
            action: Action {
                clusters: clusters(action).map_err(named)?,
                timeout: action.timeout.as_ref().and_then(duration),
                retry: action.retry_policy.as_ref().map(retry),
                mirror: action.request_mirror_policies.first().map(|m| {
                    let share = m
                        .runtime_fraction
                        .as_ref()
                        .and_then(|f| f.default_value.as_ref())
                        .map(per_million)
                        .unwrap_or(1_000_000);
                    (m.cluster.clone(), share)
                }),
                fault: r
                    .typed_per_filter_config
                    .get(FAULT_FILTER)
                    .map(|any| fault(&any.value))
                    .transpose()
                    .map_err(named)?
                    .unwrap_or_default(),
            },
        })
    }
}

fn path_match(m: &RouteMatch) -> Result<PathMatch, String> {
    use route_match::PathSpecifier as P;
    match &m.path_specifier {
        Some(P::Prefix(p)) => Ok(PathMatch::Prefix(p.clone())),
        Some(P::Path(p)) => Ok(PathMatch::Exact(p.clone())),
        Some(P::SafeRegex(r)) => Regex::new(&format!("^(?:{})$", r.regex))
            .map(PathMatch::Regex)
            .map_err(|e| format!("path regex {:?}: {e}", r.regex)),
        _ => Err("this kind of path match is not supported".into()),
    }
}

fn clusters(
    a: &envoy_types::pb::envoy::config::route::v3::RouteAction,
) -> Result<Vec<(String, u32)>, String> {
    match &a.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => Ok(vec![(c.clone(), 1)]),
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let out: Vec<(String, u32)> = w
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
                .filter(|(_, w)| *w > 0)
                .collect();
            if out.is_empty() {
                return Err("weighted clusters without weight".into());
            }
            Ok(out)
        }
        _ => Err("this kind of cluster choice is not supported".into()),
    }
}

fn retry(p: &envoy_types::pb::envoy::config::route::v3::RetryPolicy) -> Retry {
    let mut r = Retry {
        retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout: p.per_try_timeout.as_ref().and_then(duration),
        ..Default::default()
    };
    for on in p.retry_on.split(',').map(str::trim) {
        match on {
            "connect-failure" | "refused-stream" | "reset-before-request" | "reset" => {
                r.on_connect_failure = true
            }
            "5xx" => r.on_5xx = true,
            "gateway-error" => r.on_gateway_error = true,
            "retriable-status-codes" => r.status_codes.extend(
                p.retriable_status_codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok()),
            ),
            // gRPC statuses and the rest have no meaning for HTTP/1 here.
            _ => {}
        }
    }
    r
}

fn fault(bytes: &[u8]) -> Result<Fault, String> {
    let f = HttpFault::decode(bytes).map_err(|e| format!("fault: {e}"))?;
    let delay = match f.delay {
        None => None,
        Some(d) => match d.fault_delay_secifier {
            Some(fault_delay::FaultDelaySecifier::FixedDelay(fixed)) => Some((
                duration(&fixed).unwrap_or_default(),
                d.percentage.as_ref().map_or(1_000_000, per_million),
            )),
            _ => return Err("fault: only fixed delays are supported".into()),
        },
    };
    let abort = match f.abort {
        None => None,
        Some(a) => match a.error_type {
            Some(fault_abort::ErrorType::HttpStatus(s)) => Some((
                u16::try_from(s)
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .ok_or_else(|| format!("fault: abort status {s} is not an HTTP status"))?,
                a.percentage.as_ref().map_or(1_000_000, per_million),
            )),
            _ => return Err("fault: only HTTP status aborts are supported".into()),
        },
    };
    Ok(Fault { delay, abort })
}

fn per_million(f: &FractionalPercent) -> u32 {
    use fractional_percent::DenominatorType as D;
    let scale = match D::try_from(f.denominator) {
        Ok(D::Hundred) => 10_000,
        Ok(D::TenThousand) => 100,
        _ => 1,
    };
    f.numerator.saturating_mul(scale).min(1_000_000)
}

fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    let d = Duration::new(secs, nanos);
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use envoy_types::pb::envoy::config::route::v3::{
        HeaderMatcher, RetryPolicy, RouteAction, VirtualHost, WeightedCluster, header_matcher,
        weighted_cluster::ClusterWeight,
    };
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::FaultAbort;
    use envoy_types::pb::envoy::r#type::matcher::v3::{
        StringMatcher, string_matcher::MatchPattern,
    };
    use envoy_types::pb::google::protobuf::{Any, UInt32Value};

    use super::*;

    fn route(name: &str, m: RouteMatch, action: RouteAction) -> RouteProto {
        RouteProto {
            name: name.into(),
            r#match: Some(m),
            action: Some(route::Action::Route(action)),
            ..Default::default()
        }
    }

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())),
            ..Default::default()
        }
    }

    fn to(cluster: &str) -> RouteAction {
        RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        }
    }

    fn config(routes: Vec<RouteProto>) -> RouteConfiguration {
        RouteConfiguration {
            name: "outbound".into(),
            virtual_hosts: vec![VirtualHost {
                name: "echo:80".into(),
                domains: vec![
                    "echo.demo.svc.cluster.local:80".into(),
                    "echo.demo.svc.cluster.local".into(),
                ],
                routes,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn view<'a>(path: &'a str, headers: &'a http::HeaderMap) -> rbac::Request<'a> {
        rbac::Request {
            peer: None,
            method: "GET",
            path,
            authority: "echo.demo.svc.cluster.local",
            port: 80,
            headers,
        }
    }

    #[test]
    fn first_matching_route_wins_with_its_action() {
        let mut canary = prefix("/");
        canary.headers = vec![HeaderMatcher {
            name: "x-canary".into(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                StringMatcher {
                    match_pattern: Some(MatchPattern::Exact("true".into())),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }];
        let mut teapot = route("teapot", prefix("/teapot"), to("v1"));
        teapot.typed_per_filter_config.insert(
            FAULT_FILTER.into(),
            Any {
                type_url: String::new(),
                value: HttpFault {
                    abort: Some(FaultAbort {
                        error_type: Some(fault_abort::ErrorType::HttpStatus(418)),
                        percentage: Some(FractionalPercent {
                            numerator: 50,
                            denominator: 0,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
                .encode_to_vec(),
            },
        );
        let mut default = to("");
        default.cluster_specifier = Some(route_action::ClusterSpecifier::WeightedClusters(
            WeightedCluster {
                clusters: vec![
                    ClusterWeight {
                        name: "v1".into(),
                        weight: Some(UInt32Value { value: 90 }),
                        ..Default::default()
                    },
                    ClusterWeight {
                        name: "v2".into(),
                        weight: Some(UInt32Value { value: 10 }),
                        ..Default::default()
                    },
                    ClusterWeight {
                        name: "v3".into(),
                        weight: Some(UInt32Value { value: 0 }),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        ));
        default.timeout = Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 5,
            nanos: 0,
        });
        default.retry_policy = Some(RetryPolicy {
            retry_on: "connect-failure,retriable-status-codes".into(),
            retriable_status_codes: vec![503],
            num_retries: Some(UInt32Value { value: 2 }),
            ..Default::default()
        });
        let routes = OutboundRoutes::decode(&config(vec![
            route("canary", canary, to("v2")),
            teapot,
            route("default", prefix("/"), default),
        ]))
        .unwrap();
        let of = routes.of("echo.demo.svc.cluster.local", 80).unwrap();
        assert!(routes.of("echo.demo.svc.cluster.local", 8080).is_none());
        let none = http::HeaderMap::new();
        let mut canary_on = http::HeaderMap::new();
        canary_on.insert("x-canary", http::HeaderValue::from_static("true"));
        let pick = |path: &str, h: &http::HeaderMap| {
            of.iter()
                .find(|r| r.matches(&view(path, h)))
                .map(|r| r.name.as_str())
        };
        assert_eq!(pick("/", &canary_on), Some("canary"));
        assert_eq!(pick("/teapot/x", &none), Some("teapot"));
        assert_eq!(pick("/other", &none), Some("default"));
        assert_eq!(
            of[1].action.fault.abort,
            Some((418, 500_000)),
            "50 of a hundred"
        );
        let d = &of[2].action;
        assert_eq!(
            d.clusters,
            vec![("v1".to_string(), 90), ("v2".to_string(), 10)]
        );
        assert_eq!(d.timeout, Some(Duration::from_secs(5)));
        let retry = d.retry.as_ref().unwrap();
        assert!(retry.on_connect_failure && retry.on_status(503) && !retry.on_status(500));
        assert_eq!(retry.retries, 2);
        // What proxy-config shows of each match.
        assert_eq!(of[0].match_text(), "prefix /, header x-canary");
        assert_eq!(of[1].match_text(), "prefix /teapot");
    }

    #[test]
    fn routes_beyond_the_subset_are_refused_by_name() {
        let redirect = RouteProto {
            name: "moved".into(),
            r#match: Some(prefix("/")),
            action: Some(route::Action::Redirect(Default::default())),
            ..Default::default()
        };
        let e = OutboundRoutes::decode(&config(vec![redirect])).unwrap_err();
        assert_eq!(
            e,
            "virtual host echo:80: route moved: only route actions are supported"
        );
        let mut bad = prefix("/");
        bad.path_specifier = Some(route_match::PathSpecifier::SafeRegex(
            envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                regex: "[".into(),
                ..Default::default()
            },
        ));
        let e = OutboundRoutes::decode(&config(vec![route("r", bad, to("v1"))])).unwrap_err();
        assert!(e.contains("route r: path regex \"[\""), "{e}");
    }
}
