//! The outbound listener (15001): the app sends plain HTTP here, in proxy
//! form (`GET http://echo.demo.svc.cluster.local:8080/`) or with a Host
//! header. The host and port pick the cluster `outbound|PORT||HOST`; a pooled
//! mTLS connection to one of its endpoints carries the request, straight to
//! the destination sidecar on this network or through the destination
//! network's gateway otherwise, always with the SNI `outbound_.PORT_._.HOST`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_api::names::ServiceKey;
use isthmus_xds::Snapshot;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::identity::Svid;
use crate::metrics::Metrics;

pub type Body = BoxBody<Bytes, hyper::Error>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Endpoints tried for one new connection before giving up.
const CONNECT_ATTEMPTS: usize = 3;

pub fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg)).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Opens mesh mTLS connections for the legacy hyper client, which pools
/// them per `host:port` (that is, per service port).
#[derive(Clone)]
pub struct MeshConnector {
    pub xds: Arc<ArcSwap<Snapshot>>,
    pub svid: watch::Receiver<Arc<Svid>>,
    next: Arc<AtomicUsize>,
}

pub struct MeshConn(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl hyper::rt::Read for MeshConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: hyper::rt::ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for MeshConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("{0} is not a mesh service (no cluster {1})")]
    NoCluster(String, String),
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
    #[error("cluster {0} has no mesh TLS settings")]
    NoTls(String),
    #[error("connecting to {addr} for {service}: {source}")]
    Connect {
        service: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("TLS settings for {0}: {1}")]
    Tls(String, String),
}

impl MeshConnector {
    pub fn new(xds: Arc<ArcSwap<Snapshot>>, svid: watch::Receiver<Arc<Svid>>) -> Self {
        Self {
            xds,
            svid,
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    async fn connect(self, uri: Uri) -> Result<MeshConn, OutboundError> {
        let host = uri.host().unwrap_or_default().to_string();
        let port = uri.port_u16().unwrap_or(80);
        let key = ServiceKey::new(host.clone(), port);
        let service = format!("{host}:{port}");
        let snap = self.xds.load_full();
        let cluster = snap
            .clusters
            .get(&key.cluster_name())
            .ok_or_else(|| OutboundError::NoCluster(service.clone(), key.cluster_name()))?
            .clone();
        let sni = cluster.sni.clone().ok_or_else(|| OutboundError::NoTls(cluster.name.clone()))?;
        let endpoints = snap
            .endpoints
            .get(&cluster.name)
            .map(|e| e.best().to_vec())
            .unwrap_or_default();
        if endpoints.is_empty() {
            return Err(OutboundError::NoEndpoints(service));
        }
        let svid = self.svid.borrow().clone();
        let config = crate::tls::client_config(&svid, &cluster.allowed_sans)
            .map_err(|e| OutboundError::Tls(cluster.name.clone(), e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let server_name =
            ServerName::try_from(sni.clone()).map_err(|e| OutboundError::Tls(cluster.name.clone(), e.to_string()))?;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..CONNECT_ATTEMPTS.min(endpoints.len()) {
            let addr = pick(&endpoints, start + i);
            let attempt = async {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                connector.connect(server_name.clone(), tcp).await
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(tls)) => return Ok(MeshConn(TokioIo::new(tls))),
                Ok(Err(e)) => {
                    tracing::debug!(%addr, %service, error = %e, "endpoint connect failed");
                    last = Some((addr, e));
                }
                Err(_) => last = Some((addr, io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))),
            }
        }
        let (addr, source) = last.unwrap_or_else(|| (endpoints[0].addr, io::Error::other("no attempt made")));
        Err(OutboundError::Connect { service, addr, source })
    }
}

/// Weighted round robin over one priority's endpoints.
fn pick(endpoints: &[isthmus_xds::WeightedEndpoint], n: usize) -> SocketAddr {
    let total: usize = endpoints.iter().map(|e| e.weight as usize).sum::<usize>().max(1);
    let mut slot = n % total;
    for e in endpoints {
        if slot < e.weight as usize {
            return e.addr;
        }
        slot -= e.weight as usize;
    }
    endpoints[0].addr
}

impl tower::Service<Uri> for MeshConnector {
    type Response = MeshConn;
    type Error = OutboundError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshConn, OutboundError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

pub type MeshClient = Client<MeshConnector, Incoming>;

pub fn client(connector: MeshConnector) -> MeshClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// The authority a request is for: the absolute URI's, else the Host header.
fn authority(req: &Request<Incoming>) -> Option<(String, u16)> {
    let auth = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| req.headers().get("host").and_then(|h| h.to_str().ok()).map(str::to_string))?;
    let uri: Uri = format!("http://{auth}/").parse().ok()?;
    Some((uri.host()?.to_ascii_lowercase(), uri.port_u16().unwrap_or(80)))
}

pub async fn handle(client: MeshClient, metrics: Arc<Metrics>, mut req: Request<Incoming>) -> Result<Response<Body>, hyper::Error> {
    let Some((host, port)) = authority(&req) else {
        metrics.request("outbound", 400);
        return Ok(text(StatusCode::BAD_REQUEST, "request names no host (absolute URI or Host header)\n".into()));
    };
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let Ok(uri) = format!("http://{host}:{port}{path}").parse::<Uri>() else {
        metrics.request("outbound", 400);
        return Ok(text(StatusCode::BAD_REQUEST, "request target is not a valid URI\n".into()));
    };
    *req.uri_mut() = uri;
    // Hop-by-hop proxy headers are not forwarded.
    req.headers_mut().remove("proxy-connection");
    req.headers_mut().remove("proxy-authorization");
    match client.request(req).await {
        Ok(resp) => {
            metrics.request("outbound", resp.status().as_u16());
            Ok(resp.map(|b| b.boxed()))
        }
        Err(e) => {
            let reason = match std::error::Error::source(&e) {
                Some(src) => src.to_string(),
                None => e.to_string(),
            };
            let status = if reason.contains("not a mesh service") {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            metrics.request("outbound", status.as_u16());
            tracing::info!(%host, port, %reason, "outbound request failed");
            Ok(text(status, format!("isthmus-proxy: {reason}\n")))
        }
    }
}

pub async fn serve(listener: TcpListener, client: MeshClient, metrics: Arc<Metrics>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let client = client.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(client.clone(), metrics.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
