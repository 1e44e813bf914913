//! What each connected proxy has been sent, ACKed and NACKed, and which
//! certificate and trust bundle it holds.
//!
//! Each replica tracks its own streams and publishes them to the store
//! ([`publish`]) under `/isthmus/v1/xds-status/<replica>`, so any replica can
//! answer for all ([`all`]): `proxy-status`, `ca status` and the rotation's
//! progress see every proxy, whichever replica it is connected to.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::records::now_unix;
use crate::store::keys;

/// A replica's published status older than this is ignored (the replica
/// died; its proxies have moved).
const STALE_AFTER: u64 = 30;
const REFRESH: Duration = Duration::from_secs(10);

/// One replica's streams, as published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub replica: String,
    pub updated_unix: u64,
    pub proxies: Vec<ProxyStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    pub sent_version: String,
    pub acked_version: Option<String>,
    pub nack: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub node_id: String,
    pub cluster: String,
    pub role: String,
    pub identity: Option<String>,
    /// Short type name (Cluster, ClusterLoadAssignment, ...) → status.
    pub types: BTreeMap<String, TypeStatus>,
    /// Fingerprint of the intermediate behind the proxy's certificate.
    #[serde(default)]
    pub intermediate: Option<String>,
    /// Fingerprint of the root that intermediate chains to.
    #[serde(default)]
    pub root: Option<String>,
    #[serde(default)]
    pub certificate_not_after_unix: Option<i64>,
    /// The trust bundle sequence the proxy holds, as it reported.
    #[serde(default)]
    pub bundle_sequence: Option<u64>,
}

#[derive(Default)]
pub struct Tracker {
    inner: Mutex<HashMap<u64, ProxyStatus>>,
    changed: tokio::sync::Notify,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ProxyStatus>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn connect(&self, id: u64, status: ProxyStatus) {
        self.lock().insert(id, status);
        self.changed.notify_one();
    }

    pub fn disconnect(&self, id: u64) {
        self.lock().remove(&id);
        self.changed.notify_one();
    }

    pub fn update(&self, id: u64, type_url: &str, f: impl FnOnce(&mut TypeStatus)) {
        if let Some(p) = self.lock().get_mut(&id) {
            let short = type_url.rsplit('.').next().unwrap_or(type_url).to_string();
            f(p.types.entry(short).or_default());
        }
        self.changed.notify_one();
    }

    pub fn snapshot(&self) -> Vec<ProxyStatus> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Publishes this replica's streams to the store: soon after a change
/// (batched over half a second), and every 10 s so readers know the replica
/// lives. Runs until the process ends; on a store no other replica reads
/// (the embedded one), there is no one to tell, and it returns at once.
pub async fn publish(shared: Arc<Shared>) {
    if !shared.store.shared_by_replicas() {
        return;
    }
    let key = format!("{}{}", keys::XDS_STATUS, shared.replica);
    loop {
        let _ = tokio::time::timeout(REFRESH, shared.proxies.changed.notified()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = ReplicaStatus {
            replica: shared.replica.clone(),
            updated_unix: now_unix(),
            proxies: shared.proxies.snapshot(),
        };
        match serde_json::to_vec(&status) {
            Ok(value) => {
                if let Err(e) = shared.store.put(&key, value).await {
                    tracing::warn!(error = %e, "cannot publish xDS status");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode xDS status"),
        }
    }
}

/// Every proxy connected to any live replica: this replica's own streams
/// as they are now, and the others' as last published. A proxy that moved
/// between replicas is listed once, from the freshest report.
pub fn all(shared: &Shared) -> Vec<ProxyStatus> {
    let mut by_node: BTreeMap<String, (u64, ProxyStatus)> = BTreeMap::new();
    let now = now_unix();
    let model = shared.model.borrow().clone();
    for r in model.xds_status.values() {
        if r.replica == shared.replica || now.saturating_sub(r.updated_unix) > STALE_AFTER {
            continue;
        }
        for p in &r.proxies {
            let newer = by_node
                .get(&p.node_id)
                .is_none_or(|(t, _)| *t < r.updated_unix);
            if newer {
                by_node.insert(p.node_id.clone(), (r.updated_unix, p.clone()));
            }
        }
    }
    for p in shared.proxies.snapshot() {
        by_node.insert(p.node_id.clone(), (u64::MAX, p));
    }
    by_node.into_values().map(|(_, p)| p).collect()
}
