//! Cross-cluster failover under load, in network namespaces: east's echo
//! (app and sidecar) dies without leaving the registry. Outlier detection,
//! which the primary turns on by itself, ejects it; retries carry the
//! requests that hit it; traffic moves to west through west's gateway with
//! no client-visible error, and returns when east is back. The same test runs
//! with isthmus-proxy and isthmus-gateway, and with Envoy 1.40 as every
//! sidecar and gateway. Needs root.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use isthmus_e2e::{Mesh, cluster_of, eventually};
use isthmus_topology::runner::{self, DataPlane, MeshState, NetMode};

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const URL: &str = "http://echo.demo.svc.cluster.local:8080/";
const REQUESTS: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_fails_over_to_west_without_errors_and_comes_back() {
    failover(DataPlane::Isthmus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_fails_over_with_envoy_as_every_proxy() {
    failover(DataPlane::Envoy).await;
}

/// `isthmusctl failover drill` on a live local mesh: it kills east's echo
/// (app and sidecar) under load, sees every request answered by west, and
/// sees east answer again once restarted. Bad drills are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failover_drill_reports_failover_and_return() {
    if !isthmus_e2e::can_run("the_failover_drill_reports_failover_and_return", false) {
        return;
    }
    let mesh = Mesh::up(NetMode::Netns, NODE).await.expect("mesh starts");
    let drill = |service: &str, cluster: &str| isthmus_topology::drill::Drill {
        service: service.into(),
        cluster: cluster.into(),
        from: None,
        rate: 50,
        patience: Duration::from_secs(60),
        exe: NODE.into(),
    };
    let report = isthmus_topology::drill::run(mesh.dir(), &drill("echo.demo:8080", "east"))
        .await
        .unwrap();
    assert_eq!(report.from, "client-east");
    assert_eq!(report.stopped, ["echo-east", "proxy-echo-east"]);
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(
        report.answered_by.keys().collect::<Vec<_>>(),
        ["west"],
        "{report:?}"
    );
    assert!(report.requests >= 20, "{report:?}");
    // The drill left east running and serving.
    for name in ["echo-east", "proxy-echo-east"] {
        let pid = MeshState::load(mesh.dir())
            .unwrap()
            .component(name)
            .unwrap()
            .pid;
        assert!(runner::alive(pid), "{name} runs again");
    }
    for (service, cluster, error) in [
        ("echo.nope", "east", "cluster east has no service echo.nope"),
        ("echo.demo:9", "east", "service echo.demo has no port 9"),
        // Short names are taken (`echo` would be echo.demo); an unknown one
        // is refused by name.
        ("nope", "east", "nope"),
        (
            "echo.demo",
            "north",
            "cluster \"north\" has no file registry",
        ),
    ] {
        let e = isthmus_topology::drill::run(mesh.dir(), &drill(service, cluster))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(error), "{service} in {cluster}: {e}");
    }
}

async fn failover(data_plane: DataPlane) {
    if !isthmus_e2e::can_run(
        &format!("failover ({data_plane:?})"),
        data_plane == DataPlane::Envoy,
    ) {
        return;
    }
    let mut mesh = Mesh::up_data_plane(
        "multi-network",
        NetMode::Netns,
        NODE,
        None,
        data_plane,
        vec![],
    )
    .await
    .expect("mesh starts");
    let (status, body) = mesh
        .get("proxy-client-east", "outbound", URL)
        .await
        .unwrap();
    assert_eq!(
        (status, cluster_of(&body).as_str()),
        (200, "east"),
        "same zone first"
    );
    let (_, dump) = mesh
        .get("proxy-client-east", "admin", "/config_dump?include_eds")
        .await
        .unwrap();
    assert!(
        // East's sidecar directly, and west's gateway.
        dump.contains("198.51.100.10") && dump.contains("192.0.2.11"),
        "{dump}"
    );

    // Steady load, one request every 20 ms.
    let ns = mesh.netns("proxy-client-east").map(str::to_string);
    let outbound = mesh.listener("proxy-client-east", "outbound");
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let load = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut results = Vec::with_capacity(REQUESTS);
        for _ in 0..REQUESTS {
            tick.tick().await;
            let r = isthmus_topology::probe::get(ns.as_deref(), outbound, URL).await;
            results.push(match r {
                Ok((status, body)) => (status, cluster_of(&body)),
                Err(e) => (0, e.to_string()),
            });
            counter.fetch_add(1, Ordering::Relaxed);
        }
        results
    });

    // A sixth of the way in, east's echo dies: app and sidecar.
    eventually("the load to get going", Duration::from_secs(30), || async {
        (sent.load(Ordering::Relaxed) >= REQUESTS / 6).then_some(())
    })
    .await;
    for name in ["proxy-echo-east", "echo-east"] {
        let pid = mesh.component(name).pid;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    let results = load.await.unwrap();
    let failed: Vec<_> = results
        .iter()
        .enumerate()
        .filter(|(_, (s, _))| *s != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {REQUESTS} requests failed; first: {:?}",
        failed.len(),
        failed.first()
    );
    let tail: Vec<&str> = results[REQUESTS - 100..]
        .iter()
        .map(|(_, c)| c.as_str())
        .collect();
    assert!(
        tail.iter().all(|c| *c == "west"),
        "after the failover every answer comes from west: {tail:?}"
    );

    // East returns; once its ejection ends, traffic returns to it.
    for name in ["echo-east", "proxy-echo-east"] {
        runner::restart(&mut mesh.state, name, std::path::Path::new(NODE))
            .await
            .unwrap();
    }
    eventually(
        "traffic to come back to east",
        Duration::from_secs(60),
        || async {
            let (s, body) = mesh.get("proxy-client-east", "outbound", URL).await.ok()?;
            (s == 200 && cluster_of(&body) == "east").then_some(())
        },
    )
    .await;
}
