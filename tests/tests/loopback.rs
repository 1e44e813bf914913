//! End-to-end on loopback: the same mesh without network namespaces, so it
//! runs anywhere. Checks the request path, the cluster registry's view and
//! the `status` contract.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_e2e::{Mesh, eventually};
use isthmus_topology::client::PrimaryClient;
use isthmus_topology::runner::NetMode;

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_mesh_serves_requests_and_reports_its_clusters() {
    let mesh = Mesh::up(NetMode::Loopback, NODE)
        .await
        .expect("mesh starts");
    let (status, body) = mesh
        .get(
            "proxy-client-east",
            "outbound",
            "http://echo.demo.svc.cluster.local:8080/",
        )
        .await
        .expect("request");
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    // Same zone first: east's own echo answers while it is up.
    assert_eq!(answer["cluster"], "east");
    assert!(
        answer["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap_or_default()
            .contains("URI=spiffe://cluster.local/ns/demo/sa/client")
    );

    // A service that is not in the mesh gets a clear 404 from the sidecar.
    let (status, body) = mesh
        .get(
            "proxy-client-east",
            "outbound",
            "http://nosuch.demo.svc.cluster.local:8080/",
        )
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not a mesh service"), "{body}");

    let client = mesh.state.client().unwrap();
    let clusters = eventually(
        "both clusters healthy with their endpoints",
        Duration::from_secs(30),
        || async {
            let list = client.list_clusters().await.ok()?;
            let ok = list.len() == 2
                && list.iter().all(|c| {
                    c.health == "healthy" && c.endpoint_count == 1 && c.agent_version.is_some()
                });
            ok.then_some(list)
        },
    )
    .await;
    assert_eq!(clusters[0].name, "east");
    assert_eq!(clusters[0].network, "net-east");

    // Over TCP with only the URL and the admin token: the token pins the root.
    let token = std::fs::read_to_string(&mesh.state.admin_token_file).unwrap();
    let remote = PrimaryClient::new(&mesh.state.primary_api, &token, None).unwrap();
    assert_eq!(remote.list_clusters().await.unwrap().len(), 2);
    let wrong = PrimaryClient::new(
        &mesh.state.primary_api,
        &token.replace("ist1.", "ist1.x"),
        None,
    )
    .unwrap();
    let err = wrong
        .list_clusters()
        .await
        .expect_err("a wrong token is refused")
        .to_string();
    assert!(
        err.contains("401") && err.contains("admin token is not valid"),
        "{err}"
    );

    // Every component is recorded with the fields `status -o json` prints.
    let kinds: Vec<&str> = mesh
        .state
        .components
        .iter()
        .map(|c| c.kind.as_str())
        .collect();
    for kind in ["primary", "agent", "gateway", "proxy", "app"] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    assert!(
        mesh.state
            .components
            .iter()
            .all(|c| c.pid > 0 && !c.listeners.is_empty())
    );

    // Deregistering west removes its endpoints from east's client.
    client.deregister_cluster("west").await.unwrap();
    eventually(
        "west's gateway to leave east's client config",
        Duration::from_secs(30),
        || async {
            let (_, dump) = mesh
                .get("proxy-client-east", "admin", "/config_dump")
                .await
                .ok()?;
            (!dump.contains(&mesh.listener("gateway-west", "gateway").to_string())).then_some(())
        },
    )
    .await;
}
