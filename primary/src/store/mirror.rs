//! A local copy of everything under a prefix, kept in step with the store.
//!
//! It lists, then watches from the listed revision. When the store says the
//! watched revision was compacted away, it lists again and works out what
//! changed while it was not looking, deletions included, so its owner sees
//! the same events it would have seen from an uninterrupted watch.

use std::collections::BTreeMap;

use super::{Event, KeyValue, Store, StoreError};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub prefix: String,
    pub items: BTreeMap<String, Vec<u8>>,
    /// The store revision the items reflect.
    pub revision: i64,
}

impl Mirror {
    /// Lists `prefix` once.
    pub async fn new(store: &dyn Store, prefix: &str) -> Result<Self, StoreError> {
        let mut m = Mirror {
            prefix: prefix.to_string(),
            ..Default::default()
        };
        m.resync(store).await?;
        Ok(m)
    }

    /// Lists again and returns the difference from what was held.
    pub async fn resync(&mut self, store: &dyn Store) -> Result<Vec<Event>, StoreError> {
        let (listed, revision) = store.list(&self.prefix).await?;
        let fresh: BTreeMap<String, KeyValue> =
            listed.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        let mut events: Vec<Event> = self
            .items
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .map(|k| Event::Delete {
                key: k.clone(),
                mod_revision: revision,
            })
            .collect();
        for (k, kv) in &fresh {
            if self.items.get(k) != Some(&kv.value) {
                events.push(Event::Put(kv.clone()));
            }
        }
        self.items = fresh.into_iter().map(|(k, kv)| (k, kv.value)).collect();
        self.revision = revision;
        Ok(events)
    }

    pub fn apply(&mut self, events: &[Event]) {
        for e in events {
            self.revision = self.revision.max(e.revision());
            match e {
                Event::Put(kv) => {
                    self.items.insert(kv.key.clone(), kv.value.clone());
                }
                Event::Delete { key, .. } => {
                    self.items.remove(key);
                }
            }
        }
    }

    /// Follows the store, calling `on_change` after every batch it applies
    /// (a resync after compaction included). Returns when `on_change` says
    /// stop (false) or the store fails in a way a resync cannot mend.
    pub async fn follow<F>(&mut self, store: &dyn Store, mut on_change: F) -> Result<(), StoreError>
    where
        F: FnMut(&Mirror, &[Event]) -> bool,
    {
        loop {
            let mut watch = match store.watch(&self.prefix, self.revision + 1).await {
                Ok(w) => w,
                Err(StoreError::Compacted { .. }) => {
                    let diff = self.resync(store).await?;
                    if !on_change(self, &diff) {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            loop {
                match watch.recv().await {
                    Some(Ok(batch)) => {
                        self.apply(&batch);
                        if !on_change(self, &batch) {
                            return Ok(());
                        }
                    }
                    Some(Err(StoreError::Compacted { requested, oldest })) => {
                        tracing::warn!(prefix = %self.prefix, requested, oldest, "watch compacted; listing again");
                        let diff = self.resync(store).await?;
                        if !on_change(self, &diff) {
                            return Ok(());
                        }
                        break;
                    }
                    Some(Err(e)) => return Err(e),
                    None => return Err(StoreError::Backend("store watch ended".into())),
                }
            }
        }
    }
}
