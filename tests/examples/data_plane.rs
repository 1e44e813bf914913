//! Benchmark: the sidecar data plane, side by side in one run.
//!
//! It starts the `multi-network` template on loopback with release
//! binaries, once with isthmus-proxy as every sidecar and once with Envoy
//! 1.40, and drives HTTP/1.1 requests from east's client position through
//! the client sidecar's outbound listener, over mesh mTLS to echo's sidecar
//! and on to the echo app: two proxies and one TLS hop, as in Istio's own
//! benchmarks. The physical limit is the same requests sent straight to the
//! echo app.
//!
//! For each path and each concurrency (1 connection for latency, many for
//! throughput) it reports requests per second, p50 and p99 latency, and for
//! the meshed paths the CPU time both sidecars spent per request and their
//! resident memory after the run. Each meshed figure is also given as a
//! ratio to the direct path and to Envoy.
//!
//! `bench/data-plane.sh` builds and runs it; it is never part of the suite.
//! `cargo run --release -p isthmus-e2e --example data_plane -- ISTHMUSCTL [SECONDS CONNECTIONS]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use isthmus_e2e::Mesh;
use isthmus_topology::runner::{DataPlane, NetMode};
use tokio::net::TcpStream;

const SERVICE: &str = "echo.demo.svc.cluster.local:8080";
const SIDECARS: [&str; 2] = ["proxy-client-east", "proxy-echo-east"];

/// What one load run measured.
struct Run {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU seconds both sidecars used during the run (meshed paths only).
    sidecar_cpu: Option<f64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
    fn cpu_us_per_request(&self) -> Option<f64> {
        self.sidecar_cpu
            .map(|cpu| cpu * 1e6 / self.requests.max(1) as f64)
    }
}

/// `connections` keep-alive connections to `addr`, each sending one GET for
/// `SERVICE` at a time, for `length`.
async fn drive(addr: SocketAddr, connections: usize, length: Duration) -> Run {
    let start = Instant::now();
    let deadline = start + length;
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0usize;
                'connection: while Instant::now() < deadline {
                    let Ok(tcp) = TcpStream::connect(addr).await else {
                        errors += 1;
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let Ok((mut sender, conn)) =
                        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await
                    else {
                        errors += 1;
                        continue;
                    };
                    tokio::spawn(conn);
                    while Instant::now() < deadline {
                        let req = http::Request::get("/")
                            .header("host", SERVICE)
                            .body(Empty::<Bytes>::new())
                            .unwrap();
                        let sent = Instant::now();
                        let ok = match sender.send_request(req).await {
                            Ok(resp) => {
                                let status = resp.status();
                                resp.into_body().collect().await.is_ok() && status.is_success()
                            }
                            Err(_) => false,
                        };
                        if !ok {
                            errors += 1;
                            continue 'connection;
                        }
                        latencies.push(sent.elapsed());
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut run = Run {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        sidecar_cpu: None,
    };
    for w in workers {
        let (latencies, errors) = w.await.unwrap();
        run.errors += errors;
        run.latencies.extend(latencies);
    }
    run.elapsed = start.elapsed();
    run.requests = run.latencies.len();
    run.latencies.sort();
    run
}

/// CPU seconds a process has used so far, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    ticks as f64 / per_second as f64
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

async fn wait_serving(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if drive(addr, 1, Duration::from_millis(200)).await.requests > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing answered at {addr} within 60 s");
}

struct Path {
    name: &'static str,
    runs: Vec<Run>,
    rss: Option<f64>,
}

async fn measure(
    mesh: &Mesh,
    addr: SocketAddr,
    meshed: bool,
    shapes: &[usize],
    length: Duration,
) -> (Vec<Run>, Option<f64>) {
    let pids: Vec<u32> = SIDECARS.iter().map(|s| mesh.component(s).pid).collect();
    wait_serving(addr).await;
    drive(addr, 8, Duration::from_secs(2)).await; // warm pools and caches
    let mut runs = Vec::new();
    for &connections in shapes {
        let before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
        let mut run = drive(addr, connections, length).await;
        if meshed {
            let after: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
            run.sidecar_cpu = Some(after - before);
        }
        runs.push(run);
    }
    let rss = meshed.then(|| pids.iter().map(|p| rss_mib(*p)).sum());
    (runs, rss)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let exe = args
        .get(1)
        .cloned()
        .expect("usage: data_plane ISTHMUSCTL [SECONDS CONNECTIONS]");
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let many: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let length = Duration::from_secs(seconds);
    let shapes = [1, many];

    let mut paths = Vec::new();
    for (name, plane) in [
        ("isthmus-proxy", DataPlane::Isthmus),
        ("Envoy 1.40", DataPlane::Envoy),
    ] {
        let mesh = Mesh::up_data_plane(
            "multi-network",
            NetMode::Loopback,
            &exe,
            None,
            plane,
            vec![],
        )
        .await
        .expect("mesh starts");
        if paths.is_empty() {
            let app = mesh.listener("echo-east", "http");
            let (runs, _) = measure(&mesh, app, false, &shapes, length).await;
            paths.push(Path {
                name: "direct",
                runs,
                rss: None,
            });
        }
        let outbound = mesh.listener("proxy-client-east", "outbound");
        let (runs, rss) = measure(&mesh, outbound, true, &shapes, length).await;
        paths.push(Path { name, runs, rss });
    }

    println!(
        "\n{seconds} s per run, HTTP/1.1 GET through client sidecar -> mTLS -> echo sidecar -> echo app, on loopback\n"
    );
    println!(
        "| path | connections | req/s | p50 | p99 | errors | sidecar CPU per request | sidecar RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for p in &paths {
        for (r, connections) in p.runs.iter().zip(shapes) {
            println!(
                "| {} | {} | {:.0} | {:.0} µs | {:.0} µs | {} | {} | {} |",
                p.name,
                connections,
                r.rate(),
                r.percentile(0.5).as_secs_f64() * 1e6,
                r.percentile(0.99).as_secs_f64() * 1e6,
                r.errors,
                r.cpu_us_per_request()
                    .map(|c| format!("{c:.0} µs"))
                    .unwrap_or_else(|| "-".into()),
                p.rss
                    .map(|m| format!("{m:.1} MiB"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
    let (direct, isthmus, envoy) = (&paths[0], &paths[1], &paths[2]);
    println!("\nRatios (isthmus-proxy / direct, Envoy / direct, isthmus-proxy / Envoy):\n");
    println!("| connections | measure | isthmus/direct | Envoy/direct | isthmus/Envoy |");
    println!("|---|---|---|---|---|");
    for (i, connections) in shapes.iter().enumerate() {
        let (d, is, en) = (&direct.runs[i], &isthmus.runs[i], &envoy.runs[i]);
        println!(
            "| {connections} | req/s | {:.2} | {:.2} | {:.2} |",
            is.rate() / d.rate(),
            en.rate() / d.rate(),
            is.rate() / en.rate()
        );
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            let (dp, ip, ep) = (
                d.percentile(p).as_secs_f64(),
                is.percentile(p).as_secs_f64(),
                en.percentile(p).as_secs_f64(),
            );
            println!(
                "| {connections} | {label} latency | {:.2} | {:.2} | {:.2} |",
                ip / dp,
                ep / dp,
                ip / ep
            );
        }
        if let (Some(a), Some(b)) = (is.cpu_us_per_request(), en.cpu_us_per_request()) {
            println!(
                "| {connections} | sidecar CPU per request | - | - | {:.2} |",
                a / b
            );
        }
    }
    if let (Some(a), Some(b)) = (isthmus.rss, envoy.rss) {
        println!("| - | sidecar RSS | - | - | {:.2} |", a / b);
    }
}
