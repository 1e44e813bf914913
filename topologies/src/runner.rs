//! The local runner behind `isthmusctl up`: real processes for the primary
//! (on its embedded store), each cluster's agent and gateway, and each
//! workload's sidecar and sample app, wired exactly as they would be across
//! machines. As root, every network is its own Linux network namespace;
//! otherwise everything shares loopback on distinct 127.x addresses.
//!
//! Everything about a running mesh is recorded in `STATE_DIR/mesh.json`, which
//! `status` and `down` read.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use isthmus_api::ports;
use isthmus_api::rest::RegisterCluster;
use serde::{Deserialize, Serialize};

use crate::client::PrimaryClient;
use crate::netns::{self, Layout};
use crate::probe;
use crate::template::{self, Template};

pub const STATE_FILE: &str = "mesh.json";
/// How long `up` waits for any one component to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// How networks are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// Network namespaces when running as root, loopback otherwise.
    Auto,
    /// One Linux network namespace per network (needs root and iproute2).
    Netns,
    /// Everything on loopback; networks are not isolated.
    Loopback,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Component {
    pub name: String,
    pub kind: String,
    pub cluster: Option<String>,
    pub network: Option<String>,
    pub netns: Option<String>,
    pub pid: u32,
    pub listeners: BTreeMap<String, String>,
    pub log: PathBuf,
    /// What it was started with (after `component`), for restarts.
    #[serde(default)]
    pub args: Vec<String>,
    /// The program, when it is not `isthmusctl component` (etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshState {
    pub template: String,
    pub mode: NetMode,
    pub state_dir: PathBuf,
    /// gRPC (agents, xDS): `https://IP:15012`, or every replica's,
    /// comma-separated.
    pub primary_grpc: String,
    /// REST: `https://IP:15014`.
    pub primary_api: String,
    /// The same REST API on a Unix socket, reachable from any namespace.
    pub api_socket: PathBuf,
    /// Every replica's API socket (the first is `api_socket`).
    #[serde(default)]
    pub primary_sockets: Vec<PathBuf>,
    /// The etcd client URL the replicas share, if there are several.
    #[serde(default)]
    pub etcd: Option<String>,
    pub admin_token_file: PathBuf,
    pub ca_file: PathBuf,
    pub layout: Option<Layout>,
    pub components: Vec<Component>,
    /// The shell command that sends one request through the mesh.
    pub client_command: String,
}

impl MeshState {
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no mesh is recorded in {} (run `isthmusctl up` first)",
                state_dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    fn save(&self) -> anyhow::Result<()> {
        // 0600: it records every component's arguments.
        let path = self.state_dir.join(STATE_FILE);
        isthmus_transport::write_private(&path, &serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// A client of the first replica that accepts connections (with one
    /// primary, of that primary).
    pub fn client(&self) -> anyhow::Result<PrimaryClient> {
        let live = self
            .primary_sockets
            .iter()
            .find(|s| std::os::unix::net::UnixStream::connect(s).is_ok())
            .unwrap_or(&self.api_socket);
        PrimaryClient::from_files(live, &self.admin_token_file, &self.ca_file)
    }

    /// A client of one replica's API socket.
    pub fn replica_client(&self, socket: &Path) -> anyhow::Result<PrimaryClient> {
        PrimaryClient::from_files(socket, &self.admin_token_file, &self.ca_file)
    }

    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }
}

/// Which proxies a local mesh runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataPlane {
    /// isthmus-proxy sidecars and isthmus-gateway gateways.
    #[default]
    Isthmus,
    /// Envoy for every sidecar and gateway, configured by the primary.
    Envoy,
}

pub struct UpOptions {
    pub template: String,
    pub state_dir: PathBuf,
    pub mode: NetMode,
    /// The binary that runs components (`isthmusctl component ...`).
    pub exe: PathBuf,
    /// Lifetime of the sidecars' certificates in seconds; None for the CA
    /// default (24 h). Short lifetimes show renewal at work.
    pub cert_ttl_seconds: Option<u64>,
    pub data_plane: DataPlane,
    /// Workloads (by name) and gateways (`gateway-CLUSTER`) that run the
    /// other data plane: mixed meshes for interop.
    pub swap_data_plane: Vec<String>,
}

impl UpOptions {
    fn envoy_for(&self, name: &str) -> bool {
        (self.data_plane == DataPlane::Envoy) != self.swap_data_plane.iter().any(|n| n == name)
    }
}

/// Addresses for one run.
struct Plan {
    /// One address per primary replica.
    primaries: Vec<Ipv4Addr>,
    /// Per network: gateway address.
    gateway: Vec<Ipv4Addr>,
    /// Per network: pod address maker.
    pod: Vec<Box<dyn Fn(u8) -> Ipv4Addr + Send + Sync>>,
}

fn plan(mode: NetMode, networks: usize, replicas: usize) -> anyhow::Result<Plan> {
    match mode {
        NetMode::Netns => Ok(Plan {
            primaries: (0..replicas).map(netns::primary_addr).collect(),
            gateway: (0..networks).map(netns::gateway_addr).collect(),
            pod: (0..networks)
                .map(|i| {
                    Box::new(move |h| netns::pod_addr(i, h))
                        as Box<dyn Fn(u8) -> Ipv4Addr + Send + Sync>
                })
                .collect(),
        }),
        _ => {
            // A random 127.X/16 keeps concurrent meshes apart.
            for _ in 0..20 {
                let x: u8 = rand::random_range(20..250);
                let primary = Ipv4Addr::new(127, x, 0, 1);
                if std::net::TcpListener::bind((primary, ports::PRIMARY_HTTP)).is_ok() {
                    return Ok(Plan {
                        primaries: (0..replicas)
                            .map(|i| Ipv4Addr::new(127, x, 0, 1 + i as u8))
                            .collect(),
                        gateway: (0..networks)
                            .map(|i| Ipv4Addr::new(127, x, 10 + i as u8, 1))
                            .collect(),
                        pod: (0..networks)
                            .map(|i| {
                                Box::new(move |h| Ipv4Addr::new(127, x, 100 + i as u8, h))
                                    as Box<dyn Fn(u8) -> Ipv4Addr + Send + Sync>
                            })
                            .collect(),
                    });
                }
            }
            bail!("found no free 127.x.0.1 address for the primary")
        }
    }
}

fn resolve_mode(mode: NetMode) -> anyhow::Result<NetMode> {
    match mode {
        NetMode::Auto if netns::available() => Ok(NetMode::Netns),
        NetMode::Auto => Ok(NetMode::Loopback),
        NetMode::Netns if !netns::available() => {
            bail!("--net netns needs root and iproute2 (`ip`)")
        }
        m => Ok(m),
    }
}

/// Starts the mesh and returns once a request has crossed it.
pub async fn up(opts: UpOptions) -> anyhow::Result<MeshState> {
    let tpl = template::load(&opts.template)?;
    isthmus_transport::create_private_dir(&opts.state_dir)
        .with_context(|| format!("creating {}", opts.state_dir.display()))?;
    let state_dir = opts.state_dir.canonicalize()?;
    if let Ok(existing) = MeshState::load(&state_dir)
        && existing.components.iter().any(|c| alive(c.pid))
    {
        bail!(
            "a mesh is already running from {}; stop it with `isthmusctl down --state-dir {}`",
            state_dir.display(),
            state_dir.display()
        );
    }
    let mode = resolve_mode(opts.mode)?;
    let networks: Vec<String> = {
        let mut v: Vec<String> = tpl.clusters.iter().map(|c| c.network.clone()).collect();
        v.dedup();
        v
    };
    let layout = if mode == NetMode::Netns {
        let prefix = format!("isth{:04x}", rand::random::<u16>());
        Some(Layout::create(&prefix, &networks)?)
    } else {
        None
    };
    let addrs = plan(mode, networks.len(), tpl.primaries)?;
    let replicas = replica_names(tpl.primaries);
    let mut state = MeshState {
        template: tpl.name.clone(),
        mode,
        state_dir: state_dir.clone(),
        primary_grpc: addrs
            .primaries
            .iter()
            .map(|p| format!("https://{p}:{}", ports::PRIMARY_GRPC))
            .collect::<Vec<_>>()
            .join(","),
        primary_api: format!("https://{}:{}", addrs.primaries[0], ports::PRIMARY_HTTP),
        api_socket: state_dir.join(&replicas[0]).join("api.sock"),
        primary_sockets: replicas
            .iter()
            .map(|r| state_dir.join(r).join("api.sock"))
            .collect(),
        etcd: None,
        admin_token_file: state_dir.join("admin-token"),
        ca_file: state_dir.join(&replicas[0]).join("root-cert.pem"),
        layout,
        components: vec![],
        client_command: String::new(),
    };
    state.save()?;
    match start(&opts, &tpl, &addrs, &networks, &mut state).await {
        Ok(()) => {
            state.save()?;
            Ok(state)
        }
        Err(e) => {
            let _ = state.save();
            down(&state_dir);
            Err(e.context(format!(
                "starting the mesh failed; logs are in {}",
                state_dir.join("logs").display()
            )))
        }
    }
}

/// `primary` alone; `primary-0`, `primary-1`... for replicas.
fn replica_names(n: usize) -> Vec<String> {
    if n <= 1 {
        vec!["primary".into()]
    } else {
        (0..n).map(|i| format!("primary-{i}")).collect()
    }
}

async fn start(
    opts: &UpOptions,
    tpl: &Template,
    addrs: &Plan,
    networks: &[String],
    state: &mut MeshState,
) -> anyhow::Result<()> {
    let dir = state.state_dir.clone();
    std::fs::create_dir_all(dir.join("logs"))?;
    let spawner = Spawner {
        exe: opts.exe.clone(),
        dir: dir.clone(),
    };

    // 1. The primary: one on the embedded store, or replicas on an etcd
    //    started here.
    let wan = state.layout.as_ref().map(|l| l.wan.clone());
    let replicas = replica_names(tpl.primaries);
    if replicas.len() > 1 {
        if let Some(layout) = &state.layout {
            for addr in &addrs.primaries[1..] {
                layout.add_wan_addr(*addr)?;
            }
        }
        let url = start_etcd(&spawner, state, addrs.primaries[0], wan.clone()).await?;
        state.etcd = Some(url);
    }
    let mut client = None;
    for (i, name) in replicas.iter().enumerate() {
        let p = addrs.primaries[i];
        let mut listeners = BTreeMap::new();
        listeners.insert("grpc".to_string(), format!("{p}:{}", ports::PRIMARY_GRPC));
        listeners.insert("http".to_string(), format!("{p}:{}", ports::PRIMARY_HTTP));
        let mut args = vec![
            "primary".into(),
            "--api-socket".into(),
            state.primary_sockets[i].display().to_string(),
            "--data-dir".into(),
            dir.join(name).display().to_string(),
            "--grpc-listen".into(),
            listeners["grpc"].clone(),
            "--http-listen".into(),
            listeners["http"].clone(),
            "--admin-token-file".into(),
            state.admin_token_file.display().to_string(),
        ];
        if let Some(etcd) = &state.etcd {
            args.extend([
                "--etcd".into(),
                etcd.clone(),
                "--replica-id".into(),
                name.clone(),
            ]);
            if i > 0 {
                // The first replica made the KEK; the others must share it
                // to open the root it sealed.
                args.extend([
                    "--kek-file".into(),
                    dir.join(&replicas[0]).join("kek").display().to_string(),
                ]);
            }
        }
        let spec = Spec {
            name: name.clone(),
            kind: "primary",
            cluster: None,
            network: None,
            ns: wan.clone(),
            listeners,
        };
        let component = spawner.spawn(spec, args)?;
        let pid = component.pid;
        state.components.push(component);
        state.save()?;
        let c = wait_for_primary(state, name, &state.primary_sockets[i], pid).await?;
        client.get_or_insert(c);
    }
    let client = client.context("no primary was started")?;

    // 2. Clusters: register, write registries, start agents and gateways.
    // East-west gateways carry traffic between networks, so a template of
    // one network (single-cluster, flat-multicluster) runs none.
    let with_gateways = networks.len() > 1;
    for (i, cluster) in tpl.clusters.iter().enumerate() {
        let net_index = networks
            .iter()
            .position(|n| *n == cluster.network)
            .unwrap_or(0);
        let ns = state
            .layout
            .as_ref()
            .and_then(|l| l.namespace_of(&cluster.network))
            .map(str::to_string);
        // Clusters that share a network take address blocks of 64 in it.
        let block = tpl.clusters[..i]
            .iter()
            .filter(|c| c.network == cluster.network)
            .count();
        let base = u8::try_from(64 * block)
            .ok()
            .filter(|_| cluster.workloads.len() <= 50)
            .with_context(|| {
                format!(
                    "network {}: at most 4 clusters of at most 50 workloads each",
                    cluster.network
                )
            })?;
        if with_gateways && block > 0 {
            bail!(
                "network {}: `up` runs one cluster per network when the mesh has several networks",
                cluster.network
            );
        }
        let net_pod = &addrs.pod[net_index];
        let pod = |h: u8| net_pod(base + h);
        let gw = addrs.gateway[net_index];
        let registered = client
            .register_cluster(&RegisterCluster {
                name: cluster.name.clone(),
                network: cluster.network.clone(),
                region: cluster.region.clone(),
                zone: cluster.zone.clone(),
                gateways: if with_gateways {
                    vec![gw.to_string()]
                } else {
                    vec![]
                },
                token_ttl_seconds: 0,
            })
            .await?;
        let cdir = dir.join("clusters").join(&cluster.name);
        std::fs::create_dir_all(&cdir)?;
        // Workload credentials: the token for the sidecar, its digest for the registry.
        let mut reg_workloads = Vec::new();
        for (j, w) in cluster.workloads.iter().enumerate() {
            let token = isthmus_api::workload_credential::generate();
            isthmus_transport::write_private(&cdir.join(format!("{}.token", w.name)), &token)?;
            let addr = pod(10 + j as u8);
            if let (Some(layout), true) = (&state.layout, j == 0) {
                layout.add_pod_addr(&cluster.network, pod(2))?;
            }
            if let Some(layout) = &state.layout {
                layout.add_pod_addr(&cluster.network, addr)?;
            }
            reg_workloads.push(serde_json::json!({
                "name": w.name,
                "namespace": w.namespace,
                "serviceAccount": w.service_account,
                "address": addr.to_string(),
                "labels": w.labels,
                "tokenSha256": isthmus_api::workload_credential::sha256_hex(&token),
            }));
        }
        let registry = serde_json::json!({
            "services": tpl.services.iter().map(|s| serde_json::json!({
                "name": s.name, "namespace": s.namespace,
                "ports": [{"name": "http", "port": s.port}],
                "selector": s.selector,
            })).collect::<Vec<_>>(),
            "workloads": reg_workloads,
        });
        std::fs::write(
            cdir.join("registry.yaml"),
            serde_saphyr::to_string(&registry)?,
        )?;

        let agent_dir = cdir.join("agent");
        // The token goes in a 0600 file, not on the command line.
        let token_file = cdir.join("join-token");
        isthmus_transport::write_private(&token_file, &registered.join_token)?;
        let agent_admin = SocketAddr::new(IpAddr::V4(pod(2)), ports::ADMIN);
        let name = format!("agent-{}", cluster.name);
        let spec = |name: &str, kind: &'static str, listeners: BTreeMap<String, String>| Spec {
            name: name.to_string(),
            kind,
            cluster: Some(cluster.name.clone()),
            network: Some(cluster.network.clone()),
            ns: ns.clone(),
            listeners,
        };
        let args = vec![
            "agent".into(),
            "--primary".into(),
            state.primary_grpc.clone(),
            "--join-token-file".into(),
            token_file.display().to_string(),
            "--cluster".into(),
            cluster.name.clone(),
            "--state-dir".into(),
            agent_dir.display().to_string(),
            "--registry".into(),
            cdir.join("registry.yaml").display().to_string(),
            "--admin".into(),
            agent_admin.to_string(),
        ];
        let listeners = BTreeMap::from([("admin".into(), agent_admin.to_string())]);
        let component = spawner.spawn(spec(&name, "agent", listeners), args)?;
        let pid = component.pid;
        state.components.push(component);
        state.save()?;
        wait_ready(ns.as_deref(), agent_admin, pid, &spawner.log(&name)).await?;

        if with_gateways {
            let name = format!("gateway-{}", cluster.name);
            let gw_listen = SocketAddr::new(IpAddr::V4(gw), ports::GATEWAY);
            let gw_admin = SocketAddr::new(IpAddr::V4(gw), ports::ADMIN);
            let gw_metrics = SocketAddr::new(IpAddr::V4(gw), ports::METRICS);
            let component = if opts.envoy_for(&name) {
                let token = std::fs::read_to_string(agent_dir.join("gateway-token"))?;
                let bootstrap = crate::envoy::gateway_bootstrap(
                    &cluster.name,
                    &gw.to_string(),
                    gw_admin,
                    &state.primary_grpc,
                    &token,
                    &agent_dir.join("roots.pem"),
                )?;
                let listeners = BTreeMap::from([
                    ("gateway".into(), gw_listen.to_string()),
                    ("admin".into(), gw_admin.to_string()),
                ]);
                spawn_envoy(
                    &spawner,
                    spec(&name, "gateway", listeners),
                    &cdir,
                    &bootstrap,
                )?
            } else {
                let args = vec![
                    "gateway".into(),
                    "--primary".into(),
                    state.primary_grpc.clone(),
                    "--cluster".into(),
                    cluster.name.clone(),
                    "--token-file".into(),
                    agent_dir.join("gateway-token").display().to_string(),
                    "--roots".into(),
                    agent_dir.join("roots.pem").display().to_string(),
                    "--listen".into(),
                    gw_listen.to_string(),
                    "--admin".into(),
                    gw_admin.to_string(),
                    "--metrics".into(),
                    gw_metrics.to_string(),
                ];
                let listeners = BTreeMap::from([
                    ("gateway".into(), gw_listen.to_string()),
                    ("admin".into(), gw_admin.to_string()),
                    ("metrics".into(), gw_metrics.to_string()),
                ]);
                spawner.spawn(spec(&name, "gateway", listeners), args)?
            };
            let pid = component.pid;
            state.components.push(component);
            state.save()?;
            wait_ready(ns.as_deref(), gw_admin, pid, &spawner.log(&name)).await?;
        }

        // 3. Workloads: the sample app and its sidecar.
        for (j, w) in cluster.workloads.iter().enumerate() {
            let addr = pod(10 + j as u8);
            let app_addr = SocketAddr::new(IpAddr::V4(addr), 18080);
            let mut proxy_args: Vec<String> = vec![
                "proxy".into(),
                "--primary".into(),
                state.primary_grpc.clone(),
                "--cluster".into(),
                cluster.name.clone(),
                "--agent-socket".into(),
                agent_dir.join("ca.sock").display().to_string(),
                "--token-file".into(),
                cdir.join(format!("{}.token", w.name)).display().to_string(),
                "--node-id".into(),
                format!("sidecar~{}~{}", cluster.name, w.name),
            ];
            if let Some(ttl) = opts.cert_ttl_seconds {
                proxy_args.push("--cert-ttl-seconds".into());
                proxy_args.push(ttl.to_string());
            }
            let listen = |port: u16| SocketAddr::new(IpAddr::V4(addr), port);
            for (flag, port) in [
                ("--outbound", ports::OUTBOUND),
                ("--inbound", ports::INBOUND),
                ("--admin", ports::ADMIN),
                ("--metrics", ports::METRICS),
            ] {
                proxy_args.push(flag.into());
                proxy_args.push(listen(port).to_string());
            }
            let mut apps: Vec<(u16, SocketAddr)> = Vec::new();
            if let Some(app) = &w.app {
                let port = tpl
                    .services
                    .iter()
                    .find(|s| s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                    .map(|s| s.port)
                    .unwrap_or(8080);
                proxy_args.push("--app".into());
                proxy_args.push(format!("{port}={app_addr}"));
                apps.push((port, app_addr));
                let name = format!("{app}-{}", cluster.name);
                let args = vec![
                    "echo".into(),
                    "--listen".into(),
                    app_addr.to_string(),
                    "--cluster".into(),
                    cluster.name.clone(),
                    "--workload".into(),
                    w.name.clone(),
                ];
                let listeners = BTreeMap::from([("http".into(), app_addr.to_string())]);
                state
                    .components
                    .push(spawner.spawn(spec(&name, "app", listeners), args)?);
            }
            let name = format!("proxy-{}", w.name);
            let listeners = BTreeMap::from([
                ("outbound".into(), listen(ports::OUTBOUND).to_string()),
                ("inbound".into(), listen(ports::INBOUND).to_string()),
                ("admin".into(), listen(ports::ADMIN).to_string()),
                ("metrics".into(), listen(ports::METRICS).to_string()),
            ]);
            let component = if opts.envoy_for(&w.name) {
                let bootstrap = crate::envoy::sidecar_bootstrap(
                    &format!("sidecar~{}~{}", cluster.name, w.name),
                    &cluster.name,
                    &addr.to_string(),
                    &apps,
                    listen(ports::ADMIN),
                    &state.primary_grpc,
                    &agent_dir.join("sds").join(format!("{}.sock", w.name)),
                )?;
                let mut listeners = listeners;
                listeners.remove("metrics");
                spawn_envoy(&spawner, spec(&name, "proxy", listeners), &cdir, &bootstrap)?
            } else {
                spawner.spawn(spec(&name, "proxy", listeners), proxy_args)?
            };
            let pid = component.pid;
            state.components.push(component);
            state.save()?;
            wait_ready(
                ns.as_deref(),
                listen(ports::ADMIN),
                pid,
                &spawner.log(&name),
            )
            .await?;
        }
    }

    // 4. The client command, proven before it is handed out.
    let client_proxy = state
        .component(&format!("proxy-{}", tpl.client.workload))
        .context("template names a client workload that has no sidecar")?
        .clone();
    let outbound = client_proxy.listeners["outbound"].clone();
    let curl = format!(
        "curl -sS --max-time 10 -x http://{outbound} {}",
        tpl.client.url
    );
    state.client_command = match &client_proxy.netns {
        Some(ns) => format!("ip netns exec {ns} {curl}"),
        None => curl,
    };
    let out: SocketAddr = outbound.parse()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match probe::get(client_proxy.netns.as_deref(), out, &tpl.client.url).await {
            Ok((200, _)) => break,
            other if Instant::now() > deadline => {
                bail!("the first request through the mesh never succeeded: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Ok(())
}

/// Writes `bootstrap` beside the cluster's files and starts Envoy with it.
fn spawn_envoy(
    spawner: &Spawner,
    spec: Spec,
    cdir: &Path,
    bootstrap: &str,
) -> anyhow::Result<Component> {
    let dir = cdir.join("envoy");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.yaml", spec.name));
    std::fs::write(&path, bootstrap).with_context(|| format!("writing {}", path.display()))?;
    let args = vec![
        "-c".into(),
        path.display().to_string(),
        "--disable-hot-restart".into(),
        "--log-level".into(),
        "warning".into(),
    ];
    spawner.spawn_program(spec, Some(crate::envoy::binary()?), args)
}

/// Starts the etcd that primary replicas share (Debian's etcd-server), in
/// the primaries' namespace, and waits until it reports itself healthy.
async fn start_etcd(
    spawner: &Spawner,
    state: &mut MeshState,
    addr: Ipv4Addr,
    ns: Option<String>,
) -> anyhow::Result<String> {
    let program = PathBuf::from("etcd");
    if Command::new(&program).arg("--version").output().is_err() {
        bail!(
            "several primaries need etcd, which is not installed; scripts/install-deps.sh installs Debian's etcd-server"
        );
    }
    let client = SocketAddr::new(IpAddr::V4(addr), ETCD_CLIENT_PORT);
    let peer = format!("http://{addr}:{ETCD_PEER_PORT}");
    let url = format!("http://{client}");
    let args: Vec<String> = vec![
        "--name".into(),
        "isthmus".into(),
        "--data-dir".into(),
        state.state_dir.join("etcd").display().to_string(),
        "--listen-client-urls".into(),
        url.clone(),
        "--advertise-client-urls".into(),
        url.clone(),
        "--listen-peer-urls".into(),
        peer.clone(),
        "--initial-advertise-peer-urls".into(),
        peer.clone(),
        "--initial-cluster".into(),
        format!("isthmus={peer}"),
    ];
    let spec = Spec {
        name: "etcd".into(),
        kind: "etcd",
        cluster: None,
        network: None,
        ns: ns.clone(),
        listeners: BTreeMap::from([("client".into(), client.to_string())]),
    };
    let component = spawner.spawn_program(spec, Some(program), args)?;
    let pid = component.pid;
    state.components.push(component);
    state.save()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if !alive(pid) {
            bail!("etcd exited:\n{}", tail(&spawner.log("etcd")));
        }
        if let Ok((200, body)) = probe::get(ns.as_deref(), client, "/health").await
            && body.contains("true")
        {
            return Ok(url);
        }
        if Instant::now() > deadline {
            bail!(
                "etcd was not healthy within {READY_TIMEOUT:?}:\n{}",
                tail(&spawner.log("etcd"))
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_primary(
    state: &MeshState,
    name: &str,
    socket: &Path,
    pid: u32,
) -> anyhow::Result<PrimaryClient> {
    let log = state.state_dir.join("logs").join(format!("{name}.log"));
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if !alive(pid) {
            bail!("{name} exited:\n{}", tail(&log));
        }
        if state.ca_file.exists()
            && state.admin_token_file.exists()
            && socket.exists()
            && let Ok(client) = state.replica_client(socket)
            && client.healthz().await.is_ok()
        {
            return Ok(client);
        }
        if Instant::now() > deadline {
            bail!("{name} did not become healthy:\n{}", tail(&log));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `GET /ready` on a component's admin port to answer 200.
async fn wait_ready(
    ns: Option<&str>,
    admin: SocketAddr,
    pid: u32,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if !alive(pid) {
            bail!("component exited before it was ready:\n{}", tail(log));
        }
        if let Ok((200, _)) = probe::get(ns, admin, "/ready").await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "component at {admin} was not ready within {READY_TIMEOUT:?}:\n{}",
                tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

struct Spawner {
    exe: PathBuf,
    dir: PathBuf,
}

impl Spawner {
    fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    /// Starts a component and describes it.
    fn spawn(&self, spec: Spec, args: Vec<String>) -> anyhow::Result<Component> {
        self.spawn_program(spec, None, args)
    }

    /// Starts `program ARGS...` (or a component, if None) and describes it.
    fn spawn_program(
        &self,
        spec: Spec,
        program: Option<PathBuf>,
        args: Vec<String>,
    ) -> anyhow::Result<Component> {
        let pid = self.start(&spec.name, spec.ns.as_deref(), program.as_deref(), &args)?;
        Ok(Component {
            log: self.log(&spec.name),
            name: spec.name,
            kind: spec.kind.to_string(),
            cluster: spec.cluster,
            network: spec.network,
            netns: spec.ns,
            pid,
            listeners: spec.listeners,
            args,
            program,
        })
    }

    /// Starts `exe component ARGS...`, in `ns` if given, detached from our
    /// process group so it outlives `up --detach` and a terminal's Ctrl-C
    /// reaches only `up`, which then stops everything in order.
    fn start(
        &self,
        name: &str,
        ns: Option<&str>,
        program: Option<&Path>,
        args: &[String],
    ) -> anyhow::Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(name))?;
        let exe = program.unwrap_or(&self.exe);
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        if program.is_none() {
            cmd.arg("component");
        }
        cmd.args(args)
            .env("ISTHMUS_STATE_DIR", &self.dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(child.id())
    }
}

/// What a component is, apart from its arguments.
struct Spec {
    name: String,
    kind: &'static str,
    cluster: Option<String>,
    network: Option<String>,
    ns: Option<String>,
    listeners: BTreeMap<String, String>,
}

/// Starts a stopped component again with the arguments it was started with,
/// and records its new pid. For tests of outages and recovery.
pub async fn restart(state: &mut MeshState, name: &str, exe: &Path) -> anyhow::Result<u32> {
    let spawner = Spawner {
        exe: exe.to_path_buf(),
        dir: state.state_dir.clone(),
    };
    let c = state
        .components
        .iter_mut()
        .find(|c| c.name == name)
        .with_context(|| format!("no component {name}"))?;
    if alive(c.pid) {
        bail!("{name} is still running (pid {})", c.pid);
    }
    c.pid = spawner.start(name, c.netns.as_deref(), c.program.as_deref(), &c.args)?;
    let pid = c.pid;
    state.save()?;
    Ok(pid)
}

/// Stops `pid`: SIGTERM, then SIGKILL if it still runs after `grace`.
/// Returns once it is gone (or after one more second of SIGKILL).
pub async fn stop(pid: u32, grace: std::time::Duration) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let target = Pid::from_raw(pid as i32);
    let _ = kill(target, Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while alive(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if alive(pid) {
        let _ = kill(target, Signal::SIGKILL);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while alive(pid) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// True if `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// True if `pid` is one of this mesh's processes (guards against pid reuse).
fn ours(pid: u32, state_dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| {
            let needle = format!("ISTHMUS_STATE_DIR={}", state_dir.display());
            env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes())
        })
        .unwrap_or(false)
}

/// Stops every process of the mesh in `state_dir` and removes its network
/// namespaces. Safe to run twice.
pub fn down(state_dir: &Path) -> Vec<String> {
    let mut report = Vec::new();
    let Ok(state) = MeshState::load(state_dir) else {
        report.push(format!("no mesh recorded in {}", state_dir.display()));
        return report;
    };
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let live: Vec<&Component> = state
        .components
        .iter()
        .rev()
        .filter(|c| alive(c.pid) && ours(c.pid, &state.state_dir))
        .collect();
    for c in &live {
        let _ = kill(Pid::from_raw(c.pid as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while live.iter().any(|c| alive(c.pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in &live {
        if alive(c.pid) {
            let _ = kill(Pid::from_raw(c.pid as i32), Signal::SIGKILL);
            report.push(format!("{} did not stop on SIGTERM; killed", c.name));
        }
    }
    for c in &live {
        // Reap our own children (foreground mode); others are reaped by init.
        let _ = nix::sys::wait::waitpid(
            Pid::from_raw(c.pid as i32),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
    report.push(format!("stopped {} processes", live.len()));
    if let Some(layout) = &state.layout {
        layout.destroy();
        report.push(format!("removed network namespaces {}-*", layout.prefix));
    }
    let _ = std::fs::remove_file(state_dir.join(STATE_FILE));
    report
}
