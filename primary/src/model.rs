//! The primary's in-memory model of the mesh, rebuilt from store events.
//!
//! Data flows one way: a [`Mirror`] follows the store, and after every change
//! a fresh immutable [`Model`] is built from the mirrored keys and published.
//! Readers (xDS, the REST API) hold an `Arc<Model>` and never lock. After a
//! compaction the mirror lists everything again, so deletions made while it
//! was away are not missed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::records::{ClusterRecord, HeartbeatRecord, ServiceRecord};
use crate::store::mirror::Mirror;
use crate::store::{Store, StoreError, keys};

/// An immutable view of the mesh at one store revision.
#[derive(Debug, Default)]
pub struct Model {
    pub revision: i64,
    /// The last revision that changed anything but heartbeats; xDS only
    /// regenerates when this moves.
    pub config_revision: i64,
    pub clusters: BTreeMap<String, ClusterRecord>,
    pub heartbeats: BTreeMap<String, HeartbeatRecord>,
    /// (namespace, name) → cluster → the service as that cluster reports it.
    pub services: BTreeMap<(String, String), BTreeMap<String, ServiceRecord>>,
    /// Intermediate fingerprint → cluster name.
    pub intermediates: HashMap<String, String>,
    /// The CA record (roots, signer, CRLs, rotation), without any key.
    pub ca: Option<crate::ca::CaRecord>,
    /// Replica name → the proxies connected to it, as it last published.
    pub xds_status: BTreeMap<String, crate::xds::status::ReplicaStatus>,
    /// VirtualServices, with their namespace, in name order.
    pub virtual_services: Vec<(String, isthmus_api::config::istio::VirtualService)>,
    /// DestinationRules, with their namespace, in name order.
    pub destination_rules: Vec<(String, isthmus_api::config::istio::DestinationRule)>,
    /// AuthorizationPolicies: (namespace, name, spec), in key order.
    pub authorization_policies: Vec<(
        String,
        String,
        isthmus_api::config::istio::AuthorizationPolicy,
    )>,
    /// Sidecars: (namespace, name, spec), in key order.
    pub sidecars: Vec<(String, String, isthmus_api::config::istio::Sidecar)>,
    /// PeerAuthentications: (namespace, name, spec), in key order.
    pub peer_authentications: Vec<(
        String,
        String,
        isthmus_api::config::istio::PeerAuthentication,
    )>,
    /// The mesh's path normalisation: the first `Mesh` object (in key
    /// order) that sets `pathNormalization`, else the default,
    /// DECODE_AND_MERGE_SLASHES.
    pub path_normalization: isthmus_api::config::mesh::PathNormalization,
}

/// A stored config object's spec as the type the primary reads, or None
/// (logged) if it does not decode: one bad object does not stop the rest.
fn spec_of<T: serde::de::DeserializeOwned>(key: &str, spec: serde_json::Value) -> Option<T> {
    serde_json::from_value(spec)
        .map_err(
            |e| tracing::error!(key, error = %e, "skipping a config object that does not decode"),
        )
        .ok()
}

impl Model {
    fn build(revision: i64, config_revision: i64, kv: &BTreeMap<String, Vec<u8>>) -> Self {
        let mut m = Model {
            revision,
            config_revision,
            ..Default::default()
        };
        let mut path_normalization = None;
        for (key, value) in kv {
            if let Some(rest) = key.strip_prefix(keys::CONFIG) {
                let Some((plural, rest)) = rest.split_once('/') else {
                    continue;
                };
                let Some((ns, name)) = rest.split_once('/') else {
                    continue;
                };
                let Ok(r) = serde_json::from_slice::<isthmus_api::config::Resource>(value) else {
                    tracing::error!(key, "skipping a corrupt config object");
                    continue;
                };
                let spec = r.spec;
                match plural {
                    "virtualservices" => m
                        .virtual_services
                        .extend(spec_of(key, spec).map(|vs| (ns.to_string(), vs))),
                    "destinationrules" => m
                        .destination_rules
                        .extend(spec_of(key, spec).map(|dr| (ns.to_string(), dr))),
                    "peerauthentications" => m.peer_authentications.extend(
                        spec_of(key, spec).map(|pa| (ns.to_string(), name.to_string(), pa)),
                    ),
                    "sidecars" => m.sidecars.extend(
                        spec_of(key, spec).map(|sc| (ns.to_string(), name.to_string(), sc)),
                    ),
                    "authorizationpolicies" => m.authorization_policies.extend(
                        spec_of(key, spec).map(|ap| (ns.to_string(), name.to_string(), ap)),
                    ),
                    "meshes" if path_normalization.is_none() => {
                        path_normalization =
                            spec_of::<isthmus_api::config::mesh::MeshSpec>(key, spec)
                                .and_then(|m| m.path_normalization());
                    }
                    _ => {}
                }
            } else if let Some(replica) = key.strip_prefix(keys::XDS_STATUS) {
                if let Ok(s) = serde_json::from_slice(value) {
                    m.xds_status.insert(replica.to_string(), s);
                }
            } else if key == keys::CA {
                match serde_json::from_slice(value) {
                    Ok(ca) => m.ca = Some(ca),
                    Err(e) => tracing::error!(key, error = %e, "skipping corrupt CA record"),
                }
            } else if let Some(name) = key.strip_prefix(keys::CLUSTERS) {
                match serde_json::from_slice::<ClusterRecord>(value) {
                    Ok(c) => {
                        for fp in &c.intermediates {
                            m.intermediates.insert(fp.clone(), name.to_string());
                        }
                        m.clusters.insert(name.to_string(), c);
                    }
                    Err(e) => tracing::error!(key, error = %e, "skipping corrupt cluster record"),
                }
            } else if let Some(name) = key.strip_prefix(keys::HEARTBEATS) {
                if let Ok(h) = serde_json::from_slice::<HeartbeatRecord>(value) {
                    m.heartbeats.insert(name.to_string(), h);
                }
            } else if let Some(rest) = key.strip_prefix(keys::ENDPOINTS) {
                let Some((cluster, _)) = rest.split_once('/') else {
                    continue;
                };
                match serde_json::from_slice::<ServiceRecord>(value) {
                    Ok(s) => {
                        m.services
                            .entry((s.namespace.clone(), s.name.clone()))
                            .or_default()
                            .insert(cluster.to_string(), s);
                    }
                    Err(e) => tracing::error!(key, error = %e, "skipping corrupt service record"),
                }
            }
        }
        // Endpoints of clusters that are no longer registered do not count.
        for per_cluster in m.services.values_mut() {
            per_cluster.retain(|c, _| m.clusters.contains_key(c));
        }
        m.services.retain(|_, v| !v.is_empty());
        m.path_normalization = path_normalization.unwrap_or_default();
        m
    }

    pub fn cluster_of_intermediate(&self, fingerprint: &str) -> Option<&ClusterRecord> {
        self.intermediates
            .get(fingerprint)
            .and_then(|c| self.clusters.get(c))
    }

    pub fn endpoint_count(&self, cluster: &str) -> usize {
        self.services
            .values()
            .filter_map(|m| m.get(cluster))
            .map(|s| s.endpoints.len())
            .sum()
    }
}

/// Watches the store and publishes a new model after every change. Runs
/// until the receiver side is gone.
pub async fn run(store: Arc<dyn Store>, tx: watch::Sender<Arc<Model>>) {
    loop {
        match follow(&*store, &tx).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, "model watch failed; listing again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn follow(store: &dyn Store, tx: &watch::Sender<Arc<Model>>) -> Result<(), StoreError> {
    let mut mirror = Mirror::new(store, keys::PREFIX).await?;
    // A fresh listing is a config change as far as xDS knows.
    let mut config_revision = mirror.revision;
    tx.send_replace(Arc::new(Model::build(
        mirror.revision,
        config_revision,
        &mirror.items,
    )));
    mirror
        .follow(store, |m, events| {
            // Heartbeats, elections and xDS status change nothing proxies see.
            if events.iter().any(|e| {
                ![keys::HEARTBEATS, keys::ELECTIONS, keys::XDS_STATUS]
                    .iter()
                    .any(|p| e.key().starts_with(p))
            }) {
                config_revision = m.revision;
            }
            tx.send_replace(Arc::new(Model::build(
                m.revision,
                config_revision,
                &m.items,
            )));
            !tx.is_closed()
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_api::config::mesh::PathNormalization;

    fn mesh_object(name: &str, spec: serde_json::Value) -> (String, Vec<u8>) {
        let resource = serde_json::json!({
            "apiVersion": "isthmus.io/v1", "kind": "Mesh",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec,
        });
        (
            format!("{}meshes/default/{name}", keys::CONFIG),
            serde_json::to_vec(&resource).unwrap(),
        )
    }

    #[test]
    fn the_first_mesh_object_that_sets_path_normalization_decides() {
        let empty = BTreeMap::new();
        assert_eq!(
            Model::build(1, 1, &empty).path_normalization,
            PathNormalization::DecodeAndMergeSlashes
        );
        let kv: BTreeMap<String, Vec<u8>> = [
            mesh_object("a", serde_json::json!({"trustDomain": "cluster.local"})),
            mesh_object(
                "b",
                serde_json::json!({"pathNormalization": {"normalization": "BASE"}}),
            ),
            mesh_object(
                "c",
                serde_json::json!({"pathNormalization": {"normalization": "NONE"}}),
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            Model::build(1, 1, &kv).path_normalization,
            PathNormalization::Base
        );
    }
}
