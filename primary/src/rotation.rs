//! Root and intermediate rotation, as resumable state machines kept in the
//! store and driven by the leader.
//!
//! **Root** (`ca rotate-root`, `ca import-root`), three phases:
//! 1. The new root joins the bundle. Done when every agent and every
//!    connected proxy reports holding that bundle.
//! 2. The new root's CA signs: every cluster is asked to renew its
//!    intermediate, and every workload renews under it (agents tell them).
//!    Done when every agent signs with an intermediate under the new root and
//!    every connected proxy holds a certificate under it.
//! 3. The old root leaves the bundle. Done when everyone holds that bundle.
//!
//! A rollback before phase 3 swaps the roots: in phase 1 it drops the new
//! root at once; in phase 2 it re-issues under the old one first.
//!
//! **Intermediate** (`ca rotate-intermediate CLUSTER`): the agent renews;
//! once no connected proxy of the cluster holds a certificate from the old
//! intermediate, the old one is revoked by a CRL signed by its root, and the
//! rotation is done when everyone holds that CRL.
//!
//! Requests only record intent ([`request_root`], [`request_intermediate`]);
//! [`step`] moves things on, on the leader, in transactions fenced by its
//! leadership. A crash of the CLI, or of any primary, loses nothing: the next
//! leader picks up where the record says.

use std::collections::BTreeMap;

use isthmus_api::rest::{CaView, FederatedView, IntermediateView, RootView, RotationView};
use isthmus_ca::Authority;

use crate::Shared;
use crate::ca::{CaRecord, Revoked, RootRotation};
use crate::model::Model;
use crate::records::{ClusterRecord, IntermediateRotation, now_unix};
use crate::store::{Compare, KeyValue, Leadership, Op, StoreError, keys};
use crate::xds::status::ProxyStatus;

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

fn internal(e: impl std::fmt::Display) -> RotationError {
    RotationError::Internal(e.to_string())
}

async fn load_ca(shared: &Shared) -> Result<(CaRecord, KeyValue), RotationError> {
    let kv = shared
        .store
        .get(keys::CA)
        .await?
        .ok_or_else(|| RotationError::Internal("the CA record is missing".into()))?;
    let rec = serde_json::from_slice(&kv.value).map_err(internal)?;
    Ok((rec, kv))
}

fn put_ca(rec: &CaRecord) -> Result<Op, RotationError> {
    Ok(Op::Put {
        key: keys::CA.into(),
        value: serde_json::to_vec(rec).map_err(internal)?,
    })
}

fn until(requested: u8) -> u8 {
    if requested == 0 { 3 } else { requested.min(3) }
}

/// Starts a root rotation to `next` (generated or imported), resumes one
/// (a higher `until`), or rolls one back. Writes intent only.
pub async fn request_root(
    shared: &Shared,
    next: Option<(Authority, bool)>,
    requested_until: u8,
    rollback: bool,
) -> Result<(), RotationError> {
    for _ in 0..5 {
        let (mut rec, kv) = load_ca(shared).await?;
        let now = now_unix();
        match rec.rotation.as_mut().filter(|r| r.phase < 4) {
            Some(r) if rollback => {
                if r.phase >= 3 {
                    return Err(RotationError::Conflict(
                        "the rotation is in phase 3 (the old root is being dropped); it can no longer be rolled back"
                            .into(),
                    ));
                }
                if r.rolled_back {
                    return Err(RotationError::Conflict(
                        "this rotation is already being rolled back".into(),
                    ));
                }
                std::mem::swap(&mut r.from, &mut r.to);
                r.rolled_back = true;
                r.until = 3;
                r.phase_started_unix = now;
                // In phase 1 nothing was signed by the new root: drop it now
                // (phase 3). In phase 2, first re-issue under the old root.
                r.phase = if r.phase == 1 { 3 } else { 2 };
                let phase = r.phase;
                let (compares, mut ops) = if phase == 3 {
                    enter_phase_3(&mut rec);
                    rec.rebuild_crls(&shared.kek).map_err(internal)?;
                    (vec![], vec![])
                } else {
                    enter_phase_2(shared, &mut rec).await?
                };
                ops.push(put_ca(&rec)?);
                if commit(shared, &kv, compares, ops).await? {
                    tracing::warn!(audit = true, phase, "root rotation rolled back");
                    return Ok(());
                }
            }
            None if rollback => {
                return Err(RotationError::Conflict(
                    "no root rotation is in progress".into(),
                ));
            }
            Some(r) => {
                if next.is_some() {
                    return Err(RotationError::Conflict(format!(
                        "a rotation to root {} is already in phase {}; finish or roll it back first",
                        short(&r.to),
                        r.phase
                    )));
                }
                r.until = r.until.max(until(requested_until));
                if commit(shared, &kv, vec![], vec![put_ca(&rec)?]).await? {
                    return Ok(());
                }
            }
            None => {
                if let Some(busy) = intermediate_in_progress(shared).await? {
                    return Err(RotationError::Conflict(format!(
                        "cluster {busy} is rotating its intermediate; a root rotation re-issues every intermediate, so wait until `isthmusctl ca status` shows that rotation done, then start this one"
                    )));
                }
                let (authority, imported) = match &next {
                    Some((a, imported)) => (a, *imported),
                    None => {
                        return Err(RotationError::Invalid(
                            "no rotation is in progress and no new root was given".into(),
                        ));
                    }
                };
                if authority.trust_domain() != rec.trust_domain {
                    return Err(RotationError::Invalid(format!(
                        "the new root is for trust domain {:?}, the mesh is {:?}",
                        authority.trust_domain(),
                        rec.trust_domain
                    )));
                }
                let entry = crate::ca::entry(authority, &shared.kek, imported).map_err(internal)?;
                if rec.roots.iter().any(|r| r.fingerprint == entry.fingerprint) {
                    return Err(RotationError::Conflict(
                        "that root is already trusted".into(),
                    ));
                }
                let to = entry.fingerprint.clone();
                rec.roots.push(entry);
                rec.sequence += 1;
                rec.rotation = Some(RootRotation {
                    from: rec.signing.clone(),
                    to: to.clone(),
                    phase: 1,
                    until: until(requested_until),
                    rolled_back: false,
                    started_unix: now,
                    phase_started_unix: now,
                });
                if commit(shared, &kv, vec![], vec![put_ca(&rec)?]).await? {
                    tracing::info!(audit = true, to = %to, imported, "root rotation started: phase 1, trusting both roots");
                    return Ok(());
                }
            }
        }
    }
    Err(RotationError::Conflict(
        "the CA record kept changing; retry".into(),
    ))
}

/// The first cluster whose intermediate rotation has not finished.
async fn intermediate_in_progress(shared: &Shared) -> Result<Option<String>, RotationError> {
    let (clusters, _) = shared.store.list(keys::CLUSTERS).await?;
    Ok(clusters.iter().find_map(|kv| {
        let c: ClusterRecord = serde_json::from_slice(&kv.value).ok()?;
        c.intermediate_rotation
            .as_ref()
            .filter(|r| r.state != "done")
            .map(|_| c.name.clone())
    }))
}

/// Starts replacing a cluster's intermediate. Refused while a root rotation
/// runs: that re-issues every intermediate itself, and an intermediate
/// revoked under a root that is about to leave would gain nothing.
pub async fn request_intermediate(shared: &Shared, cluster: &str) -> Result<(), RotationError> {
    let key = keys::cluster(cluster);
    for _ in 0..5 {
        let kv = shared.store.get(&key).await?.ok_or_else(|| {
            RotationError::Invalid(format!("no cluster named {cluster:?} is registered"))
        })?;
        let (ca, _) = load_ca(shared).await?;
        if let Some(r) = ca.rotation.as_ref().filter(|r| r.phase < 4) {
            return Err(RotationError::Conflict(format!(
                "a root rotation is in phase {}/3, and it re-issues every cluster's intermediate itself; let it finish (`isthmusctl ca rotate-root` resumes a paused one) or roll it back (`isthmusctl ca rotate-root --rollback`), then rotate {cluster}'s intermediate",
                r.phase
            )));
        }
        let mut c: ClusterRecord = serde_json::from_slice(&kv.value).map_err(internal)?;
        let current = c.current_intermediate.clone().ok_or_else(|| {
            RotationError::Conflict(format!("cluster {cluster:?} has not joined yet"))
        })?;
        if let Some(r) = c
            .intermediate_rotation
            .as_ref()
            .filter(|r| r.state != "done")
        {
            return Err(RotationError::Conflict(format!(
                "cluster {cluster:?} is already rotating its intermediate ({})",
                r.state
            )));
        }
        c.reissue_requested = true;
        c.intermediate_rotation = Some(IntermediateRotation {
            old: current.fingerprint.clone(),
            state: "reissuing".into(),
            started_unix: now_unix(),
        });
        let value = serde_json::to_vec(&c).map_err(internal)?;
        let (ok, revision) = crate::store::replace(&*shared.store, &kv, value).await?;
        if ok {
            caught_up(shared, revision).await;
            tracing::info!(audit = true, cluster, old = %current.fingerprint, "intermediate rotation started");
            return Ok(());
        }
    }
    Err(RotationError::Conflict(
        "the cluster record kept changing; retry".into(),
    ))
}

/// Applies `ops` if the CA record is still at `kv`'s revision and every
/// extra compare holds.
async fn commit(
    shared: &Shared,
    kv: &KeyValue,
    mut compares: Vec<Compare>,
    ops: Vec<Op>,
) -> Result<bool, RotationError> {
    compares.push(kv.unchanged());
    let (ok, revision) = shared.store.txn(compares, ops).await?;
    if ok {
        caught_up(shared, revision).await;
    }
    Ok(ok)
}

/// Waits (briefly) until this replica's model reflects `revision`, so a
/// view built right after a write shows it.
async fn caught_up(shared: &Shared, revision: i64) {
    let mut model = shared.model.clone();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        model.wait_for(|m| m.revision >= revision),
    )
    .await;
}

/// Phase 2: the new root's CA signs; every joined cluster renews. Returns
/// the compares and writes for the clusters, read fresh from the store.
async fn enter_phase_2(
    shared: &Shared,
    rec: &mut CaRecord,
) -> Result<(Vec<Compare>, Vec<Op>), RotationError> {
    let Some(r) = &rec.rotation else {
        return Ok((vec![], vec![]));
    };
    rec.signing = r.to.clone();
    let to = r.to.clone();
    let (clusters, _) = shared.store.list(keys::CLUSTERS).await?;
    let (mut compares, mut ops) = (Vec::new(), Vec::new());
    for kv in clusters {
        let Ok(mut c) = serde_json::from_slice::<ClusterRecord>(&kv.value) else {
            continue;
        };
        let under_new = c
            .current_intermediate
            .as_ref()
            .is_some_and(|i| i.root == to);
        if c.joined_unix.is_some() && !under_new {
            c.reissue_requested = true;
            compares.push(kv.unchanged());
            ops.push(Op::Put {
                key: kv.key,
                value: serde_json::to_vec(&c).map_err(internal)?,
            });
        }
    }
    Ok((compares, ops))
}

/// Phase 3: the old root leaves the bundle.
fn enter_phase_3(rec: &mut CaRecord) {
    let Some(r) = &rec.rotation else {
        return;
    };
    let from = r.from.clone();
    rec.roots.retain(|e| e.fingerprint != from);
    rec.revoked.retain(|e| e.root != from);
    rec.crls.clear(); // rebuilt by the caller, who holds the KEK
    rec.sequence += 1;
    if rec.signing == from {
        // Only reachable through a rollback from phase 1.
        rec.signing = r.to.clone();
    }
}

/// Who holds what: agents and connected sidecars.
struct Census {
    model: std::sync::Arc<Model>,
    sidecars: Vec<ProxyStatus>,
}

impl Census {
    fn take(shared: &Shared) -> Self {
        Self {
            model: shared.model.borrow().clone(),
            sidecars: crate::xds::status::all(shared)
                .into_iter()
                .filter(|p| p.role == "sidecar")
                .collect(),
        }
    }

    fn joined(&self) -> impl Iterator<Item = &ClusterRecord> {
        self.model
            .clusters
            .values()
            .filter(|c| c.joined_unix.is_some())
    }

    /// What still lacks bundle `sequence`.
    fn lacking_bundle(&self, sequence: u64) -> Vec<String> {
        let mut out = Vec::new();
        let agents = self
            .joined()
            .filter(|c| {
                self.model
                    .heartbeats
                    .get(&c.name)
                    .is_none_or(|h| h.bundle_sequence < sequence)
            })
            .map(|c| c.name.clone())
            .collect::<Vec<_>>();
        if !agents.is_empty() {
            out.push(format!(
                "agents of {} to hold the new bundle",
                agents.join(", ")
            ));
        }
        let proxies = self
            .sidecars
            .iter()
            .filter(|p| p.bundle_sequence.unwrap_or(0) < sequence)
            .count();
        if proxies > 0 {
            out.push(format!(
                "{proxies} of {} proxies to hold the new bundle",
                self.sidecars.len()
            ));
        }
        out
    }

    /// What still lacks a certificate under root `to`.
    fn lacking_root(&self, to: &str) -> Vec<String> {
        let mut out = Vec::new();
        let agents = self
            .joined()
            .filter(|c| {
                let current = c.current_intermediate.as_ref();
                let reported = self
                    .model
                    .heartbeats
                    .get(&c.name)
                    .and_then(|h| h.intermediate_fingerprint.as_deref());
                c.reissue_requested
                    || current.is_none_or(|i| i.root != to)
                    || reported != current.map(|i| i.fingerprint.as_str())
            })
            .map(|c| c.name.clone())
            .collect::<Vec<_>>();
        if !agents.is_empty() {
            out.push(format!(
                "agents of {} to sign under the new root",
                agents.join(", ")
            ));
        }
        let proxies = self
            .sidecars
            .iter()
            .filter(|p| p.root.as_deref() != Some(to))
            .count();
        if proxies > 0 {
            out.push(format!(
                "{proxies} of {} proxies to hold a certificate under the new root",
                self.sidecars.len()
            ));
        }
        out
    }

    fn cluster_sidecars<'a>(&'a self, cluster: &'a str) -> impl Iterator<Item = &'a ProxyStatus> {
        self.sidecars.iter().filter(move |p| p.cluster == cluster)
    }
}

/// What the current root rotation phase waits for.
fn waiting_for(census: &Census, rec: &CaRecord) -> Vec<String> {
    match &rec.rotation {
        Some(r) if r.phase == 1 || r.phase == 3 => census.lacking_bundle(rec.sequence),
        Some(r) if r.phase == 2 => census.lacking_root(&r.to),
        _ => vec![],
    }
}

/// One leader pass over every rotation. Returns whether anything moved.
pub async fn step(shared: &Shared, leadership: &Leadership) -> Result<bool, RotationError> {
    let mut moved = false;
    let census = Census::take(shared);
    let (mut rec, kv) = load_ca(shared).await?;

    // CRLs stored by an older primary may name their issuer by a key id
    // the verifiers no longer tie to it: rebuild them (a new sequence, so
    // everyone gets them).
    if rec.crls_outdated() {
        rec.rebuild_crls(&shared.kek).map_err(internal)?;
        rec.sequence += 1;
        if commit(shared, &kv, vec![leadership.fence()], vec![put_ca(&rec)?]).await? {
            tracing::info!(
                audit = true,
                sequence = rec.sequence,
                "rebuilt CRLs that named their issuer by an outdated key id"
            );
            return Ok(true);
        }
    }

    // Intermediates first: a revocation changes the CA record too.
    for c in census.joined() {
        if c.intermediate_rotation.is_none() {
            continue;
        }
        let key = keys::cluster(&c.name);
        let Some(ckv) = shared.store.get(&key).await? else {
            continue;
        };
        // Decide on the record as stored, not as the model last saw it.
        let Ok(c) = serde_json::from_slice::<ClusterRecord>(&ckv.value) else {
            continue;
        };
        let Some(r) = c.intermediate_rotation.clone() else {
            continue;
        };
        let mut next = c.clone();
        let mut ca_changed = false;
        match r.state.as_str() {
            "reissuing" => {
                let replaced = c
                    .current_intermediate
                    .as_ref()
                    .is_some_and(|i| i.fingerprint != r.old);
                let agent_moved = census
                    .model
                    .heartbeats
                    .get(&c.name)
                    .and_then(|h| h.intermediate_fingerprint.as_deref())
                    != Some(r.old.as_str());
                let holders = census
                    .cluster_sidecars(&c.name)
                    .filter(|p| p.intermediate.as_deref() == Some(r.old.as_str()))
                    .count();
                if !(replaced && agent_moved && holders == 0 && !c.reissue_requested) {
                    continue;
                }
                let old = c
                    .replaced_intermediates
                    .iter()
                    .find(|i| i.fingerprint == r.old)
                    .cloned();
                next.intermediates.retain(|fp| *fp != r.old);
                next.replaced_intermediates
                    .retain(|i| i.fingerprint != r.old);
                if let Some(old) = old
                    && rec.roots.iter().any(|e| e.fingerprint == old.root)
                {
                    rec.revoked.push(Revoked {
                        root: old.root.clone(),
                        cluster: c.name.clone(),
                        pem: old.pem.clone(),
                    });
                    rec.sequence += 1;
                    rec.rebuild_crls(&shared.kek).map_err(internal)?;
                    ca_changed = true;
                }
                if let Some(r) = next.intermediate_rotation.as_mut() {
                    r.state = "revoking".into();
                }
            }
            "revoking" => {
                let lacking = census.lacking_bundle(rec.sequence);
                if !lacking.is_empty() {
                    continue;
                }
                if let Some(r) = next.intermediate_rotation.as_mut() {
                    r.state = "done".into();
                }
            }
            _ => continue,
        }
        let mut ops = vec![Op::Put {
            key: key.clone(),
            value: serde_json::to_vec(&next).map_err(internal)?,
        }];
        let mut compares = vec![leadership.fence(), ckv.unchanged()];
        if ca_changed {
            ops.push(put_ca(&rec)?);
            compares.push(kv.unchanged());
        }
        if shared.store.txn(compares, ops).await?.0 {
            tracing::info!(audit = true, cluster = %c.name, state = ?next.intermediate_rotation.as_ref().map(|r| r.state.clone()), "intermediate rotation moved on");
            // The CA record changed under us; the next pass reloads it.
            return Ok(true);
        }
    }

    // The root rotation.
    let Some(r) = rec.rotation.clone().filter(|r| r.phase < 4) else {
        return Ok(moved);
    };
    if r.phase == 2 {
        rearm(shared, leadership, &r.to).await?;
    }
    if !waiting_for(&census, &rec).is_empty() || r.phase >= r.until && r.phase < 3 {
        return Ok(moved);
    }
    let now = now_unix();
    let next_phase = r.phase + 1;
    let (mut compares, mut ops) = match next_phase {
        2 => enter_phase_2(shared, &mut rec).await?,
        3 => {
            enter_phase_3(&mut rec);
            rec.rebuild_crls(&shared.kek).map_err(internal)?;
            (vec![], vec![])
        }
        _ => (vec![], vec![]),
    };
    compares.push(leadership.fence());
    if let Some(rot) = rec.rotation.as_mut() {
        rot.phase = next_phase;
        rot.phase_started_unix = now;
    }
    ops.push(put_ca(&rec)?);
    if commit(shared, &kv, compares, ops).await? {
        moved = true;
        tracing::info!(audit = true, phase = next_phase, from = %r.from, to = %r.to, "root rotation moved on");
    }
    Ok(moved)
}

/// In phase 2, asks again any joined cluster whose intermediate is still not
/// under the new root and that is not being asked (a renewal that raced the
/// phase change, or an agent that was away).
async fn rearm(shared: &Shared, leadership: &Leadership, to: &str) -> Result<(), RotationError> {
    let (clusters, _) = shared.store.list(keys::CLUSTERS).await?;
    for kv in clusters {
        let Ok(mut c) = serde_json::from_slice::<ClusterRecord>(&kv.value) else {
            continue;
        };
        let stuck = c.joined_unix.is_some()
            && !c.reissue_requested
            && c.current_intermediate
                .as_ref()
                .is_some_and(|i| i.root != to);
        if !stuck {
            continue;
        }
        c.reissue_requested = true;
        let value = serde_json::to_vec(&c).map_err(internal)?;
        shared
            .store
            .txn(
                vec![leadership.fence(), kv.unchanged()],
                vec![Op::Put { key: kv.key, value }],
            )
            .await?;
        tracing::info!(cluster = %c.name, "asking again for an intermediate under the new root");
    }
    Ok(())
}

fn short(fp: &str) -> &str {
    &fp[..fp.len().min(12)]
}

/// `GET /api/v1/ca`.
pub fn view(shared: &Shared) -> CaView {
    let census = Census::take(shared);
    let rec = match census.model.ca.clone() {
        Some(rec) => rec,
        None => shared.ca().record.clone(),
    };
    let mut per_root: BTreeMap<&str, u64> = BTreeMap::new();
    let mut unknown = 0;
    for p in &census.sidecars {
        match p.root.as_deref() {
            Some(root) => *per_root.entry(root).or_default() += 1,
            None => unknown += 1,
        }
    }
    let roots = rec
        .roots
        .iter()
        .map(|e| RootView {
            fingerprint: e.fingerprint.clone(),
            subject: isthmus_ca::pem::certs(&e.root_pem, "root")
                .ok()
                .and_then(|c| isthmus_ca::svid::inspect(&c[0]).ok())
                .map(|i| i.subject)
                .unwrap_or_default(),
            not_after_unix: e.not_after_unix,
            signer_not_after_unix: isthmus_ca::pem::certs(&e.chain_pem, "chain")
                .unwrap_or_default()
                .iter()
                .filter_map(|c| isthmus_ca::svid::inspect(c).ok())
                .map(|i| i.not_after_unix)
                .fold(e.not_after_unix, i64::min),
            imported: e.imported,
            signing: e.fingerprint == rec.signing,
            workloads: per_root.get(e.fingerprint.as_str()).copied().unwrap_or(0),
        })
        .collect();
    let clusters = census
        .model
        .clusters
        .values()
        .map(|c| {
            let current = c.current_intermediate.as_ref();
            let mine: Vec<&ProxyStatus> = census.cluster_sidecars(&c.name).collect();
            let on_current = mine
                .iter()
                .filter(|p| {
                    current.is_some_and(|i| p.intermediate.as_deref() == Some(&i.fingerprint))
                })
                .count() as u64;
            IntermediateView {
                cluster: c.name.clone(),
                fingerprint: current.map(|i| i.fingerprint.clone()),
                serial: current.map(|i| i.serial_hex.clone()),
                root: current.map(|i| i.root.clone()),
                not_after_unix: current.map(|i| i.not_after_unix),
                workloads: on_current,
                workloads_on_replaced: mine.len() as u64 - on_current,
                rotation: c.intermediate_rotation.as_ref().map(|r| r.state.clone()),
            }
        })
        .collect();
    CaView {
        trust_domain: rec.trust_domain.clone(),
        bundle_sequence: rec.sequence,
        signing_root: rec.signing.clone(),
        roots,
        clusters,
        rotation: rec.rotation.as_ref().map(|r| RotationView {
            from: r.from.clone(),
            to: r.to.clone(),
            phase: r.phase,
            until: r.until,
            rolled_back: r.rolled_back,
            started_unix: r.started_unix,
            phase_started_unix: r.phase_started_unix,
            waiting_for: if r.phase < 4 {
                let mut w = waiting_for(&census, &rec);
                if w.is_empty() && r.phase >= r.until && r.phase < 3 {
                    w.push(format!(
                        "paused after phase {}: run `isthmusctl ca rotate-root` to go on",
                        r.phase
                    ));
                }
                w
            } else {
                vec![]
            },
        }),
        workloads_unknown: unknown,
        federated: rec
            .federated
            .iter()
            .map(|(td, pem)| FederatedView {
                trust_domain: td.clone(),
                roots: isthmus_ca::pem::certs(pem, "federated roots")
                    .map(|c| c.iter().map(|d| isthmus_ca::pem::fingerprint(d)).collect())
                    .unwrap_or_default(),
            })
            .collect(),
    }
}

/// Federates with `trust_domain` (its bundle's roots), replaces its
/// bundle, or (with `None`) stops federating with it. Proxies get the change
/// with the next bundle sequence.
pub async fn federate(
    shared: &Shared,
    trust_domain: &str,
    bundle: Option<isthmus_ca::TrustBundle>,
) -> Result<(), RotationError> {
    isthmus_ca::SpiffeId::parse(&format!("spiffe://{trust_domain}")).map_err(|e| {
        RotationError::Invalid(format!("{trust_domain:?} is not a trust domain: {e}"))
    })?;
    for _ in 0..5 {
        let (mut rec, kv) = load_ca(shared).await?;
        if trust_domain == rec.trust_domain {
            return Err(RotationError::Invalid(format!(
                "{trust_domain} is this mesh's own trust domain; rotate its root instead"
            )));
        }
        match &bundle {
            Some(b) => {
                rec.federated.insert(trust_domain.to_string(), b.to_pem());
            }
            None => {
                if rec.federated.remove(trust_domain).is_none() {
                    return Err(RotationError::Invalid(format!(
                        "this mesh does not federate with {trust_domain}"
                    )));
                }
            }
        }
        rec.sequence += 1;
        if commit(shared, &kv, vec![], vec![put_ca(&rec)?]).await? {
            tracing::info!(
                audit = true,
                trust_domain,
                federated = bundle.is_some(),
                "federation changed"
            );
            return Ok(());
        }
    }
    Err(RotationError::Conflict(
        "the CA record kept changing; retry".into(),
    ))
}
