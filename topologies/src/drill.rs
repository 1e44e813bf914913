//! `isthmusctl failover drill`: proves cross-cluster failover on a mesh that
//! `isthmusctl up` runs, and says how long it took.
//!
//! 1. From a client workload's sidecar, requests for the service must be
//!    answered by the drilled cluster (the baseline).
//! 2. Under a steady stream of requests, every workload of the service in
//!    that cluster dies with its sidecar (SIGKILL, as in a crash). The
//!    registry is left alone, as after a node failure that discovery has
//!    not noticed yet: only outlier detection and retries carry traffic.
//! 3. The drill reports the failed requests and the time from the kill
//!    until every answer comes from other clusters.
//! 4. It starts the workloads again and reports the time until the
//!    cluster answers again (after the outlier ejection ends).
//!
//! Which cluster answered is read from the `cluster` field of the answer,
//! which the sample echo app (the one `up` runs) writes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use isthmus_agent::registry::Registry;
use serde::Serialize;

use crate::probe;
use crate::runner::{self, MeshState};

#[derive(Debug, Clone)]
pub struct Drill {
    /// `NAME`, `NAME.NAMESPACE` or the FQDN, optionally `:PORT` (default:
    /// the service's first). A bare `NAME` is in the namespace of the
    /// `from` workload, as Istio resolves short names in the caller's
    /// namespace; without `from`, in the one namespace of the cluster that
    /// has such a service.
    pub service: String,
    /// The cluster whose workloads of the service die.
    pub cluster: String,
    /// The client workload whose sidecar sends the requests (default: one
    /// in the drilled cluster that is not a workload of the service).
    pub from: Option<String>,
    /// Requests per second during the failover.
    pub rate: u32,
    /// How long each phase may take before the drill gives up.
    pub patience: Duration,
    /// The component binary, to start the workloads again.
    pub exe: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrillReport {
    pub service: String,
    pub cluster: String,
    pub from: String,
    /// The components the drill stopped and started again.
    pub stopped: Vec<String>,
    /// Requests sent from the kill until traffic had settled elsewhere.
    pub requests: usize,
    /// Of those, the ones that did not get a 2xx answer.
    pub failed: usize,
    /// From the kill to the first answer of the unbroken run of answers
    /// from other clusters that ended the phase.
    pub failover_ms: u64,
    /// Who answered after the kill.
    pub answered_by: BTreeMap<String, usize>,
    /// From the restart until the drilled cluster answered again.
    pub returned_ms: u64,
}

/// Answers from other clusters, in a row, that end the failover phase.
const SETTLED: usize = 20;

struct Target {
    fqdn_port: String,
    outbound: SocketAddr,
    netns: Option<String>,
    from: String,
}

impl Target {
    /// One request: its status and the cluster that answered.
    async fn ask(&self) -> (u16, String) {
        let url = format!("http://{}/", self.fqdn_port);
        match probe::get(self.netns.as_deref(), self.outbound, &url).await {
            Ok((status, body)) => (
                status,
                answered_by(&body).unwrap_or_else(|| "(unknown)".into()),
            ),
            Err(_) => (0, String::new()),
        }
    }

    /// Asks until `done` holds for an answer, or `patience` runs out.
    async fn until(
        &self,
        what: &str,
        patience: Duration,
        done: impl Fn(u16, &str) -> bool,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let (status, by) = self.ask().await;
            if done(status, &by) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > patience {
                bail!(
                    "{what}: not within {} s (last answer: {status} from {by:?})",
                    patience.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The namespace of workload `from` (its sidecar is `proxy-FROM`): the
/// registry entry of its cluster at its sidecar's inbound address.
fn workload_namespace(state_dir: &Path, state: &MeshState, from: &str) -> anyhow::Result<String> {
    let proxy = state
        .component(&format!("proxy-{from}"))
        .with_context(|| format!("no workload {from:?} with a sidecar in this mesh"))?;
    let cluster = proxy
        .cluster
        .as_deref()
        .with_context(|| format!("workload {from:?} has no cluster"))?;
    let inbound: std::net::SocketAddr = proxy
        .listeners
        .get("inbound")
        .with_context(|| format!("the sidecar of {from:?} has no inbound listener"))?
        .parse()?;
    let registry = Registry::load(
        &state_dir
            .join("clusters")
            .join(cluster)
            .join("registry.yaml"),
    )?;
    registry
        .workloads
        .iter()
        .find(|w| w.address == inbound.ip())
        .map(|w| w.namespace.clone())
        .with_context(|| format!("workload {from:?} is not in cluster {cluster}'s registry"))
}

/// The cluster named in the sample echo app's answer, if it is one.
pub fn answered_by(body: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("cluster")?
        .as_str()
        .map(str::to_string)
}

pub async fn run(state_dir: &Path, drill: &Drill) -> anyhow::Result<DrillReport> {
    let mut state = MeshState::load(state_dir)?;
    let registry_path = state_dir
        .join("clusters")
        .join(&drill.cluster)
        .join("registry.yaml");
    if !registry_path.exists() {
        bail!(
            "cluster {:?} has no file registry in this mesh (see `isthmusctl status`)",
            drill.cluster
        );
    }
    let registry = Registry::load(&registry_path)?;
    let (name_ns, port) = match drill.service.rsplit_once(':') {
        Some((s, p)) => (
            s,
            Some(
                p.parse::<u16>()
                    .with_context(|| format!("{p:?} is not a port"))?,
            ),
        ),
        None => (drill.service.as_str(), None),
    };
    let caller_ns = match &drill.from {
        Some(from) => workload_namespace(state_dir, &state, from)?,
        None => {
            let bare = name_ns.split('.').next().unwrap_or(name_ns);
            let mut namespaces: Vec<&str> = registry
                .services
                .iter()
                .filter(|s| s.name == bare)
                .map(|s| s.namespace.as_str())
                .collect();
            namespaces.sort_unstable();
            namespaces.dedup();
            match namespaces.as_slice() {
                [one] => one.to_string(),
                [] => String::new(),
                several => bail!(
                    "{name_ns:?} is a service in namespaces {}: name one as NAME.NAMESPACE, or give --from to resolve it in the caller's namespace",
                    several.join(", ")
                ),
            }
        }
    };
    let (name, namespace) = isthmus_api::names::service_name_and_namespace(
        name_ns,
        &caller_ns,
        isthmus_api::DEFAULT_CLUSTER_DOMAIN,
    )
    .map_err(|e| {
        anyhow::anyhow!("{name_ns:?}: {e}; name the service as NAME, NAME.NAMESPACE or its FQDN")
    })?;
    let name_ns = format!("{name}.{namespace}");
    let service = registry
        .services
        .iter()
        .find(|s| s.name == name && s.namespace == namespace)
        .with_context(|| format!("cluster {} has no service {name_ns}", drill.cluster))?;
    let port = match port {
        Some(p) if service.ports.iter().any(|sp| sp.port == p) => p,
        Some(p) => bail!("service {name_ns} has no port {p}"),
        None => service
            .ports
            .first()
            .map(|p| p.port)
            .with_context(|| format!("service {name_ns} has no ports"))?,
    };
    // The service's workloads in the cluster, and the components (app and
    // sidecar) at their addresses.
    let addresses: Vec<IpAddr> = registry
        .workloads
        .iter()
        .filter(|w| {
            w.namespace == namespace
                && !service.selector.is_empty()
                && service
                    .selector
                    .iter()
                    .all(|(k, v)| w.labels.get(k) == Some(v))
        })
        .map(|w| w.address)
        .collect();
    let at_address = |c: &runner::Component| {
        c.cluster.as_deref() == Some(drill.cluster.as_str())
            && (c.kind == "app" || c.kind == "proxy")
            && c.listeners.values().any(|l| {
                l.parse::<SocketAddr>()
                    .is_ok_and(|a| addresses.contains(&a.ip()))
            })
    };
    let stopped: Vec<String> = state
        .components
        .iter()
        .filter(|c| at_address(c))
        .map(|c| c.name.clone())
        .collect();
    if stopped.is_empty() {
        bail!(
            "no workload of {name_ns} runs in cluster {} of this mesh",
            drill.cluster
        );
    }
    let client = match &drill.from {
        Some(w) => state
            .component(&format!("proxy-{w}"))
            .with_context(|| format!("no workload {w:?} with a sidecar in this mesh"))?,
        None => state
            .components
            .iter()
            .find(|c| {
                c.kind == "proxy"
                    && c.cluster.as_deref() == Some(drill.cluster.as_str())
                    && !stopped.contains(&c.name)
            })
            .with_context(|| {
                format!(
                    "no other workload with a sidecar in cluster {}; name one with --from",
                    drill.cluster
                )
            })?,
    };
    let target = Target {
        fqdn_port: format!("{name}.{namespace}.svc.cluster.local:{port}"),
        outbound: client
            .listeners
            .get("outbound")
            .context("the client's sidecar has no outbound listener")?
            .parse()?,
        netns: client.netns.clone(),
        from: client.name.trim_start_matches("proxy-").to_string(),
    };
    let home = drill.cluster.as_str();

    // 1. The baseline: the drilled cluster answers.
    target
        .until(
            &format!("before the drill, {home} to answer {}", target.from),
            drill.patience,
            |s, by| s == 200 && by == home,
        )
        .await?;

    // 2. A steady stream of requests; the workloads die.
    let interval = Duration::from_secs_f64(1.0 / f64::from(drill.rate.max(1)));
    let killed_at = Instant::now();
    for name in &stopped {
        if let Some(c) = state.component(name) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let mut log: Vec<(Duration, u16, String)> = Vec::new();
    let mut elsewhere = 0usize;
    let mut ticks = tokio::time::interval(interval);
    while elsewhere < SETTLED {
        ticks.tick().await;
        if killed_at.elapsed() > drill.patience {
            bail!(
                "traffic did not settle on other clusters within {} s ({} requests, {} failed)",
                drill.patience.as_secs(),
                log.len(),
                log.iter()
                    .filter(|(_, s, _)| !(200..300).contains(s))
                    .count()
            );
        }
        let (status, by) = target.ask().await;
        let settled = (200..300).contains(&status) && by != home;
        elsewhere = if settled { elsewhere + 1 } else { 0 };
        log.push((killed_at.elapsed(), status, by));
    }
    let failover = log[log.len() - SETTLED].0;
    let mut answered_by = BTreeMap::new();
    for (_, status, by) in &log {
        if (200..300).contains(status) {
            *answered_by.entry(by.clone()).or_insert(0) += 1;
        }
    }

    // 3. The workloads return; so does their traffic.
    for name in &stopped {
        runner::restart(&mut state, name, &drill.exe).await?;
    }
    let returned = target
        .until(
            &format!("after the restart, {home} to answer again"),
            drill.patience,
            |s, by| s == 200 && by == home,
        )
        .await?;
    Ok(DrillReport {
        service: target.fqdn_port.clone(),
        cluster: drill.cluster.clone(),
        from: target.from.clone(),
        stopped,
        requests: log.len(),
        failed: log
            .iter()
            .filter(|(_, s, _)| !(200..300).contains(s))
            .count(),
        failover_ms: failover.as_millis() as u64,
        answered_by,
        returned_ms: returned.as_millis() as u64,
    })
}
