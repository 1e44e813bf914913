//! The etcd backend (etcd-client): for production and for more than one
//! primary replica. Revisions, compare-and-swap and compaction are etcd's
//! own.

use async_trait::async_trait;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Compare, Event, KeyValue, Leadership, Op, Store, StoreError, WatchReceiver};

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

fn backend(e: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {e}"))
}

fn key_string(raw: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(raw.to_vec()).map_err(|_| StoreError::Corrupt {
        key: String::from_utf8_lossy(raw).to_string(),
        reason: "key is not UTF-8".into(),
    })
}

fn convert(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: key_string(kv.key())?,
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map(|h| h.revision()).unwrap_or(0)
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://HOST:2379`).
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(backend)?;
        Ok(Self { client })
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(backend)?;
        resp.kvs().first().map(convert).transpose()
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError> {
        let resp = self
            .client
            .kv_client()
            .put(key, value, None)
            .await
            .map_err(backend)?;
        Ok(revision(resp.header()))
    }

    async fn delete(&self, key: &str) -> Result<Option<i64>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .delete(key, None)
            .await
            .map_err(backend)?;
        Ok((resp.deleted() > 0).then(|| revision(resp.header())))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(backend)?;
        let items = resp
            .kvs()
            .iter()
            .map(convert)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((items, revision(resp.header())))
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchReceiver, StoreError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision);
        let mut stream = self
            .client
            .watch_client()
            .watch(prefix, Some(options))
            .await
            .map_err(backend)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let resp = match stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        let _ = tx.send(Err(StoreError::Backend("etcd watch ended".into())));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(backend(e)));
                        return;
                    }
                };
                if resp.compact_revision() > 0 {
                    let _ = tx.send(Err(StoreError::Compacted {
                        requested: from_revision,
                        oldest: resp.compact_revision(),
                    }));
                    return;
                }
                if resp.canceled() {
                    let _ = tx.send(Err(StoreError::Backend(format!(
                        "etcd canceled the watch: {}",
                        resp.cancel_reason()
                    ))));
                    return;
                }
                let mut batch = Vec::new();
                for e in resp.events() {
                    let Some(kv) = e.kv() else { continue };
                    let event = match e.event_type() {
                        EventType::Put => convert(kv).map(Event::Put),
                        EventType::Delete => key_string(kv.key()).map(|key| Event::Delete {
                            key,
                            mod_revision: kv.mod_revision(),
                        }),
                    };
                    match event {
                        Ok(ev) => batch.push(ev),
                        Err(err) => tracing::error!(error = %err, "skipping an etcd event"),
                    }
                }
                if !batch.is_empty() && tx.send(Ok(batch)).is_err() {
                    return; // the watcher went away
                }
            }
        });
        Ok(rx)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<(bool, i64), StoreError> {
        let when: Vec<EtcdCompare> = compares
            .into_iter()
            .map(|c| EtcdCompare::mod_revision(c.key, CompareOp::Equal, c.mod_revision))
            .collect();
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(key, value, None),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().when(when).and_then(then))
            .await
            .map_err(backend)?;
        Ok((resp.succeeded(), revision(resp.header())))
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.client
            .kv_client()
            .compact(revision, None)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn campaign(
        &self,
        election: &str,
        candidate: Vec<u8>,
        ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        let key = super::keys::election(election);
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let mut leases = self.client.lease_client();
        let lease = leases.grant(ttl_secs, None).await.map_err(backend)?.id();
        // The lease is kept alive from the start, so it outlives the wait.
        let (lost_tx, lost) = watch::channel(false);
        let (resign_tx, resign) = oneshot::channel::<()>();
        tokio::spawn(keep_alive(
            self.client.clone(),
            lease,
            Duration::from_secs(ttl_secs as u64),
            lost_tx,
            resign,
        ));
        loop {
            let txn = Txn::new()
                .when([EtcdCompare::create_revision(
                    key.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(
                    key.clone(),
                    candidate.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let resp = self.client.kv_client().txn(txn).await.map_err(backend)?;
            let rev = revision(resp.header());
            if resp.succeeded() {
                return Ok(Leadership {
                    key,
                    revision: rev,
                    lost,
                    _guard: Box::new(resign_tx),
                });
            }
            // Someone leads: wait for their key to go (resigned or lapsed).
            let options = WatchOptions::new().with_start_revision(rev + 1);
            let mut stream = self
                .client
                .watch_client()
                .watch(key.clone(), Some(options))
                .await
                .map_err(backend)?;
            loop {
                if *lost.borrow() {
                    return Err(StoreError::Backend(
                        "the election lease lapsed while campaigning".into(),
                    ));
                }
                match stream.message().await.map_err(backend)? {
                    Some(r)
                        if r.events()
                            .iter()
                            .any(|e| e.event_type() == EventType::Delete) =>
                    {
                        break;
                    }
                    Some(r) if r.canceled() || r.compact_revision() > 0 => break,
                    Some(_) => {}
                    None => break,
                }
            }
        }
    }
}

/// Renews `lease` at a third of its TTL until resigned or a renewal fails
/// for longer than the TTL; then reports leadership lost and revokes the
/// lease (best effort) so that another candidate need not wait it out.
async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    lost: watch::Sender<bool>,
    mut resign: oneshot::Receiver<()>,
) {
    let mut leases = client.lease_client();
    let mut last_renewed = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(ttl / 3);
    let mut stream = None;
    loop {
        tokio::select! {
            _ = &mut resign => break,
            _ = tick.tick() => {}
        }
        // Timed from before the request, so this side gives up no later
        // than etcd expires the lease.
        let sent = tokio::time::Instant::now();
        if stream.is_none() {
            stream = leases.keep_alive(lease).await.ok();
        }
        let renewed = match stream.as_mut() {
            Some((keeper, responses)) => match keeper.keep_alive().await {
                Ok(()) => matches!(
                    tokio::time::timeout(ttl / 3, responses.message()).await,
                    Ok(Ok(Some(r))) if r.ttl() > 0
                ),
                Err(_) => false,
            },
            None => false,
        };
        if renewed {
            last_renewed = sent;
        } else {
            stream = None;
            if last_renewed.elapsed() >= ttl {
                tracing::warn!(lease, "the election lease lapsed; leadership lost");
                break;
            }
        }
    }
    let _ = lost.send(true);
    let _ = leases.revoke(lease).await;
}
