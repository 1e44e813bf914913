//! How a failed server-side TLS handshake is logged. A client that closes
//! before the handshake is done (a TCP health probe, a CLI that gave up, a
//! port scan) is routine and logged at DEBUG. A real refusal (a bad or
//! missing certificate, an alert from the peer, plain text on a TLS port)
//! is what an operator wants to see, so it is logged at INFO, at most
//! [`RefusalLog::PER_WINDOW`] times per [`RefusalLog::WINDOW`]; the rest go
//! to DEBUG and are counted in the next INFO line. [`escape`] makes any
//! untrusted string (an SNI, a credential's complaint) safe to log.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why a handshake did not complete, as far as the log is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The peer went away (EOF, reset, broken pipe, or a close_notify alert)
    /// before the handshake finished.
    ClosedEarly,
    /// The handshake was refused: certificate, protocol or alert error.
    Refused,
}

/// Classifies the error of `tokio_rustls::TlsAcceptor::accept`.
pub fn classify(e: &io::Error) -> HandshakeFailure {
    use io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            return HandshakeFailure::ClosedEarly;
        }
        _ => {}
    }
    let closed_politely = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::AlertReceived(rustls::AlertDescription::CloseNotify)
            )
        });
    if closed_politely {
        HandshakeFailure::ClosedEarly
    } else {
        HandshakeFailure::Refused
    }
}

/// A lock-free budget of log lines per time window: the first
/// `per_window` events of each window are logged, the rest are counted and
/// that count is reported with the next logged one. The TLS accept loop
/// uses it for refused handshakes; the agent for refused workload
/// credentials.
#[derive(Debug)]
pub struct RefusalLog {
    start: Instant,
    window_len: Duration,
    per_window: u32,
    /// The window the counts below belong to.
    window: AtomicU64,
    logged: AtomicU32,
    suppressed: AtomicU32,
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it at INFO, saying how many earlier ones were not.
    Info { suppressed_before: u32 },
    /// Over budget: log at DEBUG only.
    Debug,
}

impl RefusalLog {
    pub const WINDOW: Duration = Duration::from_secs(10);
    pub const PER_WINDOW: u32 = 5;

    /// The handshake budget: [`Self::PER_WINDOW`] lines per [`Self::WINDOW`].
    pub fn new(start: Instant) -> Self {
        Self::with_budget(start, Self::WINDOW, Self::PER_WINDOW)
    }

    /// At most `per_window` lines per `window` (at least one second).
    pub fn with_budget(start: Instant, window: Duration, per_window: u32) -> Self {
        Self {
            start,
            window_len: window.max(Duration::from_secs(1)),
            per_window,
            window: AtomicU64::new(0),
            logged: AtomicU32::new(0),
            suppressed: AtomicU32::new(0),
        }
    }

    /// Spends one line of the budget of the window `now` falls in.
    pub fn admit(&self, now: Instant) -> Admit {
        let window =
            (now.saturating_duration_since(self.start).as_secs() / self.window_len.as_secs()) + 1;
        let seen = self.window.load(Ordering::Relaxed);
        if window > seen
            && self
                .window
                .compare_exchange(seen, window, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.logged.store(0, Ordering::Relaxed);
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < self.per_window {
            Admit::Info {
                suppressed_before: self.suppressed.swap(0, Ordering::Relaxed),
            }
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            Admit::Debug
        }
    }
}

/// The longest untrusted string logged, in characters.
pub const MAX_LOGGED: usize = 256;

/// `s` quoted, with quotes, backslashes and control characters escaped
/// (Rust's `Debug` for strings), cut to [`MAX_LOGGED`] characters,
/// so an untrusted string can neither forge log lines or fields nor fill
/// the log.
pub fn escape(s: &str) -> String {
    match s.char_indices().nth(MAX_LOGGED) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// Logs one failed handshake from `peer`.
pub fn log_failure(limit: &RefusalLog, peer: &str, e: &io::Error) {
    match classify(e) {
        HandshakeFailure::ClosedEarly => {
            tracing::debug!(%peer, error = %e, "TLS client closed before the handshake finished");
        }
        HandshakeFailure::Refused => match limit.admit(Instant::now()) {
            Admit::Info {
                suppressed_before: 0,
            } => tracing::info!(%peer, error = %e, "TLS handshake refused"),
            Admit::Info { suppressed_before } => tracing::info!(
                %peer,
                error = %e,
                not_logged_before = suppressed_before,
                "TLS handshake refused"
            ),
            Admit::Debug => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
        },
    }
}

/// Logs a handshake that did not finish within the timeout.
pub fn log_timeout(limit: &RefusalLog, peer: &str) {
    match limit.admit(Instant::now()) {
        Admit::Info { .. } => tracing::info!(%peer, "TLS handshake timed out"),
        Admit::Debug => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_strings_cannot_forge_lines_or_fields() {
        assert_eq!(
            escape("outbound_.8080_._.x\nlevel=ERROR forged"),
            r#""outbound_.8080_._.x\nlevel=ERROR forged""#
        );
        assert_eq!(escape("a\u{1b}[31m\" b=1"), r#""a\u{1b}[31m\" b=1""#);
        let long = "x".repeat(1000);
        assert_eq!(escape(&long).chars().count(), MAX_LOGGED + 2 + 3);
    }
    use rustls::ClientConfig;
    use std::sync::Arc;

    fn rustls_error(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn a_client_that_goes_away_is_not_a_refusal() {
        for kind in [
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::BrokenPipe,
        ] {
            let e = io::Error::new(kind, "tls handshake eof");
            assert_eq!(classify(&e), HandshakeFailure::ClosedEarly, "{kind:?}");
        }
        let close_notify = rustls_error(rustls::Error::AlertReceived(
            rustls::AlertDescription::CloseNotify,
        ));
        assert_eq!(classify(&close_notify), HandshakeFailure::ClosedEarly);
    }

    #[test]
    fn certificate_and_protocol_errors_are_refusals() {
        let cases = [
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
            rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            rustls::Error::NoCertificatesPresented,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoCipherSuitesInCommon),
        ];
        for case in cases {
            let text = format!("{case:?}");
            assert_eq!(
                classify(&rustls_error(case)),
                HandshakeFailure::Refused,
                "{text}"
            );
        }
        let other = io::Error::other("something else");
        assert_eq!(classify(&other), HandshakeFailure::Refused);
    }

    /// The error a real rustls server gets when `client` talks to it.
    async fn server_error<F, Fut>(client: F) -> io::Error
    where
        F: FnOnce(tokio::net::TcpStream, Arc<ClientConfig>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        isthmus_ca::install_crypto_provider();
        let ca = isthmus_ca::Authority::generate("cluster.local").unwrap();
        let (cert, key) = ca.issue_server_cert(&["127.0.0.1".into()]).unwrap();
        let identity = crate::Identity::from_pem(&cert, &key).unwrap();
        let server = crate::server_config(identity, None).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A client that trusts no root: the mesh root is unknown to it.
        let untrusting = ClientConfig::builder_with_provider(isthmus_ca::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let (accepted, ()) = tokio::join!(
            async {
                let (conn, _) = listener.accept().await.unwrap();
                acceptor.accept(conn).await
            },
            async {
                let conn = tokio::net::TcpStream::connect(addr).await.unwrap();
                client(conn, Arc::new(untrusting)).await;
            }
        );
        accepted.expect_err("the handshake fails")
    }

    #[tokio::test]
    async fn real_handshakes_are_told_apart() {
        // A TCP health probe: connect, then close.
        let e = server_error(|conn, _| async move { drop(conn) }).await;
        assert_eq!(classify(&e), HandshakeFailure::ClosedEarly, "{e}");

        // Plain HTTP on the TLS port.
        let e = server_error(|mut conn, _| async move {
            use tokio::io::AsyncWriteExt;
            let _ = conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
            let _ = conn.shutdown().await;
        })
        .await;
        assert_eq!(classify(&e), HandshakeFailure::Refused, "{e}");

        // A client that does not trust the server's certificate says so.
        let e = server_error(|conn, config| async move {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let _ = tokio_rustls::TlsConnector::from(config)
                .connect(name, conn)
                .await;
        })
        .await;
        assert_eq!(classify(&e), HandshakeFailure::Refused, "{e}");
    }

    #[test]
    fn refusals_beyond_the_budget_are_counted_into_the_next_window() {
        let t0 = Instant::now();
        let log = RefusalLog::new(t0);
        for _ in 0..RefusalLog::PER_WINDOW {
            assert_eq!(
                log.admit(t0),
                Admit::Info {
                    suppressed_before: 0
                }
            );
        }
        assert_eq!(log.admit(t0), Admit::Debug);
        assert_eq!(log.admit(t0 + Duration::from_secs(1)), Admit::Debug);
        // The next window logs again and says how many were not logged.
        let next = t0 + RefusalLog::WINDOW;
        assert_eq!(
            log.admit(next),
            Admit::Info {
                suppressed_before: 2
            }
        );
        assert_eq!(
            log.admit(next),
            Admit::Info {
                suppressed_before: 0
            }
        );
    }
}
