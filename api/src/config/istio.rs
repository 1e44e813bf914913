//! The spec of each kind: typed where Isthmus reads it, and checked the way
//! `istioctl validate` would, with a field path on every error. Fields
//! Isthmus does not model are kept as they are.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Context, FieldError, Resource, effective_namespace, field_error};
use crate::names::check_label;

fn decode<T: DeserializeOwned>(spec: &Value) -> Result<T, FieldError> {
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(spec.clone(), &mut track);
    T::deserialize(de).map_err(|e| {
        let path = track.path().to_string();
        let path = if path == "." {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        field_error(path, e.to_string())
    })
}

pub fn validate_spec(r: &Resource, ctx: &Context) -> Vec<FieldError> {
    let ns = effective_namespace(r);
    let mut e = Errors::default();
    let result = match r.kind.as_str() {
        "VirtualService" => decode(&r.spec).map(|s| virtual_service(&s, ns, ctx, &mut e)),
        "DestinationRule" => decode(&r.spec).map(|s| destination_rule(&s, &mut e)),
        "Gateway" => decode(&r.spec).map(|s| gateway(&s, &mut e)),
        "ServiceEntry" => decode(&r.spec).map(|s| service_entry(&s, &mut e)),
        "Sidecar" => decode(&r.spec).map(|s| sidecar(&s, &mut e)),
        "PeerAuthentication" => decode(&r.spec).map(|s| peer_authentication(&s, &mut e)),
        "AuthorizationPolicy" => decode(&r.spec).map(|s| authorization_policy(&s, &mut e)),
        "RequestAuthentication" => decode(&r.spec).map(|s| request_authentication(&s, &mut e)),
        "Cluster" => decode(&r.spec).map(|s| cluster(&s, &mut e)),
        "Mesh" => decode(&r.spec).map(|s| mesh(&s, &mut e)),
        _ => Ok(()),
    };
    if let Err(type_error) = result {
        e.0.push(type_error);
    }
    e.0
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(field_error(path, message));
    }
    fn one_of(&mut self, path: &str, value: &Option<String>, allowed: &[&str]) {
        if let Some(v) = value
            && !allowed.contains(&v.as_str())
        {
            self.add(path, format!("{v:?} is not one of {}", allowed.join(", ")));
        }
    }
    fn duration(&mut self, path: &str, value: &Option<String>) {
        if let Some(v) = value
            && parse_duration(v).is_none()
        {
            self.add(
                path,
                format!("{v:?} is not a duration such as 500ms, 5s, 1m or 1h"),
            );
        }
    }
    fn percent(&mut self, path: &str, value: Option<f64>) {
        if let Some(v) = value
            && !(0.0..=100.0).contains(&v)
        {
            self.add(path, format!("{v} is not a percentage from 0 to 100"));
        }
    }
    fn port(&mut self, path: &str, number: u32) {
        if number == 0 || number > 65535 {
            self.add(path, format!("{number} is not a port from 1 to 65535"));
        }
    }
    fn hosts(&mut self, path: &str, hosts: &[String]) {
        if hosts.is_empty() {
            self.add(path, "at least one host is required");
        }
        for (i, h) in hosts.iter().enumerate() {
            if h.is_empty() {
                self.add(format!("{path}[{i}]"), "host must not be empty");
            }
        }
    }
}

/// `500ms`, `5s`, `1.5s`, `1m`, `1h`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return None;
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let v: f64 = num.parse().ok()?;
    std::time::Duration::try_from_secs_f64(v * unit).ok()
}

// === VirtualService ===

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    pub redirect: Option<Value>,
    pub direct_response: Option<Value>,
    pub timeout: Option<String>,
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    pub mirror: Option<Destination>,
    pub mirror_percentage: Option<Percent>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    pub port: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RouteDestination {
    pub destination: Option<Destination>,
    pub weight: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delay {
    pub percentage: Option<Percent>,
    pub fixed_delay: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Abort {
    pub percentage: Option<Percent>,
    pub http_status: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Percent {
    pub value: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TcpRoute {
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

fn string_match(e: &mut Errors, path: &str, m: &StringMatch) {
    let set = [&m.exact, &m.prefix, &m.regex]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set != 1 {
        e.add(path, "exactly one of exact, prefix or regex must be set");
    }
}

fn destination(e: &mut Errors, path: &str, d: &Destination, ns: &str, ctx: &Context) {
    if d.host.is_empty() {
        e.add(format!("{path}.host"), "host is required");
        return;
    }
    let host = ctx.resolve(&d.host, ns);
    if !d.host.contains('*') && !ctx.hosts.contains(&host) {
        e.add(
            format!("{path}.host"),
            format!(
                "unknown host {:?}: no service or ServiceEntry defines it",
                d.host
            ),
        );
    }
    if let Some(subset) = &d.subset
        && !ctx.subsets.get(&host).is_some_and(|s| s.contains(subset))
    {
        e.add(
            format!("{path}.subset"),
            format!("subset {subset:?} is not defined by any DestinationRule for {host}"),
        );
    }
    if let Some(p) = &d.port {
        e.port(&format!("{path}.port.number"), p.number);
    }
}

fn routes(e: &mut Errors, path: &str, routes: &[RouteDestination], ns: &str, ctx: &Context) {
    for (j, r) in routes.iter().enumerate() {
        let rp = format!("{path}[{j}]");
        match &r.destination {
            Some(d) => destination(e, &format!("{rp}.destination"), d, ns, ctx),
            None => e.add(format!("{rp}.destination"), "destination is required"),
        }
        if let Some(w) = r.weight
            && !(0..=100).contains(&w)
        {
            e.add(
                format!("{rp}.weight"),
                format!("{w} is not a weight from 0 to 100"),
            );
        }
    }
    let weighted = routes.iter().any(|r| r.weight.is_some());
    let sum: i64 = routes.iter().filter_map(|r| r.weight).sum();
    if routes.len() > 1 && weighted && sum != 100 || routes.len() > 1 && !weighted {
        e.add(
            format!("{path}[{}].weight", routes.len() - 1),
            format!("weights must sum to 100 (they sum to {sum})"),
        );
    }
}

fn virtual_service(s: &VirtualService, ns: &str, ctx: &Context, e: &mut Errors) {
    e.hosts("spec.hosts", &s.hosts);
    for (i, g) in s.gateways.iter().enumerate() {
        if g.is_empty() {
            e.add(
                format!("spec.gateways[{i}]"),
                "gateway name must not be empty",
            );
        }
    }
    if s.http.is_empty() && s.tcp.is_empty() {
        e.add("spec", "at least one http or tcp route is required");
    }
    let mut names = BTreeSet::new();
    for (i, h) in s.http.iter().enumerate() {
        let p = format!("spec.http[{i}]");
        if let Some(name) = &h.name
            && !names.insert(name.clone())
        {
            e.add(
                format!("{p}.name"),
                format!("route name {name:?} is used twice"),
            );
        }
        for (k, m) in h.matches.iter().enumerate() {
            let mp = format!("{p}.match[{k}]");
            if let Some(u) = &m.uri {
                string_match(e, &format!("{mp}.uri"), u);
            }
            if let Some(u) = &m.method {
                string_match(e, &format!("{mp}.method"), u);
            }
            for (name, hm) in &m.headers {
                string_match(e, &format!("{mp}.headers.{name}"), hm);
            }
            if let Some(port) = m.port {
                e.port(&format!("{mp}.port"), port);
            }
        }
        if h.route.is_empty() && h.redirect.is_none() && h.direct_response.is_none() {
            e.add(
                format!("{p}.route"),
                "a route, redirect or directResponse is required",
            );
        }
        routes(e, &format!("{p}.route"), &h.route, ns, ctx);
        e.duration(&format!("{p}.timeout"), &h.timeout);
        if let Some(r) = &h.retries {
            if r.attempts.is_some_and(|a| a < 0) {
                e.add(
                    format!("{p}.retries.attempts"),
                    "attempts must not be negative",
                );
            }
            e.duration(&format!("{p}.retries.perTryTimeout"), &r.per_try_timeout);
        }
        if let Some(f) = &h.fault {
            if let Some(d) = &f.delay {
                e.percent(
                    &format!("{p}.fault.delay.percentage.value"),
                    d.percentage.as_ref().map(|x| x.value),
                );
                if d.fixed_delay.is_none() {
                    e.add(
                        format!("{p}.fault.delay.fixedDelay"),
                        "fixedDelay is required",
                    );
                }
                e.duration(&format!("{p}.fault.delay.fixedDelay"), &d.fixed_delay);
            }
            if let Some(a) = &f.abort {
                e.percent(
                    &format!("{p}.fault.abort.percentage.value"),
                    a.percentage.as_ref().map(|x| x.value),
                );
                if !a.http_status.is_some_and(|s| (200..=599).contains(&s)) {
                    e.add(
                        format!("{p}.fault.abort.httpStatus"),
                        "httpStatus from 200 to 599 is required",
                    );
                }
            }
        }
        if let Some(m) = &h.mirror {
            destination(e, &format!("{p}.mirror"), m, ns, ctx);
        }
        e.percent(
            &format!("{p}.mirrorPercentage.value"),
            h.mirror_percentage.as_ref().map(|x| x.value),
        );
    }
    for (i, t) in s.tcp.iter().enumerate() {
        routes(e, &format!("spec.tcp[{i}].route"), &t.route, ns, ctx);
    }
}

// === DestinationRule ===

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRule {
    #[serde(default)]
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    pub max_connections: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<i64>,
    pub http2_max_requests: Option<i64>,
    pub max_retries: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoadBalancer {
    pub simple: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClientTls {
    pub mode: Option<String>,
}

fn traffic_policy(e: &mut Errors, p: &str, t: &TrafficPolicy) {
    if let Some(lb) = &t.load_balancer {
        e.one_of(
            &format!("{p}.loadBalancer.simple"),
            &lb.simple,
            &[
                "UNSPECIFIED",
                "RANDOM",
                "PASSTHROUGH",
                "ROUND_ROBIN",
                "LEAST_REQUEST",
                "LEAST_CONN",
            ],
        );
    }
    if let Some(o) = &t.outlier_detection {
        for (name, v) in [
            ("consecutive5xxErrors", o.consecutive_5xx_errors),
            ("consecutiveGatewayErrors", o.consecutive_gateway_errors),
        ] {
            if v.is_some_and(|v| v < 0) {
                e.add(
                    format!("{p}.outlierDetection.{name}"),
                    "must not be negative",
                );
            }
        }
        e.duration(&format!("{p}.outlierDetection.interval"), &o.interval);
        e.duration(
            &format!("{p}.outlierDetection.baseEjectionTime"),
            &o.base_ejection_time,
        );
        if let Some(m) = o.max_ejection_percent {
            e.percent(
                &format!("{p}.outlierDetection.maxEjectionPercent"),
                Some(m as f64),
            );
        }
    }
    if let Some(tls) = &t.tls {
        e.one_of(
            &format!("{p}.tls.mode"),
            &tls.mode,
            &["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"],
        );
    }
}

fn destination_rule(s: &DestinationRule, e: &mut Errors) {
    if s.host.is_empty() {
        e.add("spec.host", "host is required");
    }
    if let Some(t) = &s.traffic_policy {
        traffic_policy(e, "spec.trafficPolicy", t);
    }
    let mut names = BTreeSet::new();
    for (i, sub) in s.subsets.iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        if check_label(&sub.name).is_err() {
            e.add(
                format!("{p}.name"),
                format!("{:?} is not a DNS label", sub.name),
            );
        } else if !names.insert(sub.name.clone()) {
            e.add(
                format!("{p}.name"),
                format!("subset {:?} is defined twice", sub.name),
            );
        }
        if let Some(t) = &sub.traffic_policy {
            traffic_policy(e, &format!("{p}.trafficPolicy"), t);
        }
    }
}

// === Gateway ===

#[derive(Deserialize)]
struct GatewaySpec {
    #[serde(default)]
    servers: Vec<Server>,
}

#[derive(Deserialize)]
struct Server {
    port: Option<ServerPort>,
    #[serde(default)]
    hosts: Vec<String>,
    tls: Option<ServerTls>,
}

#[derive(Deserialize)]
struct ServerPort {
    number: u32,
    #[serde(default)]
    name: String,
    #[serde(default)]
    protocol: String,
}

#[derive(Deserialize)]
struct ServerTls {
    mode: Option<String>,
}

const PROTOCOLS: &[&str] = &["HTTP", "HTTPS", "GRPC", "HTTP2", "MONGO", "TCP", "TLS"];

fn gateway(s: &GatewaySpec, e: &mut Errors) {
    if s.servers.is_empty() {
        e.add("spec.servers", "at least one server is required");
    }
    let mut ports = BTreeSet::new();
    for (i, srv) in s.servers.iter().enumerate() {
        let p = format!("spec.servers[{i}]");
        match &srv.port {
            Some(port) => {
                e.port(&format!("{p}.port.number"), port.number);
                e.one_of(
                    &format!("{p}.port.protocol"),
                    &Some(port.protocol.to_ascii_uppercase()),
                    PROTOCOLS,
                );
                if !port.name.is_empty() && !ports.insert(port.name.clone()) {
                    e.add(
                        format!("{p}.port.name"),
                        format!("port name {:?} is used twice", port.name),
                    );
                }
            }
            None => e.add(format!("{p}.port"), "port is required"),
        }
        e.hosts(&format!("{p}.hosts"), &srv.hosts);
        if let Some(tls) = &srv.tls {
            e.one_of(
                &format!("{p}.tls.mode"),
                &tls.mode,
                &[
                    "PASSTHROUGH",
                    "SIMPLE",
                    "MUTUAL",
                    "AUTO_PASSTHROUGH",
                    "ISTIO_MUTUAL",
                    "OPTIONAL_MUTUAL",
                ],
            );
        }
    }
}

// === ServiceEntry ===

#[derive(Deserialize)]
struct ServiceEntry {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<ServicePort>,
    location: Option<String>,
    resolution: Option<String>,
    #[serde(default)]
    endpoints: Vec<SeEndpoint>,
}

#[derive(Deserialize)]
struct ServicePort {
    number: u32,
    #[serde(default)]
    name: String,
    protocol: Option<String>,
}

#[derive(Deserialize)]
struct SeEndpoint {
    #[serde(default)]
    address: String,
}

fn service_entry(s: &ServiceEntry, e: &mut Errors) {
    e.hosts("spec.hosts", &s.hosts);
    let mut numbers = BTreeSet::new();
    for (i, port) in s.ports.iter().enumerate() {
        let p = format!("spec.ports[{i}]");
        e.port(&format!("{p}.number"), port.number);
        if !numbers.insert(port.number) {
            e.add(
                format!("{p}.number"),
                format!("port {} is listed twice", port.number),
            );
        }
        if port.name.is_empty() {
            e.add(format!("{p}.name"), "name is required");
        }
        e.one_of(
            &format!("{p}.protocol"),
            &port.protocol.as_ref().map(|p| p.to_ascii_uppercase()),
            PROTOCOLS,
        );
    }
    e.one_of(
        "spec.location",
        &s.location,
        &["MESH_EXTERNAL", "MESH_INTERNAL"],
    );
    e.one_of(
        "spec.resolution",
        &s.resolution,
        &["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"],
    );
    if s.resolution.as_deref() == Some("STATIC") {
        if s.endpoints.is_empty() {
            e.add(
                "spec.endpoints",
                "STATIC resolution needs at least one endpoint",
            );
        }
        for (i, ep) in s.endpoints.iter().enumerate() {
            if ep.address.parse::<std::net::IpAddr>().is_err() {
                e.add(
                    format!("spec.endpoints[{i}].address"),
                    format!("{:?} is not an IP address", ep.address),
                );
            }
        }
    }
}

// === Sidecar ===

/// A Sidecar's spec: which services its proxies see.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sidecar {
    pub workload_selector: Option<SidecarSelector>,
    #[serde(default)]
    pub egress: Vec<Egress>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SidecarSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Egress {
    /// `namespace/host`: namespace `*`, `.` (the Sidecar's own) or a name;
    /// host `*`, `*.suffix`, or a name.
    #[serde(default)]
    pub hosts: Vec<String>,
}

fn sidecar(s: &Sidecar, e: &mut Errors) {
    for (i, eg) in s.egress.iter().enumerate() {
        e.hosts(&format!("spec.egress[{i}].hosts"), &eg.hosts);
        for (j, h) in eg.hosts.iter().enumerate() {
            match h.split_once('/') {
                Some((ns, host)) if !ns.is_empty() && !host.is_empty() => {}
                _ => e.add(
                    format!("spec.egress[{i}].hosts[{j}]"),
                    format!("{h:?} is not of the form namespace/host"),
                ),
            }
        }
    }
}

// === Security ===

/// A PeerAuthentication's spec: the mTLS mode of workloads' inbound ports.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<Mtls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Mtls {
    pub mode: Option<String>,
}

const MTLS_MODES: &[&str] = &["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];

fn peer_authentication(s: &PeerAuthentication, e: &mut Errors) {
    if let Some(m) = &s.mtls {
        e.one_of("spec.mtls.mode", &m.mode, MTLS_MODES);
    }
    for (port, m) in &s.port_level_mtls {
        if !port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p)) {
            e.add(
                format!("spec.portLevelMtls.{port}"),
                "keys must be port numbers from 1 to 65535",
            );
        }
        e.one_of(
            &format!("spec.portLevelMtls.{port}.mode"),
            &m.mode,
            MTLS_MODES,
        );
    }
}

/// An AuthorizationPolicy's spec, as the primary turns it into RBAC.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub selector: Option<WorkloadSelector>,
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthzRule {
    #[serde(default)]
    pub from: Vec<AuthzFrom>,
    #[serde(default)]
    pub to: Vec<AuthzTo>,
    #[serde(default)]
    pub when: Vec<AuthzCondition>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthzFrom {
    pub source: Option<AuthzSource>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzSource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Not supported: refused by validation.
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthzTo {
    pub operation: Option<AuthzOperation>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzOperation {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// Not supported: refused by validation.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzCondition {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

impl AuthzCondition {
    /// The header a `request.headers[NAME]` key names.
    pub fn header(&self) -> Option<&str> {
        self.key
            .strip_prefix("request.headers[")?
            .strip_suffix(']')
            .filter(|h| !h.is_empty())
    }
}

/// Istio's match syntax for principals, namespaces and paths: exact, or one
/// `*` at the start or the end (or alone).
fn wildcard_ok(v: &str) -> bool {
    let inner = v
        .strip_prefix('*')
        .or_else(|| v.strip_suffix('*'))
        .unwrap_or(v);
    !v.is_empty() && !inner.contains('*')
}

fn authorization_policy(s: &AuthorizationPolicy, e: &mut Errors) {
    e.one_of(
        "spec.action",
        &s.action,
        &["ALLOW", "DENY", "AUDIT", "CUSTOM"],
    );
    if s.action.as_deref() == Some("CUSTOM") {
        e.add(
            "spec.action",
            "CUSTOM needs an external authorizer, which Isthmus does not provide",
        );
    }
    let unsupported = |e: &mut Errors, path: String, values: &[String]| {
        if !values.is_empty() {
            e.add(path, "not supported by Isthmus yet");
        }
    };
    for (i, r) in s.rules.iter().enumerate() {
        for (j, from) in r.from.iter().enumerate() {
            let Some(src) = &from.source else { continue };
            let path = format!("spec.rules[{i}].from[{j}].source");
            for (field, values) in [
                ("requestPrincipals", &src.request_principals),
                ("notRequestPrincipals", &src.not_request_principals),
                ("ipBlocks", &src.ip_blocks),
                ("notIpBlocks", &src.not_ip_blocks),
                ("remoteIpBlocks", &src.remote_ip_blocks),
                ("notRemoteIpBlocks", &src.not_remote_ip_blocks),
            ] {
                unsupported(e, format!("{path}.{field}"), values);
            }
            for (field, values) in [
                ("principals", &src.principals),
                ("notPrincipals", &src.not_principals),
            ] {
                for (k, v) in values.iter().enumerate() {
                    if !wildcard_ok(v) {
                        e.add(
                            format!("{path}.{field}[{k}]"),
                            format!("{v:?}: one `*` at the start or the end at most"),
                        );
                    }
                }
            }
            for (field, values) in [
                ("namespaces", &src.namespaces),
                ("notNamespaces", &src.not_namespaces),
            ] {
                for (k, v) in values.iter().enumerate() {
                    let label = v.trim_start_matches('*').trim_end_matches('*');
                    if !wildcard_ok(v) || (!label.is_empty() && check_label(label).is_err()) {
                        e.add(
                            format!("{path}.{field}[{k}]"),
                            format!("{v:?} is not a namespace (a DNS label, with one `*` at the start or the end at most)"),
                        );
                    }
                }
            }
        }
        for (j, to) in r.to.iter().enumerate() {
            let Some(op) = &to.operation else { continue };
            let path = format!("spec.rules[{i}].to[{j}].operation");
            unsupported(e, format!("{path}.hosts"), &op.hosts);
            unsupported(e, format!("{path}.notHosts"), &op.not_hosts);
            for (field, values) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
                for (k, port) in values.iter().enumerate() {
                    if !port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p)) {
                        e.add(
                            format!("{path}.{field}[{k}]"),
                            format!("{port:?} is not a port"),
                        );
                    }
                }
            }
            for (field, values) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
                for (k, v) in values.iter().enumerate() {
                    if !wildcard_ok(v) {
                        e.add(
                            format!("{path}.{field}[{k}]"),
                            format!("{v:?}: one `*` at the start or the end at most"),
                        );
                    }
                }
            }
        }
        for (j, c) in r.when.iter().enumerate() {
            let path = format!("spec.rules[{i}].when[{j}]");
            if c.key.is_empty() {
                e.add(format!("{path}.key"), "key is required");
            } else if !matches!(c.key.as_str(), "source.principal" | "source.namespace")
                && c.header().is_none()
            {
                e.add(
                    format!("{path}.key"),
                    format!(
                        "{:?} is not supported by Isthmus yet (source.principal, source.namespace and request.headers[NAME] are)",
                        c.key
                    ),
                );
            } else if c.values.is_empty() && c.not_values.is_empty() {
                e.add(path, "values or notValues is required");
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestAuthenticationSpec {
    #[serde(default)]
    jwt_rules: Vec<JwtRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JwtRule {
    #[serde(default)]
    issuer: String,
    jwks_uri: Option<String>,
}

fn request_authentication(s: &RequestAuthenticationSpec, e: &mut Errors) {
    for (i, r) in s.jwt_rules.iter().enumerate() {
        if r.issuer.is_empty() {
            e.add(format!("spec.jwtRules[{i}].issuer"), "issuer is required");
        }
        if let Some(uri) = &r.jwks_uri
            && !uri.starts_with("https://")
        {
            e.add(
                format!("spec.jwtRules[{i}].jwksUri"),
                "jwksUri must be an https:// URL",
            );
        }
    }
}

// === Isthmus kinds ===

#[derive(Deserialize)]
struct ClusterSpec {
    #[serde(default)]
    network: String,
    #[serde(default)]
    gateways: Vec<String>,
}

fn cluster(s: &ClusterSpec, e: &mut Errors) {
    if check_label(&s.network).is_err() {
        e.add(
            "spec.network",
            format!("{:?} is not a DNS label", s.network),
        );
    }
    for (i, g) in s.gateways.iter().enumerate() {
        if g.parse::<std::net::IpAddr>().is_err() {
            e.add(
                format!("spec.gateways[{i}]"),
                format!("{g:?} is not an IP address"),
            );
        }
    }
}

fn mesh(s: &super::mesh::MeshSpec, e: &mut Errors) {
    use super::mesh::PathNormalization;
    if let Some(name) = s
        .path_normalization
        .as_ref()
        .and_then(|p| p.normalization.as_ref())
        && PathNormalization::parse(name).is_none()
    {
        let allowed: Vec<&str> = PathNormalization::ALL.iter().map(|p| p.as_str()).collect();
        e.add(
            "spec.pathNormalization.normalization",
            format!("{name:?} is not one of {}", allowed.join(", ")),
        );
    }
    if let Some(td) = &s.trust_domain
        && (td.is_empty()
            || td.len() > 255
            || !td.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            }))
    {
        e.add(
            "spec.trustDomain",
            format!("{td:?} is not a valid SPIFFE trust domain"),
        );
    }
}
