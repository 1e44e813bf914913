//! `isthmus.sync.v1`: agents join with a one-time token and then stream
//! their cluster's services. A stream speaks only for the cluster whose
//! intermediate signed the agent's certificate: every key it writes is derived
//! from that cluster, so an agent cannot touch another cluster's entries.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use isthmus_api::names::check_label;
use isthmus_api::pb::sync::sync_server::Sync;
use isthmus_api::pb::sync::{
    AgentMessage, Delta, Heartbeat, JoinRequest, JoinResponse, PrimaryMessage, RenewRequest,
    RenewResponse, Service, agent_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::records::{
    ClusterRecord, EndpointRecord, HeartbeatRecord, IntermediateRecord, PortRecord, ServiceRecord,
    now_unix,
};
use crate::store::{self, Op, keys};
use crate::{Shared, auth, tokens};

/// Upper bounds on what one agent may report.
const MAX_SERVICES: usize = 10_000;
const MAX_ENDPOINTS_PER_SERVICE: usize = 10_000;
const MAX_LABELS: usize = 64;

pub struct SyncService {
    pub shared: Arc<Shared>,
    /// Refused joins reach WARN at most 5 per 10 s.
    pub refused_joins: isthmus_transport::handshake_log::RefusalLog,
}

impl SyncService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            refused_joins: isthmus_transport::handshake_log::RefusalLog::new(
                std::time::Instant::now(),
            ),
        }
    }
}

#[tonic::async_trait]
impl Sync for SyncService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = request.into_inner();
        let result = self.join_inner(&req).await;
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        self.shared
            .metrics
            .joins
            .get_or_create(&vec![("result".into(), outcome.into())])
            .inc();
        if let Err(status) = &result {
            // The name and the reason may echo what an unauthenticated
            // client sent: escaped and cut, and rate-limited.
            use isthmus_transport::handshake_log::{Admit, escape};
            let (cluster, reason) = (escape(&req.cluster), escape(status.message()));
            match self.refused_joins.admit(std::time::Instant::now()) {
                Admit::Info { suppressed_before } => {
                    tracing::warn!(cluster, reason, suppressed_before, "join refused")
                }
                Admit::Debug => tracing::debug!(cluster, reason, "join refused"),
            }
        }
        result.map(Response::new)
    }

    async fn renew_intermediate(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let peer = auth::agent(&self.shared, crate::peer_certs(&request))?;
        let csr = request.into_inner().csr_pem;
        let key = keys::cluster(&peer.cluster);
        for _ in 0..5 {
            let kv = self
                .shared
                .store
                .get(&key)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
                .ok_or_else(|| Status::permission_denied("the cluster is no longer registered"))?;
            let mut rec: ClusterRecord = serde_json::from_slice(&kv.value)
                .map_err(|e| Status::internal(format!("cluster record is corrupt: {e}")))?;
            let ca = self
                .shared
                .ca_fresh()
                .await
                .map_err(|e| Status::unavailable(format!("loading the CA: {e}")))?;
            let issued = ca
                .authority
                .sign_intermediate(&csr, &peer.cluster)
                .map_err(|e| Status::invalid_argument(format!("intermediate CSR: {e}")))?;
            let issued_record = intermediate_record(&issued, &ca, now_unix());
            let fingerprint = issued_record.fingerprint.clone();
            if let Some(old) = rec.current_intermediate.take() {
                rec.replaced_intermediates.push(old);
            }
            rec.intermediates.push(fingerprint.clone());
            rec.current_intermediate = Some(issued_record);
            rec.reissue_requested = false;
            let value = serde_json::to_vec(&rec).map_err(|e| Status::internal(e.to_string()))?;
            let (ok, _) = store::replace(&*self.shared.store, &kv, value)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            if !ok {
                continue;
            }
            tracing::info!(
                audit = true,
                cluster = %peer.cluster,
                serial = %issued.serial_hex,
                fingerprint,
                root = %ca.root_fingerprint(),
                not_after = issued.not_after_unix,
                "cluster intermediate renewed"
            );
            self.shared
                .metrics
                .intermediates_issued
                .get_or_create(&vec![("cluster".into(), peer.cluster.clone())])
                .inc();
            return Ok(Response::new(RenewResponse {
                intermediate_pem: format!("{}{}", issued.pem, ca.intermediate_chain_suffix()),
                trust_bundle_pem: ca.bundle_pem(),
            }));
        }
        Err(Status::aborted(
            "cluster record kept changing during renewal; retry",
        ))
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<PrimaryMessage, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = auth::agent(&self.shared, crate::peer_certs(&request))?;
        let cluster = peer.cluster;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let shared = self.shared.clone();
        tracing::info!(%cluster, "agent stream open");
        tokio::spawn(async move {
            // The bundle and any renewal request go out first, then again
            // whenever they change.
            let mut model = shared.model.clone();
            let mut pushed = (0u64, false);
            loop {
                let (ca, renew) = {
                    let m = model.borrow_and_update();
                    (
                        m.ca.clone(),
                        m.clusters
                            .get(&cluster)
                            .is_some_and(|c| c.reissue_requested),
                    )
                };
                let sequence = ca.as_ref().map(|c| c.sequence).unwrap_or(0);
                let ask = renew && !pushed.1;
                if let Some(ca) = ca.filter(|_| sequence > pushed.0 || ask) {
                    let bundle = match ca.bundle() {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(error = %e, "the stored trust bundle is unusable");
                            break;
                        }
                    };
                    let msg = PrimaryMessage {
                        trust_bundle_pem: bundle.to_pem(),
                        crls_pem: bundle.crls_pem(),
                        bundle_sequence: sequence,
                        renew_intermediate: ask,
                        federated_bundles: ca.federated.clone().into_iter().collect(),
                        ..Default::default()
                    };
                    if ask {
                        tracing::info!(%cluster, "asking the agent to renew its intermediate");
                    }
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                }
                pushed = (sequence, renew);
                let msg = tokio::select! {
                    changed = model.changed() => {
                        if changed.is_err() { break; }
                        continue;
                    }
                    msg = inbound.message() => msg,
                };
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(%cluster, error = %e, "agent stream ended");
                        break;
                    }
                };
                // A deregistered cluster's agent is cut off mid-stream too.
                if !shared.model.borrow().clusters.contains_key(&cluster) {
                    let _ = tx
                        .send(Err(Status::permission_denied(format!(
                            "cluster {cluster:?} is no longer registered"
                        ))))
                        .await;
                    break;
                }
                let reply = match msg.kind {
                    Some(agent_message::Kind::Snapshot(snap)) if snap.cluster != cluster => {
                        refuse_foreign(&shared, &cluster, &snap.cluster)
                    }
                    Some(agent_message::Kind::Snapshot(snap)) => {
                        apply_snapshot(&shared, &cluster, snap.services).await
                    }
                    Some(agent_message::Kind::Delta(d)) if d.cluster != cluster => {
                        refuse_foreign(&shared, &cluster, &d.cluster)
                    }
                    Some(agent_message::Kind::Delta(d)) => apply_delta(&shared, &cluster, d).await,
                    Some(agent_message::Kind::Heartbeat(hb)) => {
                        heartbeat(&shared, &cluster, Some(hb), false).await
                    }
                    None => Err(Status::invalid_argument("agent message has no kind")),
                };
                let reply = match reply {
                    Ok(m) => Ok(m),
                    // Bad content is answered, not fatal: the agent can fix it.
                    Err(s) if s.code() == tonic::Code::InvalidArgument => Ok(PrimaryMessage {
                        error: s.message().to_string(),
                        ..Default::default()
                    }),
                    Err(s) => Err(s),
                };
                let fatal = reply.is_err();
                if tx.send(reply).await.is_err() || fatal {
                    break;
                }
            }
            tracing::info!(%cluster, "agent stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl SyncService {
    async fn join_inner(&self, req: &JoinRequest) -> Result<JoinResponse, Status> {
        check_label(&req.cluster).map_err(|_| {
            Status::invalid_argument(format!("cluster {:?} is not a DNS label", req.cluster))
        })?;
        let pin = req.agent_key_sha256.as_str();
        if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(
                "agent_key_sha256: the agent must send the SHA-256 (64 hex digits) of its identity key; an agent that sends none is too old for this primary, so upgrade it",
            ));
        }
        let (secret, _) = isthmus_api::join_token::parse(&req.token).ok_or_else(|| {
            Status::invalid_argument(
                "join token is malformed; expected ist1.<secret>.<root sha256>",
            )
        })?;
        let key = keys::cluster(&req.cluster);
        let store = &self.shared.store;
        for _ in 0..5 {
            let kv = store
                .get(&key)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
                .ok_or_else(|| {
                    Status::permission_denied(format!(
                        "no cluster named {:?} is registered",
                        req.cluster
                    ))
                })?;
            let mut rec: ClusterRecord = serde_json::from_slice(&kv.value)
                .map_err(|e| Status::internal(format!("cluster record is corrupt: {e}")))?;
            let stored = rec.join_token_sha256.as_deref().ok_or_else(|| {
                Status::permission_denied(if rec.joined_unix.is_some() {
                    format!(
                        "the join token of cluster {:?} was already used; deregister and register the cluster again",
                        req.cluster
                    )
                } else {
                    format!(
                        "the join token of cluster {:?} expired unused and was removed; deregister and register the cluster again",
                        req.cluster
                    )
                })
            })?;
            if !tokens::matches(secret, stored) {
                return Err(Status::permission_denied(format!(
                    "join token is not valid for cluster {:?}",
                    req.cluster
                )));
            }
            let now = now_unix();
            if now > rec.join_token_expires_unix {
                return Err(Status::permission_denied(format!(
                    "join token of cluster {:?} expired {}s ago; register the cluster again",
                    req.cluster,
                    now - rec.join_token_expires_unix
                )));
            }
            let ca = self
                .shared
                .ca_fresh()
                .await
                .map_err(|e| Status::unavailable(format!("loading the CA: {e}")))?;
            let issued = ca
                .authority
                .sign_intermediate(&req.csr_pem, &req.cluster)
                .map_err(|e| Status::invalid_argument(format!("intermediate CSR: {e}")))?;
            let gateway_secret = tokens::generate();
            rec.join_token_sha256 = None;
            rec.joined_unix = Some(now);
            rec.agent_key_sha256 = Some(pin.to_ascii_lowercase());
            let issued_record = intermediate_record(&issued, &ca, now);
            rec.intermediates.push(issued_record.fingerprint.clone());
            rec.current_intermediate = Some(issued_record);
            rec.gateway_token_sha256 = Some(tokens::sha256_hex(&gateway_secret));
            let value = serde_json::to_vec(&rec).map_err(|e| Status::internal(e.to_string()))?;
            let (ok, _) = store::replace(&**store, &kv, value)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            if !ok {
                continue; // raced with another write; re-check the token
            }
            tracing::info!(audit = true, cluster = %req.cluster, serial = %issued.serial_hex, not_after = issued.not_after_unix, "cluster joined; intermediate issued");
            self.shared
                .metrics
                .intermediates_issued
                .get_or_create(&vec![("cluster".into(), req.cluster.clone())])
                .inc();
            return Ok(JoinResponse {
                intermediate_pem: format!("{}{}", issued.pem, ca.intermediate_chain_suffix()),
                trust_bundle_pem: ca.bundle_pem(),
                trust_domain: ca.trust_domain().to_string(),
                gateway_token: gateway_secret,
            });
        }
        Err(Status::aborted(
            "cluster record kept changing during join; retry",
        ))
    }
}

/// What the cluster record keeps of an intermediate the CA just signed.
fn intermediate_record(
    issued: &isthmus_ca::IssuedCert,
    ca: &crate::ca::CaState,
    now: u64,
) -> IntermediateRecord {
    IntermediateRecord {
        fingerprint: isthmus_ca::pem::fingerprint(&issued.der),
        pem: issued.pem.clone(),
        serial_hex: issued.serial_hex.clone(),
        root: ca.root_fingerprint(),
        not_after_unix: issued.not_after_unix,
        issued_unix: now,
    }
}

/// An agent that reports for a cluster other than its own is refused; the
/// attempt is logged and counted so operators see it.
fn refuse_foreign(shared: &Shared, cluster: &str, claimed: &str) -> Result<PrimaryMessage, Status> {
    shared
        .metrics
        .sync_refusals
        .get_or_create(&vec![("cluster".into(), cluster.into())])
        .inc();
    tracing::warn!(
        audit = true,
        cluster,
        claimed,
        "refused a snapshot for another cluster: an agent may write only its own cluster's entries"
    );
    Err(Status::invalid_argument(format!(
        "snapshot names cluster {claimed:?}, but this agent's certificate belongs to {cluster:?}; nothing was written"
    )))
}

async fn heartbeat(
    shared: &Shared,
    cluster: &str,
    report: Option<Heartbeat>,
    synced: bool,
) -> Result<PrimaryMessage, Status> {
    let key = keys::heartbeat(cluster);
    let previous = shared.model.borrow().heartbeats.get(cluster).cloned();
    let now = now_unix();
    let report = report.unwrap_or_default();
    let rec = HeartbeatRecord {
        agent_version: if report.agent_version.is_empty() {
            previous
                .as_ref()
                .map(|p| p.agent_version.clone())
                .unwrap_or_default()
        } else {
            report.agent_version
        },
        last_heartbeat_unix: now,
        last_sync_unix: if synced {
            Some(now)
        } else {
            previous.as_ref().and_then(|p| p.last_sync_unix)
        },
        intermediate_fingerprint: if report.intermediate_fingerprint.is_empty() {
            previous
                .as_ref()
                .and_then(|p| p.intermediate_fingerprint.clone())
        } else {
            Some(report.intermediate_fingerprint)
        },
        bundle_sequence: if report.bundle_sequence == 0 {
            previous.map(|p| p.bundle_sequence).unwrap_or(0)
        } else {
            report.bundle_sequence
        },
    };
    let value = serde_json::to_vec(&rec).map_err(|e| Status::internal(e.to_string()))?;
    let revision = shared
        .store
        .put(&key, value)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(PrimaryMessage {
        applied_revision: revision,
        ..Default::default()
    })
}

/// Reported services that passed validation, by store key, and a
/// description of every one refused (by position and field).
struct Validated {
    records: BTreeMap<String, Vec<u8>>,
    errors: Vec<String>,
}

fn validated(cluster: &str, services: Vec<Service>) -> Result<Validated, Status> {
    if services.len() > MAX_SERVICES {
        return Err(Status::invalid_argument(format!(
            "{} services in one message; at most {MAX_SERVICES} are accepted",
            services.len()
        )));
    }
    let mut errors = Vec::new();
    let mut records = BTreeMap::new();
    for (i, svc) in services.into_iter().enumerate() {
        match validate_service(svc) {
            Ok(rec) => {
                let key = keys::endpoints(cluster, &rec.namespace, &rec.name);
                if records.contains_key(&key) {
                    errors.push(format!(
                        "services[{i}]: {}/{} is listed twice",
                        rec.namespace, rec.name
                    ));
                    continue;
                }
                let value =
                    serde_json::to_vec(&rec).map_err(|e| Status::internal(e.to_string()))?;
                records.insert(key, value);
            }
            Err(e) => errors.push(format!("services[{i}].{e}")),
        }
    }
    Ok(Validated { records, errors })
}

/// Replaces the cluster's services with a snapshot, in one transaction.
/// Invalid services are refused by name and the rest still apply.
async fn apply_snapshot(
    shared: &Shared,
    cluster: &str,
    services: Vec<Service>,
) -> Result<PrimaryMessage, Status> {
    let Validated {
        records: desired,
        errors,
    } = validated(cluster, services)?;
    let (existing, _) = shared
        .store
        .list(&keys::cluster_endpoints(cluster))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let existing: HashMap<String, Vec<u8>> =
        existing.into_iter().map(|kv| (kv.key, kv.value)).collect();
    let mut ops: Vec<Op> = existing
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .map(|k| Op::Delete { key: k.clone() })
        .collect();
    for (key, value) in desired {
        if existing.get(&key) != Some(&value) {
            ops.push(Op::Put { key, value });
        }
    }
    commit(shared, cluster, ops, errors).await
}

/// Applies what changed: whole services upserted, others removed.
async fn apply_delta(
    shared: &Shared,
    cluster: &str,
    delta: Delta,
) -> Result<PrimaryMessage, Status> {
    let Validated {
        records: upserts,
        mut errors,
    } = validated(cluster, delta.upserts)?;
    let mut ops: Vec<Op> = upserts
        .into_iter()
        .map(|(key, value)| Op::Put { key, value })
        .collect();
    for (i, r) in delta.removed.iter().enumerate() {
        if check_label(&r.namespace).is_err() || check_label(&r.name).is_err() {
            errors.push(format!(
                "removed[{i}]: {:?}/{:?} is not a service name",
                r.namespace, r.name
            ));
            continue;
        }
        ops.push(Op::Delete {
            key: keys::endpoints(cluster, &r.namespace, &r.name),
        });
    }
    commit(shared, cluster, ops, errors).await
}

async fn commit(
    shared: &Shared,
    cluster: &str,
    ops: Vec<Op>,
    errors: Vec<String>,
) -> Result<PrimaryMessage, Status> {
    let changed = ops.len();
    if !ops.is_empty() {
        shared
            .store
            .txn(vec![], ops)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
    }
    let mut reply = heartbeat(shared, cluster, None, true).await?;
    if !errors.is_empty() {
        shared
            .metrics
            .sync_refusals
            .get_or_create(&vec![("cluster".into(), cluster.into())])
            .inc_by(errors.len() as u64);
        tracing::warn!(cluster, refused = errors.len(), first = %errors[0], "refused part of an agent update");
        reply.error = errors.join("; ");
    }
    tracing::debug!(cluster, changed, "applied agent update");
    Ok(reply)
}

fn validate_service(svc: Service) -> Result<ServiceRecord, String> {
    check_label(&svc.namespace)
        .map_err(|_| format!("namespace: {:?} is not a DNS label", svc.namespace))?;
    check_label(&svc.name).map_err(|_| format!("name: {:?} is not a DNS label", svc.name))?;
    if svc.endpoints.len() > MAX_ENDPOINTS_PER_SERVICE {
        return Err(format!(
            "endpoints: {} is more than {MAX_ENDPOINTS_PER_SERVICE}",
            svc.endpoints.len()
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in svc.ports.iter().enumerate() {
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("ports[{i}].port: {} is not from 1 to 65535", p.port))?;
        if ports.iter().any(|q: &PortRecord| q.port == port) {
            return Err(format!("ports[{i}].port: {port} is listed twice"));
        }
        ports.push(PortRecord {
            name: p.name.clone(),
            port,
            protocol: p.protocol.clone(),
        });
    }
    let mut endpoints = Vec::new();
    for (i, e) in svc.endpoints.iter().enumerate() {
        e.address.parse::<IpAddr>().map_err(|_| {
            format!(
                "endpoints[{i}].address: {:?} is not an IP address",
                e.address
            )
        })?;
        let inbound_port = u16::try_from(e.inbound_port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                format!(
                    "endpoints[{i}].inboundPort: {} is not from 1 to 65535",
                    e.inbound_port
                )
            })?;
        check_label(&e.service_account).map_err(|_| {
            format!(
                "endpoints[{i}].serviceAccount: {:?} is not a DNS label",
                e.service_account
            )
        })?;
        if e.labels.len() > MAX_LABELS {
            return Err(format!(
                "endpoints[{i}].labels: {} labels; at most {MAX_LABELS} are accepted",
                e.labels.len()
            ));
        }
        if let Some((k, _)) = e
            .labels
            .iter()
            .find(|(k, v)| k.is_empty() || k.len() > 317 || v.len() > 63)
        {
            return Err(format!(
                "endpoints[{i}].labels[{k:?}]: keys must be 1 to 317 bytes and values at most 63, as in Kubernetes"
            ));
        }
        endpoints.push(EndpointRecord {
            workload: e.workload.clone(),
            address: e.address.clone(),
            inbound_port,
            service_account: e.service_account.clone(),
            ready: e.ready,
            labels: e
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
    }
    Ok(ServiceRecord {
        namespace: svc.namespace,
        name: svc.name,
        ports,
        endpoints,
    })
}
