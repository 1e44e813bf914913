//! The embedded store: a redb file plus an in-memory history of recent
//! events for watchers. One primary only; use etcd for several replicas.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::mpsc;

use super::{Compare, Event, KeyValue, Leadership, Op, Store, StoreError, WatchReceiver};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// Events kept for watchers that resume from an older revision.
const DEFAULT_HISTORY: usize = 10_000;
/// The history's bound in bytes: records such as a replica's xDS status
/// grow with the fleet (hundreds of KB at a thousand proxies) and are
/// rewritten often, so a count alone would let history hold gigabytes. A
/// watcher further behind than the history resumes from a fresh read, as
/// after etcd's compaction.
const HISTORY_BYTES: usize = 16 * 1024 * 1024;

fn size(e: &Event) -> usize {
    match e {
        Event::Put(kv) => kv.key.len() + kv.value.len(),
        Event::Delete { key, .. } => key.len(),
    }
}

type WatchSender = mpsc::UnboundedSender<Result<Vec<Event>, StoreError>>;

pub struct EmbeddedStore {
    db: Database,
    inner: Mutex<Inner>,
}

struct Inner {
    revision: i64,
    history: VecDeque<Event>,
    history_limit: usize,
    /// Bytes of keys and values in `history`, kept under `HISTORY_BYTES`.
    history_bytes: usize,
    /// Revision of the oldest event still in history, or revision+1.
    oldest: i64,
    /// (prefix, sender) of every live watcher.
    watchers: Vec<(String, WatchSender)>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Values are stored as create revision, mod revision (i64 LE) then bytes.
fn encode(create: i64, modrev: i64, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + value.len());
    v.extend_from_slice(&create.to_le_bytes());
    v.extend_from_slice(&modrev.to_le_bytes());
    v.extend_from_slice(value);
    v
}

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    if raw.len() < 16 {
        return Err(StoreError::Corrupt {
            key: key.to_string(),
            reason: format!(
                "record is {} bytes, shorter than its 16-byte header",
                raw.len()
            ),
        });
    }
    let (c, rest) = raw.split_at(8);
    let (m, value) = rest.split_at(8);
    let int = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    Ok(KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        create_revision: int(c),
        mod_revision: int(m),
    })
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_history(path, DEFAULT_HISTORY)
    }

    /// As [`open`](Self::open), keeping at most `history` events for watchers.
    pub fn open_with_history(path: &Path, history: usize) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(backend)?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        {
            txn.open_table(KV).map_err(backend)?;
            txn.open_table(META).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        let revision = {
            let read = db.begin_read().map_err(backend)?;
            let meta = read.open_table(META).map_err(backend)?;
            meta.get(REVISION)
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0)
        };
        Ok(Self {
            db,
            inner: Mutex::new(Inner {
                revision,
                history: VecDeque::new(),
                history_limit: history.max(1),
                history_bytes: 0,
                oldest: revision + 1,
                watchers: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the redb file
        // inconsistent (it is transactional), so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_kv(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let read = self.db.begin_read().map_err(backend)?;
        let table = read.open_table(KV).map_err(backend)?;
        match table.get(key).map_err(backend)? {
            Some(v) => Ok(Some(decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    /// Applies ops at `inner.revision + 1` when compares hold. Caller holds the lock.
    fn apply(
        &self,
        inner: &mut Inner,
        compares: &[Compare],
        ops: &[Op],
    ) -> Result<(bool, i64), StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let mut events = Vec::new();
        {
            let mut table = txn.open_table(KV).map_err(backend)?;
            for c in compares {
                let current = match table.get(c.key.as_str()).map_err(backend)? {
                    Some(v) => decode(&c.key, v.value())?.mod_revision,
                    None => 0,
                };
                if current != c.mod_revision {
                    return Ok((false, inner.revision));
                }
            }
            let rev = inner.revision + 1;
            for op in ops {
                match op {
                    Op::Put { key, value } => {
                        let create = match table.get(key.as_str()).map_err(backend)? {
                            Some(v) => decode(key, v.value())?.create_revision,
                            None => rev,
                        };
                        table
                            .insert(key.as_str(), encode(create, rev, value).as_slice())
                            .map_err(backend)?;
                        events.push(Event::Put(KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision: create,
                            mod_revision: rev,
                        }));
                    }
                    Op::Delete { key } => {
                        if table.remove(key.as_str()).map_err(backend)?.is_some() {
                            events.push(Event::Delete {
                                key: key.clone(),
                                mod_revision: rev,
                            });
                        }
                    }
                }
            }
            if events.is_empty() {
                return Ok((true, inner.revision));
            }
            let mut meta = txn.open_table(META).map_err(backend)?;
            meta.insert(REVISION, rev).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        inner.revision += 1;
        self.publish(inner, events);
        Ok((true, inner.revision))
    }

    fn publish(&self, inner: &mut Inner, events: Vec<Event>) {
        inner.watchers.retain(|(prefix, tx)| {
            let batch: Vec<Event> = events
                .iter()
                .filter(|e| e.key().starts_with(prefix.as_str()))
                .cloned()
                .collect();
            batch.is_empty() || tx.send(Ok(batch)).is_ok()
        });
        for e in events {
            inner.history_bytes += size(&e);
            inner.history.push_back(e);
        }
        while inner.history.len() > inner.history_limit
            || (inner.history_bytes > HISTORY_BYTES && inner.history.len() > 1)
        {
            if let Some(e) = inner.history.pop_front() {
                inner.history_bytes -= size(&e);
            }
        }
        inner.oldest = inner
            .history
            .front()
            .map(Event::revision)
            .unwrap_or(inner.revision + 1);
    }

    /// Drops history older than `revision`, like etcd's compaction.
    fn compact_history(&self, revision: i64) {
        let mut inner = self.lock();
        while inner
            .history
            .front()
            .is_some_and(|e| e.revision() < revision)
        {
            if let Some(e) = inner.history.pop_front() {
                inner.history_bytes -= size(&e);
            }
        }
        inner.oldest = inner
            .history
            .front()
            .map(Event::revision)
            .unwrap_or(inner.revision + 1)
            .max(revision);
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.read_kv(key)
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError> {
        let mut inner = self.lock();
        let ops = [Op::Put {
            key: key.to_string(),
            value,
        }];
        Ok(self.apply(&mut inner, &[], &ops)?.1)
    }

    async fn delete(&self, key: &str) -> Result<Option<i64>, StoreError> {
        let mut inner = self.lock();
        let before = inner.revision;
        let (_, rev) = self.apply(
            &mut inner,
            &[],
            &[Op::Delete {
                key: key.to_string(),
            }],
        )?;
        Ok((rev != before).then_some(rev))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        // Hold the lock so the revision matches the snapshot read.
        let inner = self.lock();
        let read = self.db.begin_read().map_err(backend)?;
        let table = read.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for item in table.range(prefix..).map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push(decode(key, v.value())?);
        }
        Ok((out, inner.revision))
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchReceiver, StoreError> {
        let mut inner = self.lock();
        let (tx, rx) = mpsc::unbounded_channel();
        if from_revision <= inner.revision {
            if from_revision < inner.oldest {
                return Err(StoreError::Compacted {
                    requested: from_revision,
                    oldest: inner.oldest,
                });
            }
            let replay: Vec<Event> = inner
                .history
                .iter()
                .filter(|e| e.revision() >= from_revision && e.key().starts_with(prefix))
                .cloned()
                .collect();
            if !replay.is_empty() {
                let _ = tx.send(Ok(replay));
            }
        }
        inner.watchers.push((prefix.to_string(), tx));
        Ok(rx)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<(bool, i64), StoreError> {
        let mut inner = self.lock();
        self.apply(&mut inner, &compares, &ops)
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.compact_history(revision);
        Ok(())
    }

    /// redb locks the file: one process, one replica.
    fn shared_by_replicas(&self) -> bool {
        false
    }

    /// The embedded store belongs to one process (redb locks the file), so
    /// its only candidate wins at once and never loses.
    async fn campaign(
        &self,
        election: &str,
        candidate: Vec<u8>,
        _ttl: std::time::Duration,
    ) -> Result<Leadership, StoreError> {
        let key = super::keys::election(election);
        let revision = self.put(&key, candidate).await?;
        let (tx, lost) = tokio::sync::watch::channel(false);
        Ok(Leadership {
            key,
            revision,
            lost,
            _guard: Box::new(tx),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn revisions_watch_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with_history(&dir.path().join("db"), 4).unwrap();
        let r1 = store.put("/a/1", b"one".to_vec()).await.unwrap();
        let r2 = store.put("/a/2", b"two".to_vec()).await.unwrap();
        assert_eq!(r2, r1 + 1);
        let mut w = store.watch("/a/", r1).await.unwrap();
        let replay = w.recv().await.unwrap().unwrap();
        assert_eq!(replay.len(), 2);
        store.delete("/a/1").await.unwrap();
        let next = w.recv().await.unwrap().unwrap();
        assert!(matches!(&next[0], Event::Delete { key, .. } if key == "/a/1"));

        // txn: create-if-absent fails when present.
        let (ok, _) = store
            .txn(
                vec![Compare {
                    key: "/a/2".into(),
                    mod_revision: 0,
                }],
                vec![Op::Delete { key: "/a/2".into() }],
            )
            .await
            .unwrap();
        assert!(!ok);
        assert!(store.get("/a/2").await.unwrap().is_some());

        for i in 0..10 {
            store.put(&format!("/b/{i}"), vec![]).await.unwrap();
        }
        assert!(matches!(
            store.watch("/a/", r1).await,
            Err(StoreError::Compacted { .. })
        ));
        drop(store);
        // Reopen: state and revision survive.
        let store = EmbeddedStore::open(&dir.path().join("db")).unwrap();
        let (items, rev) = store.list("/").await.unwrap();
        assert_eq!(items.len(), 11);
        assert_eq!(rev, r2 + 11);
    }

    #[tokio::test]
    async fn history_is_bounded_in_bytes_as_well_as_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("db")).unwrap();
        // A status record as large as a big fleet's, rewritten often.
        let big = vec![b'x'; 1024 * 1024];
        let first = store.put("/s/status", big.clone()).await.unwrap();
        let mut last = first;
        for _ in 0..(HISTORY_BYTES / big.len()) + 2 {
            last = store.put("/s/status", big.clone()).await.unwrap();
        }
        assert!(matches!(
            store.watch("/s/", first).await,
            Err(StoreError::Compacted { .. })
        ));
        // Recent history is still there for watchers a little behind.
        let mut w = store.watch("/s/", last).await.unwrap();
        let replay = w.recv().await.unwrap().unwrap();
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].revision(), last);
        assert!(store.lock().history_bytes <= HISTORY_BYTES);
    }
}
