//! The inbound listener (15006): terminates mesh mTLS, requiring a client
//! SVID from the trust bundle, then forwards HTTP to the local app chosen by
//! the SNI's port. The caller's identity goes to the app in
//! `x-forwarded-client-cert` (Istio's format); any such header the caller
//! sent is replaced, so the app can trust it.
//!
//! Each request is first checked against the AuthorizationPolicies that
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

pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    svid: watch::Receiver<Arc<Svid>>,
    apps: Arc<HashMap<u16, SocketAddr>>,
    config: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
) {
    let app_client: AppClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        metrics.inbound_connections.inc();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
        let (app_client, apps, metrics) = (app_client.clone(), apps.clone(), metrics.clone());
        let config = config.clone();
        let me = svid.borrow().id.to_string();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                isthmus_transport::HANDSHAKE_TIMEOUT,
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "inbound mTLS refused");
                    metrics.tls_refused.inc();
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
            let Some((port, app)) = port.and_then(|p| Some((p, *apps.get(&p)?))) else {
                tracing::info!(%peer, ?port, "SNI names no port this workload serves; closing");
                return;
            };
            let peer_id: Arc<str> = peer_id.to_string().into();
            let xfcc = format!(
                "By={me};Hash={};URI={peer_id}",
                hex::encode(Sha256::digest(peer_cert.as_ref()))
            );
            let Ok(xfcc) = HeaderValue::from_str(&xfcc) else {
                return;
            };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let refused = authorize(&config, port, &peer_id, &req);
                let (app_client, xfcc, metrics) =
                    (app_client.clone(), xfcc.clone(), metrics.clone());
                async move {
                    if let Some(refused) = refused {
                        metrics.request("inbound", refused.status().as_u16());
                        return Ok(refused);
                    }
                    forward(app_client, app, xfcc, metrics, req).await
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// The response refusing the request, if the port's rules do.
fn authorize(
    config: &ArcSwap<Snapshot>,
    port: u16,
    peer: &str,
    req: &Request<Incoming>,
) -> Option<Response<Body>> {
    let snapshot = config.load();
    let Some(rules) = snapshot.inbound.get(&port) else {
        return Some(text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("isthmus-proxy: no authorization rules for port {port} from the primary yet\n"),
        ));
    };
    let rbac = rules.as_ref()?;
    let authority = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    let request = rbac::Request {
        peer: Some(peer),
        method: req.method().as_str(),
        path: req.uri().path(),
        authority,
        port,
        headers: req.headers(),
    };
    if rbac.allows(&request) {
        return None;
    }
    tracing::debug!(%peer, port, path = req.uri().path(), "request refused by authorization policy");
    Some(text(StatusCode::FORBIDDEN, "RBAC: access denied".into()))
}

async fn forward(
    client: AppClient,
    app: SocketAddr,
    xfcc: HeaderValue,
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
    req.headers_mut().insert("x-forwarded-client-cert", xfcc);
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
