//! Isthmus's wire contracts, shared by every other crate: the generated
//! `isthmus.sync.v1` and `isthmus.ca.v1` gRPC services, Istio's naming rules
//! (service FQDNs, outbound cluster names and the `outbound_.PORT_.SUBSET_.FQDN`
//! SNI), the JSON types of the primary's REST API, and the workload
//! credential of file registries and its `tokenSha256`. It holds no logic that
//! does I/O, so anything may depend on it.

pub mod config;
pub mod join_token;
pub mod names;
pub mod rest;
pub mod workload_credential;

/// Generated protobuf types and tonic services.
pub mod pb {
    /// `isthmus.sync.v1`: agent join and discovery sync.
    pub mod sync {
        tonic::include_proto!("isthmus.sync.v1");
    }
    /// `isthmus.ca.v1`: workload certificate issuance.
    pub mod ca {
        tonic::include_proto!("isthmus.ca.v1");
    }
}

/// The default trust domain, as in Istio.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The default cluster DNS domain used in service FQDNs.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Well-known ports (see the port table in docs/architecture.md).
pub mod ports {
    pub const PRIMARY_GRPC: u16 = 15012;
    pub const PRIMARY_HTTP: u16 = 15014;
    pub const GATEWAY: u16 = 15443;
    pub const OUTBOUND: u16 = 15001;
    pub const INBOUND: u16 = 15006;
    /// The sidecar's admin listener (Envoy's, in Istio).
    pub const ADMIN: u16 = 15000;
    /// The sidecar's Prometheus listener (Envoy's, in Istio).
    pub const METRICS: u16 = 15090;
    /// The agent's admin listener (istio-agent's status port).
    pub const AGENT_ADMIN: u16 = 15020;
    /// The gateway's admin listener, clear of the sidecar's on one host.
    pub const GATEWAY_ADMIN: u16 = 15100;
    /// The gateway's Prometheus listener, clear of the sidecar's.
    pub const GATEWAY_METRICS: u16 = 15190;
}

/// xDS type URLs.
pub mod type_urls {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    pub const UPSTREAM_TLS: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
    pub const TLS_INSPECTOR: &str =
        "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
    pub const SNI_CLUSTER: &str =
        "type.googleapis.com/envoy.extensions.filters.network.sni_cluster.v3.SniCluster";
    pub const DOWNSTREAM_TLS: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
    pub const HTTP_CONNECTION_MANAGER: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    pub const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
    pub const TCP_PROXY: &str =
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
}
