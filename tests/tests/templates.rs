//! The one-network templates, in network namespaces. `single-cluster` runs
//! a client and echo with no gateway. `flat-multicluster` runs two clusters
//! on one network: east's client is served by east's echo, west's echo is
//! reached directly (pod to pod, no gateway) at a lower priority, and the
//! failover drill moves traffic there and back. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_e2e::{Mesh, can_run, cluster_of};
use isthmus_topology::runner::NetMode;

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const PATIENCE: Duration = Duration::from_secs(60);
const URL: &str = "http://echo.demo.svc.cluster.local:8080/";

/// Starts a one-network template and checks what both share: no gateway
/// runs, east's client is answered by east's echo, and all `proxies` ACK.
async fn up_one_network(template: &str, proxies: usize) -> Mesh {
    let mesh = Mesh::up_template(template, NetMode::Netns, NODE, None)
        .await
        .expect("mesh starts");
    let kinds: Vec<&str> = mesh
        .state
        .components
        .iter()
        .map(|c| c.kind.as_str())
        .collect();
    assert!(
        !kinds.contains(&"gateway"),
        "one network needs no gateway: {kinds:?}"
    );
    let (s, body) = mesh
        .get("proxy-client-east", "outbound", URL)
        .await
        .unwrap();
    assert_eq!((s, cluster_of(&body).as_str()), (200, "east"), "{body}");
    mesh.wait_all_synced(proxies, PATIENCE).await;
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_cluster_serves_without_a_gateway() {
    if !can_run("single_cluster_serves_without_a_gateway", false) {
        return;
    }
    up_one_network("single-cluster", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_multicluster_reaches_the_other_cluster_pod_to_pod() {
    if !can_run(
        "flat_multicluster_reaches_the_other_cluster_pod_to_pod",
        false,
    ) {
        return;
    }
    let mesh = up_one_network("flat-multicluster", 3).await;
    // West's echo is one of the client's endpoints at its own pod address
    // (its sidecar's inbound listener), a priority below east's.
    let dump = isthmus_topology::inspect::proxy_config(
        mesh.dir(),
        "client-east",
        isthmus_topology::inspect::ProxyConfigKind::Endpoints,
    )
    .await
    .unwrap();
    let echo = dump["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "outbound|8080||echo.demo.svc.cluster.local")
        .unwrap();
    let west_inbound = mesh.listener("proxy-echo-west", "inbound").to_string();
    assert_eq!(
        echo["priorities"][1][0]["address"],
        west_inbound.as_str(),
        "{echo}"
    );
    // The drill: east's echo dies, west answers directly, east comes back.
    let report = isthmus_topology::drill::run(
        mesh.dir(),
        &isthmus_topology::drill::Drill {
            service: "echo.demo".into(),
            cluster: "east".into(),
            from: None,
            rate: 50,
            patience: PATIENCE,
            exe: NODE.into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(
        report.answered_by.keys().collect::<Vec<_>>(),
        ["west"],
        "{report:?}"
    );
}
