//! State-of-the-World ADS, one task per stream.
//!
//! A request whose nonce is not the last one sent for its type is stale and
//! ignored. A request carrying `error_detail` is a NACK: the proxy keeps its
//! last good config, the NACK is recorded, and nothing is re-sent until the
//! model changes. Resources are regenerated when the model's config revision
//! moves and sent only when their version (a digest of their content) changes.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use isthmus_api::type_urls;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::generate::{self, Resources, Role};
use super::status::ProxyStatus;
use crate::{Shared, auth};

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

pub struct AdsService {
    pub shared: Arc<Shared>,
}

type RespStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A stream's outgoing responses. Boxed: the channel allocates its slots in
/// blocks of 32, and a response beside a `Status` is a few hundred bytes,
/// which at a thousand streams is megabytes of empty slots.
pub(super) type Queue<T> = mpsc::Sender<Box<Result<T, Status>>>;

fn queue<T: Send + 'static>() -> (Queue<T>, RespStream<T>) {
    use tokio_stream::StreamExt;
    let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
    (tx, Box::pin(ReceiverStream::new(rx).map(|b| *b)))
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = RespStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = RespStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = Peer::authenticate(&self.shared, &request)?;
        let (tx, rx) = queue();
        let conn = Connection {
            peer,
            types: HashMap::new(),
            nonce: 0,
            tx,
        };
        tokio::spawn(conn.run(request.into_inner()));
        Ok(Response::new(rx))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = Peer::authenticate(&self.shared, &request)?;
        let (tx, rx) = queue();
        tokio::spawn(super::delta::run(peer, request.into_inner(), tx));
        Ok(Response::new(rx))
    }
}

#[derive(Default)]
struct TypeState {
    /// None subscribes to everything (wildcard).
    names: Option<BTreeSet<String>>,
    sent_version: Option<String>,
    nonce: String,
}

/// Who is on a stream; shared by the SotW and Delta protocols.
pub(super) struct Peer {
    pub id: u64,
    pub shared: Arc<Shared>,
    pub cluster: String,
    pub role: Role,
    pub identity: Option<String>,
    pub node_id: String,
    /// The certificate the peer connected with: (intermediate fingerprint,
    /// not-after). Proxies reconnect after every renewal, so this is the
    /// certificate they hold now.
    pub certificate: Option<(String, i64)>,
    /// What an Envoy sidecar's node metadata says about it.
    pub node_info: generate::NodeInfo,
}

struct Connection {
    peer: Peer,
    types: HashMap<String, TypeState>,
    nonce: u64,
    tx: Queue<DiscoveryResponse>,
}

impl Peer {
    /// Workloads present their SVID chain; gateways their bearer credential.
    pub fn authenticate<T>(shared: &Arc<Shared>, request: &Request<T>) -> Result<Self, Status> {
        let mut certificate = None;
        let (cluster, role, identity) = match crate::peer_certs(request) {
            Some(certs) => {
                let peer = auth::workload(shared, Some(certs))?;
                if let (Some(leaf), Some(intermediate)) = (certs.first(), certs.get(1)) {
                    let not_after = isthmus_ca::svid::inspect(leaf)
                        .map(|i| i.not_after_unix)
                        .unwrap_or(0);
                    certificate = Some((isthmus_ca::pem::fingerprint(intermediate), not_after));
                }
                (peer.cluster, Role::Sidecar, Some(peer.identity.to_string()))
            }
            None => (
                auth::gateway(shared, request.metadata())?,
                Role::Gateway,
                None,
            ),
        };
        Ok(Self {
            id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            shared: shared.clone(),
            cluster,
            role,
            identity,
            node_id: String::new(),
            certificate,
            node_info: Default::default(),
        })
    }

    pub fn check_type(type_url: &str) -> Result<(), Status> {
        if [
            type_urls::CLUSTER,
            type_urls::ENDPOINT,
            type_urls::LISTENER,
            type_urls::ROUTE,
        ]
        .contains(&type_url)
        {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "unsupported type_url {type_url:?}"
            )))
        }
    }

    /// Records a NACK: the proxy keeps its last good config.
    pub fn nacked(&self, type_url: &str, message: &str) {
        tracing::warn!(node = %self.node_id, type_url, error = %message, "proxy NACKed config");
        self.shared
            .metrics
            .xds_nacks
            .get_or_create(&vec![("type".into(), short(type_url))])
            .inc();
        let message = message.to_string();
        self.shared
            .proxies
            .update(self.id, type_url, |s| s.nack = Some(message));
    }

    pub fn acked(&self, type_url: &str, version: String) {
        self.shared.proxies.update(self.id, type_url, |s| {
            s.acked_version = Some(version);
            s.nack = None;
        });
    }

    /// The current resources of a type for this peer, with their versions
    /// (shared with every peer that gets the same).
    pub fn generated(&self, type_url: &str) -> Result<Arc<generate::Generated>, Status> {
        let model = self.shared.model.borrow().clone();
        let me = model.clusters.get(&self.cluster).ok_or_else(|| {
            Status::permission_denied(format!("cluster {:?} was deregistered", self.cluster))
        })?;
        Ok(self
            .shared
            .xds_cache
            .get(&model, self.role, me, &self.node_info, type_url))
    }

    /// The current resources of a type for this peer.
    pub fn resources(&self, type_url: &str) -> Result<Resources, Status> {
        Ok(self
            .generated(type_url)?
            .resources
            .iter()
            .map(|(name, (any, _))| (name.clone(), any.clone()))
            .collect())
    }

    /// What a node says about itself must agree with its credentials: the
    /// cluster, network and locality of the cluster its certificate (or
    /// gateway token) belongs to, and for a workload the namespace and
    /// service account of its SVID. An INSTANCE_IP that the registry knows
    /// as another identity's workload is refused, so no proxy fetches the
    /// inbound config of a workload it is not.
    fn check_claims(
        &self,
        node: &Node,
        meta: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), Status> {
        let refuse = |what: String| {
            tracing::warn!(node = %node.id, cluster = %self.cluster, identity = ?self.identity, "{what}");
            Err(Status::permission_denied(what))
        };
        if let Some(claimed) = meta("CLUSTER_ID")
            && claimed != self.cluster
        {
            return refuse(format!(
                "node metadata claims cluster {claimed:?} but its credentials belong to {:?}",
                self.cluster
            ));
        }
        let model = self.shared.model.borrow().clone();
        let Some(me) = model.clusters.get(&self.cluster) else {
            return Err(Status::permission_denied(format!(
                "cluster {:?} was deregistered",
                self.cluster
            )));
        };
        if let Some(network) = meta("NETWORK").filter(|n| !n.is_empty())
            && network != me.network
        {
            return refuse(format!(
                "node metadata claims network {network:?} but cluster {:?} is on {:?}",
                me.name, me.network
            ));
        }
        if let Some(locality) = &node.locality {
            for (what, claimed, actual) in [
                ("region", &locality.region, &me.region),
                ("zone", &locality.zone, &me.zone),
            ] {
                if !claimed.is_empty() && claimed != actual {
                    return refuse(format!(
                        "node locality claims {what} {claimed:?} but cluster {:?} is in {actual:?}",
                        me.name
                    ));
                }
            }
        }
        let Some(identity) = &self.identity else {
            return Ok(());
        };
        let id = isthmus_ca::SpiffeId::parse(identity)
            .map_err(|e| Status::unauthenticated(format!("SVID: {e}")))?;
        let Some((namespace, account)) = id.namespace_and_account() else {
            return Ok(());
        };
        for (key, actual) in [("NAMESPACE", namespace), ("SERVICE_ACCOUNT", account)] {
            if let Some(claimed) = meta(key)
                && claimed != actual
            {
                return refuse(format!(
                    "node metadata claims {key} {claimed:?} but its SVID is {identity}"
                ));
            }
        }
        // Istio's node id: sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN.
        let parts: Vec<&str> = node.id.split('~').collect();
        if let [_, _, _, domain] = parts.as_slice()
            && let Some(claimed) = domain.split('.').next()
            && domain.contains(".svc.")
            && claimed != namespace
        {
            return refuse(format!(
                "node id names namespace {claimed:?} but its SVID is {identity}"
            ));
        }
        if let Some(ip) = meta("INSTANCE_IP") {
            let owner = model
                .services
                .values()
                .filter_map(|by_cluster| by_cluster.get(&self.cluster))
                .flat_map(|svc| svc.endpoints.iter().map(move |e| (svc, e)))
                .find(|(svc, e)| {
                    e.address == ip && (svc.namespace != namespace || e.service_account != account)
                });
            if let Some((svc, e)) = owner {
                return refuse(format!(
                    "INSTANCE_IP {ip} is workload {:?} of {}/{} (service account {:?}), not {identity}",
                    e.workload, svc.namespace, svc.name, e.service_account
                ));
            }
        }
        Ok(())
    }

    pub fn accept_node(&mut self, node: Option<&Node>) -> Result<(), Status> {
        let node = node.ok_or_else(|| {
            Status::invalid_argument("the first DiscoveryRequest must carry a node")
        })?;
        if node.id.is_empty() || node.id.len() > 256 {
            return Err(Status::invalid_argument("node.id must be 1 to 256 bytes"));
        }
        let meta = |key: &str| {
            node.metadata
                .as_ref()
                .and_then(|m| m.fields.get(key))
                .and_then(|v| match &v.kind {
                    Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => {
                        Some(s.clone())
                    }
                    _ => None,
                })
        };
        self.check_claims(node, &meta)?;
        self.node_id = node.id.clone();
        self.node_info = generate::NodeInfo {
            instance_ip: meta("INSTANCE_IP").filter(|ip| ip.parse::<std::net::IpAddr>().is_ok()),
            apps: meta("APPS")
                .map(|a| generate::NodeInfo::parse_apps(&a))
                .unwrap_or_default(),
            namespace: self
                .identity
                .as_deref()
                .and_then(|i| isthmus_ca::SpiffeId::parse(i).ok())
                .and_then(|id| id.namespace_and_account().map(|(ns, _)| ns.to_string())),
        };
        let bundle_sequence = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("BUNDLE_SEQUENCE"))
            .and_then(|v| match &v.kind {
                Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => {
                    s.parse::<u64>().ok()
                }
                Some(envoy_types::pb::google::protobuf::value::Kind::NumberValue(n)) => {
                    Some(*n as u64)
                }
                _ => None,
            });
        let model = self.shared.model.borrow().clone();
        let root = self.certificate.as_ref().and_then(|(fp, _)| {
            let c = model.clusters.get(&self.cluster)?;
            c.current_intermediate
                .iter()
                .chain(c.replaced_intermediates.iter())
                .find(|i| &i.fingerprint == fp)
                .map(|i| i.root.clone())
        });
        self.shared.proxies.connect(
            self.id,
            ProxyStatus {
                node_id: node.id.clone(),
                cluster: self.cluster.clone(),
                role: match self.role {
                    Role::Sidecar => "sidecar".into(),
                    Role::Gateway => "gateway".into(),
                },
                identity: self.identity.clone(),
                types: Default::default(),
                intermediate: self.certificate.as_ref().map(|(fp, _)| fp.clone()),
                root,
                certificate_not_after_unix: self.certificate.as_ref().map(|(_, t)| *t),
                bundle_sequence,
            },
        );
        tracing::info!(node = %node.id, cluster = %self.cluster, identity = ?self.identity, "xDS stream opened");
        Ok(())
    }
}

impl Connection {
    async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>) {
        let mut model = self.peer.shared.model.clone();
        let mut seen_revision = model.borrow_and_update().config_revision;
        let shared = self.peer.shared.clone();
        shared.metrics.xds_connections.inc();
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(status) = self.on_request(req).await {
                            tracing::warn!(node = %self.peer.node_id, cluster = %self.peer.cluster, reason = %status.message(), "closing xDS stream");
                            let _ = self.tx.send(Box::new(Err(status))).await;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(node = %self.peer.node_id, error = %e, "xDS stream error");
                        break;
                    }
                },
                changed = model.changed() => {
                    if changed.is_err() { break; }
                    if model.borrow_and_update().config_revision != seen_revision {
                        // A burst of changes becomes one push.
                        tokio::time::sleep(PUSH_DEBOUNCE).await;
                    }
                    let revision = model.borrow_and_update().config_revision;
                    if revision != seen_revision {
                        seen_revision = revision;
                        if !self.peer.shared.model.borrow().clusters.contains_key(&self.peer.cluster) {
                            let _ = self.tx.send(Box::new(Err(Status::permission_denied(format!("cluster {:?} was deregistered", self.peer.cluster))))).await;
                            break;
                        }
                        // Clusters first; a changed cluster is re-warmed by
                        // Envoy, which then waits for its endpoints, so they
                        // follow even when they did not change.
                        let mut types: Vec<String> = self.types.keys().cloned().collect();
                        types.sort_by_key(|t| push_order(t));
                        let mut clusters_sent = false;
                        for t in types {
                            let force = clusters_sent && t == type_urls::ENDPOINT;
                            match self.push(&t, force).await {
                                Ok(sent) => clusters_sent |= sent && t == type_urls::CLUSTER,
                                Err(_) => break,
                            }
                        }
                    }
                }
            }
        }
        shared.metrics.xds_connections.dec();
        shared.proxies.disconnect(self.peer.id);
        tracing::info!(node = %self.peer.node_id, cluster = %self.peer.cluster, "xDS stream closed");
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        if self.peer.node_id.is_empty() {
            self.peer.accept_node(req.node.as_ref())?;
        }
        let type_url = req.type_url.clone();
        Peer::check_type(&type_url)?;
        let state = self.types.entry(type_url.clone()).or_default();
        if !req.response_nonce.is_empty() && req.response_nonce != state.nonce {
            return Ok(()); // stale: answers an older response
        }
        let names: Option<BTreeSet<String>> =
            (!req.resource_names.is_empty()).then(|| req.resource_names.iter().cloned().collect());
        let names_changed = names != state.names;
        state.names = names;
        if let Some(err) = &req.error_detail {
            self.peer.nacked(&type_url, &err.message);
            if names_changed {
                self.push(&type_url, true).await?;
            }
            return Ok(());
        }
        if !req.response_nonce.is_empty() {
            self.peer.acked(&type_url, req.version_info.clone());
        }
        let first = self
            .types
            .get(&type_url)
            .is_some_and(|s| s.sent_version.is_none());
        if first || names_changed {
            self.push(&type_url, true).await?;
        }
        Ok(())
    }

    /// Sends the current resources of `type_url` if they changed (or always,
    /// when `force`). Returns whether it sent.
    async fn push(&mut self, type_url: &str, force: bool) -> Result<bool, Status> {
        let mut resources: Resources = self.peer.resources(type_url)?;
        let Some(state) = self.types.get_mut(type_url) else {
            return Ok(false);
        };
        // Endpoints and routes are not wildcard types: a request naming
        // nothing subscribes to nothing (Envoy sends one when its last EDS
        // cluster goes), and a response would go unanswered.
        if state.names.is_none() && [type_urls::ENDPOINT, type_urls::ROUTE].contains(&type_url) {
            return Ok(false);
        }
        if let Some(names) = &state.names {
            resources.retain(|name, _| names.contains(name));
        }
        // A forced resend of endpoints is for clusters Envoy is warming; if
        // none of its subscriptions remain (the clusters went), Envoy will
        // unsubscribe and would leave the response unanswered.
        if force && resources.is_empty() && type_url == type_urls::ENDPOINT {
            return Ok(false);
        }
        let version = digest(&resources);
        if !force && state.sent_version.as_deref() == Some(version.as_str()) {
            return Ok(false);
        }
        self.nonce += 1;
        state.nonce = self.nonce.to_string();
        state.sent_version = Some(version.clone());
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources: resources.into_values().collect(),
            type_url: type_url.to_string(),
            nonce: state.nonce.clone(),
            ..Default::default()
        };
        self.peer
            .shared
            .metrics
            .xds_pushes
            .get_or_create(&vec![("type".into(), short(type_url))])
            .inc();
        self.peer
            .shared
            .proxies
            .update(self.peer.id, type_url, |s| s.sent_version = version);
        self.tx
            .send(Box::new(Ok(response)))
            .await
            .map_err(|_| Status::cancelled("proxy went away"))?;
        Ok(true)
    }
}

/// How long a push waits after a change, so that a burst of changes (an
/// agent's snapshot, an `apply` of many documents) reaches each proxy as one
/// push. Istio waits 100 ms.
/// Responses queued per stream ahead of the transport. Small: a response
/// is generated when the stream can take it, so a slow proxy holds two
/// batches here, not a snapshot.
const RESPONSE_QUEUE: usize = 2;

pub(super) const PUSH_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(50);

/// The order Envoy needs updates in: clusters before their endpoints,
/// listeners before their routes.
pub(super) fn push_order(type_url: &str) -> u8 {
    match type_url {
        type_urls::CLUSTER => 0,
        type_urls::ENDPOINT => 1,
        type_urls::LISTENER => 2,
        type_urls::ROUTE => 3,
        _ => 4,
    }
}

pub(super) fn short(type_url: &str) -> String {
    type_url.rsplit('.').next().unwrap_or(type_url).to_string()
}

/// The version of a resource set: a digest of names and encoded bytes.
pub(super) fn digest(resources: &Resources) -> String {
    let mut h = Sha256::new();
    for (name, any) in resources {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((any.value.len() as u64).to_le_bytes());
        h.update(&any.value);
    }
    hex::encode(&h.finalize()[..8])
}
