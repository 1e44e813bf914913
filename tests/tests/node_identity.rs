//! A proxy's node id and metadata must agree with the SVID on its xDS
//! stream: its cluster, network and locality are its cluster's, its
//! namespace and service account are its SVID's, and it cannot claim the
//! INSTANCE_IP of another identity's workload. A refused stream names the
//! claim, and a proxy whose claims hold keeps being served beside it.
//!
//! Also here, as the other way one proxy could hurt the rest: a proxy that
//! never ACKs cannot keep a push slot, so it cannot starve the others.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use isthmus_api::pb::sync::{Endpoint, Port, Service};
use isthmus_api::type_urls;
use isthmus_e2e::InProcessPrimary;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn node(id: &str, meta: &[(&str, &str)], locality: Option<(&str, &str)>) -> Node {
    let fields: HashMap<String, Value> = meta
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value {
                    kind: Some(Kind::StringValue(v.to_string())),
                },
            )
        })
        .collect();
    Node {
        id: id.into(),
        metadata: Some(Struct { fields }),
        locality: locality.map(|(region, zone)| Locality {
            region: region.into(),
            zone: zone.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Opens a Delta stream as `identity` and sends `node`: the first
/// response, or the status the stream was closed with.
async fn first_response(
    grpc: &str,
    tls: Arc<rustls::ClientConfig>,
    node: Node,
) -> (
    Result<Vec<String>, tonic::Status>,
    mpsc::Sender<DeltaDiscoveryRequest>,
) {
    let channel = isthmus_transport::tls_channel(grpc, tls).unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(node),
        type_url: type_urls::CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let result = async {
        let mut inbound = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let r = tokio::time::timeout(Duration::from_secs(20), inbound.message())
            .await
            .expect("an answer within 20 s")?
            .ok_or_else(|| tonic::Status::aborted("stream ended without an answer"))?;
        Ok(r.resources.into_iter().map(|r| r.name).collect())
    }
    .await;
    (result, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_claims_must_match_the_svid() {
    let p = InProcessPrimary::start().await;
    let endpoint = |workload: &str, address: &str, account: &str| Endpoint {
        workload: workload.into(),
        address: address.into(),
        inbound_port: 15006,
        service_account: account.into(),
        ready: true,
        labels: Default::default(),
    };
    // east: network net-east, region r, zone z.
    let east = p
        .reporting(
            "east",
            vec![Service {
                namespace: "demo".into(),
                name: "echo".into(),
                ports: vec![Port {
                    name: "http".into(),
                    port: 8080,
                    protocol: "http".into(),
                }],
                endpoints: vec![
                    endpoint("echo-0", "198.51.100.10", "echo"),
                    endpoint("client-0", "198.51.100.20", "client"),
                ],
            }],
        )
        .await;
    // demo/client's SVID.
    let tls = east.workload_tls("demo", "client");

    // Claims that hold: served.
    let honest = node(
        "sidecar~198.51.100.20~client-0.demo~demo.svc.cluster.local",
        &[
            ("CLUSTER_ID", "east"),
            ("NETWORK", "net-east"),
            ("NAMESPACE", "demo"),
            ("SERVICE_ACCOUNT", "client"),
            ("INSTANCE_IP", "198.51.100.20"),
        ],
        Some(("r", "z")),
    );
    let (served, _keep) = first_response(&p.grpc, tls.clone(), honest.clone()).await;
    let names = served.expect("a proxy whose claims hold is served");
    assert!(
        names.iter().any(|n| n.contains("echo.demo")),
        "its clusters come: {names:?}"
    );

    // Each false claim is refused, naming it.
    let cases: Vec<(&str, Node, &str)> = vec![
        (
            "another cluster",
            node("c", &[("CLUSTER_ID", "west")], None),
            "claims cluster \"west\"",
        ),
        (
            "another network",
            node("c", &[("NETWORK", "net-west")], None),
            "claims network \"net-west\"",
        ),
        (
            "another region",
            node("c", &[], Some(("elsewhere", "z"))),
            "claims region \"elsewhere\"",
        ),
        (
            "another namespace",
            node("c", &[("NAMESPACE", "prod")], None),
            "claims NAMESPACE \"prod\"",
        ),
        (
            "another service account",
            node("c", &[("SERVICE_ACCOUNT", "echo")], None),
            "claims SERVICE_ACCOUNT \"echo\"",
        ),
        (
            "another namespace in an Istio node id",
            node(
                "sidecar~198.51.100.20~client-0.prod~prod.svc.cluster.local",
                &[],
                None,
            ),
            "names namespace \"prod\"",
        ),
        (
            "another workload's address",
            node("c", &[("INSTANCE_IP", "198.51.100.10")], None),
            "INSTANCE_IP 198.51.100.10 is workload \"echo-0\"",
        ),
    ];
    for (what, claims, expected) in cases {
        let (refused, _) = first_response(&p.grpc, tls.clone(), claims).await;
        let status = refused.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains(expected),
            "{what}: {:?} should contain {expected:?}",
            status.message()
        );
    }

    // The honest proxy is still served after all that.
    let (again, _) = first_response(&p.grpc, tls, honest).await;
    assert!(again.is_ok(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_never_acks_does_not_starve_the_others() {
    // One push slot: whoever holds it blocks everyone else's pushes.
    let p = InProcessPrimary::start_with_push_slots(1).await;
    let east = p.reporting("east", vec![]).await;
    let tls = |account: &str| east.workload_tls("demo", account);
    // The first proxy takes the slot with its first response and never
    // ACKs it (its stream stays open: `_silent` keeps the sender alive).
    let (first, _silent) = first_response(&p.grpc, tls("silent"), node("silent", &[], None)).await;
    first.expect("the silent proxy gets its first response");
    // The next proxy is still served: the slot comes back when its holder
    // has not ACKed within the slot timeout.
    let (second, _keep) = first_response(&p.grpc, tls("patient"), node("patient", &[], None)).await;
    second.expect("a proxy behind a silent one is served once the slot times out");
}
