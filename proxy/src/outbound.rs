//! The outbound listener (15001): the app sends plain HTTP here, in proxy
//! form (`GET http://echo.demo.svc.cluster.local:8080/`) or with a Host
//! header. The host and port pick the cluster `outbound|PORT||HOST`; a pooled
//! mTLS connection to one of its endpoints carries the request, straight to
//! the destination sidecar on this network or through the destination
//! network's gateway otherwise, always with the SNI `outbound_.PORT_._.HOST`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
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

pub fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Opens mesh mTLS connections to one cluster's endpoints. The legacy hyper
/// client pools them per request URI authority, which is the endpoint, so
/// the pool key is (cluster, endpoint).
#[derive(Clone)]
pub struct MeshConnector {
    cluster: Arc<str>,
    xds: Arc<ArcSwap<Snapshot>>,
    svid: watch::Receiver<Arc<Svid>>,
}

pub struct MeshConn(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl hyper::rt::Read for MeshConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
    #[error("cluster {0} is gone from the config")]
    NoCluster(String),
    #[error("cluster {0} has no mesh TLS settings")]
    NoTls(String),
    #[error("request URI {0} names no endpoint")]
    BadEndpoint(String),
    #[error("connecting to {addr} for {cluster}: {source}")]
    Connect {
        cluster: String,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("TLS settings for {0}: {1}")]
    Tls(String, String),
}

impl MeshConnector {
    async fn connect(self, uri: Uri) -> Result<MeshConn, OutboundError> {
        let cluster_name = self.cluster.to_string();
        let addr: SocketAddr = uri
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .ok_or_else(|| OutboundError::BadEndpoint(uri.to_string()))?;
        let snap = self.xds.load_full();
        let cluster = snap
            .clusters
            .get(&cluster_name)
            .ok_or_else(|| OutboundError::NoCluster(cluster_name.clone()))?
            .clone();
        let sni = cluster
            .sni
            .clone()
            .ok_or_else(|| OutboundError::NoTls(cluster_name.clone()))?;
        let svid = self.svid.borrow().clone();
        let config = crate::tls::client_config(&svid, &cluster.allowed_sans)
            .map_err(|e| OutboundError::Tls(cluster_name.clone(), e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let server_name = ServerName::try_from(sni)
            .map_err(|e| OutboundError::Tls(cluster_name.clone(), e.to_string()))?;
        let attempt = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            connector.connect(server_name, tcp).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(tls)) => Ok(MeshConn(TokioIo::new(tls))),
            Ok(Err(source)) => Err(OutboundError::Connect {
                cluster: cluster_name,
                addr,
                source,
            }),
            Err(_) => Err(OutboundError::Connect {
                cluster: cluster_name,
                addr,
                source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            }),
        }
    }
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

type MeshClient = Client<MeshConnector, Body>;

/// Outbound routing state: config from xDS, our SVID, and one pooled client
/// per cluster, created on first use.
pub struct Outbound {
    xds: Arc<ArcSwap<Snapshot>>,
    svid: watch::Receiver<Arc<Svid>>,
    clients: ArcSwap<HashMap<String, MeshClient>>,
    next: AtomicUsize,
    metrics: Arc<Metrics>,
    health: crate::health::Outliers,
}

impl Outbound {
    pub fn new(
        xds: Arc<ArcSwap<Snapshot>>,
        svid: watch::Receiver<Arc<Svid>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            xds,
            svid,
            clients: ArcSwap::from_pointee(HashMap::new()),
            next: AtomicUsize::new(0),
            metrics,
            health: Default::default(),
        }
    }

    fn client(&self, cluster: &str) -> MeshClient {
        if let Some(c) = self.clients.load().get(cluster) {
            return c.clone();
        }
        let client: MeshClient = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(MeshConnector {
                cluster: cluster.into(),
                xds: self.xds.clone(),
                svid: self.svid.clone(),
            });
        self.clients.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.entry(cluster.to_string())
                .or_insert_with(|| client.clone());
            m
        });
        client
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, hyper::Error> {
        let Some((host, port)) = authority(&req) else {
            self.metrics.request("outbound", 400);
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "request names no host (absolute URI or Host header)\n".into(),
            ));
        };
        let cluster = ServiceKey::new(host.clone(), port).cluster_name();
        let snap = self.xds.load_full();
        let Some(info) = snap.clusters.get(&cluster).cloned() else {
            self.metrics.request("outbound", 404);
            return Ok(text(
                StatusCode::NOT_FOUND,
                format!(
                    "isthmus-proxy: {host}:{port} is not a mesh service (no cluster {cluster})\n"
                ),
            ));
        };
        let set = snap.endpoints.get(&cluster).cloned().unwrap_or_default();
        if set.priorities.iter().all(Vec::is_empty) {
            self.metrics.request("outbound", 503);
            return Ok(text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("isthmus-proxy: {host}:{port} has no endpoints\n"),
            ));
        }
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let (mut parts, body) = req.into_parts();
        // The app's Host header (the service) travels on unchanged.
        if !parts.headers.contains_key("host")
            && let Ok(h) = HeaderValue::from_str(&format!("{host}:{port}"))
        {
            parts.headers.insert("host", h);
        }
        parts.headers.remove("proxy-connection");
        parts.headers.remove("proxy-authorization");
        // A request without a body can be sent again, to another endpoint.
        let attempts = if has_body(&parts) { 1 } else { RETRY_ATTEMPTS };
        let mut body = Some(body.boxed());
        let mut tried = Vec::new();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = String::new();
        for attempt in 0..attempts {
            let Some(endpoint) = self.health.pick(&cluster, &set, n, &tried) else {
                break;
            };
            tried.push(endpoint);
            let Ok(uri) = format!("http://{endpoint}{path}").parse::<Uri>() else {
                self.metrics.request("outbound", 400);
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    "request target is not a valid URI\n".into(),
                ));
            };
            let mut req = Request::new(body.take().unwrap_or_else(empty));
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri;
            *req.headers_mut() = parts.headers.clone();
            let last = attempt + 1 == attempts;
            match self.client(&cluster).request(req).await {
                Ok(resp) if resp.status().is_server_error() => {
                    self.health
                        .failure(&cluster, endpoint, info.outlier.as_ref(), &set);
                    if last {
                        self.metrics.request("outbound", resp.status().as_u16());
                        return Ok(resp.map(|b| b.boxed()));
                    }
                    last_error = format!("{endpoint} answered {}", resp.status());
                }
                Ok(resp) => {
                    self.health.success(&cluster, endpoint);
                    self.metrics.request("outbound", resp.status().as_u16());
                    return Ok(resp.map(|b| b.boxed()));
                }
                Err(e) => {
                    self.health
                        .failure(&cluster, endpoint, info.outlier.as_ref(), &set);
                    last_error = std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| e.to_string());
                    tracing::info!(%host, port, %endpoint, reason = %last_error, "outbound attempt failed");
                }
            }
        }
        self.metrics.request("outbound", 503);
        Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("isthmus-proxy: {last_error}\n"),
        ))
    }
}

/// Attempts for a request without a body: the first and two retries, each
/// on an endpoint not tried yet.
const RETRY_ATTEMPTS: usize = 3;

fn has_body(parts: &http::request::Parts) -> bool {
    let length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    parts.headers.contains_key(http::header::TRANSFER_ENCODING) || length.is_some_and(|l| l > 0)
}

fn empty() -> Body {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The authority a request is for: the absolute URI's, else the Host header.
fn authority(req: &Request<Incoming>) -> Option<(String, u16)> {
    let auth = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })?;
    let uri: Uri = format!("http://{auth}/").parse().ok()?;
    Some((
        uri.host()?.to_ascii_lowercase(),
        uri.port_u16().unwrap_or(80),
    ))
}

pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| outbound.clone().handle(req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
