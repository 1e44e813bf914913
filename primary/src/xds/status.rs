//! What each connected proxy has been sent, ACKed and NACKed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    pub sent_version: String,
    pub acked_version: Option<String>,
    pub nack: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub node_id: String,
    pub cluster: String,
    pub role: String,
    pub identity: Option<String>,
    /// Short type name (Cluster, ClusterLoadAssignment, ...) → status.
    pub types: BTreeMap<String, TypeStatus>,
}

#[derive(Default)]
pub struct Tracker {
    inner: Mutex<HashMap<u64, ProxyStatus>>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ProxyStatus>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn connect(&self, id: u64, status: ProxyStatus) {
        self.lock().insert(id, status);
    }

    pub fn disconnect(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn update(&self, id: u64, type_url: &str, f: impl FnOnce(&mut TypeStatus)) {
        if let Some(p) = self.lock().get_mut(&id) {
            let short = type_url.rsplit('.').next().unwrap_or(type_url).to_string();
            f(p.types.entry(short).or_default());
        }
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
