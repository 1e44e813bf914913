//! Benchmark: the primary's Delta ADS at scale. A real primary process
//! (`isthmusctl component primary`, release build) on loopback; one cluster
//! whose agent reports SERVICES services of ENDPOINTS endpoints each; CLIENTS
//! Delta-ADS clients over real gRPC and mTLS, each on its own connection,
//! each subscribed to every cluster and every endpoint assignment.
//!
//! It reports, from one run:
//! - the time from an endpoint change (the agent's delta) to each client
//!   holding the new assignment, p50 and p99 over CHANGES changes;
//! - the primary's resident memory per connected client;
//! - the primary's CPU time for a full push (every assignment changes, and
//!   every client receives every one).
//!
//! `bench/xds-scale.sh` builds and runs it; it is never part of the suite.
//! `cargo run --release -p isthmus-e2e --example xds_scale -- ISTHMUSCTL [CLIENTS SERVICES ENDPOINTS CHANGES]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use isthmus_api::pb::sync::sync_client::SyncClient;
use isthmus_api::pb::sync::{
    AgentMessage, Delta, Endpoint, JoinRequest, Port, Service, Snapshot, agent_message,
};
use isthmus_api::rest::RegisterCluster;
use isthmus_api::type_urls;
use isthmus_ca::{Signer, SpiffeId};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CLUSTER: &str = "bench";
const WATCHED: &str = "outbound|8080||svc-0.bench.svc.cluster.local";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn service(i: usize, endpoints: usize, generation: usize) -> Service {
    Service {
        namespace: "bench".into(),
        name: format!("svc-{i}"),
        ports: vec![Port {
            name: "http".into(),
            port: 8080,
            protocol: "http".into(),
        }],
        endpoints: (0..endpoints + generation)
            .map(|j| {
                let n = i * 64 + j;
                Endpoint {
                    workload: format!("svc-{i}-{j}"),
                    address: format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255),
                    inbound_port: 15006,
                    service_account: format!("svc-{i}"),
                    ready: true,
                    labels: Default::default(),
                }
            })
            .collect(),
    }
}

/// RSS (bytes) and CPU time (seconds) of a process.
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the comm.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = 100.0; // USER_HZ on Linux
    (rss_kb * 1024, ticks as f64 / hz)
}

/// How long after the last client synced resident memory is read: the
/// allocator returns the connection burst's freed pages within it.
const SETTLE: Duration = Duration::from_secs(10);

/// The process's peak resident memory (bytes).
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// What clients tell the driver.
enum Event {
    /// Client `id` received `count` endpoint assignments; `watched` is the
    /// version of the watched one if it was among them.
    Endpoints {
        id: usize,
        count: usize,
        watched: Option<String>,
        at: Instant,
    },
}

async fn client(
    id: usize,
    grpc: String,
    tls: Arc<rustls::ClientConfig>,
    events: mpsc::UnboundedSender<Event>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let mut permit = Some(permit);
    let channel = isthmus_transport::tls_channel(&grpc, tls)?;
    let mut ads =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(16);
    let mut fields = HashMap::new();
    fields.insert(
        "CLUSTER_ID".to_string(),
        Value {
            kind: Some(Kind::StringValue(CLUSTER.into())),
        },
    );
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: format!("sidecar~{CLUSTER}~client-{id}"),
            cluster: CLUSTER.into(),
            metadata: Some(Struct { fields }),
            ..Default::default()
        }),
        type_url: type_urls::CLUSTER.into(),
        ..Default::default()
    })
    .await?;
    let mut inbound = ads
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(resp) = inbound.message().await? {
        let at = Instant::now();
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await?;
        if resp.type_url == type_urls::CLUSTER && !resp.resources.is_empty() {
            // Clusters may come in batches; subscribe to each batch's.
            tx.send(DeltaDiscoveryRequest {
                type_url: type_urls::ENDPOINT.into(),
                resource_names_subscribe: resp.resources.iter().map(|r| r.name.clone()).collect(),
                ..Default::default()
            })
            .await?;
        } else if resp.type_url == type_urls::ENDPOINT {
            // Connected and receiving: let the next client in.
            permit.take();
            let watched = resp
                .resources
                .iter()
                .find(|r| r.name == WATCHED)
                .map(|r| r.version.clone());
            let _ = events.send(Event::Endpoints {
                id,
                count: resp.resources.len(),
                watched,
                at,
            });
        }
    }
    Ok(())
}

/// Waits until each of `clients` has received `services` assignments.
async fn every_client_got(
    events: &mut mpsc::UnboundedReceiver<Event>,
    clients: usize,
    services: usize,
) -> anyhow::Result<()> {
    let mut got = vec![0usize; clients];
    let mut done = 0;
    while done < clients {
        let Some(Event::Endpoints { id, count, .. }) =
            tokio::time::timeout(Duration::from_secs(300), events.recv()).await?
        else {
            anyhow::bail!("clients went away");
        };
        let before = got[id];
        got[id] += count;
        if before < services && got[id] >= services {
            done += 1;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let exe = args.next().expect("the isthmusctl binary");
    let mut num = |d: usize| args.next().map(|a| a.parse().unwrap()).unwrap_or(d);
    let (clients, services, endpoints, changes) = (num(1000), num(1000), num(10), num(20));
    isthmus_ca::install_crypto_provider();

    // The primary, as its own process.
    let dir = tempfile::tempdir()?;
    let (grpc_port, http_port) = (free_port(), free_port());
    let mut primary = std::process::Command::new(&exe)
        .args(["component", "primary", "--data-dir"])
        .arg(dir.path())
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let pid = primary.id();
    let grpc = format!("https://127.0.0.1:{grpc_port}");
    let token_file = dir.path().join("admin-token");
    let deadline = Instant::now() + Duration::from_secs(30);
    let api = loop {
        if let Ok(token) = std::fs::read_to_string(&token_file)
            && let Ok(ca) = std::fs::read_to_string(dir.path().join("root-cert.pem"))
            && let Ok(api) = isthmus_topology::client::PrimaryClient::new(
                &format!("https://127.0.0.1:{http_port}"),
                &token,
                Some(&ca),
            )
            && api.healthz().await.is_ok()
        {
            break api;
        }
        anyhow::ensure!(Instant::now() < deadline, "the primary did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let roots = std::fs::read_to_string(dir.path().join("root-cert.pem"))?;

    // The cluster's agent: join, then report every service.
    let registered = api
        .register_cluster(&RegisterCluster {
            name: CLUSTER.into(),
            network: "n1".into(),
            region: "r".into(),
            zone: "z".into(),
            gateways: vec![],
            token_ttl_seconds: 0,
        })
        .await?;
    let (_, fp) = isthmus_api::join_token::parse(&registered.join_token).unwrap();
    let pinned = Arc::new(isthmus_transport::pinned_root_client_config(fp)?);
    let (csr, key) = isthmus_ca::issue::generate_csr("bench agent")?;
    let joined = SyncClient::new(isthmus_transport::tls_channel(&grpc, pinned)?)
        .join(JoinRequest {
            cluster: CLUSTER.into(),
            token: registered.join_token.clone(),
            csr_pem: csr,
            agent_version: "bench".into(),
            agent_key_sha256: isthmus_e2e::TEST_AGENT_KEY.1.clone(),
        })
        .await?
        .into_inner();
    let signer = Signer::from_pem(&joined.intermediate_pem, &key)?;
    let identity = |id: &SpiffeId| {
        let (leaf, key) = signer.issue_system(id, Duration::from_secs(3600)).unwrap();
        isthmus_transport::Identity::from_pem(
            &format!("{}{}", leaf.pem, joined.intermediate_pem),
            &key,
        )
        .unwrap()
    };
    let agent_tls = isthmus_e2e::agent_tls(
        &signer,
        &joined.intermediate_pem,
        &roots,
        &isthmus_e2e::TEST_AGENT_KEY.0,
    );
    let (agent_tx, agent_rx) = mpsc::channel(4);
    let mut agent_in = SyncClient::new(isthmus_transport::tls_channel(&grpc, agent_tls)?)
        .max_decoding_message_size(64 * 1024 * 1024)
        .stream(ReceiverStream::new(agent_rx))
        .await?
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = agent_in.message().await {} });
    let all: Vec<Service> = (0..services).map(|i| service(i, endpoints, 0)).collect();
    agent_tx
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Snapshot(Snapshot {
                services: all,
                cluster: CLUSTER.into(),
            })),
        })
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // let the model settle
    let (rss_before, _) = usage(pid);

    // The clients.
    let client_id = SpiffeId::workload("cluster.local", "bench", "client")?;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    // Clients connect 64 at a time, as a fleet rolls out, rather than all
    // in the same instant.
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    for id in 0..clients {
        let permit = gate.clone().acquire_owned().await?;
        let tls = Arc::new(isthmus_transport::primary_client_config(
            &roots,
            Some(identity(&client_id)),
        )?);
        let (grpc, ev_tx) = (grpc.clone(), ev_tx.clone());
        tokio::spawn(async move {
            if let Err(e) = client(id, grpc, tls, ev_tx, permit).await {
                eprintln!("client {id}: {e}");
            }
        });
    }
    every_client_got(&mut ev_rx, clients, services).await?;
    let connect_time = started.elapsed();
    eprintln!("all {clients} clients synced after {connect_time:?}");
    // Resident memory once the connection burst has settled.
    tokio::time::sleep(SETTLE).await;
    let (rss_after, _) = usage(pid);
    eprintln!("primary RSS {:.1} MiB", rss_after as f64 / 1048576.0);

    // Endpoint changes: svc-0 gains an endpoint, then loses it, and so on.
    let mut latencies = Vec::new();
    for c in 0..changes {
        let t0 = Instant::now();
        agent_tx
            .send(AgentMessage {
                kind: Some(agent_message::Kind::Delta(Delta {
                    cluster: CLUSTER.into(),
                    upserts: vec![service(0, endpoints, (c % 2) + 1)],
                    removed: vec![],
                })),
            })
            .await?;
        let mut seen = vec![false; clients];
        let mut done = 0;
        while done < clients {
            let Some(Event::Endpoints {
                id, watched, at, ..
            }) = tokio::time::timeout(Duration::from_secs(60), ev_rx.recv()).await?
            else {
                anyhow::bail!("clients went away");
            };
            if watched.is_some() && !seen[id] {
                seen[id] = true;
                done += 1;
                latencies.push(at - t0);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        while ev_rx.try_recv().is_ok() {}
    }
    latencies.sort();

    // A full push: every service changes; every client gets every assignment.
    let (_, cpu_before) = usage(pid);
    let t0 = Instant::now();
    agent_tx
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Snapshot(Snapshot {
                services: (0..services).map(|i| service(i, endpoints, 3)).collect(),
                cluster: CLUSTER.into(),
            })),
        })
        .await?;
    every_client_got(&mut ev_rx, clients, services).await?;
    let full_push_wall = t0.elapsed();
    let (_, cpu_after) = usage(pid);
    let peak = peak_rss(pid);

    println!(
        "clients: {clients}, services: {services}, endpoints: {}",
        services * endpoints
    );
    println!("all clients connected and synced in {connect_time:?}");
    println!(
        "endpoint change to every client ({} samples): p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
    println!(
        "primary RSS: {:.1} MiB before the clients, {:.1} MiB with them ({}s after the last synced): {:.1} KiB per client",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        SETTLE.as_secs(),
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0 / clients as f64
    );
    println!(
        "primary peak RSS over the whole run (connection burst, changes, full push): {:.1} MiB",
        peak as f64 / 1048576.0
    );
    println!(
        "full push ({} assignments to each client): {:.2} s of primary CPU, {:?} wall",
        services,
        cpu_after - cpu_before,
        full_push_wall
    );
    let _ = primary.kill();
    let _ = primary.wait();
    Ok(())
}
