//! The proxy's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub cluster: String,
    /// `route` for requests the app sent, `mirror` for copies.
    pub kind: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub tls_refused: Counter,
    pub plaintext_refused: Counter,
    pub inbound_connections: Counter,
    pub upstream: Family<UpstreamLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("isthmus_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        let tls_refused = Counter::default();
        let inbound_connections = Counter::default();
        let plaintext_refused = Counter::default();
        registry.register(
            "inbound_plaintext_refused",
            "Inbound plaintext connections refused: no port takes plaintext",
            plaintext_refused.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests by direction and status",
            requests.clone(),
        );
        registry.register(
            "inbound_tls_refused",
            "Inbound mTLS handshakes refused",
            tls_refused.clone(),
        );
        let upstream = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Outbound requests sent to each cluster, routed or mirrored",
            upstream.clone(),
        );
        registry.register(
            "inbound_connections",
            "Inbound TCP connections accepted",
            inbound_connections.clone(),
        );
        Self {
            registry,
            requests,
            tls_refused,
            plaintext_refused,
            inbound_connections,
            upstream,
        }
    }

    pub fn request(&self, direction: &'static str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels { direction, code })
            .inc();
    }

    pub fn upstream(&self, cluster: &str, kind: &'static str) {
        self.upstream
            .get_or_create(&UpstreamLabels {
                cluster: cluster.to_string(),
                kind,
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
