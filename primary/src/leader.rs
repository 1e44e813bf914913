//! Leader election among primary replicas, and the jobs that must run once.
//!
//! Every replica serves the API, agent sync and xDS; they share all state
//! through the store. A few jobs must run on one replica only, so replicas
//! campaign through [`Store::campaign`] (an etcd lease; on the embedded
//! store the single replica always leads):
//! - sweeping join tokens that expired unused, so a leaked old token is gone
//!   from the store and the cluster shows `token-expired`;
//! - compacting the store's history;
//! - moving CA rotations on ([`crate::rotation::step`]).
//!
//! The sweep's writes carry the leadership fence as well as a compare on the
//! record they change, so a replica that lost leadership without noticing
//! (a long pause, a partition) cannot overwrite what the new leader wrote.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::records::{ClusterRecord, now_unix};
use crate::store::{Leadership, Op, Store, StoreError, keys};

/// The election every replica runs.
pub const ELECTION: &str = "primary";
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const COMPACT_EVERY: Duration = Duration::from_secs(300);
const ROTATE_EVERY: Duration = Duration::from_secs(1);
/// Revisions of history kept for watchers that reconnect.
const KEEP_REVISIONS: i64 = 10_000;

/// The leader key's value: who leads and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LeaderRecord {
    pub replica: String,
    pub api: String,
    pub grpc: String,
    pub since_unix: u64,
}

/// Campaigns until the process ends; while leading, runs the jobs.
pub async fn run(shared: Arc<Shared>, me: LeaderRecord, ttl: Duration) {
    loop {
        let mut record = me.clone();
        record.since_unix = now_unix();
        let value = match serde_json::to_vec(&record) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the leader record");
                return;
            }
        };
        let leadership = match shared.store.campaign(ELECTION, value, ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "campaign for leadership failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!(replica = %me.replica, revision = leadership.revision, "this replica now leads");
        shared.metrics.leader.set(1);
        shared.metrics.leader_elections_won.inc();
        tokio::select! {
            () = leadership.lost() => {
                tracing::warn!(replica = %me.replica, "leadership lost; campaigning again");
            }
            () = jobs(&shared, &leadership) => {}
        }
        shared.metrics.leader.set(0);
    }
}

async fn jobs(shared: &Shared, leadership: &Leadership) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut compact = tokio::time::interval(COMPACT_EVERY);
    let mut rotate = tokio::time::interval(ROTATE_EVERY);
    loop {
        tokio::select! {
            _ = rotate.tick() => {
                if let Err(e) = crate::rotation::step(shared, leadership).await {
                    tracing::warn!(error = %e, "rotation step failed; retrying");
                }
            }
            _ = sweep.tick() => {
                match sweep_join_tokens(&*shared.store, leadership).await {
                    Ok(n) if n > 0 => tracing::info!(swept = n, "removed expired join tokens"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "join token sweep failed"),
                }
            }
            _ = compact.tick() => {
                if let Err(e) = compact_history(&*shared.store).await {
                    tracing::warn!(error = %e, "store compaction failed");
                }
            }
        }
    }
}

/// Clears join tokens that expired unused. Returns how many were cleared.
pub async fn sweep_join_tokens(
    store: &dyn Store,
    leadership: &Leadership,
) -> Result<usize, StoreError> {
    let (clusters, _) = store.list(keys::CLUSTERS).await?;
    let now = now_unix();
    let mut swept = 0;
    for kv in clusters {
        let Ok(mut c) = serde_json::from_slice::<ClusterRecord>(&kv.value) else {
            continue;
        };
        if c.join_token_sha256.is_none() || c.join_token_expires_unix > now {
            continue;
        }
        c.join_token_sha256 = None;
        let value = serde_json::to_vec(&c).map_err(|e| StoreError::Corrupt {
            key: kv.key.clone(),
            reason: e.to_string(),
        })?;
        let (applied, _) = store
            .txn(
                vec![leadership.fence(), kv.unchanged()],
                vec![Op::Put {
                    key: kv.key.clone(),
                    value,
                }],
            )
            .await?;
        if applied {
            swept += 1;
        }
    }
    Ok(swept)
}

async fn compact_history(store: &dyn Store) -> Result<(), StoreError> {
    let (_, revision) = store.list(keys::ELECTIONS).await?;
    if revision > KEEP_REVISIONS {
        store.compact(revision - KEEP_REVISIONS).await?;
    }
    Ok(())
}

/// Who leads now, as the store says.
pub async fn current(store: &dyn Store) -> Result<Option<LeaderRecord>, StoreError> {
    let Some(kv) = store.get(&keys::election(ELECTION)).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&kv.value)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            key: kv.key,
            reason: e.to_string(),
        })
}
