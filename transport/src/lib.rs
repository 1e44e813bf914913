//! Transport plumbing shared by every Isthmus process: rustls configs for
//! talking to the primary, gRPC channels over TLS or a Unix socket, and a TLS
//! accept loop that feeds tonic servers.
//!
//! Handshakes run in their own tasks so one slow or hostile client never holds
//! up another, and a failed handshake is logged and dropped rather than ending
//! the server: at DEBUG when the client just went away, at rate-limited INFO
//! when it is a real refusal (`handshake_log`).

pub mod admin;
pub mod handshake_log;
pub mod server_name;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid address {0:?}: {1}")]
    BadAddress(String, String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("trust roots: {0}")]
    Roots(String),
    #[error(transparent)]
    Pem(#[from] isthmus_ca::pem::PemError),
}

/// A certificate chain and its key, ready for rustls.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TransportError> {
        Ok(Self {
            chain: isthmus_ca::pem::certs(chain_pem, "certificate chain")?,
            key: isthmus_ca::pem::private_key(key_pem, "private key")?,
        })
    }
}

/// A client config that verifies the primary's server certificate (DNS/IP
/// SANs) against the mesh roots, optionally presenting a client identity.
pub fn primary_client_config(
    roots_pem: &str,
    identity: Option<Identity>,
) -> Result<ClientConfig, TransportError> {
    let mut roots = RootCertStore::empty();
    for cert in isthmus_ca::pem::certs(roots_pem, "primary trust roots")? {
        roots
            .add(cert)
            .map_err(|e| TransportError::Roots(e.to_string()))?;
    }
    let builder = ClientConfig::builder_with_provider(isthmus_ca::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// How long one attempt to reach a primary replica may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A lazily connecting gRPC channel over TLS to `url` (`https://HOST:PORT`).
/// The TLS server name is the URL's host.
///
/// `url` may list several replicas, comma-separated
/// (`https://a:15012,https://b:15012`). Each connection then tries them in
/// turn, starting after the one used last, so a client whose primary died
/// reconnects to another on its next attempt.
pub fn tls_channel(url: &str, config: Arc<ClientConfig>) -> Result<Channel, TransportError> {
    let mut targets = Vec::new();
    for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let Some(rest) = one.strip_prefix("https://") else {
            return Err(TransportError::BadAddress(
                one.to_string(),
                "must start with https://".into(),
            ));
        };
        let uri = format!("http://{rest}")
            .parse::<Uri>()
            .map_err(|e| TransportError::BadAddress(one.to_string(), e.to_string()))?;
        let host = uri
            .host()
            .ok_or_else(|| TransportError::BadAddress(one.to_string(), "no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = ServerName::try_from(host.clone())
            .map_err(|e| TransportError::BadAddress(one.to_string(), e.to_string()))?;
        targets.push((host, uri.port_u16().unwrap_or(443), name, rest.to_string()));
    }
    let Some((_, _, _, first)) = targets.first() else {
        return Err(TransportError::BadAddress(
            url.to_string(),
            "no address given".into(),
        ));
    };
    // The connector below does the TLS and picks the replica; tonic must
    // not try to.
    let endpoint = endpoint(&format!("http://{first}"))?;
    let targets = Arc::new(targets);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        let targets = targets.clone();
        let next = next.clone();
        async move {
            let start = next.load(std::sync::atomic::Ordering::Relaxed);
            let mut last_error = None;
            for i in 0..targets.len() {
                let index = (start + i) % targets.len();
                let (host, port, name, _) = &targets[index];
                let attempt = async {
                    let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                    tcp.set_nodelay(true)?;
                    tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name.clone(), tcp)
                        .await
                };
                match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                    Ok(Ok(tls)) => {
                        // A later reconnect starts with the next replica
                        // only if this one fails then.
                        next.store(index, std::sync::atomic::Ordering::Relaxed);
                        return Ok::<_, io::Error>(TokioIo::new(tls));
                    }
                    Ok(Err(e)) => {
                        // A certificate without the name dialled: say
                        // which names it has and that --advertise adds one.
                        let reached = format!("https://{host}:{port}");
                        last_error = Some(match server_name::explain(&reached, &e) {
                            Some(why) => io::Error::new(io::ErrorKind::InvalidData, why),
                            None => e,
                        });
                    }
                    Err(_) => {
                        last_error = Some(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("connecting to {host}:{port} timed out"),
                        ))
                    }
                }
                next.store(
                    (index + 1) % targets.len(),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            Err(last_error.unwrap_or_else(|| io::Error::other("no address to connect to")))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// A lazily connecting gRPC channel over a Unix socket (the local agent).
pub fn uds_channel(path: impl Into<PathBuf>) -> Channel {
    let path = Arc::new(path.into());
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path.as_path()).await?)) }
    });
    // The URI is required by tonic but unused by the connector.
    Endpoint::from_static("http://agent.local").connect_with_connector_lazy(connector)
}

fn endpoint(url: &str) -> Result<Endpoint, TransportError> {
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| TransportError::BadAddress(url.to_string(), e.to_string()))?;
    Ok(ep
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10)))
}

/// Something that accepts byte streams: a TCP or a Unix listener.
pub trait Listener: Send + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept(
        &mut self,
    ) -> impl std::future::Future<Output = io::Result<(Self::Io, String)>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;
    async fn accept(&mut self) -> io::Result<(TcpStream, String)> {
        let (s, peer) = TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, peer.to_string()))
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = UnixStream;
    async fn accept(&mut self) -> io::Result<(UnixStream, String)> {
        let (s, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((s, "unix".into()))
    }
}

/// Accepts connections, completes TLS handshakes concurrently with the
/// current server config, and yields the established streams. The config is
/// read per connection, so certificate rotation takes effect for new
/// connections without a restart.
pub fn tls_incoming<L: Listener>(
    mut listener: L,
    config: watch::Receiver<Arc<ServerConfig>>,
) -> ReceiverStream<Result<TlsStream<L::Io>, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let refusals = Arc::new(handshake_log::RefusalLog::new(std::time::Instant::now()));
    tokio::spawn(async move {
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => handshake_log::log_failure(&refusals, &peer, &e),
                    Err(_) => handshake_log::log_timeout(&refusals, &peer),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A server config for the primary's listeners: its own certificate, h2 and
/// HTTP/1.1 ALPN, and client certificates verified (but optional, because
/// joining agents and gateways have none yet).
pub fn server_config(
    identity: Identity,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<ServerConfig, TransportError> {
    let builder = ServerConfig::builder_with_provider(isthmus_ca::crypto_provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A client config for an agent's first contact with the primary: the
/// primary presents its root in its chain, and the connection is trusted
/// only if that root's SHA-256 equals `root_fingerprint` (from the join
/// token) and the serving certificate chains to it.
pub fn pinned_root_client_config(root_fingerprint: &str) -> Result<ClientConfig, TransportError> {
    pinned_roots_client_config(&[root_fingerprint])
}

/// As [`pinned_root_client_config`], accepting a chain to any of several
/// pinned roots (a root rotation, where the client learned the new root's
/// fingerprint over a connection verified with the old one).
pub fn pinned_roots_client_config(fingerprints: &[&str]) -> Result<ClientConfig, TransportError> {
    let provider = isthmus_ca::crypto_provider();
    let verifier = Arc::new(PinnedRoot {
        fingerprints: fingerprints
            .iter()
            .map(|f| f.to_ascii_lowercase())
            .collect(),
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct PinnedRoot {
    fingerprints: Vec<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedRoot {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut roots = RootCertStore::empty();
        for c in intermediates
            .iter()
            .filter(|c| self.fingerprints.contains(&isthmus_ca::pem::fingerprint(c)))
        {
            roots.add(c.clone().into_owned())?;
        }
        if roots.is_empty() {
            return Err(rustls::Error::General(
                "the primary did not present the root CA named by the token's fingerprint".into(),
            ));
        }
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Creates `path` (and its parents) and makes it private to its owner
/// (mode 0700): state dirs hold keys, tokens and the store.
pub fn create_private_dir(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Writes a secret file readable only by its owner (mode 0600).
pub fn write_private(path: &std::path::Path, contents: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Written whole to a 0600 file beside the target, then renamed over
    // it: a reader sees the old contents or the new, never a part, and an
    // existing file with looser permissions is replaced, not reused.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let tmp = dir
        .map(|d| d.to_path_buf())
        .unwrap_or_default()
        .join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// When a gRPC call to the primary at `url` got a plain HTTP answer (no
/// `grpc-status`, as from the primary's REST API on 15014), says what was
/// reached and what was expected. tonic alone reports only `grpc-status
/// header missing, mapped from HTTP status code 404`.
pub fn grpc_wrong_port(url: &str, status: &tonic::Status) -> Option<String> {
    status
        .message()
        .contains("grpc-status header missing")
        .then(|| {
            format!(
                "{url} answered with plain HTTP, not gRPC ({}): that looks like the \
                 primary's REST API (default port {rest}, for isthmusctl); agents, \
                 gateways and sidecars need its gRPC port: --primary https://HOST:{grpc} \
                 or ISTHMUS_PRIMARY_GRPC=https://HOST:{grpc}",
                status.message(),
                rest = isthmus_api::ports::PRIMARY_HTTP,
                grpc = isthmus_api::ports::PRIMARY_GRPC,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dirs_are_0700_even_when_they_existed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("isthmus-pdir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("{e}"));
        create_private_dir(&dir.join("a/b")).unwrap_or_else(|e| panic!("{e}"));
        create_private_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        for d in [dir.clone(), dir.join("a/b")] {
            let mode = std::fs::metadata(&d)
                .unwrap_or_else(|e| panic!("{e}"))
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{}", d.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn private_files_are_replaced_whole_at_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("isthmus-private-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("key.pem");
        // A file left world-readable (an older version wrote in place and
        // kept an existing file's mode) is replaced, not reused.
        std::fs::write(&path, "old").unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("{e}"));
        write_private(&path, "secret").unwrap_or_else(|e| panic!("{e}"));
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}")),
            "secret"
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("key.pem")],
            "no temp file left"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_plain_http_answer_to_grpc_names_both_ports() {
        let s = tonic::Status::unimplemented(
            "grpc-status header missing, mapped from HTTP status code 404",
        );
        let msg = grpc_wrong_port("https://10.0.0.1:15014", &s).expect("a wrong port");
        assert!(
            msg.starts_with("https://10.0.0.1:15014 answered with plain HTTP"),
            "{msg}"
        );
        assert!(
            msg.contains("15014") && msg.contains("https://HOST:15012"),
            "{msg}"
        );
        assert!(msg.contains("HTTP status code 404"), "{msg}");
    }

    #[test]
    fn a_grpc_refusal_is_not_a_wrong_port() {
        let s = tonic::Status::permission_denied("join token already used");
        assert_eq!(grpc_wrong_port("https://h:15012", &s), None);
    }
}
