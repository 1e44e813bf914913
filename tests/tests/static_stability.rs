//! Static stability: with every primary down, traffic between existing
//! workloads keeps flowing on the proxies' last config, and agents keep
//! issuing certificates; when the primary returns, everything converges.
//! Needs root for network namespaces (CI runs as root).

use std::time::Duration;

use isthmus_e2e::{Mesh, eventually};
use isthmus_topology::runner::{self, NetMode};

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const URL: &str = "http://echo.demo.svc.cluster.local:8080/";
const PATIENCE: Duration = Duration::from_secs(30);
/// The outage lasts for this many requests, one every 20 ms: 60 s.
const OUTAGE_REQUESTS: u32 = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_keeps_working_while_the_primary_is_down() {
    if !isthmus_e2e::can_run("the_mesh_keeps_working_while_the_primary_is_down", false) {
        return;
    }
    let mut mesh = Mesh::up(NetMode::Netns, NODE).await.expect("mesh starts");
    // Half the traffic crosses networks: west's echo is reached via its gateway.
    mesh.relabel("east", "echo-east", "app", "off").unwrap();
    eventually("east's client to route echo to west", PATIENCE, || async {
        let (s, body) = mesh.get("proxy-client-east", "outbound", URL).await.ok()?;
        (s == 200 && body.contains("\"cluster\": \"west\"")).then_some(())
    })
    .await;

    let primary = mesh.component("primary").pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(primary as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the primary to be gone", PATIENCE, || async {
        (!runner::alive(primary)).then_some(())
    })
    .await;

    // Steady requests for the whole outage.
    let ns = mesh.netns("proxy-client-east").map(str::to_string);
    let outbound = mesh.listener("proxy-client-east", "outbound");
    let load = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut failures = Vec::new();
        for i in 0..OUTAGE_REQUESTS {
            tick.tick().await;
            match isthmus_topology::probe::get(ns.as_deref(), outbound, URL).await {
                Ok((200, _)) => {}
                other => failures.push(format!("request {i}: {other:?}")),
            }
        }
        failures
    });

    // A workload that appears during the outage gets its certificate from
    // its cluster's agent alone.
    mesh.add_workload("east", "late", "198.51.100.40").unwrap();
    let svid = eventually(
        "the agent to certify the new workload",
        PATIENCE,
        || async { mesh.workload_svid("east", "late").await.ok() },
    )
    .await;
    assert_eq!(svid.id.as_str(), "spiffe://cluster.local/ns/demo/sa/late");

    let failures = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {OUTAGE_REQUESTS} requests failed during the outage; first: {:?}",
        failures.len(),
        failures.first()
    );

    // The primary returns: agents resync, and proxies learn the new service.
    runner::restart(&mut mesh.state, "primary", std::path::Path::new(NODE))
        .await
        .unwrap();
    eventually(
        "east's client to learn the service added during the outage",
        Duration::from_secs(60),
        || async {
            let (_, dump) = mesh
                .get("proxy-client-east", "admin", "/config_dump")
                .await
                .ok()?;
            dump.contains("outbound|8080||late.demo.svc.cluster.local")
                .then_some(())
        },
    )
    .await;
    // Agents reconnect with backoff; both come back healthy.
    let client = mesh.state.client().unwrap();
    eventually(
        "both agents to resync with the returned primary",
        Duration::from_secs(60),
        || async {
            let clusters = client.list_clusters().await.ok()?;
            (clusters.len() == 2 && clusters.iter().all(|c| c.health == "healthy")).then_some(())
        },
    )
    .await;
    let (status, body) = mesh
        .get("proxy-client-east", "outbound", URL)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}
