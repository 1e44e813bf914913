//! A small echo service for Isthmus samples and tests. Every request is
//! answered with a JSON body naming the cluster and workload that answered
//! and the method, path and headers it received, so a caller can see where
//! its request landed and what identity the mesh passed along.
//!
//! Each request is logged (method and path) at INFO: the app's request log.
//!
//! `GET /delay/MS` answers after MS milliseconds (at most 10 s), for
//! exercising timeouts and connection limits.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Where the echo serves HTTP (its sidecar's `--app PORT=` points here).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Reported in every answer.
    #[arg(long, default_value = "")]
    pub cluster: String,
    /// Reported in every answer.
    #[arg(long, default_value = "")]
    pub workload: String,
}

pub fn answer(config: &Config, req: &Request<Incoming>) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    serde_json::json!({
        "cluster": config.cluster,
        "workload": config.workload,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "headers": headers,
    })
}

/// The wait a `/delay/MS` path asks for, capped at 10 s.
fn delay(path: &str) -> Option<std::time::Duration> {
    let ms: u64 = path.strip_prefix("/delay/")?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms.min(10_000)))
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, cluster = %config.cluster, "echo serving");
    loop {
        let (tcp, _) = listener.accept().await?;
        let config = config.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                // The request log: what reached the app (tests read it to
                // prove a refused request never did). Debug-quoted, so a
                // path cannot forge a line.
                let target = req.uri().path_and_query().map_or("", |p| p.as_str());
                tracing::info!(method = %req.method(), path = ?target, "request");
                let body = answer(&config, &req);
                let delay = delay(req.uri().path());
                async move {
                    if let Some(delay) = delay {
                        tokio::time::sleep(delay).await;
                    }
                    let mut text = serde_json::to_string_pretty(&body).unwrap_or_default();
                    text.push('\n');
                    let mut resp = Response::new(Full::new(Bytes::from(text)));
                    resp.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
