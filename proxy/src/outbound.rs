//! The outbound listener (15001): the app sends plain HTTP here, in proxy
//! form (`GET http://echo.demo.svc.cluster.local:8080/`) or with a Host
//! header. The host and port pick the service's routes from the primary's
//! `outbound` route configuration (VirtualService: path, header and method
//! matches, weighted destinations and subsets, timeout, retries, fault
//! injection, mirroring); the matching route picks a cluster such as
//! `outbound|PORT|SUBSET|HOST`. A pooled mTLS connection to one of its
//! endpoints carries the request, straight to the destination sidecar on
//! this network or through the destination network's gateway otherwise,
//! with the cluster's SNI (`outbound_.PORT_SUBSET_.HOST`).
//!
//! The request's path is normalised first, as the mesh's
//! `pathNormalization` says, and the normalised path is what routes match
//! and what is sent on.
//!
//! Requests with a body are sent once: they are streamed, not buffered, so
//! neither retried nor mirrored.

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
use isthmus_xds::rbac;
use isthmus_xds::routes::{Fault, Retry};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::identity::Svid;
use crate::metrics::Metrics;

pub type Body = BoxBody<Bytes, hyper::Error>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Rewrites the request's path as the mesh's `pathNormalization` says,
/// once, before anything reads it: routes, authorisation and the request
/// forwarded all see the normalised path. A path that cannot be normalised
/// safely gets Envoy's answer, 400, returned as the refusal.
pub fn normalize_path<B>(snapshot: &Snapshot, req: &mut Request<B>) -> Option<Response<Body>> {
    match isthmus_xds::path::normalize_uri(req.uri(), snapshot.path_normalization) {
        Ok(None) => None,
        Ok(Some(uri)) => {
            *req.uri_mut() = uri;
            None
        }
        Err(e) => Some(text(
            StatusCode::BAD_REQUEST,
            format!("isthmus-proxy: {e}\n"),
        )),
    }
}

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
    pools: crate::pool::Pools,
    /// The workload's namespace (its SPIFFE ID's), in which short service
    /// names resolve.
    namespace: String,
}

impl Outbound {
    pub fn new(
        xds: Arc<ArcSwap<Snapshot>>,
        svid: watch::Receiver<Arc<Svid>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let namespace = svid
            .borrow()
            .id
            .namespace_and_account()
            .map_or_else(|| "default".to_string(), |(ns, _)| ns.to_string());
        Self {
            namespace,
            xds,
            svid,
            clients: ArcSwap::from_pointee(HashMap::new()),
            next: AtomicUsize::new(0),
            metrics,
            health: Default::default(),
            pools: Default::default(),
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
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, hyper::Error> {
        if let Some(refused) = normalize_path(&self.xds.load(), &mut req) {
            self.metrics.request("outbound", refused.status().as_u16());
            return Ok(refused);
        }
        let Some((host, port)) = authority(&req) else {
            self.metrics.request("outbound", 400);
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "request names no host (absolute URI or Host header)\n".into(),
            ));
        };
        let snap = self.xds.load_full();
        let host = resolve(&snap, &self.namespace, host, port);
        let plan = match Plan::of(&snap, &host, port, &req) {
            Ok(plan) => plan,
            Err(no_route) => {
                self.metrics.request("outbound", 404);
                return Ok(text(StatusCode::NOT_FOUND, no_route));
            }
        };
        let (delay, abort) = (plan.fault.delay, plan.fault.abort);
        if let Some((wait, share)) = delay
            && chance(share)
        {
            tokio::time::sleep(wait).await;
        }
        if let Some((status, share)) = abort
            && chance(share)
        {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            self.metrics.request("outbound", status.as_u16());
            return Ok(text(status, "fault filter abort".into()));
        }
        let timeout = plan.timeout;
        let attempts = self.clone().attempts(snap, host, port, plan, req);
        let resp = match timeout {
            None => attempts.await,
            Some(limit) => match tokio::time::timeout(limit, attempts).await {
                Ok(resp) => resp,
                Err(_) => text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout".into(),
                ),
            },
        };
        self.metrics.request("outbound", resp.status().as_u16());
        Ok(resp)
    }

    /// Sends the request to the plan's cluster, retrying as its policy says.
    async fn attempts(
        self: Arc<Self>,
        snap: Arc<Snapshot>,
        host: String,
        port: u16,
        plan: Plan,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let cluster = plan.cluster;
        let Some(info) = snap.clusters.get(&cluster).cloned() else {
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "isthmus-proxy: {host}:{port} is not a mesh service (no cluster {cluster})\n"
                ),
            );
        };
        let set = snap.endpoints.get(&cluster).cloned().unwrap_or_default();
        if set.priorities.iter().all(Vec::is_empty) {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("isthmus-proxy: {cluster} has no endpoints\n"),
            );
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
        // A request without a body can be sent again, to another endpoint,
        // and copied to a mirror.
        let bodyless = !has_body(&parts);
        if bodyless && let Some(mirror) = &plan.mirror {
            self.clone().mirror(&snap, mirror, &parts, &path);
        }
        let retry = plan.retry.unwrap_or_default();
        let attempts = if bodyless {
            1 + retry.retries as usize
        } else {
            1
        };
        let pool = self.pools.of(&cluster, info.limits);
        let _admitted = match pool.admit().await {
            Ok(admitted) => admitted,
            Err(overflow) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("isthmus-proxy: {cluster}: {overflow}\n"),
                );
            }
        };
        let mut body = Some(body.boxed());
        let mut tried = Vec::new();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = String::new();
        // The retry in flight, counted against the cluster's maxRetries.
        let mut _retrying = None;
        for attempt in 0..attempts {
            // Past every endpoint, retries start over on the best ones.
            if tried.len() >= set.priorities.iter().map(Vec::len).sum::<usize>() {
                tried.clear();
            }
            let Some(endpoint) = self
                .health
                .pick(&cluster, &set, &tried, |ok| pool.choose(info.lb, ok, n))
            else {
                break;
            };
            tried.push(endpoint);
            let Ok(uri) = format!("http://{endpoint}{path}").parse::<Uri>() else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "request target is not a valid URI\n".into(),
                );
            };
            let mut req = Request::new(body.take().unwrap_or_else(empty));
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri;
            *req.headers_mut() = parts.headers.clone();
            let last = attempt + 1 == attempts;
            self.metrics.upstream(&cluster, "route");
            let in_flight = pool.start(endpoint);
            let sent = self.client(&cluster).request(req);
            let outcome = match retry.per_try_timeout {
                None => Ok(sent.await),
                Some(limit) => tokio::time::timeout(limit, sent).await,
            };
            drop(in_flight);
            // Whether to try again, within the cluster's retry budget.
            let again = |wanted: bool| (wanted && !last).then(|| pool.retry()).flatten();
            match outcome {
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    if status.is_server_error() {
                        self.health
                            .failure(&cluster, endpoint, info.outlier.as_ref(), &set);
                    } else {
                        self.health.success(&cluster, endpoint);
                    }
                    let Some(token) = again(retry.on_status(status.as_u16())) else {
                        return resp.map(|b| b.boxed());
                    };
                    _retrying = Some(token);
                    last_error = format!("{endpoint} answered {status}");
                }
                Ok(Err(e)) => {
                    self.health
                        .failure(&cluster, endpoint, info.outlier.as_ref(), &set);
                    last_error = std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| e.to_string());
                    tracing::info!(%host, port, %endpoint, reason = %last_error, "outbound attempt failed");
                    let Some(token) = again(retry.on_connect_failure) else {
                        break;
                    };
                    _retrying = Some(token);
                }
                Err(_) => {
                    let Some(token) = again(retry.on_5xx || retry.on_gateway_error) else {
                        return text(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream request timeout".into(),
                        );
                    };
                    _retrying = Some(token);
                    last_error = format!("{endpoint}: per-try timeout");
                }
            }
        }
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("isthmus-proxy: {last_error}\n"),
        )
    }

    /// Sends a copy of a bodyless request to the mirror cluster, in the
    /// background; its answer is dropped. As in Envoy, the copy's Host has
    /// `-shadow` appended.
    fn mirror(
        self: Arc<Self>,
        snap: &Snapshot,
        cluster: &str,
        parts: &http::request::Parts,
        path: &str,
    ) {
        let set = snap.endpoints.get(cluster).cloned().unwrap_or_default();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let Some(endpoint) = self
            .health
            .pick(cluster, &set, &[], |ok| crate::health::round_robin(ok, n))
        else {
            return;
        };
        let Ok(uri) = format!("http://{endpoint}{path}").parse::<Uri>() else {
            return;
        };
        let mut req = Request::new(empty());
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers.clone();
        if let Some(host) = parts.headers.get("host").and_then(|h| h.to_str().ok()) {
            let shadow = match host.rsplit_once(':') {
                Some((name, port)) => format!("{name}-shadow:{port}"),
                None => format!("{host}-shadow"),
            };
            if let Ok(v) = HeaderValue::from_str(&shadow) {
                req.headers_mut().insert("host", v);
            }
        }
        self.metrics.upstream(cluster, "mirror");
        let client = self.client(cluster);
        tokio::spawn(async move {
            if let Err(e) = client.request(req).await {
                tracing::debug!(%endpoint, error = %e, "mirrored request failed");
            }
        });
    }
}

/// What to do with one request: from the route it matches, or, for a
/// service without routes from the primary yet, its cluster with the
/// default retries. No matching route is a 404, as in Envoy.
struct Plan {
    cluster: String,
    timeout: Option<Duration>,
    retry: Option<Retry>,
    mirror: Option<String>,
    fault: Fault,
}

impl Plan {
    fn of(snap: &Snapshot, host: &str, port: u16, req: &Request<Incoming>) -> Result<Self, String> {
        let Some(routes) = snap.outbound.of(host, port) else {
            return Ok(Plan {
                cluster: ServiceKey::new(host.to_string(), port).cluster_name(),
                timeout: None,
                retry: Some(default_retry()),
                mirror: None,
                fault: Fault::default(),
            });
        };
        let authority = format!("{host}:{port}");
        let view = rbac::Request {
            peer: None,
            method: req.method().as_str(),
            path: req.uri().path(),
            authority: &authority,
            port,
            headers: req.headers(),
        };
        let Some(route) = routes.iter().find(|r| r.matches(&view)) else {
            return Err(format!(
                "isthmus-proxy: no route of {host}:{port} matches {} {}\n",
                view.method, view.path
            ));
        };
        let a = &route.action;
        let total: u64 = a.clusters.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut roll = rand::random_range(0..total.max(1));
        let cluster = a
            .clusters
            .iter()
            .find(|(_, w)| {
                let hit = roll < u64::from(*w);
                roll = roll.saturating_sub(u64::from(*w));
                hit
            })
            .or(a.clusters.first())
            .map(|(c, _)| c.clone())
            .unwrap_or_default();
        Ok(Plan {
            cluster,
            timeout: a.timeout,
            retry: a.retry.clone(),
            mirror: a
                .mirror
                .as_ref()
                .filter(|(_, share)| chance(*share))
                .map(|(c, _)| c.clone()),
            fault: a.fault,
        })
    }
}

/// Retries before the primary's routes arrive: up to three attempts, each
/// on an endpoint not tried yet, after a failed connection or a 5xx.
fn default_retry() -> Retry {
    Retry {
        retries: 2,
        on_connect_failure: true,
        on_5xx: true,
        ..Default::default()
    }
}

/// True for `share` requests in a million.
fn chance(share: u32) -> bool {
    share >= 1_000_000 || rand::random_range(0..1_000_000) < share
}

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

/// The service `host` names for a workload in `namespace`, as Istio's
/// sidecars resolve it: the host itself when the mesh knows it (routes or
/// a cluster on `port`), else the first of `echo.NAMESPACE.svc.DOMAIN`,
/// `echo.svc.DOMAIN` (for `echo.ns`), `echo.DOMAIN` that it knows. A host
/// the mesh does not know under any of these names is kept, and refused
/// later as no mesh service.
pub(crate) fn resolve(snap: &Snapshot, namespace: &str, host: String, port: u16) -> String {
    let known = |h: &str| {
        snap.outbound.of(h, port).is_some()
            || snap
                .clusters
                .contains_key(&ServiceKey::new(h.to_string(), port).cluster_name())
    };
    if known(&host) {
        return host;
    }
    isthmus_api::names::search_names(&host, namespace, isthmus_api::DEFAULT_CLUSTER_DOMAIN)
        .into_iter()
        .skip(1)
        .find(|h| known(h))
        .unwrap_or(host)
}

/// The authority a request is for: the absolute URI's, else the Host
/// header; the port defaults to 80.
pub(crate) fn authority(req: &Request<Incoming>) -> Option<(String, u16)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cluster(fqdn: &str, port: u16) -> Snapshot {
        let name = ServiceKey::new(fqdn.to_string(), port).cluster_name();
        let mut snap = Snapshot::default();
        snap.clusters.insert(
            name.clone(),
            Arc::new(isthmus_xds::ClusterInfo {
                name,
                sni: None,
                allowed_sans: Vec::new(),
                outlier: None,
                lb: Default::default(),
                limits: Default::default(),
            }),
        );
        snap
    }

    /// `Host: echo:8080` from a workload in demo reaches
    /// echo.demo.svc.cluster.local, as in Istio; `echo.prod` reaches prod's.
    #[test]
    fn short_names_resolve_in_the_callers_namespace() {
        let snap = with_cluster("echo.demo.svc.cluster.local", 8080);
        let r = |host: &str, ns: &str, port| resolve(&snap, ns, host.to_string(), port);
        assert_eq!(r("echo", "demo", 8080), "echo.demo.svc.cluster.local");
        assert_eq!(r("echo.demo", "other", 8080), "echo.demo.svc.cluster.local");
        assert_eq!(
            r("echo.demo.svc", "other", 8080),
            "echo.demo.svc.cluster.local"
        );
        assert_eq!(
            r("echo.demo.svc.cluster.local", "other", 8080),
            "echo.demo.svc.cluster.local"
        );
        // Another namespace's caller, another port, or an unknown name: the
        // host stays as given (and is refused as no mesh service).
        assert_eq!(r("echo", "prod", 8080), "echo");
        assert_eq!(r("echo", "demo", 9090), "echo");
        assert_eq!(r("example.com", "demo", 8080), "example.com");
    }
}
