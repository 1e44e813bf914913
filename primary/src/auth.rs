//! Who is on the other end of a gRPC stream.
//!
//! Agents and workloads present a certificate chain `[leaf, intermediate]`.
//! The TLS layer has already checked that some path reaches a trusted root;
//! here the leaf is verified again against exactly the intermediate it
//! presented second, and that intermediate's fingerprint names the cluster.
//! Without the second check a client could append another cluster's
//! intermediate to its chain and speak for that cluster.
//!
//! Gateways hold no key: they present their cluster's gateway credential as a
//! bearer token instead.

use isthmus_ca::SpiffeId;
use rustls::pki_types::{CertificateDer, UnixTime};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::{Shared, tokens};

/// The identity of every cluster's agent.
pub const AGENT_NAMESPACE: &str = "isthmus-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "isthmus-agent";

#[derive(Debug, Clone)]
pub struct Peer {
    pub cluster: String,
    pub identity: SpiffeId,
}

/// Authenticates a workload (or agent) by its certificate chain.
pub fn workload(
    shared: &Shared,
    certs: Option<&[CertificateDer<'static>]>,
) -> Result<Peer, Status> {
    let certs =
        certs.ok_or_else(|| Status::unauthenticated("no client certificate was presented"))?;
    let [leaf, intermediate, ..] = certs else {
        return Err(Status::unauthenticated(
            "client certificate chain must be [leaf, cluster intermediate]",
        ));
    };
    // Only the presented intermediate and the mesh's own CA chain may sit
    // between the leaf and a root.
    let ca = shared.ca();
    let mut path = vec![intermediate.clone()];
    path.extend(ca.ca_chain.iter().cloned());
    let identity = ca
        .bundle
        .verify(
            leaf,
            &path,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            &shared.crypto.signature_verification_algorithms,
        )
        .map_err(|e| {
            Status::unauthenticated(format!(
                "client certificate was not issued by the intermediate it presented: {e}"
            ))
        })?;
    let fp = isthmus_ca::pem::fingerprint(intermediate);
    let model = shared.model.borrow().clone();
    let cluster = model.cluster_of_intermediate(&fp).ok_or_else(|| {
        Status::permission_denied("the certificate's intermediate belongs to no registered cluster (deregistered or rotated out)")
    })?;
    Ok(Peer {
        cluster: cluster.name.clone(),
        identity,
    })
}

/// Authenticates an agent: a workload whose identity is the agent's, over
/// the key the agent pinned when its cluster joined. The identity alone is
/// not enough: anything the cluster's intermediate signs could carry it.
pub fn agent(shared: &Shared, certs: Option<&[CertificateDer<'static>]>) -> Result<Peer, Status> {
    let peer = workload(shared, certs)?;
    if peer.identity.namespace_and_account() != Some((AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT)) {
        tracing::warn!(cluster = %peer.cluster, identity = %peer.identity, "non-agent identity refused on the sync stream");
        return Err(Status::permission_denied(format!(
            "{} is not an agent identity",
            peer.identity
        )));
    }
    let model = shared.model.borrow().clone();
    let pinned = model
        .clusters
        .get(&peer.cluster)
        .and_then(|c| c.agent_key_sha256.clone());
    if let Some(pinned) = pinned {
        let presented = certs
            .and_then(|c| c.first())
            .and_then(|leaf| isthmus_ca::svid::public_key_sha256(leaf));
        if presented.as_deref() != Some(pinned.as_str()) {
            tracing::warn!(audit = true, cluster = %peer.cluster, "agent identity over a key that is not the agent's pinned key refused");
            return Err(Status::permission_denied(format!(
                "this certificate carries cluster {}'s agent identity but not the key its agent pinned at join; only that agent may stream or renew the intermediate (an agent that lost its state must have the cluster registered again)",
                peer.cluster
            )));
        }
    }
    Ok(peer)
}

/// Authenticates a gateway by its cluster's bearer credential.
pub fn gateway(shared: &Shared, metadata: &MetadataMap) -> Result<String, Status> {
    let token = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("present a workload certificate or a gateway bearer token")
        })?;
    let digest = tokens::sha256_hex(token);
    let model = shared.model.borrow().clone();
    model
        .clusters
        .values()
        .find(|c| c.gateway_token_sha256.as_deref() == Some(digest.as_str()))
        .map(|c| c.name.clone())
        .ok_or_else(|| {
            Status::unauthenticated("gateway token is not valid for any registered cluster")
        })
}
