//! HA primaries: three replicas on one etcd (the `ha-primary` template).
//! The leader is SIGKILLed while config is being written and traffic flows:
//! leadership moves to another replica within the lease TTL, writes go on
//! through the survivors, every acknowledged write is still there, every
//! proxy and agent moves to a survivor, and no request fails.
//! Needs root for network namespaces (CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use isthmus_e2e::{Mesh, eventually};
use isthmus_topology::client::PrimaryClient;
use isthmus_topology::runner::{self, NetMode};
use tokio::sync::Mutex;

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const URL: &str = "http://echo.demo.svc.cluster.local:8080/";
/// The primaries' default `--leader-ttl-seconds`.
const LEASE_TTL: Duration = Duration::from_secs(10);
const PATIENCE: Duration = Duration::from_secs(60);

fn service_entry(i: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: ha-{i}, namespace: demo}}\nspec:\n  hosts: [ha-{i}.example.com]\n  location: MESH_EXTERNAL\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n"
    )
}

/// What the writer saw.
#[derive(Default)]
struct Writes {
    acked: BTreeSet<String>,
    acked_after_kill: usize,
    /// Attempts that failed and were retried on the next replica.
    retried: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_write_and_fails_no_request() {
    if !isthmus_e2e::can_run(
        "killing_the_leader_loses_no_write_and_fails_no_request",
        false,
    ) {
        return;
    }
    let mesh = Mesh::up_template("ha-primary", NetMode::Netns, NODE, None)
        .await
        .expect("mesh starts");
    let replicas: Vec<(String, PrimaryClient)> = mesh
        .state
        .primary_sockets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                format!("primary-{i}"),
                mesh.state.replica_client(s).unwrap(),
            )
        })
        .collect();
    assert_eq!(replicas.len(), 3);

    // Every replica agrees on one leader.
    let leader = eventually("a leader to be elected", PATIENCE, || async {
        let mut seen = BTreeSet::new();
        for (name, c) in &replicas {
            let view = c.leader().await.ok()?;
            assert_eq!(&view.replica, name, "each socket is its own replica");
            seen.insert(view.leader?);
        }
        (seen.len() == 1).then(|| seen.into_iter().next().unwrap())
    })
    .await;

    // All of east's traffic crosses networks: its own echo is relabelled
    // away, so requests go through west's gateway.
    mesh.relabel("east", "echo-east", "app", "off").unwrap();
    eventually("east's client to route echo to west", PATIENCE, || async {
        let (s, body) = mesh.get("proxy-client-east", "outbound", URL).await.ok()?;
        (s == 200 && body.contains("\"cluster\": \"west\"")).then_some(())
    })
    .await;

    // Steady traffic from east's client for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let ns = mesh.netns("proxy-client-east").map(str::to_string);
    let outbound = mesh.listener("proxy-client-east", "outbound");
    let killed = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, killed) = (stop.clone(), killed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let (mut sent, mut after_kill, mut failures) = (0u32, 0u32, Vec::new());
            let mut clusters = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                sent += 1;
                if killed.load(Ordering::Relaxed) {
                    after_kill += 1;
                }
                match isthmus_topology::probe::get(ns.as_deref(), outbound, URL).await {
                    Ok((200, body)) => {
                        for c in ["east", "west"] {
                            if body.contains(&format!("\"cluster\": \"{c}\"")) {
                                clusters.insert(c);
                            }
                        }
                    }
                    other => failures.push(format!("request {sent}: {other:?}")),
                }
            }
            (sent, after_kill, failures, clusters)
        })
    };

    // Config writes, round-robin over live replicas; a failed attempt is
    // retried on the next replica. Only a 2xx counts as acknowledged.
    let writes = Arc::new(Mutex::new(Writes::default()));
    let clients: Vec<PrimaryClient> = replicas.iter().map(|(_, c)| c.clone()).collect();
    let writer = {
        let (stop, writes, killed) = (stop.clone(), writes.clone(), killed.clone());
        tokio::spawn(async move {
            let mut target = 0usize;
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let client = &clients[target % clients.len()];
                match tokio::time::timeout(Duration::from_secs(5), client.apply(service_entry(i)))
                    .await
                {
                    Ok(Ok(_)) => {
                        let mut w = writes.lock().await;
                        w.acked.insert(format!("ha-{i}"));
                        if killed.load(Ordering::Relaxed) {
                            w.acked_after_kill += 1;
                        }
                        i += 1;
                    }
                    _ => writes.lock().await.retried += 1,
                }
                target += 1;
            }
        })
    };
    eventually("writes to be acknowledged", PATIENCE, || async {
        (writes.lock().await.acked.len() >= 30).then_some(())
    })
    .await;

    // Kill the leader.
    let leader_pid = mesh.component(&leader).pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leader_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed_at = Instant::now();
    killed.store(true, Ordering::Relaxed);
    let survivors: Vec<&(String, PrimaryClient)> =
        replicas.iter().filter(|(n, _)| *n != leader).collect();

    let new_leader = eventually(
        "a surviving replica to take over",
        LEASE_TTL + Duration::from_secs(10),
        || async {
            let view = survivors[0].1.leader().await.ok()?;
            view.leader.filter(|l| *l != leader)
        },
    )
    .await;
    let handover = killed_at.elapsed();
    eprintln!("leadership moved from {leader} to {new_leader} in {handover:?}");
    assert!(
        handover <= LEASE_TTL + Duration::from_secs(2),
        "handover took {handover:?}, longer than the lease TTL of {LEASE_TTL:?}"
    );
    assert!(survivors.iter().any(|(n, _)| *n == new_leader));
    let metrics = survivors
        .iter()
        .find(|(n, _)| *n == new_leader)
        .unwrap()
        .1
        .metrics()
        .await
        .unwrap();
    assert!(
        metrics.contains("isthmus_primary_leader 1"),
        "the new leader does not say it leads:\n{metrics}"
    );

    eventually(
        "writes to continue through the survivors",
        PATIENCE,
        || async { (writes.lock().await.acked_after_kill >= 30).then_some(()) },
    )
    .await;

    // Every proxy and gateway is connected to a survivor and synced, and
    // both agents report through one.
    let expected: BTreeSet<String> = mesh
        .state
        .components
        .iter()
        .filter_map(|c| match c.kind.as_str() {
            "proxy" => c
                .name
                .strip_prefix("proxy-")
                .map(|w| format!("sidecar~{}~{w}", c.cluster.as_deref().unwrap_or_default())),
            "gateway" => Some(format!(
                "gateway~{}",
                c.cluster.as_deref().unwrap_or_default()
            )),
            _ => None,
        })
        .collect();
    assert_eq!(expected.len(), 5);
    eventually(
        "every proxy to be synced with a surviving replica",
        PATIENCE,
        || async {
            let mut synced = BTreeSet::new();
            for (_, c) in &survivors {
                for p in c.proxies().await.ok()?.as_array()?.clone() {
                    let types = p["types"].as_object()?;
                    if !types.is_empty()
                        && types
                            .values()
                            .all(|t| t["nack"].is_null() && t["ackedVersion"] == t["sentVersion"])
                    {
                        synced.insert(p["nodeId"].as_str()?.to_string());
                    }
                }
            }
            (synced == expected).then_some(())
        },
    )
    .await;
    eventually(
        "both agents to report through a survivor",
        PATIENCE,
        || async {
            let clusters = survivors[0].1.list_clusters().await.ok()?;
            (clusters.len() == 2 && clusters.iter().all(|c| c.health == "healthy")).then_some(())
        },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let (sent, after_kill, failures, clusters) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed; first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        after_kill >= 200,
        "only {after_kill} requests were sent after the kill"
    );
    assert_eq!(
        clusters,
        BTreeSet::from(["west"]),
        "every request crossed to west"
    );

    // Every acknowledged write is there, read back through each survivor.
    let writes = writes.lock().await;
    for (name, c) in &survivors {
        let stored: BTreeSet<String> = c
            .list_config("serviceentries", None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.metadata.name)
            .collect();
        let lost: Vec<&String> = writes.acked.difference(&stored).collect();
        assert!(
            lost.is_empty(),
            "{} of {} acknowledged writes are missing on {name}: {lost:?}",
            lost.len(),
            writes.acked.len()
        );
    }
    eprintln!(
        "{} writes acknowledged ({} after the kill, {} attempts retried on another replica); {sent} requests ({after_kill} after the kill), 0 failed",
        writes.acked.len(),
        writes.acked_after_kill,
        writes.retried
    );
    assert!(!runner::alive(leader_pid));
}
