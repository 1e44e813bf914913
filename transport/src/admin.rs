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

/// Binds `addr` now (so a busy port fails start-up) and serves in the
/// background.
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("binding admin listener {addr}: {e}"))
    })?;
    tokio::spawn(async move { axum::serve(listener, router).await });
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
