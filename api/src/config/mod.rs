//! Mesh configuration as users write it: Istio's `networking.istio.io` and
//! `security.istio.io` kinds, plus Isthmus's own `Cluster` and `Mesh`.
//!
//! [`parse_documents`] reads JSON or (multi-document) YAML into
//! [`Resource`]s; [`validate`] checks one against the mesh it would join and
//! returns every problem with the field path it concerns, e.g.
//! `spec.http[0].route[1].weight: weights must sum to 100`. Type errors come
//! from serde with their path; the rest are the checks in [`istio`].

pub mod istio;
pub mod mesh;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::names::check_label;

/// A stored or submitted config object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    /// `networking.istio.io/v1`, `security.istio.io/v1` or `isthmus.io/v1`.
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    /// The kind's spec, as Istio defines it.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    /// Set by the primary; send it back to update only if nothing changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// One problem, at one field path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

pub fn field_error(path: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.into(),
        message: message.into(),
    }
}

/// A kind Isthmus accepts, with the API versions it is accepted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: &'static str,
    pub group: &'static str,
    pub versions: &'static [&'static str],
    /// Lowercase plural used in URLs (`virtualservices`).
    pub plural: &'static str,
}

const NETWORKING: &[&str] = &["v1", "v1beta1", "v1alpha3"];
const SECURITY: &[&str] = &["v1"];
const ISTHMUS: &[&str] = &["v1"];

pub const KINDS: &[KindInfo] = &[
    KindInfo {
        kind: "VirtualService",
        group: "networking.istio.io",
        versions: NETWORKING,
        plural: "virtualservices",
    },
    KindInfo {
        kind: "DestinationRule",
        group: "networking.istio.io",
        versions: NETWORKING,
        plural: "destinationrules",
    },
    KindInfo {
        kind: "Gateway",
        group: "networking.istio.io",
        versions: NETWORKING,
        plural: "gateways",
    },
    KindInfo {
        kind: "ServiceEntry",
        group: "networking.istio.io",
        versions: NETWORKING,
        plural: "serviceentries",
    },
    KindInfo {
        kind: "Sidecar",
        group: "networking.istio.io",
        versions: NETWORKING,
        plural: "sidecars",
    },
    KindInfo {
        kind: "PeerAuthentication",
        group: "security.istio.io",
        versions: SECURITY,
        plural: "peerauthentications",
    },
    KindInfo {
        kind: "AuthorizationPolicy",
        group: "security.istio.io",
        versions: SECURITY,
        plural: "authorizationpolicies",
    },
    KindInfo {
        kind: "RequestAuthentication",
        group: "security.istio.io",
        versions: SECURITY,
        plural: "requestauthentications",
    },
    KindInfo {
        kind: "Cluster",
        group: "isthmus.io",
        versions: ISTHMUS,
        plural: "clusters",
    },
    KindInfo {
        kind: "Mesh",
        group: "isthmus.io",
        versions: ISTHMUS,
        plural: "meshes",
    },
];

/// Finds a kind by its name, plural or lowercase singular (`vs` style
/// short names are not supported).
pub fn kind_info(name: &str) -> Option<&'static KindInfo> {
    let lower = name.to_ascii_lowercase();
    KINDS
        .iter()
        .find(|k| k.kind.eq_ignore_ascii_case(name) || k.plural == lower)
}

/// The largest request body the config API reads.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The most documents one request may carry.
pub const MAX_DOCUMENTS: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("body is {0} bytes; at most {MAX_BODY_BYTES} are accepted")]
    TooLarge(usize),
    #[error("body is not valid JSON or YAML: {0}")]
    Syntax(String),
    #[error("body holds {0} documents; at most {MAX_DOCUMENTS} are accepted")]
    TooManyDocuments(usize),
    #[error("body holds no documents")]
    Empty,
    #[error("document {index}: {error}")]
    Document { index: usize, error: FieldError },
}

/// Reads one JSON object, a JSON array of objects, or YAML documents
/// separated by `---`.
pub fn parse_documents(body: &str) -> Result<Vec<Resource>, ParseError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ParseError::TooLarge(body.len()));
    }
    let values: Vec<serde_json::Value> = match serde_json::from_str::<serde_json::Value>(body) {
        Ok(serde_json::Value::Array(items)) => items,
        Ok(v) => vec![v],
        Err(_) => serde_saphyr::from_multiple::<serde_json::Value>(body)
            .map_err(|e| ParseError::Syntax(e.to_string()))?
            .into_iter()
            .filter(|v| !v.is_null())
            .collect(),
    };
    if values.is_empty() {
        return Err(ParseError::Empty);
    }
    if values.len() > MAX_DOCUMENTS {
        return Err(ParseError::TooManyDocuments(values.len()));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(index, v)| from_value(v).map_err(|error| ParseError::Document { index, error }))
        .collect()
}

fn from_value(v: serde_json::Value) -> Result<Resource, FieldError> {
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(v, &mut track);
    Resource::deserialize(de).map_err(|e| {
        let path = track.path().to_string();
        field_error(
            if path == "." {
                "(document)".into()
            } else {
                path
            },
            e.to_string(),
        )
    })
}

/// What a resource is checked against: the hosts and subsets the mesh
/// knows, including those defined in the same request.
#[derive(Debug, Default, Clone)]
pub struct Context {
    /// Fully qualified service hosts (`name.ns.svc.cluster.local`) and
    /// ServiceEntry hosts.
    pub hosts: BTreeSet<String>,
    /// Host → subset names defined by DestinationRules.
    pub subsets: BTreeMap<String, BTreeSet<String>>,
}

impl Context {
    /// Resolves a host as Istio does: a short name is in the resource's
    /// namespace; `name.ns` and FQDNs are taken as they are.
    pub fn resolve(&self, host: &str, namespace: &str) -> String {
        let short = format!("{host}.{namespace}.svc.{}", crate::DEFAULT_CLUSTER_DOMAIN);
        if self.hosts.contains(&short) && !host.contains('.') {
            return short;
        }
        let two = format!("{host}.svc.{}", crate::DEFAULT_CLUSTER_DOMAIN);
        if host.matches('.').count() == 1 && self.hosts.contains(&two) {
            return two;
        }
        if !host.contains('.') {
            return short;
        }
        host.to_string()
    }

    /// Adds what a resource defines (ServiceEntry hosts, DestinationRule subsets).
    pub fn learn(&mut self, r: &Resource) {
        let ns = effective_namespace(r);
        match r.kind.as_str() {
            "ServiceEntry" => {
                for h in r.spec["hosts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|h| h.as_str())
                {
                    let resolved = self.resolve(h, ns);
                    self.hosts.insert(resolved);
                }
            }
            "DestinationRule" => {
                if let Some(host) = r.spec["host"].as_str() {
                    let host = self.resolve(host, ns);
                    let names = r.spec["subsets"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s["name"].as_str().map(str::to_string));
                    self.subsets.entry(host).or_default().extend(names);
                }
            }
            _ => {}
        }
    }
}

pub fn effective_namespace(r: &Resource) -> &str {
    if r.metadata.namespace.is_empty() {
        "default"
    } else {
        &r.metadata.namespace
    }
}

/// Every problem with `r`, empty when it is valid.
pub fn validate(r: &Resource, ctx: &Context) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let Some(info) = KINDS.iter().find(|k| k.kind == r.kind) else {
        let known: Vec<&str> = KINDS.iter().map(|k| k.kind).collect();
        return vec![field_error(
            "kind",
            format!(
                "unknown kind {:?}; known kinds: {}",
                r.kind,
                known.join(", ")
            ),
        )];
    };
    match r.api_version.split_once('/') {
        Some((group, version)) if group == info.group && info.versions.contains(&version) => {}
        _ => errors.push(field_error(
            "apiVersion",
            format!(
                "{} is served as {}",
                info.kind,
                info.versions
                    .iter()
                    .map(|v| format!("{}/{v}", info.group))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
    if r.metadata.name.is_empty()
        || r.metadata.name.len() > 253
        || !r.metadata.name.split('.').all(|l| check_label(l).is_ok())
    {
        errors.push(field_error(
            "metadata.name",
            format!("{:?} is not a lowercase DNS name", r.metadata.name),
        ));
    }
    if !r.metadata.namespace.is_empty() && check_label(&r.metadata.namespace).is_err() {
        errors.push(field_error(
            "metadata.namespace",
            format!("{:?} is not a DNS label", r.metadata.namespace),
        ));
    }
    if !r.spec.is_object() {
        errors.push(field_error("spec", "must be an object"));
        return errors;
    }
    errors.extend(istio::validate_spec(r, ctx));
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_json_and_multi_document_bodies_parse() {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: a}\nspec: {}\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: b}\nspec: {}\n";
        assert_eq!(parse_documents(yaml).unwrap().len(), 2);
        let json = r#"[{"apiVersion":"networking.istio.io/v1","kind":"Gateway","metadata":{"name":"a"},"spec":{}}]"#;
        assert_eq!(parse_documents(json).unwrap()[0].metadata.name, "a");
        let err = parse_documents("kind: [").unwrap_err();
        assert!(matches!(err, ParseError::Syntax(_)), "{err}");
        let err = parse_documents(r#"{"apiVersion":"x","kind":"Gateway","metadata":{"name":5}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("metadata.name"), "{err}");
    }
}
