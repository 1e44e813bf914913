//! End-to-end: the multi-network layout in Linux network namespaces, where
//! only gateway addresses cross networks. Needs root (CI runs as root);
//! elsewhere each test prints why it skipped.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_e2e::{Mesh, eventually, mesh_request};
use isthmus_topology::netns;
use isthmus_topology::runner::NetMode;

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const URL: &str = "http://echo.demo.svc.cluster.local:8080/";
const SNI: &str = "outbound_.8080_._.echo.demo.svc.cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const ECHO_ID: &str = "spiffe://cluster.local/ns/demo/sa/echo";
const PATIENCE: Duration = Duration::from_secs(30);

fn can_run(test: &str) -> bool {
    isthmus_e2e::can_run(test, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_network_requests_go_through_the_destination_gateway() {
    if !can_run("cross_network_requests_go_through_the_destination_gateway") {
        return;
    }
    let mesh = Mesh::up(NetMode::Netns, NODE).await.expect("mesh starts");
    let east = mesh.netns("proxy-client-east").map(str::to_string);
    assert!(east.is_some() && east != mesh.netns("proxy-echo-west").map(str::to_string));

    // East's pods cannot reach west's sidecar directly.
    let west_inbound = mesh.listener("proxy-echo-west", "inbound");
    let direct = netns::connect(east.as_deref(), west_inbound).await;
    assert!(
        direct.is_err(),
        "east reached west's sidecar {west_inbound} without the gateway"
    );

    // Scale east's echo to zero: its workload no longer matches the service.
    mesh.relabel("east", "echo-east", "app", "scaled-to-zero")
        .expect("edit registry");
    let west_gateway = mesh.listener("gateway-west", "gateway").to_string();
    eventually(
        "east's client to see only west's gateway for echo",
        PATIENCE,
        || async {
            let (_, dump) = mesh
                .get("proxy-client-east", "admin", "/config_dump")
                .await
                .ok()?;
            let dump: serde_json::Value = serde_json::from_str(&dump).ok()?;
            let cluster = dump["clusters"]
                .as_array()?
                .iter()
                .find(|c| c["sni"] == SNI)?
                .clone();
            let eps: Vec<String> = cluster["priorities"][0]
                .as_array()?
                .iter()
                .filter_map(|e| e["address"].as_str().map(str::to_string))
                .collect();
            (eps == vec![west_gateway.clone()]).then_some(())
        },
    )
    .await;

    let before = routed(&mesh).await;
    for i in 0..20 {
        let (status, body) = mesh
            .get("proxy-client-east", "outbound", URL)
            .await
            .expect("request");
        assert_eq!(status, 200, "request {i}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("echo answers JSON");
        assert_eq!(
            answer["cluster"], "west",
            "request {i} answered by {}",
            answer["cluster"]
        );
        let xfcc = answer["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap_or_default();
        assert!(
            xfcc.contains(&format!("URI={CLIENT_ID}")),
            "echo saw XFCC {xfcc:?}"
        );
        assert!(
            xfcc.contains(&format!("By={ECHO_ID}")),
            "echo saw XFCC {xfcc:?}"
        );
    }
    let after = routed(&mesh).await;
    assert!(
        after > before,
        "west's gateway routed no new connection ({before} -> {after})"
    );

    // The TLS session runs end to end: through west's gateway, the client's
    // handshake completes with west's echo sidecar, whose certificate was
    // issued by west's intermediate.
    let client = mesh
        .workload_svid("east", "client-east")
        .await
        .expect("client certificate");
    let bundle = mesh.bundle().expect("bundle");
    let via_gateway = mesh_request(
        east.as_deref(),
        mesh.listener("gateway-west", "gateway"),
        SNI,
        &bundle,
        client.identity(),
    )
    .await
    .expect("mTLS through the gateway");
    assert_eq!(
        via_gateway.server_id.map(|i| i.to_string()).as_deref(),
        Some(ECHO_ID)
    );
    let west_intermediate =
        std::fs::read_to_string(mesh.dir().join("clusters/west/agent/intermediate.pem")).unwrap();
    let west_intermediate = isthmus_ca::pem::pem_der(&west_intermediate).unwrap();
    assert_eq!(
        via_gateway.server_chain.get(1),
        Some(&west_intermediate),
        "server chain is not west's"
    );
    let response = via_gateway.response.expect("response through the gateway");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // The gateway holds no private key: none in its arguments or open files.
    let gw = mesh.component("gateway-west");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", gw.pid)).expect("gateway cmdline");
    // argv[0] is the program itself, whose code mentions PEM labels.
    let exe = std::fs::read_link(format!("/proc/{}/exe", gw.pid)).expect("gateway exe");
    let mut files: Vec<std::path::PathBuf> = cmdline
        .split(|b| *b == 0)
        .skip(1)
        .map(|a| std::path::PathBuf::from(String::from_utf8_lossy(a).to_string()))
        .filter(|p| p.is_file())
        .collect();
    for fd in std::fs::read_dir(format!("/proc/{}/fd", gw.pid))
        .expect("gateway fds")
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path())
            && target.is_file()
            && target != exe
        {
            files.push(target);
        }
    }
    assert!(
        files.iter().any(|f| f.ends_with("gateway-token"))
            && files.iter().any(|f| f.ends_with("roots.pem")),
        "the gateway's credential and roots are among its files: {files:?}"
    );
    for f in files {
        let text = std::fs::read(&f).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        assert!(
            !text.contains("PRIVATE KEY"),
            "gateway has key material in {}",
            f.display()
        );
    }
}

/// Connections west's gateway has routed for the echo service.
async fn routed(mesh: &Mesh) -> f64 {
    mesh.counter(
        "gateway-west",
        "isthmus_gateway_connections_total",
        &["result=\"routed\"", SNI],
    )
    .await
    .expect("gateway metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_roots_and_unknown_snis_are_refused() {
    if !can_run("foreign_roots_and_unknown_snis_are_refused") {
        return;
    }
    let mesh = Mesh::up(NetMode::Netns, NODE).await.expect("mesh starts");
    let east = mesh.netns("proxy-client-east").map(str::to_string);
    let bundle = mesh.bundle().expect("bundle");
    let echo_east = mesh.listener("proxy-echo-east", "inbound");

    // Control: the client's real certificate is accepted by east's echo sidecar.
    let client = mesh
        .workload_svid("east", "client-east")
        .await
        .expect("client certificate");
    let ok = mesh_request(east.as_deref(), echo_east, SNI, &bundle, client.identity())
        .await
        .expect("mTLS with a mesh certificate");
    assert!(
        ok.response
            .as_deref()
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200")),
        "{:?}",
        ok.response
    );

    // A client whose certificate chains to another root (same identity,
    // same trust domain name) is refused by the inbound sidecar.
    let foreign_root = isthmus_ca::Authority::generate("cluster.local").expect("foreign root");
    let (csr, key) = isthmus_ca::issue::generate_csr("intruder").unwrap();
    let inter = foreign_root.sign_intermediate(&csr, "east").unwrap();
    let signer = isthmus_ca::Signer::from_pem(&inter.pem, &key).unwrap();
    let id = isthmus_ca::SpiffeId::parse(CLIENT_ID).unwrap();
    let (leaf, leaf_key) = signer
        .issue_workload(&id, Duration::from_secs(3600))
        .unwrap();
    let intruder =
        isthmus_transport::Identity::from_pem(&format!("{}{}", leaf.pem, inter.pem), &leaf_key)
            .unwrap();
    let refused_before = mesh
        .counter(
            "proxy-echo-east",
            "isthmus_proxy_inbound_tls_refused_total",
            &[],
        )
        .await
        .unwrap();
    let refused = mesh_request(east.as_deref(), echo_east, SNI, &bundle, intruder).await;
    let got_response = refused
        .as_ref()
        .is_ok_and(|r| r.response.as_deref().is_ok_and(|t| t.starts_with("HTTP/")));
    assert!(!got_response, "a foreign-root client got an HTTP response");
    eventually(
        "the sidecar to count the refused handshake",
        PATIENCE,
        || async {
            let n = mesh
                .counter(
                    "proxy-echo-east",
                    "isthmus_proxy_inbound_tls_refused_total",
                    &[],
                )
                .await
                .ok()?;
            (n > refused_before).then_some(())
        },
    )
    .await;

    // An unknown SNI at west's gateway is closed, and nothing is dialled:
    // west's only endpoint sees no new connection.
    let gateway = mesh.listener("gateway-west", "gateway");
    let unknown_before = mesh
        .counter(
            "gateway-west",
            "isthmus_gateway_connections_total",
            &["unknown_sni"],
        )
        .await
        .unwrap();
    let dials_before = mesh
        .counter(
            "proxy-echo-west",
            "isthmus_proxy_inbound_connections_total",
            &[],
        )
        .await
        .unwrap();
    let unknown = "outbound_.8080_._.nosuch.demo.svc.cluster.local";
    let attempt = mesh_request(
        east.as_deref(),
        gateway,
        unknown,
        &bundle,
        client.identity(),
    )
    .await;
    assert!(
        attempt.is_err(),
        "a handshake with unknown SNI {unknown} completed through the gateway"
    );
    eventually("the gateway to count the unknown SNI", PATIENCE, || async {
        let n = mesh
            .counter(
                "gateway-west",
                "isthmus_gateway_connections_total",
                &["unknown_sni"],
            )
            .await
            .ok()?;
        (n > unknown_before).then_some(())
    })
    .await;
    let dials_after = mesh
        .counter(
            "proxy-echo-west",
            "isthmus_proxy_inbound_connections_total",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        dials_before, dials_after,
        "the gateway dialled an endpoint for an unknown SNI"
    );

    // Bytes that are not TLS at all are closed the same way.
    let mut raw = netns::connect(east.as_deref(), gateway)
        .await
        .expect("connect to gateway");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, raw.read(&mut buf))
        .await
        .expect("gateway closes")
        .unwrap_or(0);
    assert_eq!(n, 0, "gateway answered plain HTTP");
}
