//! Delta ADS (incremental xDS), one task per stream.
//!
//! Every resource has its own version, a digest of its encoded bytes. The
//! server remembers which version of which resource the client holds and, on
//! every change, sends only resources whose version moved, plus the names
//! that went away. On reconnect the client's `initial_resource_versions`
//! say what it still holds, so unchanged resources are not sent again. A
//! NACK is recorded and the client keeps what it had.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::ads::{Peer, short};
use super::generate::Generated;

#[derive(Default)]
struct TypeState {
    wildcard: bool,
    /// Subscribed names, interned: a thousand proxies subscribed to the same
    /// thousand clusters share the strings.
    names: BTreeSet<Arc<str>>,
    /// What the client holds: after every push, exactly what `base` has
    /// that it subscribes to (shared with every proxy pushed the same
    /// generation), except for `overrides`: versions it told us on
    /// reconnecting, or "" for a name it unsubscribed from.
    base: Option<Arc<Generated>>,
    overrides: HashMap<String, String>,
    nonce: String,
    /// Nonces of the earlier batches of the last push: a NACK of any of
    /// them counts.
    batch_nonces: BTreeSet<String>,
    /// The system version of the last response, recorded when it is ACKed.
    sent_version: String,
    started: bool,
}

pub(super) async fn run(
    mut peer: Peer,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) {
    let shared = peer.shared.clone();
    let mut model = shared.model.clone();
    let mut seen = model.borrow_and_update().config_revision;
    let mut types: HashMap<String, TypeState> = HashMap::new();
    let mut nonce = 0u64;
    shared.metrics.xds_connections.inc();
    loop {
        let outcome: Result<(), Status> = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => on_request(&mut peer, &mut types, &mut nonce, &tx, req).await,
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
                        result = push(&peer, &t, state, &mut nonce, &tx, false).await;
                        if result.is_err() { break; }
                    }
                }
                result
            }
        };
        if let Err(status) = outcome {
            tracing::warn!(node = %peer.node_id, cluster = %peer.cluster, reason = %status.message(), "closing delta xDS stream");
            let _ = tx.send(Err(status)).await;
            break;
        }
    }
    shared.metrics.xds_connections.dec();
    shared.proxies.disconnect(peer.id);
}

async fn on_request(
    peer: &mut Peer,
    types: &mut HashMap<String, TypeState>,
    nonce: &mut u64,
    tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
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
        } else if state.names.insert(peer.shared.intern(name)) {
            if !state.wildcard {
                state.overrides.entry(name.clone()).or_default();
            }
            subscription_changed = true;
        }
    }
    for name in &req.resource_names_unsubscribe {
        if name == "*" {
            subscription_changed |= std::mem::replace(&mut state.wildcard, false);
        } else if state.names.remove(name.as_str()) {
            // No longer held: a later subscribe gets it again.
            state.overrides.insert(name.clone(), String::new());
            subscription_changed = true;
        }
    }
    if !req.response_nonce.is_empty() {
        match &req.error_detail {
            Some(err)
                if req.response_nonce == state.nonce
                    || state.batch_nonces.contains(&req.response_nonce) =>
            {
                peer.nacked(&req.type_url, &err.message)
            }
            None if req.response_nonce == state.nonce => {
                peer.acked(&req.type_url, state.sent_version.clone())
            }
            _ => {}
        }
    }
    if first || subscription_changed {
        push(peer, &req.type_url, state, nonce, tx, first).await?;
    }
    Ok(())
}

/// Sends what changed for one type since the client's last known state.
async fn push(
    peer: &Peer,
    type_url: &str,
    state: &mut TypeState,
    nonce: &mut u64,
    tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    always: bool,
) -> Result<(), Status> {
    let generated = peer.generated(type_url)?;
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
    // The system version: a digest of the versions this peer is sent.
    let mut h = Sha256::new();
    for (name, (_, version)) in generated.resources.iter().filter(|(n, _)| wanted(n)) {
        h.update(name.as_bytes());
        h.update(version.as_bytes());
    }
    let system_version = hex::encode(&h.finalize()[..8]);
    // Held before, and gone now (or no longer wanted).
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
    let resources: Vec<Resource> = generated
        .resources
        .iter()
        .filter(|(name, (_, version))| wanted(name) && held(name) != Some(version.as_str()))
        .map(|(name, (any, version))| Resource {
            version: version.clone(),
            name: name.clone(),
            resource: Some(any.clone()),
            ..Default::default()
        })
        .collect();
    if resources.is_empty() && removed.is_empty() && !always {
        return Ok(());
    }
    // From here the client holds exactly what it subscribes to of this
    // generation.
    state.base = Some(generated.clone());
    state.overrides.clear();
    state.sent_version = system_version;
    let version = state.sent_version.clone();
    peer.shared
        .proxies
        .update(peer.id, type_url, |s| s.sent_version = version);
    // Large updates go out in batches. Each stream keeps an encode buffer as
    // big as the largest message it sent, so one message of every resource
    // would pin that much memory per proxy for the life of the stream.
    let mut batches: Vec<Vec<Resource>> = Vec::new();
    let mut resources = resources.into_iter().peekable();
    while resources.peek().is_some() {
        batches.push(
            resources
                .by_ref()
                .take(MAX_RESOURCES_PER_RESPONSE)
                .collect(),
        );
    }
    if batches.is_empty() {
        batches.push(Vec::new());
    }
    let last = batches.len() - 1;
    let mut removed = Some(removed);
    state.batch_nonces.clear();
    for (i, batch) in batches.into_iter().enumerate() {
        *nonce += 1;
        if i > 0 {
            let previous = std::mem::take(&mut state.nonce);
            state.batch_nonces.insert(previous);
        }
        state.nonce = nonce.to_string();
        let response = DeltaDiscoveryResponse {
            system_version_info: state.sent_version.clone(),
            resources: batch,
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
        tx.send(Ok(response))
            .await
            .map_err(|_| Status::cancelled("proxy went away"))?;
    }
    Ok(())
}

/// Resources per Delta response; a proxy ACKs each, and the last one's
/// ACK marks it in sync.
const MAX_RESOURCES_PER_RESPONSE: usize = 100;
