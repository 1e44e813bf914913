//! Sidecar scoping: a proxy gets the clusters of the services its
//! namespace's Sidecar names in `egress.hosts`, and nothing else; a proxy of
//! a namespace without one gets every service; and removing the Sidecar
//! brings the rest to the proxies it scoped, on the same stream.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use isthmus_api::pb::sync::{Endpoint, Port, Service};
use isthmus_api::type_urls;
use isthmus_e2e::InProcessPrimary;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const SIDECAR: &str = r#"
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: demo}
spec:
  egress: [{hosts: ["./echo.demo.svc.cluster.local", "prod/*"]}]
"#;

fn service(namespace: &str, name: &str, address: &str) -> Service {
    Service {
        namespace: namespace.into(),
        name: name.into(),
        ports: vec![Port {
            name: "http".into(),
            port: 8080,
            protocol: "http".into(),
        }],
        endpoints: vec![Endpoint {
            workload: format!("{name}-0"),
            address: address.into(),
            inbound_port: 15006,
            service_account: name.into(),
            ready: true,
            labels: Default::default(),
        }],
    }
}

fn cluster(service: &str) -> String {
    format!("outbound|8080||{service}.svc.cluster.local")
}

/// A Delta stream for clusters: the sender (to ACK) and the responses.
struct Proxy {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    inbound: tonic::Streaming<DeltaDiscoveryResponse>,
    clusters: BTreeSet<String>,
}

impl Proxy {
    async fn connect(p: &InProcessPrimary, tls: std::sync::Arc<rustls::ClientConfig>) -> Self {
        let channel = isthmus_transport::tls_channel(&p.grpc, tls).unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "scoped".into(),
                ..Default::default()
            }),
            type_url: type_urls::CLUSTER.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let inbound = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut proxy = Proxy {
            tx,
            inbound,
            clusters: BTreeSet::new(),
        };
        proxy.next().await;
        proxy
    }

    /// Applies the next response to what the proxy holds, and ACKs it.
    async fn next(&mut self) {
        let r = tokio::time::timeout(Duration::from_secs(20), self.inbound.message())
            .await
            .expect("a response within 20 s")
            .expect("stream healthy")
            .expect("stream open");
        for name in &r.removed_resources {
            self.clusters.remove(name);
        }
        self.clusters
            .extend(r.resources.iter().map(|r| r.name.clone()));
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    fn outbound(&self) -> Vec<&str> {
        self.clusters
            .iter()
            .filter(|c| c.starts_with("outbound|"))
            .map(String::as_str)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_sees_only_the_services_its_scope_names() {
    let p = InProcessPrimary::start().await;
    let east = p
        .reporting(
            "east",
            vec![
                service("demo", "echo", "198.51.100.10"),
                service("demo", "other", "198.51.100.11"),
                service("prod", "db", "198.51.100.12"),
            ],
        )
        .await;
    p.api.apply(SIDECAR.to_string()).await.unwrap();
    let tls = |ns: &str, sa: &str| east.workload_tls(ns, sa);

    // demo's Sidecar: echo (its own namespace, by name) and all of prod.
    let mut scoped = Proxy::connect(&p, tls("demo", "client")).await;
    assert_eq!(
        scoped.outbound(),
        [cluster("db.prod"), cluster("echo.demo")],
        "demo/other is out of scope"
    );
    // A namespace without a Sidecar sees every service.
    let open = Proxy::connect(&p, tls("prod", "app")).await;
    assert_eq!(
        open.outbound(),
        [
            cluster("db.prod"),
            cluster("echo.demo"),
            cluster("other.demo")
        ]
    );
    // Without the Sidecar, the scoped proxy gets the rest on its stream.
    p.api
        .delete_config("sidecars", "demo", "default")
        .await
        .unwrap();
    while scoped.outbound().len() < 3 {
        scoped.next().await;
    }
    assert_eq!(
        scoped.outbound(),
        [
            cluster("db.prod"),
            cluster("echo.demo"),
            cluster("other.demo")
        ]
    );
}
