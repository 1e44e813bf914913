//! Delta ADS (incremental xDS), one task per stream.
//!
//! Every resource has its own version, a digest of its encoded bytes. The
//! server remembers which version of which resource the client holds and, on
//! every change, sends only resources whose version moved, plus the names
//! that went away. On reconnect the client's `initial_resource_versions`
//! say what it still holds, so unchanged resources are not sent again. A
//! NACK is recorded and the client keeps what it had.
//!
//! A client that holds the previous generation is sent that generation's
//! recorded diff, without comparing versions one by one. Responses are cut
//! at 8 KiB and built only as the stream takes them, and a stream holds a
//! push slot from its first response until it has ACKed everything (or
//! 5 s), so a push to a thousand proxies queues bounded bytes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tonic::{Status, Streaming};

use super::ads::{Peer, short};
use super::generate::Generated;

#[derive(Default)]
struct TypeState {
    wildcard: bool,
    /// Subscribed names, interned, and the set itself shared (see
    /// [`Subscriptions`]): a thousand proxies subscribed to the same
    /// thousand clusters share the strings.
    names: Arc<BTreeSet<Arc<str>>>,
    /// What the client holds: after every push, exactly what `base` has
    /// that it subscribes to (shared with every proxy pushed the same
    /// generation), except for `overrides`: versions it told us on
    /// reconnecting, or "" for a name it unsubscribed from.
    base: Option<Arc<Generated>>,
    overrides: HashMap<String, String>,
    nonce: String,
    /// The nonce of the first batch of the last push; nonces count up, so
    /// the push's batches are `first_nonce..=nonce`, and a NACK of any of
    /// them counts.
    first_nonce: u64,
    /// The system version of the last response, recorded when it is ACKed.
    sent_version: String,
    started: bool,
    /// The subscription changed since the last push.
    resubscribed: bool,
    /// The last response has been neither ACKed nor NACKed yet.
    awaiting: bool,
}

/// Subscription sets shared between streams: Envoy subscribes to the
/// endpoints of every cluster it has, so the proxies of a cluster mostly
/// hold the same thousand names, and one copy of the set serves them all.
#[derive(Default)]
pub struct Subscriptions {
    sets: std::sync::Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    by_hash: HashMap<u64, Vec<std::sync::Weak<BTreeSet<Arc<str>>>>>,
    /// Entries at the last sweep of dead sets.
    swept_at: usize,
}

impl Subscriptions {
    /// The shared copy of `set`: an equal set already in use, or `set`.
    pub fn share(&self, set: Arc<BTreeSet<Arc<str>>>) -> Arc<BTreeSet<Arc<str>>> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        set.hash(&mut h);
        let hash = h.finish();
        let mut pool = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = pool.by_hash.entry(hash).or_default();
        bucket.retain(|w| w.strong_count() > 0);
        if let Some(found) = bucket
            .iter()
            .filter_map(|w| w.upgrade())
            .find(|s| **s == *set)
        {
            return found;
        }
        bucket.push(Arc::downgrade(&set));
        if pool.by_hash.len() > 2 * pool.swept_at.max(512) {
            pool.by_hash.retain(|_, b| {
                b.retain(|w| w.strong_count() > 0);
                !b.is_empty()
            });
            pool.swept_at = pool.by_hash.len();
        }
        set
    }
}

/// Where a stream's responses go.
struct Out {
    tx: super::ads::Queue<DeltaDiscoveryResponse>,
    nonce: u64,
    /// This stream's push slot (see `Config::max_concurrent_pushes`): taken
    /// before a push, given back once every type is ACKed or at `until`.
    slot: Option<(tokio::sync::OwnedSemaphorePermit, tokio::time::Instant)>,
}

/// The longest a proxy keeps its push slot without ACKing.
const SLOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Out {
    async fn take_slot(&mut self, peer: &Peer) -> Result<(), Status> {
        if self.slot.is_none() {
            let permit = peer
                .shared
                .push_slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Status::unavailable("the primary is shutting down"))?;
            self.slot = Some((permit, tokio::time::Instant::now() + SLOT_TIMEOUT));
        }
        Ok(())
    }

    async fn slot_expired(&self) {
        match &self.slot {
            Some((_, until)) => tokio::time::sleep_until(*until).await,
            None => std::future::pending().await,
        }
    }
}

pub(super) async fn run(
    mut peer: Peer,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: super::ads::Queue<DeltaDiscoveryResponse>,
) {
    let shared = peer.shared.clone();
    let mut model = shared.model.clone();
    let mut seen = model.borrow_and_update().config_revision;
    let mut types: HashMap<String, TypeState> = HashMap::new();
    let mut out = Out {
        tx,
        nonce: 0,
        slot: None,
    };
    shared.metrics.xds_connections.inc();
    loop {
        let outcome: Result<(), Status> = tokio::select! {
            msg = inbound.message() => match msg {
                // Boxed, here and below: the stream's task then rests at
                // the size of this loop, not of its largest step.
                Ok(Some(req)) => Box::pin(on_request(&mut peer, &mut types, &mut out, req)).await,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(node = %peer.node_id, error = %e, "delta xDS stream error");
                    break;
                }
            },
            changed = model.changed() => {
                if changed.is_err() { break; }
                if model.borrow_and_update().config_revision == seen { continue; }
                // A burst of changes becomes one push.
                tokio::time::sleep(super::ads::PUSH_DEBOUNCE).await;
                let revision = model.borrow_and_update().config_revision;
                seen = revision;
                let mut result = Ok(());
                let mut names: Vec<String> = types.keys().cloned().collect();
                names.sort_by_key(|t| super::ads::push_order(t));
                for t in names {
                    if let Some(state) = types.get_mut(&t) {
                        result = Box::pin(push(&peer, &t, state, &mut out, false)).await;
                        if result.is_err() { break; }
                    }
                }
                result
            }
            () = out.slot_expired() => {
                tracing::debug!(node = %peer.node_id, "proxy slow to ACK; giving back its push slot");
                out.slot = None;
                Ok(())
            }
        };
        if out.slot.is_some() && !types.values().any(|t| t.awaiting) {
            out.slot = None;
        }
        if let Err(status) = outcome {
            tracing::warn!(node = %peer.node_id, cluster = %peer.cluster, reason = %status.message(), "closing delta xDS stream");
            let _ = out.tx.send(Box::new(Err(status))).await;
            break;
        }
    }
    shared.metrics.xds_connections.dec();
    shared.proxies.disconnect(peer.id);
}

async fn on_request(
    peer: &mut Peer,
    types: &mut HashMap<String, TypeState>,
    out: &mut Out,
    req: DeltaDiscoveryRequest,
) -> Result<(), Status> {
    if peer.node_id.is_empty() {
        peer.accept_node(req.node.as_ref())?;
    }
    Peer::check_type(&req.type_url)?;
    let state = types.entry(req.type_url.clone()).or_default();
    let first = !state.started;
    if first {
        state.started = true;
        // A first request that names nothing subscribes to everything.
        state.wildcard = req.resource_names_subscribe.is_empty();
        state.overrides = req.initial_resource_versions.clone().into_iter().collect();
    }
    let mut subscription_changed = false;
    for name in &req.resource_names_subscribe {
        // A name the client did not subscribe to at the last push is not
        // held, whatever the base says.
        if name == "*" {
            if !std::mem::replace(&mut state.wildcard, true) {
                state.base = None;
                subscription_changed = true;
            }
        } else if !state.names.contains(name.as_str()) {
            Arc::make_mut(&mut state.names).insert(peer.shared.intern(name));
            if !state.wildcard {
                state.overrides.entry(name.clone()).or_default();
            }
            subscription_changed = true;
        }
    }
    for name in &req.resource_names_unsubscribe {
        if name == "*" {
            subscription_changed |= std::mem::replace(&mut state.wildcard, false);
        } else if state.names.contains(name.as_str()) {
            Arc::make_mut(&mut state.names).remove(name.as_str());
            // No longer held: a later subscribe gets it again.
            state.overrides.insert(name.clone(), String::new());
            subscription_changed = true;
        }
    }
    if subscription_changed {
        state.names = peer.shared.subscriptions.share(state.names.clone());
    }
    if !req.response_nonce.is_empty() {
        match &req.error_detail {
            Some(err)
                if req.response_nonce == state.nonce
                    || req.response_nonce.parse::<u64>().is_ok_and(|n| {
                        n >= state.first_nonce && state.nonce.parse::<u64>().is_ok_and(|l| n <= l)
                    }) =>
            {
                state.awaiting = false;
                peer.nacked(&req.type_url, &err.message)
            }
            None if req.response_nonce == state.nonce => {
                state.awaiting = false;
                peer.acked(&req.type_url, state.sent_version.clone())
            }
            _ => {}
        }
    }
    state.resubscribed |= subscription_changed;
    if first || subscription_changed {
        push(peer, &req.type_url, state, out, first).await?;
    }
    Ok(())
}

/// Sends what changed for one type since the client's last known state.
async fn push(
    peer: &Peer,
    type_url: &str,
    state: &mut TypeState,
    out: &mut Out,
    always: bool,
) -> Result<(), Status> {
    let generated = peer.generated(type_url)?;
    let wanted = |name: &str| state.wildcard || state.names.contains(name);
    let (resources, removed) = match &state.base {
        // The client holds the parent generation and nothing else: what
        // changed is known, whatever the number of resources.
        Some(base)
            if generated.parent == Some(base.id)
                && state.overrides.is_empty()
                && !state.resubscribed =>
        {
            let resources = generated
                .changed
                .iter()
                .filter(|name| wanted(name) && generated.resources.contains_key(*name))
                .map(String::as_str)
                .collect();
            let removed = generated
                .removed
                .iter()
                .filter(|name| wanted(name))
                .cloned()
                .collect();
            (resources, removed)
        }
        _ => compare(state, &generated),
    };
    if resources.is_empty() && removed.is_empty() && !always {
        return Ok(());
    }
    out.take_slot(peer).await?;
    // From here the client holds exactly what it subscribes to of this
    // generation.
    state.base = Some(generated.clone());
    // Not `clear`: that keeps the table's capacity for the life of the stream.
    state.overrides = HashMap::new();
    state.resubscribed = false;
    state.sent_version = generated.digest.clone();
    let version = state.sent_version.clone();
    peer.shared
        .proxies
        .update(peer.id, type_url, |s| s.sent_version = version);
    // Large updates go out in batches, each built only when the stream can
    // take it: a thousand proxies getting a full push at once then hold a
    // batch or two each, not a copy of everything. Each stream also keeps an
    // encode buffer as big as the largest message it sent.
    let mut batches: Vec<&[&str]> = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, name) in resources.iter().enumerate() {
        let size = generated
            .resources
            .get(*name)
            .map_or(0, |(any, _)| any.value.len() + name.len());
        if i > start
            && (i - start >= MAX_RESOURCES_PER_RESPONSE || bytes + size > MAX_BYTES_PER_RESPONSE)
        {
            batches.push(&resources[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < resources.len() || batches.is_empty() {
        batches.push(&resources[start..]);
    }
    let last = batches.len() - 1;
    let mut removed = Some(removed);
    state.first_nonce = out.nonce + 1;
    for (i, batch) in batches.into_iter().enumerate() {
        out.nonce += 1;
        state.nonce = out.nonce.to_string();
        state.awaiting = true;
        let response = DeltaDiscoveryResponse {
            system_version_info: state.sent_version.clone(),
            resources: batch
                .iter()
                .filter_map(|name| {
                    let (any, version) = generated.resources.get(*name)?;
                    Some(Resource {
                        version: version.clone(),
                        name: name.to_string(),
                        resource: Some(any.clone()),
                        ..Default::default()
                    })
                })
                .collect(),
            type_url: type_url.to_string(),
            removed_resources: if i == last {
                removed.take().unwrap_or_default()
            } else {
                Vec::new()
            },
            nonce: state.nonce.clone(),
            ..Default::default()
        };
        peer.shared
            .metrics
            .xds_pushes
            .get_or_create(&vec![("type".into(), short(type_url))])
            .inc();
        out.tx
            .send(Box::new(Ok(response)))
            .await
            .map_err(|_| Status::cancelled("proxy went away"))?;
    }
    Ok(())
}

/// What the client lacks of a generation, and what it holds that is gone
/// (or no longer wanted), by comparing versions name by name.
fn compare<'g>(state: &TypeState, generated: &'g Generated) -> (Vec<&'g str>, Vec<String>) {
    let wanted = |name: &str| state.wildcard || state.names.contains(name);
    let held = |name: &str| -> Option<&str> {
        if let Some(v) = state.overrides.get(name) {
            return (!v.is_empty()).then_some(v.as_str());
        }
        let base = state.base.as_ref()?;
        if !wanted(name) {
            return None;
        }
        base.resources.get(name).map(|(_, v)| v.as_str())
    };
    let held_names = state
        .base
        .iter()
        .flat_map(|b| b.resources.keys())
        .chain(state.overrides.keys())
        .filter(|n| held(n).is_some());
    let mut removed: Vec<String> = held_names
        .filter(|name| !generated.resources.contains_key(*name) || !wanted(name))
        .cloned()
        .collect();
    removed.sort();
    removed.dedup();
    let resources = generated
        .resources
        .iter()
        .filter(|(name, (_, version))| wanted(name) && held(name) != Some(version.as_str()))
        .map(|(name, _)| name.as_str())
        .collect();
    (resources, removed)
}

/// Resources per Delta response; a proxy ACKs each, and the last one's
/// ACK marks it in sync.
const MAX_RESOURCES_PER_RESPONSE: usize = 100;

/// Encoded bytes per Delta response (one resource may exceed it): the
/// encode buffer each stream keeps grows to its largest message.
const MAX_BYTES_PER_RESPONSE: usize = 8 * 1024;
