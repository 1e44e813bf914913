//! Plain HTTP GETs to mesh components, from inside a network namespace when
//! needed: readiness checks, config dumps, and requests through a sidecar.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// GETs `target` from `addr`. With `proxy_form`, `target` is an absolute
/// URL sent in proxy form (as `curl -x` does); otherwise it is a path.
pub async fn get(
    ns: Option<&str>,
    addr: SocketAddr,
    target: &str,
) -> anyhow::Result<(u16, String)> {
    let stream = crate::netns::connect(ns, addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let host = if target.starts_with("http://") {
        target
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string()
    } else {
        addr.to_string()
    };
    let req = hyper::Request::get(target)
        .header("host", host)
        .body(Empty::<Bytes>::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .context("request timed out")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}
