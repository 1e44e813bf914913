//! `isthmus.ca.v1.CertificateService` on a Unix socket: workloads of this
//! cluster trade a CSR for a certificate. The caller authenticates with a
//! bearer credential (`authorization: Bearer ...`): in file-registry mode,
//! the workload token the registry binds (by digest) to a namespace and
//! service account; in Kubernetes mode, its projected service-account token,
//! checked by a TokenReview ([`crate::tokenreview`]). The identity issued is
//! the one the credential names, whatever the CSR asks for.
//!
//! Each caller identity is rate-limited (a token bucket), so one workload
//! gone wrong cannot starve the others. Every certificate issued is logged
//! for audit (serial, identity, cluster, expiry) and counted. `Watch` tells
//! workloads when the intermediate or the trust bundle changed, so they
//! fetch a new certificate at once instead of at their renewal time.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use isthmus_api::pb::ca::certificate_service_server::{
    CertificateService, CertificateServiceServer,
};
use isthmus_api::pb::ca::{
    CreateCertificateRequest, CreateCertificateResponse, WatchEvent, WatchRequest,
};
use isthmus_ca::{CaError, SpiffeId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry as MetricsRegistry;
use sha2::{Digest, Sha256};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::join::Live;
use crate::registry::Registry;

/// Certificates issued and refused, by identity and outcome.
#[derive(Clone, Default)]
pub struct Metrics {
    pub issued: Family<Vec<(String, String)>, Counter>,
    pub refused: Family<Vec<(String, String)>, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut MetricsRegistry) {
        registry.register(
            "certificates_issued",
            "Workload certificates signed, by identity",
            self.issued.clone(),
        );
        registry.register(
            "certificate_requests_refused",
            "Workload certificate requests refused, by reason",
            self.refused.clone(),
        );
    }
}

/// Per-identity limits on certificate requests.
#[derive(Debug, Clone)]
pub struct Limits {
    pub quota: Quota,
    /// How the limit reads in a refusal, e.g. "5/s (burst 20)".
    pub describe: String,
}

impl Limits {
    pub fn per_second(rate: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            quota: Quota::per_second(rate).allow_burst(burst),
            describe: format!("{rate}/s (burst {burst})"),
        }
    }
}

/// How callers prove who they are.
#[derive(Clone)]
pub enum WorkloadAuth {
    /// Workload tokens listed (as digests) in the file registry.
    Registry(watch::Receiver<Arc<Registry>>),
    /// Projected service-account tokens, reviewed by the API server.
    Kubernetes(Arc<crate::tokenreview::TokenReviewer>),
}

pub fn serve(
    socket: PathBuf,
    creds: Arc<Live>,
    auth: WorkloadAuth,
    cluster: String,
    limits: Limits,
    metrics: Metrics,
) -> anyhow::Result<impl std::future::Future<Output = Result<(), tonic::transport::Error>>> {
    // A socket left by a previous run would make bind fail.
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "workload CA listening");
    let limiter = RateLimiter::keyed(limits.quota);
    Ok(tonic::transport::Server::builder()
        .add_service(CertificateServiceServer::new(CaService {
            creds,
            auth,
            cluster,
            limiter: Arc::new(limiter),
            limits,
            metrics,
            refusals: crate::refusal_log::RefusalLog::default(),
        }))
        .serve_with_incoming(UnixListenerStream::new(listener)))
}

struct CaService {
    creds: Arc<Live>,
    auth: WorkloadAuth,
    cluster: String,
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    limits: Limits,
    metrics: Metrics,
    /// WARN lines for refused credentials, rate-limited.
    refusals: crate::refusal_log::RefusalLog,
}

impl CaService {
    fn refuse(&self, reason: &str, status: Status) -> Status {
        self.metrics
            .refused
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
        status
    }

    /// As [`Self::refuse`], for a credential refused in [`Self::caller`]:
    /// also logged at WARN (rate-limited) with the reason the workload gets
    /// and the digest of what it presented.
    fn refuse_credential(&self, reason: &str, status: Status, digest: Option<&str>) -> Status {
        self.refusals.refused(reason, status.message(), digest);
        self.refuse(reason, status)
    }

    /// The workload the bearer credential names: (namespace, account, name).
    async fn caller(&self, metadata: &MetadataMap) -> Result<(String, String, String), Status> {
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                self.refuse_credential(
                    "unauthenticated",
                    Status::unauthenticated(
                        "present the workload credential as 'authorization: Bearer <token>'",
                    ),
                    None,
                )
            })?;
        let digest = hex::encode(Sha256::digest(token.as_bytes()));
        let registry = match &self.auth {
            WorkloadAuth::Registry(r) => r,
            WorkloadAuth::Kubernetes(reviewer) => {
                return match reviewer.review(token).await {
                    Ok((ns, sa)) => {
                        let name = format!("{ns}/{sa}");
                        Ok((ns, sa, name))
                    }
                    Err(e @ crate::tokenreview::ReviewError::Unavailable(_)) => Err(self
                        .refuse_credential(
                            "unavailable",
                            Status::unavailable(e.to_string()),
                            Some(&digest),
                        )),
                    Err(e) => Err(self.refuse_credential(
                        "unauthenticated",
                        Status::unauthenticated(e.to_string()),
                        Some(&digest),
                    )),
                };
            }
        };
        let reg = registry.borrow();
        let w = reg.workload_by_token(&digest).ok_or_else(|| {
            self.refuse_credential(
                "unauthenticated",
                Status::unauthenticated(
                    "workload credential is not known to this cluster's registry",
                ),
                Some(&digest),
            )
        })?;
        Ok((
            w.namespace.clone(),
            w.service_account.clone(),
            w.name.clone(),
        ))
    }
}

type WatchResult = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let (namespace, account, workload) = self.caller(request.metadata()).await?;
        let creds = self.creds.current();
        let id = SpiffeId::workload(creds.signer.trust_domain(), &namespace, &account)
            .map_err(|e| Status::internal(e.to_string()))?;
        if self.limiter.check_key(&id.to_string()).is_err() {
            tracing::warn!(%workload, identity = %id, "certificate request over the rate limit");
            return Err(self.refuse(
                "rate_limited",
                Status::resource_exhausted(format!(
                    "{id} asked for certificates faster than {}; retry later",
                    self.limits.describe
                )),
            ));
        }
        let req = request.into_inner();
        let ttl = match u64::try_from(req.validity_duration) {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                return Err(self.refuse(
                    "bad_request",
                    Status::invalid_argument(format!(
                        "validity_duration: {} is negative; ask for 0 (the default, 24 h) or a number of seconds up to 90 days",
                        req.validity_duration
                    )),
                ));
            }
        };
        let issued = creds
            .signer
            .sign_workload_csr(&req.csr, &id, ttl)
            .map_err(|e| match e {
                CaError::CsrTooLarge(_)
                | CaError::CsrMalformed
                | CaError::CsrBadSignature
                | CaError::CsrUnusable(_)
                | CaError::TtlTooLong { .. } => {
                    self.refuse("bad_request", Status::invalid_argument(e.to_string()))
                }
                CaError::ReservedIdentity(_) => {
                    tracing::warn!(audit = true, %workload, identity = %id, "refused a reserved identity to a workload");
                    self.refuse("reserved_identity", Status::permission_denied(e.to_string()))
                }
                other => Status::internal(other.to_string()),
            })?;
        tracing::info!(
            audit = true,
            cluster = %self.cluster,
            %workload,
            identity = %id,
            serial = %issued.serial_hex,
            not_after = issued.not_after_unix,
            intermediate = %creds.intermediate_fingerprint(),
            "signed workload certificate"
        );
        self.metrics
            .issued
            .get_or_create(&vec![("identity".into(), id.to_string())])
            .inc();
        Ok(Response::new(CreateCertificateResponse {
            cert_chain: vec![issued.pem, creds.intermediate_pem.clone()],
            trust_bundle: creds
                .bundle
                .roots()
                .iter()
                .map(|r| isthmus_ca::pem::encode("CERTIFICATE", r))
                .collect(),
            crls: creds.bundle.crls_pem(),
            bundle_sequence: creds.bundle_sequence,
            federated_bundles: creds
                .bundle
                .federated()
                .map(|b| (b.trust_domain().to_string(), b.to_pem()))
                .collect(),
        }))
    }

    type WatchStream = WatchResult;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.caller(request.metadata()).await?;
        let events = WatchStream::new(self.creds.generation.subscribe()).map(|(g, reason)| {
            Ok(WatchEvent {
                generation: g,
                reason: reason.to_string(),
            })
        });
        Ok(Response::new(Box::pin(events)))
    }
}
