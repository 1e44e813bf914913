//! Cluster registration security against a primary running in-process on
//! loopback: join tokens are single-use, expiring and bound to their
//! cluster; an agent speaks only for its own cluster; a deregistered
//! cluster's agent is refused. A CLI or agent pointed at the wrong port is
//! told what it reached and what it needs.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_api::pb::sync::{AgentMessage, Delta, ServiceRef, Snapshot, agent_message};
use isthmus_ca::Signer;
use isthmus_e2e::{InProcessPrimary as Primary, eventually, now_unix};
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(30);

fn snapshot(cluster: &str, service: &str) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Snapshot(Snapshot {
            cluster: cluster.into(),
            services: vec![isthmus_api::pb::sync::Service {
                namespace: "demo".into(),
                name: service.into(),
                ports: vec![isthmus_api::pb::sync::Port {
                    name: "http".into(),
                    port: 8080,
                    protocol: "http".into(),
                }],
                endpoints: vec![isthmus_api::pb::sync::Endpoint {
                    workload: "w".into(),
                    address: "198.51.100.20".into(),
                    inbound_port: 15006,
                    service_account: "echo".into(),
                    ready: true,
                    labels: Default::default(),
                }],
            }],
        })),
    }
}

/// The next reply that is not the opening trust-bundle message.
async fn reply(
    inbound: &mut tonic::Streaming<isthmus_api::pb::sync::PrimaryMessage>,
) -> Result<isthmus_api::pb::sync::PrimaryMessage, tonic::Status> {
    loop {
        let msg = tokio::time::timeout(PATIENCE, inbound.message())
            .await
            .expect("a reply")?
            .expect("stream open");
        if msg.trust_bundle_pem.is_empty() {
            return Ok(msg);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_and_agent_streams_are_held_to_their_cluster() {
    let p = Primary::start().await;
    let (east_token, _) = p.register("east", 0).await;
    let (west_token, _) = p.register("west", 0).await;

    // A malformed token, a wrong secret, and another cluster's token.
    let err = p.join("east", "hello").await.expect_err("malformed");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let wrong = format!("ist1.{}.{}", "A".repeat(43), p.root_fp);
    let err = p.join("east", &wrong).await.expect_err("wrong secret");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("not valid"), "{err}");
    let err = p
        .join("east", &west_token)
        .await
        .expect_err("west's token for east");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = p
        .join("nosuch", &east_token)
        .await
        .expect_err("unknown cluster");
    assert_eq!(err.code(), Code::PermissionDenied);

    // The right token works once.
    let (east, east_key) = p.join("east", &east_token).await.expect("east joins");
    let err = p.join("east", &east_token).await.expect_err("token reuse");
    assert!(err.message().contains("already used"), "{err}");
    let (west, west_key) = p.join("west", &west_token).await.expect("west joins");

    // An expired token is refused (wait for the wall clock to pass expiry).
    let (late_token, expires) = p.register("late", 1).await;
    eventually("the join token's expiry to pass", PATIENCE, || async {
        (now_unix() > expires).then_some(())
    })
    .await;
    let err = p
        .join("late", &late_token)
        .await
        .expect_err("expired token");
    assert!(err.message().contains("expired"), "{err}");
    // The leader's sweep then removes the unused token from the store.
    let late = eventually(
        "the leader to sweep the expired token",
        PATIENCE,
        || async {
            let clusters = p.api.list_clusters().await.ok()?;
            clusters
                .into_iter()
                .find(|c| c.name == "late" && c.health == "token-expired")
        },
    )
    .await;
    assert_eq!(late.endpoint_count, 0);
    let err = p.join("late", &late_token).await.expect_err("swept token");
    assert!(err.message().contains("expired unused"), "{err}");

    // East's agent reports its own services; they land under east only.
    let east_signer = Signer::from_pem(&east.intermediate_pem, &east_key).unwrap();
    let west_signer = Signer::from_pem(&west.intermediate_pem, &west_key).unwrap();
    let (tx, mut inbound) = p
        .stream(&east_signer, &east.intermediate_pem, &east.trust_bundle_pem)
        .await
        .expect("east streams");
    tx.send(snapshot("east", "echo")).await.unwrap();
    let ok = reply(&mut inbound).await.expect("reply");
    assert!(ok.error.is_empty() && ok.applied_revision > 0, "{ok:?}");

    // Deltas: an added service, then a removed one.
    let extra = match snapshot("east", "extra").kind {
        Some(agent_message::Kind::Snapshot(snap)) => snap.services,
        _ => unreachable!(),
    };
    let delta = |upserts, removed| AgentMessage {
        kind: Some(agent_message::Kind::Delta(Delta {
            cluster: "east".into(),
            upserts,
            removed,
        })),
    };
    let endpoints = |name: &'static str| {
        let api = &p.api;
        async move {
            api.list_clusters()
                .await
                .unwrap()
                .into_iter()
                .find(|c| c.name == name)
                .map(|c| c.endpoint_count)
        }
    };
    tx.send(delta(extra, vec![])).await.unwrap();
    assert!(reply(&mut inbound).await.unwrap().error.is_empty());
    eventually("the added service to count", PATIENCE, || async {
        (endpoints("east").await == Some(2)).then_some(())
    })
    .await;
    let echo = ServiceRef {
        namespace: "demo".into(),
        name: "echo".into(),
    };
    tx.send(delta(vec![], vec![echo])).await.unwrap();
    assert!(reply(&mut inbound).await.unwrap().error.is_empty());
    eventually("the removed service to leave", PATIENCE, || async {
        (endpoints("east").await == Some(1)).then_some(())
    })
    .await;

    // East's agent trying to write west's entries is refused and audited.
    tx.send(snapshot("west", "evil")).await.unwrap();
    let refused = reply(&mut inbound).await.expect("reply");
    assert!(refused.error.contains("belongs to \"east\""), "{refused:?}");
    let mut foreign = delta(vec![], vec![]);
    if let Some(agent_message::Kind::Delta(d)) = &mut foreign.kind {
        d.cluster = "west".into();
    }
    tx.send(foreign).await.unwrap();
    let refused = reply(&mut inbound).await.expect("reply");
    assert!(
        refused.error.contains("belongs to \"east\""),
        "a delta for west: {refused:?}"
    );
    let clusters = p.api.list_clusters().await.unwrap();
    let count = |name: &str| {
        clusters
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.endpoint_count)
    };
    assert_eq!((count("east"), count("west")), (Some(1), Some(0)));
    let metrics = p.api.metrics().await.unwrap();
    assert!(
        isthmus_e2e::counter_value(
            &metrics,
            "isthmus_primary_sync_refusals_total",
            &["cluster=\"east\""]
        ) >= 1.0,
        "{metrics}"
    );

    // A chain that pairs east's leaf with west's intermediate fails the
    // TLS handshake: there is no path to the root.
    let err = p
        .stream(&east_signer, &west.intermediate_pem, &east.trust_bundle_pem)
        .await
        .expect_err("forged chain");
    assert!(
        matches!(
            err.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown
        ),
        "{err}"
    );
    // Appending east's real intermediate after west's lets TLS find a path,
    // but the primary checks the leaf against the intermediate that names
    // the cluster, and refuses.
    let sneaky = format!("{}{}", west.intermediate_pem, east.intermediate_pem);
    let err = p
        .stream(&east_signer, &sneaky, &east.trust_bundle_pem)
        .await
        .expect_err("forged chain with the real intermediate appended");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    // West's own agent is fine.
    p.stream(&west_signer, &west.intermediate_pem, &west.trust_bundle_pem)
        .await
        .expect("west streams");

    // Deregistering east removes its endpoints and refuses its agent.
    p.api.deregister_cluster("east").await.unwrap();
    let err = eventually("east's agent to be refused", PATIENCE, || async {
        p.stream(&east_signer, &east.intermediate_pem, &east.trust_bundle_pem)
            .await
            .err()
    })
    .await;
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        p.api
            .list_clusters()
            .await
            .unwrap()
            .iter()
            .all(|c| c.name != "east")
    );
}

/// isthmusctl at the gRPC port (15012) and an agent at the REST port (15014)
/// each get an error naming the address reached and the port it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_port_says_what_was_reached_and_what_was_expected() {
    let p = Primary::start().await;

    // `isthmusctl --primary https://HOST:15012 cluster list`
    let cli = isthmus_topology::client::PrimaryClient::new(&p.grpc, &p.admin_token, None).unwrap();
    let e = format!("{:#}", cli.list_clusters().await.unwrap_err());
    assert!(e.contains(&format!("{} answered with gRPC", p.grpc)), "{e}");
    assert!(
        e.contains("REST API") && e.contains("https://HOST:15014"),
        "{e}"
    );

    // `isthmus-agent --primary https://HOST:15014 --join-token T ...`
    #[derive(clap::Parser)]
    struct Agent {
        #[command(flatten)]
        config: isthmus_agent::Config,
    }
    let (token, _) = p.register("east", 0).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("agent");
    let registry = dir.path().join("registry.yaml");
    let agent = <Agent as clap::Parser>::try_parse_from([
        "isthmus-agent",
        "--primary",
        &p.http,
        "--join-token",
        &token,
        "--cluster",
        "east",
        "--state-dir",
        state.to_str().unwrap(),
        "--registry",
        registry.to_str().unwrap(),
    ])
    .unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let e = tokio::time::timeout(PATIENCE, isthmus_agent::join::ensure_joined(&agent.config))
        .await
        .expect("the join gives up rather than retrying")
        .err()
        .map(|e| format!("{e:#}"))
        .expect("joining through the REST port fails");
    assert!(
        e.contains(&format!("{} answered with plain HTTP", p.http)),
        "{e}"
    );
    assert!(
        e.contains("gRPC port") && e.contains("https://HOST:15012"),
        "{e}"
    );
}

/// A join token lifetime past a week is refused by name; it once overflowed
/// into a token that had already expired.
#[tokio::test]
async fn an_overlong_join_token_lifetime_is_refused() {
    let p = Primary::start().await;
    for ttl in [7 * 24 * 3600 + 1, u64::MAX] {
        let err = p
            .api
            .register_cluster(&isthmus_api::rest::RegisterCluster {
                name: "east".into(),
                network: "net-east".into(),
                region: String::new(),
                zone: String::new(),
                gateways: vec![],
                token_ttl_seconds: ttl,
            })
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("400") && err.contains("tokenTtlSeconds") && err.contains("7 days"),
            "{ttl}: {err}"
        );
    }
    // A week is fine, and the token lives that long.
    let (_, expires) = p.register("east", 7 * 24 * 3600).await;
    assert!(expires >= now_unix() + 7 * 24 * 3600 - 60, "{expires}");
}
