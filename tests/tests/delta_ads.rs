//! Delta ADS on the wire: after the first full exchange, an endpoint
//! change sends only the changed ClusterLoadAssignment, and a removed
//! service is sent as a removal, not as a new full set.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use isthmus_api::pb::sync::{
    AgentMessage, Delta, Endpoint, Port, Service, ServiceRef, agent_message,
};
use isthmus_api::type_urls;
use isthmus_e2e::InProcessPrimary;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const ECHO: &str = "outbound|8080||echo.demo.svc.cluster.local";
const OTHER: &str = "outbound|8080||other.demo.svc.cluster.local";

fn service(name: &str, addresses: &[&str]) -> Service {
    Service {
        namespace: "demo".into(),
        name: name.into(),
        ports: vec![Port {
            name: "http".into(),
            port: 8080,
            protocol: "http".into(),
        }],
        endpoints: addresses
            .iter()
            .map(|a| Endpoint {
                workload: format!("{name}-{a}"),
                address: a.to_string(),
                inbound_port: 15006,
                service_account: name.into(),
                ready: true,
                labels: Default::default(),
            })
            .collect(),
    }
}

async fn next(inbound: &mut tonic::Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(20), inbound.message())
        .await
        .expect("a response within 20s")
        .expect("stream healthy")
        .expect("stream open")
}

fn ack(r: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_change_sends_only_the_changed_assignment() {
    let p = InProcessPrimary::start().await;
    let east = p
        .reporting(
            "east",
            vec![
                service("echo", &["198.51.100.10"]),
                service("other", &["198.51.100.11"]),
            ],
        )
        .await;
    let agent = &east.agent;
    let send = |kind| AgentMessage { kind: Some(kind) };

    // A sidecar of east, over real gRPC with its SVID.
    let tls = east.workload_tls("demo", "client");
    let channel = isthmus_transport::tls_channel(&p.grpc, tls).unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut inbound = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "sidecar~east~client".into(),
            ..Default::default()
        }),
        type_url: type_urls::CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cds = next(&mut inbound).await;
    assert_eq!(cds.type_url, type_urls::CLUSTER);
    let mut names: Vec<&str> = cds.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, [ECHO, OTHER]);
    tx.send(ack(&cds)).await.unwrap();
    // Subscribe one assignment, then the other, as a client does when
    // clusters arrive in batches: each subscription brings its own.
    for name in [ECHO, OTHER] {
        tx.send(DeltaDiscoveryRequest {
            type_url: type_urls::ENDPOINT.into(),
            resource_names_subscribe: vec![name.into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let eds = next(&mut inbound).await;
        assert_eq!(eds.type_url, type_urls::ENDPOINT);
        let got: Vec<&str> = eds.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            got,
            [name],
            "a new subscription brings exactly that assignment"
        );
        tx.send(ack(&eds)).await.unwrap();
    }

    // echo gains an endpoint: exactly one assignment comes, echo's, whole.
    agent
        .send(send(agent_message::Kind::Delta(Delta {
            cluster: "east".into(),
            upserts: vec![service("echo", &["198.51.100.10", "198.51.100.12"])],
            removed: vec![],
        })))
        .await
        .unwrap();
    let change = next(&mut inbound).await;
    assert_eq!(
        change.type_url,
        type_urls::ENDPOINT,
        "only endpoints changed; got {}",
        change.type_url
    );
    assert_eq!(
        change.resources.len(),
        1,
        "{:?}",
        change.resources.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    assert_eq!(change.resources[0].name, ECHO);
    assert!(change.removed_resources.is_empty());
    let cla = ClusterLoadAssignment::decode(
        change.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    let count: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
    assert_eq!(count, 2);
    tx.send(ack(&change)).await.unwrap();

    // other goes away: its cluster and assignment are removed by name.
    agent
        .send(send(agent_message::Kind::Delta(Delta {
            cluster: "east".into(),
            upserts: vec![],
            removed: vec![ServiceRef {
                namespace: "demo".into(),
                name: "other".into(),
            }],
        })))
        .await
        .unwrap();
    let mut removals = Vec::new();
    for _ in 0..2 {
        let r = next(&mut inbound).await;
        assert!(
            r.resources.is_empty(),
            "a removal resent resources: {:?}",
            r.resources.iter().map(|r| &r.name).collect::<Vec<_>>()
        );
        removals.push((r.type_url.clone(), r.removed_resources.clone()));
        tx.send(ack(&r)).await.unwrap();
    }
    removals.sort();
    assert_eq!(
        removals,
        [
            (type_urls::CLUSTER.to_string(), vec![OTHER.to_string()]),
            (type_urls::ENDPOINT.to_string(), vec![OTHER.to_string()]),
        ]
    );
}
