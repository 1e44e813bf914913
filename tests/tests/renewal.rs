//! Certificate renewal with a short lifetime (20 s): sidecars renew at
//! about half-life with no failed request, and with their agent gone they
//! keep serving on the certificates they hold until those expire.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use isthmus_e2e::{Mesh, eventually, now_unix};
use isthmus_topology::runner::{self, NetMode};

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const URL: &str = "http://echo.demo.svc.cluster.local:8080/";
const TTL: u64 = 20;

async fn not_after(mesh: &Mesh, proxy: &str) -> i64 {
    let (_, dump) = mesh.get(proxy, "admin", "/config_dump").await.unwrap();
    serde_json::from_str::<serde_json::Value>(&dump).unwrap()["certificateNotAfter"]
        .as_i64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_at_half_life_and_outlive_their_agent() {
    let mesh = Mesh::up_with(NetMode::Loopback, NODE, Some(TTL))
        .await
        .expect("mesh starts");

    // Requests every 20 ms until the client has renewed twice (bounded).
    let mut seen = BTreeSet::from([not_after(&mesh, "proxy-client-east").await]);
    let mut failures = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    for i in 0..3000 {
        pace.tick().await;
        let (status, body) = mesh
            .get("proxy-client-east", "outbound", URL)
            .await
            .unwrap();
        if status != 200 {
            failures.push(format!("request {i}: {status} {body}"));
        }
        if i % 25 == 0 {
            seen.insert(not_after(&mesh, "proxy-client-east").await);
            if seen.len() >= 3 {
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} requests failed during renewal; first: {:?}",
        failures.len(),
        failures.first()
    );
    let expiries: Vec<i64> = seen.into_iter().collect();
    assert!(
        expiries.len() >= 3,
        "the client renewed fewer than twice: {expiries:?}"
    );
    for pair in expiries.windows(2) {
        let gap = pair[1] - pair[0];
        // Renewed before the old one expired, and not in a loop.
        assert!(
            gap < TTL as i64 && gap >= 5,
            "renewals {gap}s apart with a {TTL}s lifetime: {expiries:?}"
        );
    }

    // The agent goes away; the sidecars keep serving on what they hold.
    let agent = mesh.component("agent-east").pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the agent to be gone", Duration::from_secs(10), || async {
        (!runner::alive(agent)).then_some(())
    })
    .await;
    let valid_until = not_after(&mesh, "proxy-client-east")
        .await
        .min(not_after(&mesh, "proxy-echo-east").await);
    let mut served = 0;
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    while now_unix() as i64 + 2 < valid_until {
        pace.tick().await;
        let (status, body) = mesh
            .get("proxy-client-east", "outbound", URL)
            .await
            .unwrap();
        assert_eq!(status, 200, "with the agent down, before expiry: {body}");
        served += 1;
    }
    assert!(
        served > 0,
        "no request fell inside the certificates' remaining lifetime"
    );
}
