//! `isthmus.ca.v1.CertificateService` on a Unix socket: workloads of this
//! cluster trade a CSR for a certificate. The caller authenticates with its
//! workload credential (`authorization: Bearer ...`); the identity issued is
//! the one the registry binds to that credential, whatever the CSR asks for.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use isthmus_api::pb::ca::certificate_service_server::{
    CertificateService, CertificateServiceServer,
};
use isthmus_api::pb::ca::{CreateCertificateRequest, CreateCertificateResponse};
use isthmus_ca::{CaError, SpiffeId};
use sha2::{Digest, Sha256};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::join::Credentials;
use crate::registry::Registry;

pub fn serve(
    socket: PathBuf,
    creds: Arc<Credentials>,
    registry: watch::Receiver<Arc<Registry>>,
) -> anyhow::Result<impl std::future::Future<Output = Result<(), tonic::transport::Error>>> {
    // A socket left by a previous run would make bind fail.
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "workload CA listening");
    Ok(tonic::transport::Server::builder()
        .add_service(CertificateServiceServer::new(CaService { creds, registry }))
        .serve_with_incoming(UnixListenerStream::new(listener)))
}

struct CaService {
    creds: Arc<Credentials>,
    registry: watch::Receiver<Arc<Registry>>,
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "present the workload credential as 'authorization: Bearer <token>'",
                )
            })?;
        let digest = hex::encode(Sha256::digest(token.as_bytes()));
        let (namespace, account, workload) = {
            let reg = self.registry.borrow();
            let w = reg.workload_by_token(&digest).ok_or_else(|| {
                Status::unauthenticated(
                    "workload credential is not known to this cluster's registry",
                )
            })?;
            (
                w.namespace.clone(),
                w.service_account.clone(),
                w.name.clone(),
            )
        };
        let id = SpiffeId::workload(self.creds.signer.trust_domain(), &namespace, &account)
            .map_err(|e| Status::internal(e.to_string()))?;
        let req = request.into_inner();
        let ttl = Duration::from_secs(u64::try_from(req.validity_duration).unwrap_or(0));
        let issued = self
            .creds
            .signer
            .sign_workload_csr(&req.csr, &id, ttl)
            .map_err(|e| match e {
                CaError::CsrTooLarge(_)
                | CaError::CsrMalformed
                | CaError::CsrBadSignature
                | CaError::CsrUnusable(_)
                | CaError::TtlTooLong { .. } => Status::invalid_argument(e.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        tracing::info!(%workload, identity = %id, serial = %issued.serial_hex, not_after = issued.not_after_unix, "signed workload certificate");
        Ok(Response::new(CreateCertificateResponse {
            cert_chain: vec![issued.pem, self.creds.intermediate_pem.clone()],
            trust_bundle: self
                .creds
                .bundle
                .roots()
                .iter()
                .map(|r| isthmus_ca::pem::encode("CERTIFICATE", r))
                .collect(),
        }))
    }
}
