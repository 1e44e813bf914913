//! The primary's store: one interface, `get`, `put`, `delete`, `list`,
//! `watch` and `txn`, over etcd-like revisions. Every key lives under
//! `/isthmus/v1/<kind>/...`; see [`keys`].
//!
//! The embedded backend ([`embedded::EmbeddedStore`]) keeps one primary's
//! state in a redb file; the etcd backend ([`etcd::EtcdStore`]) is for
//! production and for several replicas. A watcher that falls behind the
//! retained history gets [`StoreError::Compacted`] and must list again;
//! [`mirror::Mirror`] does that and reports the difference.
//!
//! `campaign` elects one leader among replicas for the jobs that must run
//! once. On etcd the leader key is bound to a lease that the winner keeps
//! alive; when the winner dies the lease lapses, the key is deleted and the
//! next candidate wins. Leader-only writes carry [`Leadership::fence`], a
//! compare on the leader key's revision, so a deposed leader's late write
//! fails instead of landing.

pub mod embedded;
pub mod etcd;
pub mod mirror;

use async_trait::async_trait;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "revision {requested} has been compacted; the oldest retained is {oldest}: list again and watch from the listed revision"
    )]
    Compacted { requested: i64, oldest: i64 },
    #[error("store backend failed: {0}")]
    Backend(String),
    #[error("stored value under {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

/// A stored value with its etcd-style revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
}

impl KeyValue {
    /// The compare that holds while this key is still as it was read.
    pub fn unchanged(&self) -> Compare {
        Compare {
            key: self.key.clone(),
            mod_revision: self.mod_revision,
        }
    }
}

/// Replaces a value read as `kv` if nobody changed it since. Returns
/// whether it applied and the store revision after it.
pub async fn replace(
    store: &dyn Store,
    kv: &KeyValue,
    value: Vec<u8>,
) -> Result<(bool, i64), StoreError> {
    store
        .txn(
            vec![kv.unchanged()],
            vec![Op::Put {
                key: kv.key.clone(),
                value,
            }],
        )
        .await
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, mod_revision: i64 },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// A condition of a transaction: the key's mod revision equals the given one
/// (0 means the key must be absent).
#[derive(Debug, Clone)]
pub struct Compare {
    pub key: String,
    pub mod_revision: i64,
}

#[derive(Debug, Clone)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// Leadership of one election, held until [`Leadership::lost`] turns true or
/// this value is dropped (which resigns).
pub struct Leadership {
    /// The leader key.
    pub key: String,
    /// The leader key's mod revision when this replica won.
    pub revision: i64,
    /// Turns true (or closes) when leadership is lost: the lease could not
    /// be renewed, or this replica resigned.
    pub lost: tokio::sync::watch::Receiver<bool>,
    /// Keeps the lease alive; dropping it resigns.
    pub(crate) _guard: Box<dyn Send + Sync>,
}

impl Leadership {
    /// The compare that fences a leader-only write: it holds only while the
    /// leader key is still the one this replica wrote.
    pub fn fence(&self) -> Compare {
        Compare {
            key: self.key.clone(),
            mod_revision: self.revision,
        }
    }

    /// Resolves when leadership is lost.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|l| *l).await;
    }
}

/// Watch batches, in revision order. An `Err` ends the watch.
pub type WatchReceiver = mpsc::UnboundedReceiver<Result<Vec<Event>, StoreError>>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError>;
    /// Returns the new revision if the key existed.
    async fn delete(&self, key: &str) -> Result<Option<i64>, StoreError>;
    /// Everything under `prefix`, and the revision the listing reflects.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError>;
    /// Events under `prefix` with revision >= `from_revision`.
    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchReceiver, StoreError>;
    /// Applies `ops` atomically if every compare holds. Returns whether it
    /// applied and the store revision after it.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<(bool, i64), StoreError>;
    /// Forgets history older than `revision`; watches from before it fail
    /// with [`StoreError::Compacted`].
    async fn compact(&self, revision: i64) -> Result<(), StoreError>;

    /// Whether other replicas can read this store. A replica publishes what
    /// only others need (its xDS streams) only to a store they share.
    fn shared_by_replicas(&self) -> bool {
        true
    }
    /// Campaigns in `election` with `candidate` as the leader key's value,
    /// and returns once this caller leads. The lease lapses `ttl` after the
    /// leader stops renewing it (it crashed or lost etcd), and the next
    /// candidate then wins.
    async fn campaign(
        &self,
        election: &str,
        candidate: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<Leadership, StoreError>;
}

/// Key layout: `/isthmus/v1/<kind>/<namespace>/<name>`.
pub mod keys {
    pub const PREFIX: &str = "/isthmus/v1/";
    pub const CLUSTERS: &str = "/isthmus/v1/clusters/";
    pub const ENDPOINTS: &str = "/isthmus/v1/endpoints/";
    pub const HEARTBEATS: &str = "/isthmus/v1/heartbeats/";
    /// The CA: roots, signer, CRLs and rotation progress.
    pub const CA: &str = "/isthmus/v1/ca/state";
    /// `/isthmus/v1/config/<plural>/<namespace>/<name>`.
    pub const CONFIG: &str = "/isthmus/v1/config/";
    /// `/isthmus/v1/xds-status/<replica>`: the proxies on each replica.
    pub const XDS_STATUS: &str = "/isthmus/v1/xds-status/";
    /// `/isthmus/v1/election/<name>`: the leader of each election.
    pub const ELECTIONS: &str = "/isthmus/v1/election/";

    pub fn cluster(name: &str) -> String {
        format!("{CLUSTERS}{name}")
    }
    pub fn election(name: &str) -> String {
        format!("{ELECTIONS}{name}")
    }
    pub fn heartbeat(cluster: &str) -> String {
        format!("{HEARTBEATS}{cluster}")
    }
    pub fn cluster_endpoints(cluster: &str) -> String {
        format!("{ENDPOINTS}{cluster}/")
    }
    pub fn endpoints(cluster: &str, namespace: &str, service: &str) -> String {
        format!("{ENDPOINTS}{cluster}/{namespace}/{service}")
    }
}
