//! The Isthmus end-to-end harness: starts a whole mesh of real processes
//! with the same runner as `isthmusctl up` (in network namespaces when
//! root), and gives tests ways to reach into it: HTTP from inside a
//! namespace, metrics, config dumps, registry edits, and mesh mTLS clients
//! holding real or foreign certificates. Every wait polls a condition
//! against a deadline.

pub mod istio_ca;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use isthmus_api::pb::sync::sync_client::SyncClient;
use isthmus_api::pb::sync::{AgentMessage, JoinRequest, JoinResponse, PrimaryMessage};
use isthmus_api::rest::RegisterCluster;
use isthmus_ca::Signer;
use isthmus_ca::{SpiffeId, TrustBundle};
use isthmus_topology::netns;
use isthmus_topology::probe;
use isthmus_topology::runner::{self, Component, MeshState, NetMode, UpOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A running mesh; stopped (processes and namespaces) when dropped.
pub struct Mesh {
    pub state: MeshState,
    dir: tempfile::TempDir,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for line in runner::down(self.dir.path()) {
            eprintln!("mesh down: {line}");
        }
    }
}

impl Mesh {
    /// Starts the multi-network template. `node` is the component binary.
    pub async fn up(mode: NetMode, node: &str) -> anyhow::Result<Self> {
        Self::up_with(mode, node, None).await
    }

    /// As [`Mesh::up`], with sidecar certificates of `cert_ttl_seconds`.
    pub async fn up_with(
        mode: NetMode,
        node: &str,
        cert_ttl_seconds: Option<u64>,
    ) -> anyhow::Result<Self> {
        Self::up_template("multi-network", mode, node, cert_ttl_seconds).await
    }

    /// Starts any built-in template.
    pub async fn up_template(
        template: &str,
        mode: NetMode,
        node: &str,
        cert_ttl_seconds: Option<u64>,
    ) -> anyhow::Result<Self> {
        Self::up_data_plane(
            template,
            mode,
            node,
            cert_ttl_seconds,
            runner::DataPlane::Isthmus,
            vec![],
        )
        .await
    }

    /// As [`Mesh::up_template`], choosing the data plane, with the proxies
    /// named in `swap` on the other one.
    pub async fn up_data_plane(
        template: &str,
        mode: NetMode,
        node: &str,
        cert_ttl_seconds: Option<u64>,
        data_plane: runner::DataPlane,
        swap: Vec<String>,
    ) -> anyhow::Result<Self> {
        isthmus_ca::install_crypto_provider();
        let dir = tempfile::Builder::new().prefix("isthmus-e2e-").tempdir()?;
        let state = runner::up(UpOptions {
            template: template.into(),
            state_dir: dir.path().to_path_buf(),
            mode,
            exe: PathBuf::from(node),
            cert_ttl_seconds,
            data_plane,
            swap_data_plane: swap,
        })
        .await?;
        Ok(Self { state, dir })
    }

    pub fn dir(&self) -> &Path {
        &self.state.state_dir
    }

    pub fn component(&self, name: &str) -> &Component {
        self.state
            .component(name)
            .unwrap_or_else(|| panic!("mesh has no component {name}"))
    }

    pub fn listener(&self, name: &str, role: &str) -> SocketAddr {
        let c = self.component(name);
        c.listeners
            .get(role)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{name} has no {role} listener"))
    }

    pub fn netns(&self, name: &str) -> Option<&str> {
        self.component(name).netns.as_deref()
    }

    /// GET `target` from a component's listener, from inside its namespace.
    pub async fn get(&self, name: &str, role: &str, target: &str) -> anyhow::Result<(u16, String)> {
        probe::get(self.netns(name), self.listener(name, role), target).await
    }

    /// A counter's value from a component's `/metrics`, summed over series
    /// whose labels contain every `label` given.
    pub async fn counter(&self, name: &str, metric: &str, labels: &[&str]) -> anyhow::Result<f64> {
        let (status, text) = self.get(name, "metrics", "/metrics").await?;
        if status != 200 {
            bail!("{name} /metrics answered {status}");
        }
        Ok(counter_value(&text, metric, labels))
    }

    /// Edits a cluster's file registry; the agent picks the change up.
    pub fn edit_registry(
        &self,
        cluster: &str,
        edit: impl FnOnce(&mut serde_json::Value) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let path = self
            .dir()
            .join("clusters")
            .join(cluster)
            .join("registry.yaml");
        let text = std::fs::read_to_string(&path)?;
        let mut doc: serde_json::Value =
            serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("registry: {e}"))?;
        edit(&mut doc)?;
        // JSON is YAML too.
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        Ok(())
    }

    /// Rewrites one workload's label in its cluster's file registry.
    pub fn relabel(
        &self,
        cluster: &str,
        workload: &str,
        key: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        self.edit_registry(cluster, |doc| {
            let w = doc["workloads"]
                .as_array_mut()
                .and_then(|ws| ws.iter_mut().find(|w| w["name"] == workload))
                .with_context(|| format!("no workload {workload}"))?;
            w["labels"][key] = serde_json::Value::String(value.to_string());
            Ok(())
        })
    }

    /// Adds a workload (and a service selecting it) to a cluster's registry
    /// and writes its credential where [`Mesh::workload_svid`] finds it.
    pub fn add_workload(&self, cluster: &str, name: &str, address: &str) -> anyhow::Result<()> {
        let token = format!("{name}-credential-{}", std::process::id());
        std::fs::write(
            self.dir()
                .join("clusters")
                .join(cluster)
                .join(format!("{name}.token")),
            &token,
        )?;
        self.edit_registry(cluster, |doc| {
            let selector = serde_json::json!({ "app": name });
            doc["services"]
                .as_array_mut()
                .context("registry has no services")?
                .push(serde_json::json!({"name": name, "namespace": "demo", "ports": [{"name": "http", "port": 8080}], "selector": selector}));
            doc["workloads"]
                .as_array_mut()
                .context("registry has no workloads")?
                .push(serde_json::json!({
                    "name": name, "namespace": "demo", "serviceAccount": name, "address": address,
                    "labels": selector, "tokenSha256": isthmus_ca::pem::fingerprint(token.as_bytes()),
                }));
            Ok(())
        })
    }

    /// Fetches a real certificate for `workload` from its cluster's agent.
    pub async fn workload_svid(
        &self,
        cluster: &str,
        workload: &str,
    ) -> anyhow::Result<isthmus_proxy::identity::Svid> {
        let cdir = self.dir().join("clusters").join(cluster);
        let token = std::fs::read_to_string(cdir.join(format!("{workload}.token")))?;
        isthmus_proxy::identity::AgentClient {
            socket: cdir.join("agent").join("ca.sock"),
            token,
            ttl: Duration::ZERO,
        }
        .fetch()
        .await
    }

    /// Whether west's echo sidecar answers 200 to one request sent as
    /// `svid` from east's client namespace through west's gateway: how a
    /// test proves a certificate is still (or no longer) accepted.
    pub async fn accepted_at_west(&self, svid: &isthmus_proxy::identity::Svid) -> bool {
        let Ok(bundle) = self.bundle() else {
            return false;
        };
        let east = self.netns("proxy-client-east").map(str::to_string);
        match mesh_request(
            east.as_deref(),
            self.listener("gateway-west", "gateway"),
            "outbound_.8080_._.echo.demo.svc.cluster.local",
            &bundle,
            svid.identity(),
        )
        .await
        {
            Ok(x) => x
                .response
                .as_deref()
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200")),
            Err(_) => false,
        }
    }

    /// SIGKILLs the primary and starts it again with its arguments, as
    /// `isthmusctl restart primary` does.
    pub async fn kill_and_restart_primary(&mut self, node: &str) -> anyhow::Result<()> {
        let pid = self.component("primary").pid;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        eventually(
            "the primary to be gone",
            Duration::from_secs(30),
            || async { (!runner::alive(pid)).then_some(()) },
        )
        .await;
        runner::restart(&mut self.state, "primary", Path::new(node)).await?;
        // Until it answers; if it does not, say why with its log.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(client) = self.state.client()
                && client.ca_status().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let primary = self.component("primary");
                let log = std::fs::read_to_string(&primary.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                bail!(
                    "the restarted primary (pid {}, running: {}) did not answer in 120 s; its log ends:\n{}",
                    primary.pid,
                    runner::alive(primary.pid),
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The mesh's trust bundle, as agents hold it.
    pub fn bundle(&self) -> anyhow::Result<TrustBundle> {
        let pem = std::fs::read_to_string(self.dir().join("clusters/east/agent/roots.pem"))?;
        Ok(TrustBundle::from_pem(
            isthmus_api::DEFAULT_TRUST_DOMAIN,
            &pem,
        )?)
    }
}

/// The cluster that answered, from the sample echo app's JSON answer
/// (empty if the body is not one).
pub fn cluster_of(body: &str) -> String {
    isthmus_topology::drill::answered_by(body).unwrap_or_default()
}

pub fn counter_value(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A client TLS config for the primary as workload `namespace/account` of a
/// joined cluster: an SVID from the cluster's intermediate, chained to it.
pub fn workload_tls(
    signer: &isthmus_ca::Signer,
    intermediate_pem: &str,
    trust_bundle_pem: &str,
    namespace: &str,
    account: &str,
) -> std::sync::Arc<rustls::ClientConfig> {
    let id = isthmus_ca::SpiffeId::workload("cluster.local", namespace, account)
        .expect("a valid SPIFFE id");
    // issue_system: tests also forge reserved identities with this (an
    // agent's identity over a key the primary did not pin).
    let (leaf, key) = signer
        .issue_system(&id, Duration::from_secs(600))
        .expect("the intermediate signs the SVID");
    let identity =
        isthmus_transport::Identity::from_pem(&format!("{}{intermediate_pem}", leaf.pem), &key)
            .expect("the SVID chain loads");
    std::sync::Arc::new(
        isthmus_transport::primary_client_config(trust_bundle_pem, Some(identity))
            .expect("a client config"),
    )
}

/// Polls `f` until it yields `Some`, or fails after `patience`.
pub async fn eventually<T, F, Fut>(what: &str, patience: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {patience:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a mesh mTLS client saw.
pub struct MeshExchange {
    /// SPIFFE ID of the server that completed the handshake.
    pub server_id: Option<SpiffeId>,
    /// DER of the server's chain.
    pub server_chain: Vec<Vec<u8>>,
    /// The raw HTTP response, if any came back.
    pub response: Result<String, String>,
}

/// Opens mesh mTLS to `addr` (from inside `ns`) with SNI `sni`, presenting
/// `chain`/`key`, and sends one HTTP GET. The server must present an SVID
/// from `bundle`.
pub async fn mesh_request(
    ns: Option<&str>,
    addr: SocketAddr,
    sni: &str,
    bundle: &TrustBundle,
    identity: isthmus_transport::Identity,
) -> anyhow::Result<MeshExchange> {
    let provider = isthmus_ca::crypto_provider();
    let verifier = Arc::new(isthmus_ca::SpiffeServerVerifier::new(
        bundle.clone(),
        &provider,
        vec![],
    ));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain, identity.key)?;
    let tcp = netns::connect(ns, addr).await?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    let server_chain: Vec<Vec<u8>> = conn
        .peer_certificates()
        .map(|c| c.iter().map(|d| d.to_vec()).collect())
        .unwrap_or_default();
    let server_id = isthmus_ca::verifier::peer_id(conn.peer_certificates());
    let request =
        "GET / HTTP/1.1\r\nhost: echo.demo.svc.cluster.local:8080\r\nconnection: close\r\n\r\n";
    let response = async {
        tls.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).to_string())
    };
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    Ok(MeshExchange {
        server_id,
        server_chain,
        response,
    })
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A primary running in this process on loopback ports, on its embedded
/// store in a temporary dir; stopped when dropped.
pub struct InProcessPrimary {
    /// `https://127.0.0.1:PORT` of the gRPC listener.
    pub grpc: String,
    /// `https://127.0.0.1:PORT` of the REST API.
    pub http: String,
    /// The admin token as first minted (pinning the first root).
    pub admin_token: String,
    /// The REST client, holding the admin token.
    pub api: isthmus_topology::client::PrimaryClient,
    /// SHA-256 of the mesh root, as join tokens carry it.
    pub root_fp: String,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for InProcessPrimary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl InProcessPrimary {
    pub async fn start() -> Self {
        Self::start_with_push_slots(100).await
    }

    /// As [`start`](Self::start), with `--max-concurrent-pushes slots`.
    pub async fn start_with_push_slots(slots: usize) -> Self {
        isthmus_ca::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let (grpc, http) = (free_addr(), free_addr());
        let config = isthmus_primary::Config {
            data_dir: dir.path().to_path_buf(),
            grpc_listen: grpc,
            http_listen: http,
            api_socket: None,
            advertise: vec![],
            admin_token_file: None,
            trust_domain: "cluster.local".into(),
            kek_file: None,
            etcd: vec![],
            replica_id: Some("in-process".into()),
            leader_ttl_seconds: 10,
            max_concurrent_pushes: slots,
        };
        let task = tokio::spawn(isthmus_primary::run(config));
        let token_file = dir.path().join("admin-token");
        let api = eventually(
            "the primary to answer /healthz",
            Duration::from_secs(30),
            || async {
                let token = std::fs::read_to_string(&token_file).ok()?;
                let api = isthmus_topology::client::PrimaryClient::new(
                    &format!("https://{http}"),
                    &token,
                    None,
                )
                .ok()?;
                api.healthz().await.ok()?;
                Some(api)
            },
        )
        .await;
        let token = std::fs::read_to_string(&token_file).expect("admin token");
        let fp = isthmus_api::join_token::parse(token.trim())
            .map(|(_, fp)| fp.to_string())
            .expect("the admin token carries the root fingerprint");
        Self {
            grpc: format!("https://{grpc}"),
            http: format!("https://{http}"),
            admin_token: token.trim().to_string(),
            api,
            root_fp: fp,
            _dir: dir,
            task,
        }
    }
}

/// The identity key every test agent of this process pins at join (PEM,
/// SPKI SHA-256).
pub static TEST_AGENT_KEY: std::sync::LazyLock<(String, String)> = std::sync::LazyLock::new(|| {
    isthmus_ca::issue::generate_pinned_key().expect("an agent identity key")
});

/// A client TLS config for the primary as a cluster's agent: its reserved
/// identity over `agent_key_pem`, the key pinned at join.
pub fn agent_tls(
    signer: &isthmus_ca::Signer,
    intermediate_pem: &str,
    trust_bundle_pem: &str,
    agent_key_pem: &str,
) -> std::sync::Arc<rustls::ClientConfig> {
    let id = isthmus_ca::SpiffeId::workload("cluster.local", "isthmus-system", "isthmus-agent")
        .expect("a valid SPIFFE id");
    let leaf = signer
        .issue_system_with_key(&id, agent_key_pem, Duration::from_secs(600))
        .expect("the intermediate signs the agent's SVID");
    let identity = isthmus_transport::Identity::from_pem(
        &format!("{}{intermediate_pem}", leaf.pem),
        agent_key_pem,
    )
    .expect("the SVID chain loads");
    std::sync::Arc::new(
        isthmus_transport::primary_client_config(trust_bundle_pem, Some(identity))
            .expect("a client TLS config"),
    )
}

impl InProcessPrimary {
    /// Registers a cluster on network `net-NAME`; returns its join token and expiry.
    pub async fn register(&self, name: &str, ttl: u64) -> (String, u64) {
        let r = self
            .api
            .register_cluster(&RegisterCluster {
                name: name.into(),
                network: format!("net-{name}"),
                region: "r".into(),
                zone: "z".into(),
                gateways: vec!["192.0.2.10".into()],
                token_ttl_seconds: ttl,
            })
            .await
            .expect("the primary registers the cluster");
        (r.join_token, r.join_token_expires_unix)
    }

    /// Joins as `cluster`; returns the intermediate's key too.
    pub async fn join(
        &self,
        cluster: &str,
        token: &str,
    ) -> Result<(JoinResponse, String), tonic::Status> {
        // Like a real agent: trust the root the token names.
        let pin = isthmus_api::join_token::parse(token)
            .map(|(_, fp)| fp.to_string())
            .unwrap_or_else(|| self.root_fp.clone());
        let tls = isthmus_transport::pinned_root_client_config(&pin).expect("a pinned TLS config");
        let channel =
            isthmus_transport::tls_channel(&self.grpc, Arc::new(tls)).expect("a gRPC channel");
        let (csr, key) = isthmus_ca::issue::generate_csr("test agent").expect("a CSR");
        let resp = SyncClient::new(channel)
            .join(JoinRequest {
                cluster: cluster.into(),
                token: token.into(),
                csr_pem: csr,
                agent_version: "test".into(),
                agent_key_sha256: TEST_AGENT_KEY.1.clone(),
            })
            .await?;
        Ok((resp.into_inner(), key))
    }

    /// Opens a sync stream presenting `[agent leaf, intermediate_pem]`.
    pub async fn stream(
        &self,
        signer: &Signer,
        intermediate_pem: &str,
        bundle_pem: &str,
    ) -> Result<(mpsc::Sender<AgentMessage>, tonic::Streaming<PrimaryMessage>), tonic::Status> {
        let tls = agent_tls(signer, intermediate_pem, bundle_pem, &TEST_AGENT_KEY.0);
        let channel = isthmus_transport::tls_channel(&self.grpc, tls).expect("a gRPC channel");
        let (tx, rx) = mpsc::channel(4);
        let inbound = SyncClient::new(channel)
            .stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((tx, inbound))
    }

    /// Registers and joins `cluster`, opens its agent stream, reports
    /// `services` and waits until the primary has applied them.
    pub async fn reporting(
        &self,
        cluster: &str,
        services: Vec<isthmus_api::pb::sync::Service>,
    ) -> Reporting {
        let (token, _) = self.register(cluster, 0).await;
        let (joined, key) = self.join(cluster, &token).await.expect("the cluster joins");
        let signer = Signer::from_pem(&joined.intermediate_pem, &key).expect("the intermediate");
        let (agent, mut replies) = self
            .stream(&signer, &joined.intermediate_pem, &joined.trust_bundle_pem)
            .await
            .expect("the agent stream opens");
        agent
            .send(AgentMessage {
                kind: Some(isthmus_api::pb::sync::agent_message::Kind::Snapshot(
                    isthmus_api::pb::sync::Snapshot {
                        cluster: cluster.into(),
                        services,
                    },
                )),
            })
            .await
            .expect("the snapshot is sent");
        while replies
            .message()
            .await
            .expect("the stream is healthy")
            .expect("the stream is open")
            .applied_revision
            == 0
        {}
        Reporting {
            signer,
            intermediate_pem: joined.intermediate_pem,
            trust_bundle_pem: joined.trust_bundle_pem,
            agent,
            replies,
        }
    }
}

/// A joined cluster whose agent has reported its services.
pub struct Reporting {
    pub signer: Signer,
    pub intermediate_pem: String,
    pub trust_bundle_pem: String,
    pub agent: mpsc::Sender<AgentMessage>,
    pub replies: tonic::Streaming<PrimaryMessage>,
}

impl Reporting {
    /// A client TLS config for the primary as a workload of this cluster.
    pub fn workload_tls(&self, namespace: &str, account: &str) -> Arc<rustls::ClientConfig> {
        workload_tls(
            &self.signer,
            &self.intermediate_pem,
            &self.trust_bundle_pem,
            namespace,
            account,
        )
    }
}

/// Steady request load through a sidecar: `workers` kept-alive connections,
/// each sending `per_worker` requests a second, until [`Load::stop`].
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<LoadReport>>,
    started: Instant,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub sent: u64,
    pub failures: Vec<String>,
    /// `"cluster"` values seen in echo responses.
    pub clusters: std::collections::BTreeSet<String>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(0.001)
    }
}

impl Load {
    pub fn start(
        ns: Option<String>,
        outbound: SocketAddr,
        url: &str,
        workers: usize,
        per_worker: u32,
    ) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = (0..workers)
            .map(|_| {
                let (stop, ns, url) = (stop.clone(), ns.clone(), url.to_string());
                tokio::spawn(async move {
                    let mut report = LoadReport::default();
                    let mut session: Option<probe::Session> = None;
                    let mut tick =
                        tokio::time::interval(Duration::from_secs_f64(1.0 / per_worker as f64));
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        tick.tick().await;
                        report.sent += 1;
                        let result = async {
                            if session.is_none() {
                                session =
                                    Some(probe::Session::connect(ns.as_deref(), outbound).await?);
                            }
                            match session.as_mut() {
                                Some(s) => s.get(&url).await,
                                None => bail!("no session"),
                            }
                        }
                        .await;
                        match result {
                            Ok((200, body)) => {
                                if let Some(c) = body
                                    .split("\"cluster\": \"")
                                    .nth(1)
                                    .and_then(|r| r.split('"').next())
                                {
                                    report.clusters.insert(c.to_string());
                                }
                            }
                            other => {
                                session = None;
                                report
                                    .failures
                                    .push(format!("request {}: {other:?}", report.sent));
                            }
                        }
                    }
                    report
                })
            })
            .collect();
        Self {
            stop,
            workers: handles,
            started: Instant::now(),
        }
    }

    /// Stops every worker and sums what they saw.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = LoadReport::default();
        for w in self.workers {
            if let Ok(r) = w.await {
                total.sent += r.sent;
                total.failures.extend(r.failures);
                total.clusters.extend(r.clusters);
            }
        }
        total.elapsed = self.started.elapsed();
        total
    }
}

impl Mesh {
    /// Waits until `count` proxies are connected and every one has ACKed
    /// every type it was sent, with no NACK.
    pub async fn wait_all_synced(&self, count: usize, patience: Duration) {
        let client = self.state.client().expect("a client of the primary");
        eventually("every proxy to ACK every type", patience, || async {
            let proxies = client.proxies().await.ok()?;
            let proxies = proxies.as_array()?;
            let synced = proxies.len() == count
                && proxies.iter().all(|p| {
                    p["types"].as_object().is_some_and(|types| {
                        !types.is_empty()
                            && types.values().all(|t| {
                                t["nack"].is_null() && t["ackedVersion"] == t["sentVersion"]
                            })
                    })
                });
            synced.then_some(())
        })
        .await;
    }
}

/// True in a CI run: `CI` is set to anything but empty, `0` or `false`.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Says that `test` cannot run its real scenario here, and why. In CI
/// (see [`in_ci`]) that is a failure: the test panics with the reason, so a
/// CI run that lacks root, Envoy or etcd cannot pass having run nothing.
/// Elsewhere it prints `SKIPPED test: reason` straight to stderr, past
/// libtest's capture, so `cargo test` shows it and `scripts/test.sh` can
/// name the skipped tests in its summary.
pub fn skip(test: &str, reason: &str) {
    assert!(
        !in_ci(),
        "{test} could not run its scenario in CI (CI is set): {reason}"
    );
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// Whether a test that needs network namespaces (and, with `envoy`, the
/// Envoy binary) can run here; if not, [`skip`]s it: a failure in CI.
pub fn can_run(test: &str, envoy: bool) -> bool {
    if !netns::available() {
        skip(test, "network namespaces need root and iproute2");
        return false;
    }
    if envoy && isthmus_topology::envoy::binary().is_err() {
        skip(test, "no envoy binary (run scripts/install-deps.sh)");
        return false;
    }
    true
}
