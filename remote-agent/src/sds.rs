//! SDS for Envoy sidecars: Envoy's `SecretDiscoveryService` on one Unix
//! socket per workload (`SDS_DIR/<workload>.sock`), as Istio's agent serves
//! one per pod. The socket is the credential: only that workload's sidecar
//! is given its path (in a VM, the file mode; in `isthmusctl up`, the state
//! dir), and everything served on it is for that workload's identity.
//!
//! Two secrets, with Istio's names: `default` (a fresh certificate and key,
//! signed here for the workload's SPIFFE ID) and `ROOTCA` (the trust bundle
//! and the CRLs). Both are pushed again when the agent's generation changes
//! (a new intermediate or bundle) and `default` at half its lifetime, so a
//! rotation reaches Envoy sidecars just as it reaches isthmus-proxy.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use isthmus_api::type_urls;
use isthmus_ca::SpiffeId;
use prost::Message;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::join::Live;
use crate::registry::Registry;

/// Lifetime of the certificates served to Envoy sidecars.
const CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Keeps one SDS server per workload in the registry, starting and stopping
/// them as workloads come and go. Runs until the registry channel closes.
pub async fn run(dir: PathBuf, live: Arc<Live>, mut registry: watch::Receiver<Arc<Registry>>) {
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot create the SDS socket dir");
        return;
    }
    let mut servers: HashMap<String, (SpiffeId, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        let wanted: BTreeMap<String, SpiffeId> = {
            let reg = registry.borrow_and_update();
            let td = live.current().signer.trust_domain().to_string();
            reg.workloads
                .iter()
                .filter_map(|w| {
                    SpiffeId::workload(&td, &w.namespace, &w.service_account)
                        .ok()
                        .filter(|id| !id.is_reserved())
                        .map(|id| (w.name.clone(), id))
                })
                .collect()
        };
        servers.retain(|name, (id, task)| {
            let keep = wanted.get(name) == Some(id);
            if !keep {
                task.abort();
                let _ = std::fs::remove_file(socket(&dir, name));
            }
            keep
        });
        for (name, id) in wanted {
            if servers.contains_key(&name) {
                continue;
            }
            match serve(&dir, &name, id.clone(), live.clone()) {
                Ok(task) => {
                    servers.insert(name, (id, task));
                }
                Err(e) => tracing::error!(workload = %name, error = %e, "cannot serve SDS"),
            }
        }
        if registry.changed().await.is_err() {
            return;
        }
    }
}

/// Where a workload's SDS socket is.
pub fn socket(dir: &Path, workload: &str) -> PathBuf {
    dir.join(format!("{workload}.sock"))
}

fn serve(
    dir: &Path,
    workload: &str,
    id: SpiffeId,
    live: Arc<Live>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let path = socket(dir, workload);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", path.display()))?;
    tracing::info!(workload, identity = %id, socket = %path.display(), "serving SDS");
    let service = Sds {
        workload: workload.to_string(),
        id,
        live,
    };
    Ok(tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(service))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
        {
            tracing::warn!(error = %e, "SDS server ended");
        }
    }))
}

struct Sds {
    workload: String,
    id: SpiffeId,
    live: Arc<Live>,
}

fn inline(text: String) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineString(text)),
        ..Default::default()
    })
}

impl Sds {
    /// The secret `name`, and when it should be sent again (for `default`,
    /// at half its lifetime).
    fn secret(&self, name: &str) -> Result<(Secret, Option<Duration>), Status> {
        let creds = self.live.current();
        match name {
            "default" => {
                let (cert, key) = creds
                    .signer
                    .issue_workload(&self.id, CERT_TTL)
                    .map_err(|e| Status::internal(format!("signing: {e}")))?;
                tracing::info!(
                    audit = true,
                    workload = %self.workload,
                    identity = %self.id,
                    serial = %cert.serial_hex,
                    not_after = cert.not_after_unix,
                    "signed workload certificate for an Envoy sidecar (SDS)"
                );
                let secret = Secret {
                    name: name.into(),
                    r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                        certificate_chain: inline(format!(
                            "{}{}",
                            cert.pem, creds.intermediate_pem
                        )),
                        private_key: inline(key),
                        ..Default::default()
                    })),
                };
                Ok((secret, Some(CERT_TTL / 2)))
            }
            "ROOTCA" => {
                let crls = creds.bundle.crls_pem();
                let secret = Secret {
                    name: name.into(),
                    r#type: Some(secret::Type::ValidationContext(
                        CertificateValidationContext {
                            trusted_ca: inline(creds.bundle.to_pem()),
                            crl: (!crls.is_empty()).then(|| inline(crls)).flatten(),
                            ..Default::default()
                        },
                    )),
                };
                Ok((secret, None))
            }
            other => Err(Status::not_found(format!(
                "no secret {other:?}: this agent serves \"default\" and \"ROOTCA\""
            ))),
        }
    }
}

type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = SotwStream;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = Sds {
            workload: self.workload.clone(),
            id: self.id.clone(),
            live: self.live.clone(),
        };
        tokio::spawn(async move {
            let mut generation = this.live.generation.subscribe();
            let mut names: Vec<String> = Vec::new();
            let mut version = 0u64;
            let mut refresh: Option<tokio::time::Instant> = None;
            loop {
                let send = tokio::select! {
                    req = inbound.message() => match req {
                        Ok(Some(req)) => {
                            if let Some(err) = &req.error_detail {
                                tracing::warn!(workload = %this.workload, error = %err.message, "Envoy NACKed a secret");
                            }
                            // A new subscription (not an ACK of what we sent).
                            let changed = req.resource_names != names;
                            names = req.resource_names;
                            changed
                        }
                        _ => return,
                    },
                    Ok(()) = generation.changed() => true,
                    () = async {
                        match refresh {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    } => true,
                };
                if !send || names.is_empty() {
                    continue;
                }
                version += 1;
                let mut resources = Vec::new();
                refresh = None;
                for name in &names {
                    match this.secret(name) {
                        Ok((s, again)) => {
                            if let Some(after) = again {
                                refresh = Some(tokio::time::Instant::now() + after);
                            }
                            resources.push(Any {
                                type_url: type_urls::SECRET.into(),
                                value: s.encode_to_vec(),
                            });
                        }
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    }
                }
                let response = DiscoveryResponse {
                    version_info: version.to_string(),
                    resources,
                    type_url: type_urls::SECRET.into(),
                    nonce: version.to_string(),
                    ..Default::default()
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DeltaSecretsStream = DeltaStream;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "this agent serves SDS in State-of-the-World form",
        ))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let names = request.into_inner().resource_names;
        let resources = names
            .iter()
            .map(|n| {
                self.secret(n).map(|(s, _)| Any {
                    type_url: type_urls::SECRET.into(),
                    value: s.encode_to_vec(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(DiscoveryResponse {
            version_info: "0".into(),
            resources,
            type_url: type_urls::SECRET.into(),
            ..Default::default()
        }))
    }
}
