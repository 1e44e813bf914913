//! The config API: Istio-compatible kinds and Isthmus's own, under
//! `/api/v1/config`.
//!
//! `POST /api/v1/config` applies one or more documents (JSON, or YAML with
//! `---` between documents). Every document is validated first, against the
//! mesh and against the others in the request; if any is invalid, the answer
//! is 400 with every problem and its field path, and nothing is stored. A
//! document that carries `metadata.resourceVersion` is written only if the
//! stored object still has that version; otherwise the answer is 409.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use isthmus_api::config::{self, Context, FieldError, Resource};
use isthmus_api::names::service_fqdn;
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::api::{ApiError, authorize};
use crate::store::{Compare, KeyValue, Op, keys};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/config", post(apply))
        .route("/api/v1/config/{kind}", get(list))
        .route(
            "/api/v1/config/{kind}/{namespace}/{name}",
            get(get_one).delete(delete_one),
        )
        .layer(axum::extract::DefaultBodyLimit::max(config::MAX_BODY_BYTES))
        .with_state(shared)
}

/// A 400 that lists every problem.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Invalid {
    pub error: String,
    pub details: Vec<Detail>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Detail {
    pub document: usize,
    pub kind: String,
    pub name: String,
    pub path: String,
    pub message: String,
}

fn invalid(details: Vec<Detail>) -> Response {
    let lines: Vec<String> = details
        .iter()
        .take(5)
        .map(|d| {
            let what = if d.name.is_empty() {
                format!("document {}", d.document)
            } else {
                format!("{} {}", d.kind, d.name)
            };
            format!("{what}: {}: {}", d.path, d.message)
        })
        .collect();
    let more = details.len().saturating_sub(5);
    let mut error = lines.join("; ");
    if more > 0 {
        error.push_str(&format!("; and {more} more"));
    }
    error.push_str("; nothing was stored");
    (StatusCode::BAD_REQUEST, Json(Invalid { error, details })).into_response()
}

fn key(r: &Resource) -> Option<String> {
    let info = config::kind_info(&r.kind)?;
    Some(format!(
        "{}{}/{}/{}",
        keys::CONFIG,
        info.plural,
        config::effective_namespace(r),
        r.metadata.name
    ))
}

fn with_version(kv: &KeyValue) -> Option<Resource> {
    let mut r: Resource = serde_json::from_slice(&kv.value).ok()?;
    r.metadata.resource_version = Some(kv.mod_revision.to_string());
    Some(r)
}

/// The hosts and subsets the mesh already knows.
async fn context(shared: &Shared) -> Result<Context, ApiError> {
    let mut ctx = Context::default();
    for (ns, name) in shared.model.borrow().services.keys() {
        ctx.hosts
            .insert(service_fqdn(name, ns, isthmus_api::DEFAULT_CLUSTER_DOMAIN));
    }
    for plural in ["serviceentries", "destinationrules"] {
        let (items, _) = shared
            .store
            .list(&format!("{}{plural}/", keys::CONFIG))
            .await?;
        for r in items.iter().filter_map(with_version) {
            ctx.learn(&r);
        }
    }
    Ok(ctx)
}

#[utoipa::path(post, path = "/api/v1/config", tag = "config",
    request_body(content = String, description = "One JSON object, a JSON array, or YAML documents separated by ---", content_type = "application/yaml"),
    responses((status = 200, description = "All documents stored, with their resourceVersion", body = Vec<Resource>),
               (status = 400, description = "Invalid; every problem with its field path; nothing stored", body = Invalid),
               (status = 409, description = "A resourceVersion is stale", body = isthmus_api::rest::ErrorBody),
               (status = 413, description = "Body over 1 MiB", body = isthmus_api::rest::ErrorBody)),
    security(("bearer" = [])))]
async fn apply(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<String, axum::extract::rejection::StringRejection>,
) -> Result<Response, ApiError> {
    authorize(&shared, &headers)?;
    let body = body.map_err(|e| {
        ApiError(
            e.status(),
            format!(
                "request body: {} (at most {} bytes of UTF-8 are accepted)",
                e.body_text(),
                config::MAX_BODY_BYTES
            ),
        )
    })?;
    let docs = match config::parse_documents(&body) {
        Ok(d) => d,
        Err(config::ParseError::Document { index, error }) => {
            return Ok(invalid(vec![Detail {
                document: index,
                kind: String::new(),
                name: String::new(),
                path: error.path,
                message: error.message,
            }]));
        }
        Err(e) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("{e}; nothing was stored"),
            ));
        }
    };
    let mut ctx = context(&shared).await?;
    for d in &docs {
        ctx.learn(d);
    }
    let mut details = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, d) in docs.iter().enumerate() {
        let mut errors: Vec<FieldError> = config::validate(d, &ctx);
        if let Some(k) = key(d)
            && !seen.insert(k)
        {
            errors.push(config::field_error(
                "metadata.name",
                format!(
                    "{} {:?} appears twice in this request",
                    d.kind, d.metadata.name
                ),
            ));
        }
        details.extend(errors.into_iter().map(|e| Detail {
            document: i,
            kind: d.kind.clone(),
            name: d.metadata.name.clone(),
            path: e.path,
            message: e.message,
        }));
    }
    if !details.is_empty() {
        return Ok(invalid(details));
    }
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    for d in &docs {
        let Some(k) = key(d) else { continue };
        if let Some(v) = &d.metadata.resource_version {
            let rev = v.parse::<i64>().map_err(|_| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("metadata.resourceVersion: {v:?} is not a version this primary issued"),
                )
            })?;
            compares.push(Compare {
                key: k.clone(),
                mod_revision: rev,
            });
        }
        let mut stored = d.clone();
        stored.metadata.resource_version = None;
        stored.metadata.namespace = config::effective_namespace(d).to_string();
        let value = serde_json::to_vec(&stored)
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        ops.push(Op::Put { key: k, value });
    }
    let (ok, revision) = shared.store.txn(compares, ops).await?;
    if !ok {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "a resourceVersion in the request is stale: the object changed since it was read; get it again and reapply".into(),
        ));
    }
    let applied: Vec<Resource> = docs
        .into_iter()
        .map(|mut d| {
            d.metadata.namespace = config::effective_namespace(&d).to_string();
            d.metadata.resource_version = Some(revision.to_string());
            d
        })
        .collect();
    tracing::info!(count = applied.len(), revision, "applied config");
    Ok((StatusCode::OK, Json(applied)).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    namespace: Option<String>,
}

fn plural(kind: &str) -> Result<&'static str, ApiError> {
    config::kind_info(kind).map(|k| k.plural).ok_or_else(|| {
        let known: Vec<&str> = config::KINDS.iter().map(|k| k.kind).collect();
        ApiError(
            StatusCode::NOT_FOUND,
            format!("unknown kind {kind:?}; known kinds: {}", known.join(", ")),
        )
    })
}

#[utoipa::path(get, path = "/api/v1/config/{kind}", tag = "config",
    params(("kind" = String, Path, description = "Kind or its plural, e.g. VirtualService or virtualservices"),
           ("namespace" = Option<String>, Query, description = "Only this namespace")),
    responses((status = 200, body = Vec<Resource>), (status = 404, body = isthmus_api::rest::ErrorBody)), security(("bearer" = [])))]
async fn list(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(kind): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Resource>>, ApiError> {
    authorize(&shared, &headers)?;
    let prefix = match &q.namespace {
        Some(ns) => format!("{}{}/{ns}/", keys::CONFIG, plural(&kind)?),
        None => format!("{}{}/", keys::CONFIG, plural(&kind)?),
    };
    let (items, _) = shared.store.list(&prefix).await?;
    Ok(Json(items.iter().filter_map(with_version).collect()))
}

#[utoipa::path(get, path = "/api/v1/config/{kind}/{namespace}/{name}", tag = "config",
    params(("kind" = String, Path), ("namespace" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Resource), (status = 404, body = isthmus_api::rest::ErrorBody)), security(("bearer" = [])))]
async fn get_one(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<Resource>, ApiError> {
    authorize(&shared, &headers)?;
    let k = format!("{}{}/{namespace}/{name}", keys::CONFIG, plural(&kind)?);
    let kv = shared.store.get(&k).await?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no {kind} {namespace}/{name}"),
        )
    })?;
    with_version(&kv).map(Json).ok_or_else(|| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored {kind} {namespace}/{name} is corrupt"),
        )
    })
}

#[utoipa::path(delete, path = "/api/v1/config/{kind}/{namespace}/{name}", tag = "config",
    params(("kind" = String, Path), ("namespace" = String, Path), ("name" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, body = isthmus_api::rest::ErrorBody)), security(("bearer" = [])))]
async fn delete_one(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    authorize(&shared, &headers)?;
    let k = format!("{}{}/{namespace}/{name}", keys::CONFIG, plural(&kind)?);
    match shared.store.delete(&k).await? {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no {kind} {namespace}/{name}"),
        )),
    }
}
