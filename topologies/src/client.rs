//! A client for the primary's REST API, used by `isthmusctl` and the local
//! runner. It trusts only the mesh root and sends the admin bearer token.

use std::path::Path;

use anyhow::{Context, bail};
use isthmus_api::config::Resource;
use isthmus_api::rest::{ClusterView, ErrorBody, RegisterCluster, Registered};
use reqwest::Method;
use serde::de::DeserializeOwned;

/// When an answer came from a gRPC server (the primary's 15012, most
/// likely) rather than from the REST API, says what was reached and what
/// the CLI needs. A gRPC server answers any unknown path with HTTP 200, an
/// empty body and `grpc-status: 12`, which would otherwise read as an
/// empty JSON answer.
pub fn grpc_instead_of_rest(base: &str, headers: &reqwest::header::HeaderMap) -> Option<String> {
    let grpc_status = headers.get("grpc-status");
    let grpc_type = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/grpc"));
    if grpc_status.is_none() && !grpc_type {
        return None;
    }
    let status = grpc_status
        .and_then(|v| v.to_str().ok())
        .map(|s| format!(" (grpc-status {s})"))
        .unwrap_or_default();
    Some(format!(
        "{base} answered with gRPC{status}: that is the primary's gRPC port \
         (default {grpc}, for agents, gateways and sidecars), but isthmusctl \
         needs the primary's REST API (default port {rest}): use --primary \
         https://HOST:{rest} or ISTHMUS_PRIMARY=https://HOST:{rest}",
        grpc = isthmus_api::ports::PRIMARY_GRPC,
        rest = isthmus_api::ports::PRIMARY_HTTP,
    ))
}

#[derive(Clone)]
pub struct PrimaryClient {
    base: String,
    token: String,
    http: reqwest::Client,
    /// Where the primary was sought, for errors: the URL, or the local
    /// socket a `--state-dir` client dials (its URL host is a placeholder).
    reached_as: String,
}

impl PrimaryClient {
    /// `base` is `https://HOST:15014`. The primary is verified against
    /// `ca_pem` (the mesh roots) when given, else against the root whose
    /// fingerprint the token carries (`ist1.<secret>.<root sha256>`).
    pub fn new(base: &str, token: &str, ca_pem: Option<&str>) -> anyhow::Result<Self> {
        Self::with_pins(base, token, ca_pem, &[])
    }

    /// As [`PrimaryClient::new`]; without `ca_pem`, the primary may also
    /// chain to one of `extra_pins` (root fingerprints learned from the
    /// primary during a root rotation).
    pub fn with_pins(
        base: &str,
        token: &str,
        ca_pem: Option<&str>,
        extra_pins: &[String],
    ) -> anyhow::Result<Self> {
        let tls = match ca_pem {
            Some(pem) => isthmus_transport::primary_client_config(pem, None)?,
            None => {
                let (_, fp) = isthmus_api::join_token::parse(token.trim()).context(
                    "this token carries no root fingerprint; pass --ca-file with the mesh root",
                )?;
                let mut pins = vec![fp];
                pins.extend(extra_pins.iter().map(String::as_str));
                isthmus_transport::pinned_roots_client_config(&pins)?
            }
        };
        Self::build(base, token, tls, None)
    }

    /// The token this client sends.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Talks to a local primary over its Unix API socket (still TLS).
    pub fn over_socket(socket: &Path, token: &str, ca_pem: &str) -> anyhow::Result<Self> {
        let tls = isthmus_transport::primary_client_config(ca_pem, None)?;
        Self::build("https://localhost", token, tls, Some(socket))
    }

    fn build(
        base: &str,
        token: &str,
        mut tls: rustls::ClientConfig,
        socket: Option<&Path>,
    ) -> anyhow::Result<Self> {
        isthmus_ca::install_crypto_provider();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut builder = reqwest::Client::builder();
        if let Some(socket) = socket {
            builder = builder.unix_socket(socket.to_path_buf());
        }
        let http = builder
            .use_preconfigured_tls(tls)
            .timeout(std::time::Duration::from_secs(15))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            http,
            reached_as: match socket {
                Some(s) => format!(
                    "its API socket {} (a local mesh's primary: `isthmusctl status` shows whether it runs, `isthmusctl restart primary` starts it again)",
                    s.display()
                ),
                None => base.trim_end_matches('/').to_string(),
            },
        })
    }

    /// A local primary: its API socket, admin token file and root file.
    pub fn from_files(socket: &Path, token_file: &Path, ca_file: &Path) -> anyhow::Result<Self> {
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading {}", token_file.display()))?;
        let ca = std::fs::read_to_string(ca_file)
            .with_context(|| format!("reading {}", ca_file.display()))?;
        Self::over_socket(socket, &token, &ca)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let bytes = self.send(req, &format!("{method} {path}: ")).await?;
        if bytes.is_empty() {
            return Ok(serde_json::from_value(serde_json::Value::Null)?);
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{method} {path}: unexpected answer"))
    }

    /// A request that got no answer: a primary whose certificate lacks the
    /// name dialled is told apart (with `--advertise`) from one that does
    /// not run.
    fn unreachable(&self, e: reqwest::Error, what: &str) -> anyhow::Error {
        match isthmus_transport::server_name::explain(&self.base, &e) {
            Some(why) => anyhow::Error::new(e).context(format!("{what}{why}")),
            None => anyhow::Error::new(e).context(format!(
                "{what}is the primary running at {}?",
                self.reached_as
            )),
        }
    }

    /// Sends with the admin token; a failure reads `{what}{status}: {the
    /// primary's error}`.
    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> anyhow::Result<bytes::Bytes> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.unreachable(e, what))?;
        if let Some(wrong) = grpc_instead_of_rest(&self.base, resp.headers()) {
            bail!("{what}{wrong}");
        }
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).to_string());
            bail!("{what}{status}: {msg}");
        }
        Ok(bytes)
    }

    pub async fn healthz(&self) -> anyhow::Result<()> {
        let url = format!("{}/healthz", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| self.unreachable(e, "GET /healthz: "))?;
        if let Some(wrong) = grpc_instead_of_rest(&self.base, resp.headers()) {
            bail!("{wrong}");
        }
        if !resp.status().is_success() {
            bail!("{url}: {}", resp.status());
        }
        Ok(())
    }

    pub async fn register_cluster(&self, req: &RegisterCluster) -> anyhow::Result<Registered> {
        self.call(
            Method::POST,
            "/api/v1/clusters",
            Some(serde_json::to_value(req)?),
        )
        .await
    }

    pub async fn list_clusters(&self) -> anyhow::Result<Vec<ClusterView>> {
        self.call(Method::GET, "/api/v1/clusters", None).await
    }

    pub async fn deregister_cluster(&self, name: &str) -> anyhow::Result<()> {
        let _: Option<serde_json::Value> = self
            .call(Method::DELETE, &format!("/api/v1/clusters/{name}"), None)
            .await?;
        Ok(())
    }

    /// Applies config documents (JSON or multi-document YAML) atomically.
    pub async fn apply(&self, body: String) -> anyhow::Result<Vec<Resource>> {
        let req = self
            .http
            .post(format!("{}/api/v1/config", self.base))
            .header("content-type", "application/yaml")
            .body(body);
        Ok(serde_json::from_slice(&self.send(req, "").await?)?)
    }

    pub async fn list_config(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> anyhow::Result<Vec<Resource>> {
        let q = namespace
            .map(|n| format!("?namespace={n}"))
            .unwrap_or_default();
        self.call(Method::GET, &format!("/api/v1/config/{kind}{q}"), None)
            .await
    }

    pub async fn get_config(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Resource> {
        self.call(
            Method::GET,
            &format!("/api/v1/config/{kind}/{namespace}/{name}"),
            None,
        )
        .await
    }

    pub async fn delete_config(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let _: Option<serde_json::Value> = self
            .call(
                Method::DELETE,
                &format!("/api/v1/config/{kind}/{namespace}/{name}"),
                None,
            )
            .await?;
        Ok(())
    }

    /// The REST API's OpenAPI document.
    pub async fn openapi(&self) -> anyhow::Result<serde_json::Value> {
        self.call(Method::GET, "/api/v1/openapi.json", None).await
    }

    /// The primary's Prometheus metrics, as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let url = format!("{}/metrics", self.base);
        Ok(self
            .http
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    pub async fn proxies(&self) -> anyhow::Result<serde_json::Value> {
        self.call(Method::GET, "/api/v1/proxies", None).await
    }

    /// Roots, intermediates, workloads per root, rotation progress.
    pub async fn ca_status(&self) -> anyhow::Result<isthmus_api::rest::CaView> {
        self.call(Method::GET, "/api/v1/ca", None).await
    }

    pub async fn rotate_root(
        &self,
        req: &isthmus_api::rest::RotateRoot,
    ) -> anyhow::Result<isthmus_api::rest::CaView> {
        self.call(
            Method::POST,
            "/api/v1/ca/rotate-root",
            Some(serde_json::to_value(req)?),
        )
        .await
    }

    pub async fn import_root(
        &self,
        req: &isthmus_api::rest::ImportRoot,
    ) -> anyhow::Result<isthmus_api::rest::CaView> {
        self.call(
            Method::POST,
            "/api/v1/ca/import-root",
            Some(serde_json::to_value(req)?),
        )
        .await
    }

    pub async fn rotate_intermediate(
        &self,
        cluster: &str,
    ) -> anyhow::Result<isthmus_api::rest::CaView> {
        self.call(
            Method::POST,
            &format!("/api/v1/ca/rotate-intermediate/{cluster}"),
            None,
        )
        .await
    }

    /// Federates with `trust_domain`, given its SPIFFE bundle (JWK set).
    pub async fn federate(
        &self,
        trust_domain: &str,
        bundle: &serde_json::Value,
    ) -> anyhow::Result<isthmus_api::rest::CaView> {
        self.call(
            Method::PUT,
            &format!("/api/v1/ca/federation/{trust_domain}"),
            Some(bundle.clone()),
        )
        .await
    }

    pub async fn unfederate(
        &self,
        trust_domain: &str,
    ) -> anyhow::Result<isthmus_api::rest::CaView> {
        self.call(
            Method::DELETE,
            &format!("/api/v1/ca/federation/{trust_domain}"),
            None,
        )
        .await
    }

    /// The SPIFFE bundle (JWK set).
    pub async fn trust_bundle(&self) -> anyhow::Result<serde_json::Value> {
        self.call(Method::GET, "/api/v1/trust-bundle", None).await
    }

    /// Which replica answered, and which leads.
    pub async fn leader(&self) -> anyhow::Result<isthmus_api::rest::LeaderView> {
        self.call(Method::GET, "/api/v1/leader", None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};

    /// A local mesh's client dials a socket; when nothing listens there, the
    /// error names the socket and the commands that help, not the URL's
    /// placeholder host.
    #[tokio::test]
    async fn a_down_local_primary_is_named_by_its_socket() {
        let socket =
            std::env::temp_dir().join(format!("isthmus-absent-{}.sock", std::process::id()));
        let root = isthmus_ca::Authority::generate("cluster.local").expect("root");
        let client = PrimaryClient::over_socket(&socket, "token", root.cert_pem()).expect("client");
        let err = format!(
            "{:#}",
            client.ca_status().await.expect_err("nothing listens")
        );
        assert!(err.contains(&socket.display().to_string()), "{err}");
        assert!(err.contains("isthmusctl restart primary"), "{err}");
    }

    /// A primary on 0.0.0.0 without `--advertise`, reached at an address
    /// its certificate does not hold (127.0.0.2: loopback, but not an
    /// interface address): the CLI and a component's gRPC channel both say
    /// which names the certificate holds and to use `--advertise`, instead
    /// of asking whether the primary runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_name_the_certificate_lacks_says_to_advertise_it() {
        #[derive(clap::Parser)]
        struct Primary {
            #[command(flatten)]
            config: isthmus_primary::Config,
        }
        isthmus_ca::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("isthmus-advertise-{}", std::process::id()));
        let free = || {
            std::net::TcpListener::bind("0.0.0.0:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port")
        };
        let (grpc, http) = (free(), free());
        let args = [
            "isthmus-primary".to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--grpc-listen".into(),
            format!("0.0.0.0:{grpc}"),
            "--http-listen".into(),
            format!("0.0.0.0:{http}"),
        ];
        let config = <Primary as clap::Parser>::try_parse_from(args)
            .expect("primary flags")
            .config;
        let primary = tokio::spawn(isthmus_primary::run(config));

        // Ready once 127.0.0.1, which the certificate holds, answers.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        let token = loop {
            let ready = match std::fs::read_to_string(dir.join("admin-token")) {
                Ok(token) => {
                    match PrimaryClient::new(&format!("https://127.0.0.1:{http}"), &token, None) {
                        Ok(c) if c.healthz().await.is_ok() => Some(token),
                        _ => None,
                    }
                }
                Err(_) => None,
            };
            if let Some(token) = ready {
                break token;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the primary did not answer on 127.0.0.1:{http}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };

        let reached = format!("https://127.0.0.2:{http}");
        let cli = PrimaryClient::new(&reached, &token, None).expect("client");
        let e = format!(
            "{:#}",
            cli.list_clusters()
                .await
                .expect_err("the name is not in the certificate")
        );
        assert!(
            e.contains(&format!(
                "the primary reached at {reached} presented a serving certificate for "
            )),
            "{e}"
        );
        assert!(e.contains("127.0.0.1") && e.contains("localhost"), "{e}");
        assert!(
            e.contains("not for 127.0.0.2: start the primary with --advertise 127.0.0.2"),
            "{e}"
        );
        assert!(!e.contains("is the primary running"), "{e}");

        // An agent, gateway or sidecar dialling the gRPC port.
        let (_, fp) = isthmus_api::join_token::parse(token.trim()).expect("a minted token");
        let tls = isthmus_transport::pinned_root_client_config(fp).expect("TLS config");
        let channel = isthmus_transport::tls_channel(
            &format!("https://127.0.0.2:{grpc}"),
            std::sync::Arc::new(tls),
        )
        .expect("a channel");
        let status = isthmus_api::pb::sync::sync_client::SyncClient::new(channel)
            .join(isthmus_api::pb::sync::JoinRequest::default())
            .await
            .expect_err("the name is not in the certificate");
        // The status's own message, which components log.
        let e = status.message();
        assert!(
            e.starts_with(&format!(
                "the primary reached at https://127.0.0.2:{grpc} presented"
            )),
            "{e}"
        );
        assert!(e.contains("--advertise 127.0.0.2"), "{e}");

        primary.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_grpc_answer_names_both_ports() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from_static("12"));
        let msg = grpc_instead_of_rest("https://10.0.0.1:15012", &h).expect("a gRPC answer");
        assert!(
            msg.contains("https://10.0.0.1:15012 answered with gRPC (grpc-status 12)"),
            "{msg}"
        );
        assert!(
            msg.contains("15012") && msg.contains("https://HOST:15014"),
            "{msg}"
        );
    }

    #[test]
    fn a_json_answer_is_not_a_wrong_port() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert_eq!(grpc_instead_of_rest("https://h:15014", &h), None);
        assert_eq!(
            grpc_instead_of_rest("https://h:15014", &HeaderMap::new()),
            None
        );
    }
}
