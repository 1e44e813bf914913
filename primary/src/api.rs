//! The REST API on 15014: `/api/v1` for operators (bearer token), plus
//! `/healthz` and `/metrics`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use isthmus_api::names::check_label;
use isthmus_api::rest::{
    CaView, ClusterView, ErrorBody, ImportRoot, LeaderView, RegisterCluster, Registered, RotateRoot,
};

use crate::records::{ClusterRecord, now_unix};
use crate::store::{Compare, Op, keys};
use crate::{Shared, tokens};

/// Join tokens live this long unless the request says otherwise.
const DEFAULT_TOKEN_TTL: u64 = 3600;
/// The longest a join token may stay valid: a week. Larger values once
/// overflowed into a token that had already expired.
const MAX_TOKEN_TTL: u64 = 7 * 24 * 3600;
/// A cluster whose agent has not been heard from for this long is stale.
const STALE_AFTER: u64 = 30;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/api/v1/clusters",
            get(list_clusters).post(register_cluster),
        )
        .route(
            "/api/v1/clusters/{name}",
            get(get_cluster).delete(deregister_cluster),
        )
        .route("/api/v1/proxies", get(list_proxies))
        .route("/api/v1/ca/roots", get(roots))
        .route("/api/v1/leader", get(leader))
        .route("/api/v1/ca", get(ca_status))
        .route("/api/v1/ca/rotate-root", axum::routing::post(rotate_root))
        .route("/api/v1/ca/import-root", axum::routing::post(import_root))
        .route(
            "/api/v1/ca/rotate-intermediate/{cluster}",
            axum::routing::post(rotate_intermediate),
        )
        .route("/api/v1/trust-bundle", get(trust_bundle))
        .route(
            "/api/v1/ca/federation/{trust_domain}",
            axum::routing::put(federate).delete(unfederate),
        )
        .route(
            "/api/v1/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(shared.clone())
        .merge(crate::config_api::router(shared))
}

#[utoipa::path(get, path = "/api/v1/leader", tag = "primaries",
    responses((status = 200, description = "The replica that answered, and the one that leads", body = LeaderView),
               (status = 401, body = ErrorBody), (status = 503, description = "The store is unreachable", body = ErrorBody)),
    security(("bearer" = [])))]
async fn leader(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<LeaderView>, ApiError> {
    authorize(&shared, &headers)?;
    let current = crate::leader::current(&*shared.store).await?;
    Ok(Json(LeaderView {
        replica: shared.replica.clone(),
        leader: current.as_ref().map(|l| l.replica.clone()),
        leader_since_unix: current.map(|l| l.since_unix),
    }))
}

#[utoipa::path(get, path = "/api/v1/ca", tag = "ca",
    responses((status = 200, description = "Roots, intermediates, workloads per root, rotation progress", body = CaView),
               (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn ca_status(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<CaView>, ApiError> {
    authorize(&shared, &headers)?;
    Ok(Json(crate::rotation::view(&shared)))
}

impl From<crate::rotation::RotationError> for ApiError {
    fn from(e: crate::rotation::RotationError) -> Self {
        use crate::rotation::RotationError as E;
        let status = match &e {
            E::Conflict(_) => StatusCode::CONFLICT,
            E::Invalid(_) => StatusCode::BAD_REQUEST,
            E::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

#[utoipa::path(post, path = "/api/v1/ca/rotate-root", tag = "ca", request_body = RotateRoot,
    responses((status = 202, description = "Rotation started, resumed or rolled back; follow it at GET /api/v1/ca", body = CaView),
               (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 409, description = "Another rotation is in progress, or it is too late to roll back", body = ErrorBody)),
    security(("bearer" = [])))]
async fn rotate_root(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Json<RotateRoot>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CaView>), ApiError> {
    authorize(&shared, &headers)?;
    let Json(req) = body.map_err(|e| bad(format!("request body: {}", e.body_text())))?;
    if req.until > 3 {
        return Err(bad(format!("until: {} is not a phase (1 to 3)", req.until)));
    }
    let active = shared
        .model
        .borrow()
        .ca
        .as_ref()
        .and_then(|c| c.rotation.as_ref())
        .is_some_and(|r| r.phase < 4);
    let next = if active || req.rollback {
        None
    } else {
        let authority = isthmus_ca::Authority::generate(shared.ca().trust_domain())
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Some((authority, false))
    };
    crate::rotation::request_root(&shared, next, req.until, req.rollback).await?;
    Ok((StatusCode::ACCEPTED, Json(crate::rotation::view(&shared))))
}

#[utoipa::path(post, path = "/api/v1/ca/import-root", tag = "ca", request_body = ImportRoot,
    responses((status = 202, description = "The imported CA is being rotated in; follow it at GET /api/v1/ca", body = CaView),
               (status = 400, description = "The files do not form a usable CA", body = ErrorBody), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn import_root(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Json<ImportRoot>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CaView>), ApiError> {
    authorize(&shared, &headers)?;
    let Json(req) = body.map_err(|e| bad(format!("request body: {}", e.body_text())))?;
    if req.until > 3 {
        return Err(bad(format!("until: {} is not a phase (1 to 3)", req.until)));
    }
    let authority = isthmus_ca::plugin::import(
        &isthmus_ca::PluginFiles {
            root_cert: &req.root_cert,
            ca_cert: &req.ca_cert,
            ca_key: &req.ca_key,
            cert_chain: &req.cert_chain,
        },
        shared.ca().trust_domain(),
    )
    .map_err(|e| bad(e.to_string()))?;
    if authority.not_after_unix() < crate::records::now_unix() as i64 + 30 * 86_400 {
        tracing::warn!(
            not_after = authority.not_after_unix(),
            "the imported CA expires within 30 days; cluster intermediates end with it, so replace it before then"
        );
    }
    crate::rotation::request_root(&shared, Some((authority, true)), req.until, false).await?;
    Ok((StatusCode::ACCEPTED, Json(crate::rotation::view(&shared))))
}

#[utoipa::path(post, path = "/api/v1/ca/rotate-intermediate/{cluster}", tag = "ca",
    params(("cluster" = String, Path, description = "Registered cluster name")),
    responses((status = 202, description = "The cluster's agent is renewing; follow it at GET /api/v1/ca", body = CaView),
               (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn rotate_intermediate(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(cluster): Path<String>,
) -> Result<(StatusCode, Json<CaView>), ApiError> {
    authorize(&shared, &headers)?;
    check_label(&cluster).map_err(|_| bad(format!("cluster: {cluster:?} is not a DNS label")))?;
    crate::rotation::request_intermediate(&shared, &cluster).await?;
    Ok((StatusCode::ACCEPTED, Json(crate::rotation::view(&shared))))
}

#[utoipa::path(put, path = "/api/v1/ca/federation/{trust_domain}", tag = "ca",
    params(("trust_domain" = String, Path, description = "The other mesh's trust domain")),
    request_body(content = String, description = "Its SPIFFE bundle (the JWK set its /api/v1/trust-bundle serves)", content_type = "application/json"),
    responses((status = 200, description = "Federated; workloads of that domain are verified against these roots only", body = CaView),
               (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn federate(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(trust_domain): Path<String>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<CaView>, ApiError> {
    authorize(&shared, &headers)?;
    let Json(jwks) = body.map_err(|e| bad(format!("request body: {}", e.body_text())))?;
    let bundle = isthmus_ca::TrustBundle::from_jwks(&trust_domain, &jwks)
        .map_err(|e| bad(format!("SPIFFE bundle: {e}")))?;
    crate::rotation::federate(&shared, &trust_domain, Some(bundle)).await?;
    Ok(Json(crate::rotation::view(&shared)))
}

#[utoipa::path(delete, path = "/api/v1/ca/federation/{trust_domain}", tag = "ca",
    params(("trust_domain" = String, Path, description = "The other mesh's trust domain")),
    responses((status = 200, description = "No longer federated", body = CaView),
               (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn unfederate(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(trust_domain): Path<String>,
) -> Result<Json<CaView>, ApiError> {
    authorize(&shared, &headers)?;
    crate::rotation::federate(&shared, &trust_domain, None).await?;
    Ok(Json(crate::rotation::view(&shared)))
}

/// How often federated meshes should fetch the bundle again.
const BUNDLE_REFRESH_HINT: u64 = 300;

#[utoipa::path(get, path = "/api/v1/trust-bundle", tag = "ca",
    responses((status = 200, description = "The SPIFFE bundle (a JWK set with use=x509-svid) of this trust domain, for federation", content_type = "application/json")))]
async fn trust_bundle(State(shared): State<Arc<Shared>>) -> Response {
    let ca = shared.ca();
    (
        [("content-type", "application/json")],
        Json(ca.bundle.to_jwks(ca.record.sequence, BUNDLE_REFRESH_HINT)),
    )
        .into_response()
}

pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

pub fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if tokens::admin_digest(t) == shared.admin_token_sha256 => Ok(()),
        Some(_) => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "admin token is not valid".into(),
        )),
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing 'Authorization: Bearer <admin token>' header".into(),
        )),
    }
}

#[utoipa::path(post, path = "/api/v1/clusters", tag = "clusters", request_body = RegisterCluster,
    responses((status = 201, description = "Registered; the join token is shown once", body = Registered),
               (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 409, description = "Already registered", body = ErrorBody)),
    security(("bearer" = [])))]
async fn register_cluster(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Json<RegisterCluster>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    authorize(&shared, &headers)?;
    let Json(req) = body.map_err(|e| bad(format!("request body: {}", e.body_text())))?;
    check_label(&req.name).map_err(|_| bad(format!("name: {:?} is not a DNS label", req.name)))?;
    check_label(&req.network)
        .map_err(|_| bad(format!("network: {:?} is not a DNS label", req.network)))?;
    for (i, g) in req.gateways.iter().enumerate() {
        g.parse::<std::net::IpAddr>()
            .map_err(|_| bad(format!("gateways[{i}]: {g:?} is not an IP address")))?;
    }
    for (field, v) in [("region", &req.region), ("zone", &req.zone)] {
        if !v.is_empty() && check_label(v).is_err() {
            return Err(bad(format!("{field}: {v:?} is not a DNS label")));
        }
    }
    let ttl = match req.token_ttl_seconds {
        0 => DEFAULT_TOKEN_TTL,
        t if t > MAX_TOKEN_TTL => {
            return Err(bad(format!(
                "tokenTtlSeconds: {t} is more than the longest join token lifetime, {MAX_TOKEN_TTL} (7 days); register with a shorter one"
            )));
        }
        t => t,
    };
    let secret = tokens::generate();
    let token = isthmus_api::join_token::format(&secret, &shared.ca().root_fingerprint());
    let now = now_unix();
    let record = ClusterRecord {
        name: req.name.clone(),
        network: req.network,
        region: req.region,
        zone: req.zone,
        gateways: req.gateways,
        trust_domain: shared.ca().trust_domain().to_string(),
        registered_unix: now,
        join_token_sha256: Some(tokens::sha256_hex(&secret)),
        join_token_expires_unix: now + ttl,
        joined_unix: None,
        intermediates: vec![],
        gateway_token_sha256: None,
        current_intermediate: None,
        replaced_intermediates: vec![],
        reissue_requested: false,
        intermediate_rotation: None,
        agent_key_sha256: None,
    };
    let key = keys::cluster(&req.name);
    let value = serde_json::to_vec(&record)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (created, _) = shared
        .store
        .txn(
            vec![Compare {
                key: key.clone(),
                mod_revision: 0,
            }],
            vec![Op::Put { key, value }],
        )
        .await?;
    if !created {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "cluster {:?} is already registered; deregister it first",
                req.name
            ),
        ));
    }
    tracing::info!(cluster = %record.name, network = %record.network, "registered cluster");
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            cluster: view(&shared, &record),
            join_token: token,
            join_token_expires_unix: record.join_token_expires_unix,
        }),
    ))
}

fn view(shared: &Shared, c: &ClusterRecord) -> ClusterView {
    let model = shared.model.borrow().clone();
    let hb = model.heartbeats.get(&c.name);
    let now = now_unix();
    let health = match (c.joined_unix, hb) {
        (None, _) if c.join_token_sha256.is_none() => "token-expired",
        (None, _) => "pending",
        (Some(_), Some(h)) if now.saturating_sub(h.last_heartbeat_unix) <= STALE_AFTER => "healthy",
        (Some(_), _) => "stale",
    };
    ClusterView {
        name: c.name.clone(),
        network: c.network.clone(),
        region: c.region.clone(),
        zone: c.zone.clone(),
        gateways: c.gateways.clone(),
        trust_domain: c.trust_domain.clone(),
        health: health.to_string(),
        agent_version: hb.map(|h| h.agent_version.clone()),
        last_heartbeat_unix: hb.map(|h| h.last_heartbeat_unix),
        last_sync_unix: hb.and_then(|h| h.last_sync_unix),
        endpoint_count: model.endpoint_count(&c.name) as u64,
    }
}

#[utoipa::path(get, path = "/api/v1/clusters", tag = "clusters",
    responses((status = 200, body = Vec<ClusterView>), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
async fn list_clusters(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<Vec<ClusterView>>, ApiError> {
    authorize(&shared, &headers)?;
    let model = shared.model.borrow().clone();
    Ok(Json(
        model.clusters.values().map(|c| view(&shared, c)).collect(),
    ))
}

#[utoipa::path(get, path = "/api/v1/clusters/{name}", tag = "clusters", params(("name" = String, Path, description = "Cluster name")),
    responses((status = 200, body = ClusterView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_cluster(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<ClusterView>, ApiError> {
    authorize(&shared, &headers)?;
    let model = shared.model.borrow().clone();
    let c = model
        .clusters
        .get(&name)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no cluster named {name:?}")))?;
    Ok(Json(view(&shared, c)))
}

/// Removes the cluster, its endpoints and its heartbeat in one transaction.
/// Its intermediate stops being accepted because the model no longer maps it.
#[utoipa::path(delete, path = "/api/v1/clusters/{name}", tag = "clusters", params(("name" = String, Path, description = "Cluster name")),
    responses((status = 204, description = "Removed with its endpoints; its agent is refused from now on"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn deregister_cluster(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    authorize(&shared, &headers)?;
    let (eps, _) = shared.store.list(&keys::cluster_endpoints(&name)).await?;
    if shared.store.get(&keys::cluster(&name)).await?.is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no cluster named {name:?}"),
        ));
    }
    let mut ops: Vec<Op> = eps
        .into_iter()
        .map(|kv| Op::Delete { key: kv.key })
        .collect();
    ops.push(Op::Delete {
        key: keys::heartbeat(&name),
    });
    ops.push(Op::Delete {
        key: keys::cluster(&name),
    });
    shared.store.txn(vec![], ops).await?;
    tracing::info!(cluster = %name, "deregistered cluster");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/proxies", tag = "xds",
    responses((status = 200, description = "What each connected proxy was sent, ACKed and NACKed")), security(("bearer" = [])))]
async fn list_proxies(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    authorize(&shared, &headers)?;
    Ok(Json(crate::xds::status::all(&shared)))
}

#[utoipa::path(get, path = "/api/v1/ca/roots", tag = "ca", responses((status = 200, description = "The trust bundle, PEM", content_type = "application/x-pem-file")))]
async fn roots(State(shared): State<Arc<Shared>>) -> String {
    shared.ca().bundle_pem()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    shared
        .metrics
        .ca_signer_expiry_seconds
        .set(shared.ca().authority.not_after_unix() - crate::records::now_unix() as i64);
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &shared.metrics.registry) {
        Ok(()) => (
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
