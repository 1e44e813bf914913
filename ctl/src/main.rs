//! `isthmusctl`: the Isthmus command line.
//!
//! Operator commands talk to a primary's REST API, found either through a
//! local mesh's state dir (`--state-dir`) or through `--primary`, `--token`
//! and `--ca-file` (or `ISTHMUS_PRIMARY`, `ISTHMUS_TOKEN`, `ISTHMUS_CA_FILE`).
//! `up`, `down` and `status` run and inspect a mesh on this machine. The
//! `component` command runs one Isthmus process; `up` uses it so a single
//! binary is all a laptop needs.

mod ca;
mod workload;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use isthmus_api::rest::RegisterCluster;
use isthmus_topology::client::PrimaryClient;
use isthmus_topology::runner::{self, MeshState, NetMode, UpOptions};

#[derive(Parser)]
#[command(
    name = "isthmusctl",
    version,
    about = "Operate an Isthmus service mesh"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

/// The options every command accepts anywhere on the command line, before
/// or after its name, as kubectl's and istioctl's do.
///
/// Clap copies a global option's value into every subcommand along the
/// parsed path that has an argument of the same id, and a value given on
/// the command line outranks an environment variable, which outranks a
/// default. So the commands keep their own `Conn` and `-o` (with their own
/// defaults and environment variables), and `isthmusctl --state-dir D ca
/// status` fills the same field as `isthmusctl ca status --state-dir D`.
/// The ids and value types here must match those of [`Conn`] and of the
/// commands' `output`. They carry no environment variable: the command's own
/// argument reads it, so `ISTHMUS_PRIMARY` never crosses into a component.
#[derive(clap::Args)]
struct Global {
    /// A local mesh's state dir: `up`, `down`, `status` and `failover` run
    /// there; operator commands read its primary and admin token from it.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// The primary's REST API, `https://HOST:15014` [env: ISTHMUS_PRIMARY].
    #[arg(long, global = true)]
    primary: Option<String>,
    /// Admin bearer token [env: ISTHMUS_TOKEN].
    #[arg(long, global = true)]
    token: Option<String>,
    /// PEM file with the mesh root, to verify the primary
    /// [env: ISTHMUS_CA_FILE].
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    /// Output format (each command has its own default).
    #[arg(short, long, global = true, value_enum)]
    output: Option<Output>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
    Yaml,
}

/// How to reach a primary.
#[derive(clap::Args, Clone)]
struct Conn {
    /// A local mesh started by `isthmusctl up`; its primary and admin token
    /// are read from here.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The primary's REST API, `https://HOST:15014`.
    #[arg(long, env = "ISTHMUS_PRIMARY")]
    primary: Option<String>,
    /// Admin bearer token.
    #[arg(long, env = "ISTHMUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file with the mesh root, to verify the primary. Not needed with a
    /// token the primary minted, which pins the root itself.
    #[arg(long, env = "ISTHMUS_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl Conn {
    fn client(&self) -> anyhow::Result<PrimaryClient> {
        self.client_with_pins(&[])
    }

    /// With a token and no CA file, also accept the roots in `pins`.
    fn client_with_pins(&self, pins: &[String]) -> anyhow::Result<PrimaryClient> {
        if let Some(dir) = &self.state_dir {
            return MeshState::load(dir)?.client();
        }
        let (Some(primary), Some(token)) = (&self.primary, &self.token) else {
            bail!("say which primary to use: --state-dir DIR, or --primary URL --token T");
        };
        let ca = match &self.ca_file {
            Some(f) => Some(
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            ),
            None => None,
        };
        PrimaryClient::with_pins(primary, token, ca.as_deref(), pins)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a topology template on this machine: embedded store, real
    /// processes, sample services.
    Up {
        /// Template name (see topologies/templates/).
        #[arg(default_value = "multi-network")]
        template: String,
        /// Return once the mesh is ready instead of staying in the foreground.
        #[arg(long)]
        detach: bool,
        /// Where the mesh keeps its state, logs and credentials.
        #[arg(long, default_value = "./isthmus-data")]
        state_dir: PathBuf,
        /// Network layout.
        #[arg(long, value_enum, default_value = "auto")]
        net: NetMode,
        /// Sidecar certificate lifetime in seconds (default: the CA's 24 h);
        /// a short one shows renewal at work.
        #[arg(long)]
        cert_ttl: Option<u64>,
        /// The proxies: isthmus-proxy and isthmus-gateway, or Envoy 1.40
        /// (from scripts/install-deps.sh's .venv) as every sidecar and gateway.
        #[arg(long, value_enum, default_value = "isthmus")]
        data_plane: runner::DataPlane,
    },
    /// Stop a local mesh and remove its network namespaces.
    Down {
        /// The local mesh's state dir (from `up --state-dir`).
        #[arg(long, default_value = "./isthmus-data")]
        state_dir: PathBuf,
    },
    /// Restart one component of a local mesh (for example `primary` after a
    /// crash, or to pick up a new build) with the arguments `up` gave it. A
    /// running one is stopped first (SIGTERM, then SIGKILL after 10 s).
    /// `status` and `down` follow the new process.
    Restart {
        /// The component's name, as `status` lists it (`primary`,
        /// `agent-east`, `gateway-west`, `proxy-client-east`, ...).
        component: String,
        /// The local mesh's state dir (from `up --state-dir`).
        #[arg(long, default_value = "./isthmus-data")]
        state_dir: PathBuf,
    },
    /// Show every component of a local mesh.
    Status {
        /// The local mesh's state dir (from `up --state-dir`).
        #[arg(long, default_value = "./isthmus-data")]
        state_dir: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Register, list and deregister clusters.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Apply config (Istio kinds, Cluster, Mesh) from files, directories
    /// or stdin (`-f -`); all documents are validated before any is stored.
    Apply {
        /// A file, a directory (its .yaml, .yml and .json files) or `-` for
        /// stdin (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show config objects of a kind, or one by name.
    Get {
        /// The kind or its plural, e.g. `VirtualService` or `virtualservices`.
        kind: String,
        /// One object's name (default: every object of the kind).
        name: Option<String>,
        /// The namespace to look in.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete a config object.
    Delete {
        /// The kind or its plural, e.g. `VirtualService` or `virtualservices`.
        kind: String,
        /// The object's name.
        name: String,
        /// The object's namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// What every connected proxy has ACKed or NACKed.
    ProxyStatus {
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// What one proxy holds: its listeners, routes, clusters, endpoints or
    /// secrets, from its admin endpoint (Envoy's config dump;
    /// isthmus-proxy's own). Secrets show no private key. `-o table` shows
    /// routes one a line: match, destinations with subsets and weights,
    /// timeout, retries, mirror and faults.
    ProxyConfig {
        /// The proxy: in a local mesh, a workload (`client-east`),
        /// `gateway-east`, or a component name from `status`; with
        /// `--admin`, any name for the output.
        proxy: String,
        /// Which part of the proxy's config to show.
        #[arg(value_enum)]
        what: isthmus_topology::inspect::ProxyConfigKind,
        /// The local mesh's state dir (from `up --state-dir`).
        #[arg(long, default_value = "./isthmus-data")]
        state_dir: PathBuf,
        /// The proxy's admin address (`HOST:PORT`), for a proxy that no
        /// local mesh records; it must be reachable from here (for
        /// Kubernetes, through `kubectl port-forward`).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "json")]
        output: Output,
    },
    /// Cross-cluster failover on a local mesh.
    Failover {
        #[command(subcommand)]
        command: FailoverCmd,
    },
    /// The mesh CA: status, root and intermediate rotation, import.
    Ca {
        #[command(subcommand)]
        command: ca::CaCmd,
    },
    /// Workload credentials for a file registry.
    Workload {
        #[command(subcommand)]
        command: workload::WorkloadCmd,
    },
    /// Run one Isthmus process: primary, agent, gateway, proxy or echo.
    /// `up` starts each component this way, so this binary is all a machine
    /// needs; `isthmusctl component KIND --help` lists its flags.
    Component {
        #[command(subcommand)]
        component: isthmus_topology::component::Component,
    },
}

#[derive(Subcommand)]
enum FailoverCmd {
    /// Prove failover on a mesh that `up` runs: kill every workload of
    /// SERVICE in CLUSTER (app and sidecar) under a stream of requests,
    /// report the failed requests and how long traffic took to settle on
    /// other clusters, then start them again and report how long traffic
    /// took to come back.
    Drill {
        /// `NAME[.NAMESPACE][:PORT]` or the FQDN, e.g. `echo`, `echo.demo:8080`;
        /// a bare NAME is in the namespace of `--from` (Istio's short names).
        service: String,
        /// The cluster whose workloads of SERVICE are stopped.
        #[arg(long)]
        cluster: String,
        /// The client workload whose sidecar sends the requests (default:
        /// another workload of the cluster).
        #[arg(long)]
        from: Option<String>,
        /// Requests per second during the failover.
        #[arg(long, default_value_t = 50)]
        rate: u32,
        /// Seconds each phase may take before the drill gives up.
        #[arg(long, default_value_t = 60)]
        patience: u64,
        /// The local mesh's state dir (from `up --state-dir`).
        #[arg(long, default_value = "./isthmus-data")]
        state_dir: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Register a cluster; prints its one-time join token.
    Register {
        /// The cluster's name, which its agent passes as `--cluster`.
        name: String,
        /// The network the cluster's workloads are on; clusters on one
        /// network reach each other's endpoints directly, others through
        /// gateways.
        #[arg(long)]
        network: String,
        /// The cluster's region, for locality-ordered failover.
        #[arg(long, default_value = "")]
        region: String,
        /// The cluster's zone within its region.
        #[arg(long, default_value = "")]
        zone: String,
        /// East-west gateway IP (repeatable).
        #[arg(long = "gateway")]
        gateways: Vec<String>,
        /// Join token lifetime in seconds (default 3600).
        #[arg(long, default_value_t = 0)]
        token_ttl: u64,
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// List clusters with health, last sync, agent version and endpoints.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Remove a cluster: its endpoints leave every proxy and its agent's
    /// credentials stop working.
    Deregister {
        /// The cluster's name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

fn print(
    output: Output,
    value: &impl serde::Serialize,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
        Output::Yaml => serde_saphyr::to_string(value)?,
        Output::Table => table(),
    };
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

/// Reads every document named by `-f`: files, directories (their .yaml,
/// .yml and .json files, sorted) and `-` for stdin.
fn read_documents(files: &[PathBuf]) -> anyhow::Result<String> {
    use std::io::Read;
    let mut docs = Vec::new();
    for f in files {
        if f.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            docs.push(text);
        } else if f.is_dir() {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(f)
                .with_context(|| format!("reading {}", f.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
                })
                .collect();
            paths.sort();
            for p in paths {
                docs.push(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                );
            }
        } else {
            docs.push(
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            );
        }
    }
    if docs.is_empty() {
        bail!("no documents found in {files:?}");
    }
    // JSON is YAML too, so one multi-document body carries them all.
    Ok(docs.join("\n---\n"))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ago(unix: Option<u64>) -> String {
    unix.map(|t| format!("{}s ago", now_unix().saturating_sub(t)))
        .unwrap_or_else(|| "-".into())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let component = matches!(cli.command, Cmd::Component { .. });
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| if component { "info" } else { "warn" }.into()),
        )
        .init();
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli.command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, without a backtrace: this is for operators.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Component { component } => component.run().await,
        Cmd::Ca { command } => ca::run(command).await,
        Cmd::Workload { command } => workload::run(command),
        Cmd::Failover {
            command:
                FailoverCmd::Drill {
                    service,
                    cluster,
                    from,
                    rate,
                    patience,
                    state_dir,
                    output,
                },
        } => {
            let drill = isthmus_topology::drill::Drill {
                service,
                cluster,
                from,
                rate,
                patience: std::time::Duration::from_secs(patience),
                exe: std::env::current_exe()?,
            };
            let r = isthmus_topology::drill::run(&state_dir, &drill).await?;
            print(output, &r, || {
                let by: Vec<String> = r
                    .answered_by
                    .iter()
                    .map(|(c, n)| format!("{c} {n}"))
                    .collect();
                format!(
                    "drill: {} in {} (requests from {}; stopped {})\n\
                     failover: {} ms until every answer came from another cluster; {} of {} requests failed; answered by: {}\n\
                     return: {} ms after the restart, {} answered again\n",
                    r.service,
                    r.cluster,
                    r.from,
                    r.stopped.join(", "),
                    r.failover_ms,
                    r.failed,
                    r.requests,
                    by.join(", "),
                    r.returned_ms,
                    r.cluster,
                )
            })
        }
        Cmd::ProxyConfig {
            proxy,
            what,
            state_dir,
            admin,
            output,
        } => {
            use isthmus_topology::inspect;
            let value = match admin {
                Some(admin) => {
                    let target = inspect::AdminTarget {
                        name: proxy,
                        admin,
                        netns: None,
                    };
                    inspect::proxy_config_at(&target, what).await?
                }
                None => inspect::proxy_config(&state_dir, &proxy, what).await?,
            };
            if output == Output::Table {
                let table = match what {
                    inspect::ProxyConfigKind::Routes => inspect::routes_table(&value)
                        .or_else(|| value["note"].as_str().map(|n| format!("{n}\n"))),
                    _ => None,
                };
                let Some(table) = table else {
                    bail!(
                        "-o table shows routes only (`proxy-config PROXY routes`); use -o json or -o yaml for {}",
                        format!("{what:?}").to_lowercase()
                    );
                };
                std::io::stdout().write_all(table.as_bytes())?;
                return Ok(());
            }
            print(output, &value, String::new)
        }
        Cmd::Up {
            template,
            detach,
            state_dir,
            net,
            cert_ttl,
            data_plane,
        } => {
            let exe = std::env::current_exe().context("locating isthmusctl")?;
            let state = runner::up(UpOptions {
                template: template.clone(),
                state_dir: state_dir.clone(),
                mode: net,
                exe,
                cert_ttl_seconds: cert_ttl,
                data_plane,
                swap_data_plane: vec![],
            })
            .await?;
            let dir = state.state_dir.display().to_string();
            match &state.layout {
                Some(l) => println!(
                    "mesh {template} is up, one network namespace per network ({}-*)",
                    l.prefix
                ),
                None => println!(
                    "mesh {template} is up on loopback (networks are not isolated; run as root for namespaces)"
                ),
            }
            println!("  primary API   {}", state.primary_api);
            println!("  components    isthmusctl status --state-dir {dir}");
            println!("  clusters      isthmusctl cluster list --state-dir {dir}");
            println!("  stop          isthmusctl down --state-dir {dir}");
            if detach {
                println!("Send one request from east's client through the mesh:");
                println!("{}", state.client_command);
                return Ok(());
            }
            println!("Send one request from east's client through the mesh:");
            println!("{}", state.client_command);
            println!("Press Ctrl-C to stop.");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            for line in runner::down(&state.state_dir) {
                println!("{line}");
            }
            Ok(())
        }
        Cmd::Down { state_dir } => {
            for line in runner::down(&state_dir) {
                println!("{line}");
            }
            Ok(())
        }
        Cmd::Restart {
            component,
            state_dir,
        } => {
            let mut state = MeshState::load(&state_dir)?;
            let pid = state
                .component(&component)
                .map(|c| c.pid)
                .with_context(|| {
                    format!(
                        "the mesh in {} has no component {component:?}; `isthmusctl status --state-dir {}` lists them",
                        state_dir.display(),
                        state_dir.display()
                    )
                })?;
            if runner::alive(pid) {
                runner::stop(pid, std::time::Duration::from_secs(10)).await;
            }
            let exe = std::env::current_exe().context("locating isthmusctl itself")?;
            let pid = runner::restart(&mut state, &component, &exe).await?;
            println!("{component} restarted (pid {pid})");
            Ok(())
        }
        Cmd::Status { state_dir, output } => {
            let state = MeshState::load(&state_dir)?;
            let components: Vec<serde_json::Value> = state
                .components
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "name": c.name, "kind": c.kind, "cluster": c.cluster, "network": c.network,
                        "netns": c.netns, "pid": c.pid, "listeners": c.listeners,
                        "running": runner::alive(c.pid), "log": c.log,
                    })
                })
                .collect();
            // With replicas, ask any live one which leads.
            let mut leader = None;
            if state.primary_sockets.len() > 1 {
                for socket in &state.primary_sockets {
                    if let Ok(client) = state.replica_client(socket)
                        && let Ok(view) = client.leader().await
                    {
                        leader = view.leader;
                        break;
                    }
                }
            }
            print(
                output,
                &serde_json::json!({ "components": components, "leader": leader }),
                || {
                    let mut s = match &leader {
                        Some(l) => format!("leader: {l}\n"),
                        None if state.primary_sockets.len() > 1 => "leader: none\n".into(),
                        None => String::new(),
                    };
                    s += &format!(
                        "{:<18} {:<8} {:<8} {:<10} {:<8} {:<7} LISTENERS\n",
                        "NAME", "KIND", "CLUSTER", "NETWORK", "PID", "STATE"
                    );
                    for c in &state.components {
                        let listeners: Vec<String> = c
                            .listeners
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect();
                        s += &format!(
                            "{:<18} {:<8} {:<8} {:<10} {:<8} {:<7} {}\n",
                            c.name,
                            c.kind,
                            c.cluster.as_deref().unwrap_or("-"),
                            c.network.as_deref().unwrap_or("-"),
                            c.pid,
                            if runner::alive(c.pid) {
                                "running"
                            } else {
                                "exited"
                            },
                            listeners.join(" ")
                        );
                    }
                    s
                },
            )
        }
        Cmd::Cluster { command } => match command {
            ClusterCmd::Register {
                name,
                network,
                region,
                zone,
                gateways,
                token_ttl,
                conn,
                output,
            } => {
                let registered = conn
                    .client()?
                    .register_cluster(&RegisterCluster {
                        name,
                        network,
                        region,
                        zone,
                        gateways,
                        token_ttl_seconds: token_ttl,
                    })
                    .await?;
                print(output, &registered, || {
                    format!(
                        "cluster {} registered on network {}.\nJoin token (shown once, valid for {}s):\n{}\n",
                        registered.cluster.name,
                        registered.cluster.network,
                        registered
                            .join_token_expires_unix
                            .saturating_sub(now_unix()),
                        registered.join_token
                    )
                })
            }
            ClusterCmd::List { conn, output } => {
                let clusters = conn.client()?.list_clusters().await?;
                print(output, &clusters, || {
                    let mut s = format!(
                        "{:<12} {:<12} {:<14} {:<9} {:<9} {:<12} {:<12} ENDPOINTS\n",
                        "NAME", "NETWORK", "LOCALITY", "HEALTH", "AGENT", "HEARTBEAT", "LAST SYNC"
                    );
                    for c in &clusters {
                        s += &format!(
                            "{:<12} {:<12} {:<14} {:<9} {:<9} {:<12} {:<12} {}\n",
                            c.name,
                            c.network,
                            format!("{}/{}", c.region, c.zone),
                            c.health,
                            c.agent_version.as_deref().unwrap_or("-"),
                            ago(c.last_heartbeat_unix),
                            ago(c.last_sync_unix),
                            c.endpoint_count
                        );
                    }
                    s
                })
            }
            ClusterCmd::Deregister { name, conn } => {
                conn.client()?.deregister_cluster(&name).await?;
                println!("cluster {name} deregistered");
                Ok(())
            }
        },
        Cmd::Apply {
            files,
            conn,
            output,
        } => {
            let body = read_documents(&files)?;
            let applied = conn.client()?.apply(body).await?;
            print(output, &applied, || {
                applied
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {}/{} configured (resourceVersion {})\n",
                            r.kind,
                            r.metadata.namespace,
                            r.metadata.name,
                            r.metadata.resource_version.as_deref().unwrap_or("-")
                        )
                    })
                    .collect()
            })
        }
        Cmd::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            conn,
            output,
        } => {
            let client = conn.client()?;
            let items = match &name {
                Some(n) => vec![client.get_config(&kind, &namespace, n).await?],
                None => {
                    let ns = (!all_namespaces).then_some(namespace.as_str());
                    client.list_config(&kind, ns).await?
                }
            };
            let value: serde_json::Value = if name.is_some() {
                serde_json::to_value(&items[0])?
            } else {
                serde_json::to_value(&items)?
            };
            print(output, &value, || {
                let mut s = format!(
                    "{:<24} {:<16} {:<24} {}\n",
                    "KIND", "NAMESPACE", "NAME", "VERSION"
                );
                for r in &items {
                    s += &format!(
                        "{:<24} {:<16} {:<24} {}\n",
                        r.kind,
                        r.metadata.namespace,
                        r.metadata.name,
                        r.metadata.resource_version.as_deref().unwrap_or("-")
                    );
                }
                s
            })
        }
        Cmd::Delete {
            kind,
            name,
            namespace,
            conn,
        } => {
            conn.client()?
                .delete_config(&kind, &namespace, &name)
                .await?;
            println!("{kind} {namespace}/{name} deleted");
            Ok(())
        }
        Cmd::ProxyStatus { conn, output } => {
            let proxies = conn.client()?.proxies().await?;
            print(output, &proxies, || {
                let mut s = format!(
                    "{:<36} {:<8} {:<9} {:<15} {:<16} {:<16} {}\n",
                    "NODE",
                    "CLUSTER",
                    "ROLE",
                    "CLUSTERS (CDS)",
                    "ENDPOINTS (EDS)",
                    "LISTENERS (LDS)",
                    "ROUTES (RDS)"
                );
                for p in proxies.as_array().into_iter().flatten() {
                    let state = |t: &str| {
                        let ty = &p["types"][t];
                        if ty.is_null() {
                            "-".to_string()
                        } else if !ty["nack"].is_null() {
                            "NACKED".into()
                        } else if ty["ackedVersion"] == ty["sentVersion"] {
                            "SYNCED".into()
                        } else {
                            "STALE".into()
                        }
                    };
                    s += &format!(
                        "{:<36} {:<8} {:<9} {:<15} {:<16} {:<16} {}\n",
                        p["nodeId"].as_str().unwrap_or("-"),
                        p["cluster"].as_str().unwrap_or("-"),
                        p["role"].as_str().unwrap_or("-"),
                        state("Cluster"),
                        state("ClusterLoadAssignment"),
                        state("Listener"),
                        state("RouteConfiguration")
                    );
                }
                s
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command (components included) and every option says what it
    /// is for in `--help`. `ca`'s own options are left to its owner's
    /// check for now.
    #[test]
    fn every_command_and_option_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(sub_path.clone());
                }
                if sub_path != "isthmusctl ca" {
                    walk(sub, &sub_path, missing);
                }
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "isthmusctl", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn the_command_line_is_well_formed() {
        // Clap's own checks: unique ids and shorts in every subcommand once
        // the global options are propagated into it.
        Cli::command().debug_assert();
    }

    /// The `Conn` and output `ca status` parses from `args`.
    fn ca_status(args: &[&str]) -> (Option<PathBuf>, Option<String>, Option<String>, Output) {
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            Cmd::Ca {
                command: ca::CaCmd::Status { conn, output },
            } => (conn.state_dir, conn.primary, conn.token, output),
            _ => panic!("{args:?} did not parse as `ca status`"),
        }
    }

    #[test]
    fn global_options_are_accepted_before_and_after_the_command() {
        let want = (Some(PathBuf::from("D")), None, None, Output::Table);
        assert!(ca_status(&["isthmusctl", "--state-dir", "D", "ca", "status"]) == want);
        assert!(ca_status(&["isthmusctl", "ca", "status", "--state-dir", "D"]) == want);
        assert!(ca_status(&["isthmusctl", "ca", "--state-dir", "D", "status"]) == want);

        let want = (
            None,
            Some("https://p:15014".into()),
            Some("T".into()),
            Output::Json,
        );
        let before = [
            "isthmusctl",
            "--primary",
            "https://p:15014",
            "--token",
            "T",
            "-o",
            "json",
            "ca",
            "status",
        ];
        let after = [
            "isthmusctl",
            "ca",
            "status",
            "--primary",
            "https://p:15014",
            "--token",
            "T",
            "-o",
            "json",
        ];
        assert!(ca_status(&before) == want);
        assert!(ca_status(&after) == want);
    }

    #[test]
    fn a_global_option_outranks_the_commands_default() {
        // `status` defaults to ./isthmus-data and a table.
        let cli = Cli::try_parse_from(["isthmusctl", "--state-dir", "D", "-o", "yaml", "status"])
            .expect("parses");
        let Cmd::Status { state_dir, output } = cli.command else {
            panic!("not `status`");
        };
        assert_eq!(state_dir, PathBuf::from("D"));
        assert!(output == Output::Yaml);

        let cli = Cli::try_parse_from(["isthmusctl", "status"]).expect("parses");
        let Cmd::Status { state_dir, output } = cli.command else {
            panic!("not `status`");
        };
        assert_eq!(state_dir, PathBuf::from("./isthmus-data"));
        assert!(output == Output::Table);
    }

    #[test]
    fn global_options_reach_commands_nested_two_deep() {
        let cli = Cli::try_parse_from([
            "isthmusctl",
            "--state-dir",
            "D",
            "-o",
            "json",
            "cluster",
            "list",
        ])
        .expect("parses");
        let Cmd::Cluster {
            command: ClusterCmd::List { conn, output },
        } = cli.command
        else {
            panic!("not `cluster list`");
        };
        assert_eq!(conn.state_dir, Some(PathBuf::from("D")));
        assert!(output == Output::Json);
    }
}
