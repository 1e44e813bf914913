//! The inbound listener (15006): terminates mesh mTLS, requiring a client
//! SVID from the trust bundle, then forwards HTTP to the local app chosen by
//! the SNI's port. Plaintext is told apart by its first byte and taken only
//! for ports whose PeerAuthentication mode allows it (PERMISSIVE, DISABLE),
//! chosen by the `Host` port, as an Envoy sidecar's plaintext chain does; a
//! DISABLE port refuses mTLS. The caller's identity goes to the app in
//! `x-forwarded-client-cert` (Istio's format); any such header the caller
//! sent is replaced, so the app can trust it.
//!
//! Each request's path is first normalised as the mesh's
//! `pathNormalization` says (a path that cannot be gets 400); that one
//! path is what the rules below see and what the app gets.
//!
//! Each request is then checked against the AuthorizationPolicies that
//! apply to its port, as the RBAC rules of the port's inbound route
//! configuration from the primary (the same rules an Envoy sidecar gets).
//! A refused request gets Envoy's `403 RBAC: access denied`; until the
//! primary has sent the port's rules, requests get a 503 rather than
//! passing unchecked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_api::names::ServiceKey;
use isthmus_xds::{Snapshot, rbac};
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::Svid;
use crate::metrics::Metrics;
use crate::outbound::{Body, text};

type AppClient = Client<HttpConnector, Incoming>;

/// What every inbound connection shares.
#[derive(Clone)]
struct Inbound {
    app_client: AppClient,
    apps: Arc<HashMap<u16, SocketAddr>>,
    config: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
}

pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    svid: watch::Receiver<Arc<Svid>>,
    apps: Arc<HashMap<u16, SocketAddr>>,
    config: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
) {
    let inbound = Inbound {
        app_client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        apps,
        config,
        metrics,
    };
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        inbound.metrics.inbound_connections.inc();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
        let me = svid.borrow().id.to_string();
        let inbound = inbound.clone();
        tokio::spawn(async move {
            // A TLS record starts with a handshake byte; anything else is
            // plaintext, which only PeerAuthentication can let in.
            let mut first = [0u8; 1];
            let tls_hello = match tokio::time::timeout(
                isthmus_transport::HANDSHAKE_TIMEOUT,
                tcp.peek(&mut first),
            )
            .await
            {
                Ok(Ok(1)) => first[0] == 0x16,
                _ => return,
            };
            if tls_hello {
                inbound.mtls(tcp, peer, acceptor, &me).await;
            } else {
                inbound.plaintext(tcp, peer).await;
            }
        });
    }
}

impl Inbound {
    /// A mesh mTLS connection: the SNI names the app port.
    async fn mtls(
        self,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        me: &str,
    ) {
        let tls =
            match tokio::time::timeout(isthmus_transport::HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "inbound mTLS refused");
                    self.metrics.tls_refused.inc();
                    return;
                }
                Err(_) => return,
            };
        let (_, conn) = tls.get_ref();
        let peer_cert = conn.peer_certificates().and_then(|c| c.first()).cloned();
        let peer_id = isthmus_ca::verifier::peer_id(conn.peer_certificates());
        let port = conn
            .server_name()
            .and_then(|s| ServiceKey::parse_sni(s).ok())
            .map(|k| k.port);
        let (Some(peer_id), Some(peer_cert)) = (peer_id, peer_cert) else {
            return; // the verifier already refused anything else
        };
        let Some((port, app)) = port.and_then(|p| Some((p, *self.apps.get(&p)?))) else {
            tracing::info!(%peer, ?port, "SNI names no port this workload serves; closing");
            return;
        };
        if self
            .config
            .load()
            .inbound
            .get(&port)
            .is_some_and(|p| !p.mtls)
        {
            tracing::info!(%peer, port, "port takes only plaintext (PeerAuthentication DISABLE); closing");
            return;
        }
        let peer_id: Arc<str> = peer_id.to_string().into();
        let xfcc = format!(
            "By={me};Hash={};URI={peer_id}",
            hex::encode(Sha256::digest(peer_cert.as_ref()))
        );
        let Ok(xfcc) = HeaderValue::from_str(&xfcc) else {
            return;
        };
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let refused = crate::outbound::normalize_path(&self.config.load(), &mut req)
                .or_else(|| authorize(&self.config, port, Some(&peer_id), &req));
            let (client, xfcc, metrics) =
                (self.app_client.clone(), xfcc.clone(), self.metrics.clone());
            async move {
                if let Some(refused) = refused {
                    metrics.request("inbound", refused.status().as_u16());
                    return Ok(refused);
                }
                forward(client, app, Some(xfcc), metrics, req).await
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tls), service)
            .await;
    }

    /// A plaintext connection, from outside the mesh. Closed at once unless
    /// some port takes plaintext (as an Envoy sidecar finds no filter chain
    /// for it); then each request's `Host` port picks the app, which must
    /// take plaintext, and any `x-forwarded-client-cert` the caller sent is
    /// removed: there is no verified identity to pass on.
    async fn plaintext(self, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        if !self.config.load().inbound.values().any(|p| p.plaintext) {
            tracing::info!(%peer, "plaintext refused: every port takes mTLS only (PeerAuthentication)");
            self.metrics.plaintext_refused.inc();
            return;
        }
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let normalized = crate::outbound::normalize_path(&self.config.load(), &mut req);
            let port = crate::outbound::authority(&req).map(|(_, port)| port);
            let takes = port.filter(|p| {
                self.config
                    .load()
                    .inbound
                    .get(p)
                    .is_some_and(|p| p.plaintext)
            });
            let target = takes.and_then(|p| Some((p, *self.apps.get(&p)?)));
            let decision = match (normalized, target) {
                (Some(bad_path), _) => Err(bad_path),
                (None, None) => Err(text(
                    StatusCode::NOT_FOUND,
                    format!(
                        "isthmus-proxy: port {} takes no plaintext (PeerAuthentication)\n",
                        port.map_or_else(|| "(none in Host)".to_string(), |p| p.to_string())
                    ),
                )),
                (None, Some((p, app))) => match authorize(&self.config, p, None, &req) {
                    Some(refused) => Err(refused),
                    None => Ok(app),
                },
            };
            let (client, metrics) = (self.app_client.clone(), self.metrics.clone());
            async move {
                match decision {
                    Ok(app) => forward(client, app, None, metrics, req).await,
                    Err(refused) => {
                        metrics.request("inbound", refused.status().as_u16());
                        Ok(refused)
                    }
                }
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), service)
            .await;
    }
}

/// The response refusing the request, if the port's mode or rules do.
/// `peer` is the caller's verified SPIFFE ID; plaintext callers have none.
/// Checked per request, so a policy change holds on open connections too.
fn authorize(
    config: &ArcSwap<Snapshot>,
    port: u16,
    peer: Option<&str>,
    req: &Request<Incoming>,
) -> Option<Response<Body>> {
    let snapshot = config.load();
    let Some(inbound) = snapshot.inbound.get(&port) else {
        return Some(text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("isthmus-proxy: no authorization rules for port {port} from the primary yet\n"),
        ));
    };
    if peer.is_some() && !inbound.mtls {
        // The mode changed under an open connection: refuse, and close it.
        let mut refused = text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "isthmus-proxy: port {port} takes only plaintext (PeerAuthentication DISABLE)\n"
            ),
        );
        refused
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        return Some(refused);
    }
    let rbac = inbound.rules.as_ref()?;
    let authority = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    let request = rbac::Request {
        peer,
        method: req.method().as_str(),
        path: req.uri().path(),
        authority,
        port,
        headers: req.headers(),
    };
    if rbac.allows(&request) {
        return None;
    }
    tracing::debug!(
        ?peer,
        port,
        path = req.uri().path(),
        "request refused by authorization policy"
    );
    Some(text(StatusCode::FORBIDDEN, "RBAC: access denied".into()))
}

async fn forward(
    client: AppClient,
    app: SocketAddr,
    xfcc: Option<HeaderValue>,
    metrics: Arc<Metrics>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, hyper::Error> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let Ok(uri) = format!("http://{app}{path}").parse::<Uri>() else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "request target is not a valid URI\n".into(),
        ));
    };
    *req.uri_mut() = uri;
    match xfcc {
        Some(xfcc) => req.headers_mut().insert("x-forwarded-client-cert", xfcc),
        None => req.headers_mut().remove("x-forwarded-client-cert"),
    };
    match client.request(req).await {
        Ok(resp) => {
            metrics.request("inbound", resp.status().as_u16());
            Ok(resp.map(|b| b.boxed()))
        }
        Err(e) => {
            metrics.request("inbound", 503);
            Ok(text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("isthmus-proxy: local app at {app}: {e}\n"),
            ))
        }
    }
}
