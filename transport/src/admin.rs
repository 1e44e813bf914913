//! The admin and metrics listeners every data-plane process serves:
//! `/ready` (200 once the process has what it needs), `/healthz`, and
//! Prometheus `/metrics`.

use std::net::SocketAddr;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

/// `/healthz`, and `/ready` answering 200 while `ready` holds true, else 503
/// with `waiting` as the reason.
pub fn router(ready: watch::Receiver<bool>, waiting: &'static str) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/ready",
            get(move || {
                let ok = *ready.borrow();
                async move {
                    if ok {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, waiting)
                    }
                }
            }),
        )
}

/// `/metrics`, rendering `encode()` on every scrape.
pub fn metrics_router<F>(encode: F) -> Router
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    Router::new().route(
        "/metrics",
        get(move || {
            let encode = encode.clone();
            async move { encode() }
        }),
    )
}

/// Which of a process's HTTP listeners is bound: named in bind errors with
/// the flag that moves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// `--admin`: `/ready`, `/healthz`, `/config_dump`.
    Admin,
    /// `--metrics`: Prometheus `/metrics`.
    Metrics,
}

impl Listener {
    fn name(self) -> &'static str {
        match self {
            Listener::Admin => "admin",
            Listener::Metrics => "metrics",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Listener::Admin => "--admin",
            Listener::Metrics => "--metrics",
        }
    }
}

/// The error for a listener that cannot bind `addr`, naming the flag that
/// moves it. A port in use is most often another Isthmus process on the
/// same host (several sidecars, or an agent, a gateway and a sidecar).
pub fn bind_error(listener: Listener, addr: SocketAddr, e: &std::io::Error) -> std::io::Error {
    let (name, flag) = (listener.name(), listener.flag());
    let msg = match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "{name} listener {addr} is in use (another Isthmus component on this host?): \
             give this one its own {flag} ADDR"
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            "{name} listener {addr}: no interface of this host has that address: \
             give {flag} an address of this host"
        ),
        _ => format!("{name} listener {addr}: {e} (change it with {flag} ADDR)"),
    };
    std::io::Error::new(e.kind(), msg)
}

/// Binds `addr` now (so a busy port fails start-up, naming the flag to
/// change) and serves in the background.
pub async fn serve(listener: Listener, addr: SocketAddr, router: Router) -> std::io::Result<()> {
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(listener, addr, &e))?;
    tokio::spawn(async move { axum::serve(tcp, router).await });
    Ok(())
}

/// Logging for Isthmus binaries: `RUST_LOG` or `info`, colours only on a
/// terminal.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second process on a busy admin or metrics port is told which flag
    /// gives it its own.
    #[tokio::test]
    async fn a_busy_port_names_the_flag_to_change() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = taken.local_addr().expect("its address");
        for (listener, flag) in [
            (Listener::Admin, "--admin ADDR"),
            (Listener::Metrics, "--metrics ADDR"),
        ] {
            let e = serve(listener, addr, Router::new())
                .await
                .expect_err("the port is taken");
            assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("{} listener {addr} is in use", listener.name())),
                "{msg}"
            );
            assert!(
                msg.contains("another Isthmus component on this host"),
                "{msg}"
            );
            assert!(
                msg.ends_with(&format!("give this one its own {flag}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn another_bind_error_still_names_the_flag() {
        let addr: SocketAddr = "192.0.2.1:15000".parse().expect("an address");
        let e = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
        let msg = bind_error(Listener::Metrics, addr, &e).to_string();
        assert!(msg.starts_with("metrics listener 192.0.2.1:15000"), "{msg}");
        assert!(msg.contains("--metrics"), "{msg}");
    }
}
