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
    get_with(ns, addr, target, &[]).await
}

/// As [`get`], with extra request headers.
pub async fn get_with(
    ns: Option<&str>,
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
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
    let mut req = hyper::Request::get(target).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .context("request timed out")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// One kept-alive HTTP/1.1 connection to `addr` (opened from inside `ns`),
/// for sending many requests cheaply: load in tests and benches.
pub struct Session {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
}

impl Session {
    pub async fn connect(ns: Option<&str>, addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = crate::netns::connect(ns, addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self { sender, addr })
    }

    /// GETs `url` in proxy form; returns the status and body.
    pub async fn get(&mut self, url: &str) -> anyhow::Result<(u16, String)> {
        self.sender.ready().await?;
        let host = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let req = hyper::Request::get(url)
            .header("host", host)
            .body(Empty::<Bytes>::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req))
            .await
            .with_context(|| format!("request to {} timed out", self.addr))??;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).to_string()))
    }
}
