//! JSON bodies of the primary's REST API (`/api/v1`), shared by the primary
//! and `isthmusctl`.

use serde::{Deserialize, Serialize};

/// `POST /api/v1/clusters`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterCluster {
    pub name: String,
    pub network: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    /// IP addresses of the cluster's east-west gateways.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Join token lifetime in seconds; 0 means the default (1 h).
    #[serde(default)]
    pub token_ttl_seconds: u64,
}

/// Answer to a registration: the one-time join token, shown once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Registered {
    pub cluster: ClusterView,
    pub join_token: String,
    pub join_token_expires_unix: u64,
}

/// A cluster as `cluster list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub name: String,
    pub network: String,
    pub region: String,
    pub zone: String,
    pub gateways: Vec<String>,
    pub trust_domain: String,
    /// `pending` (not joined), `token-expired` (never joined, and the join
    /// token lapsed: deregister and register again), `healthy` or `stale` (no recent
    /// heartbeat).
    pub health: String,
    pub agent_version: Option<String>,
    pub last_heartbeat_unix: Option<u64>,
    pub last_sync_unix: Option<u64>,
    pub endpoint_count: u64,
}

/// Which primary replica leads (`GET /api/v1/leader`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaderView {
    /// The replica that answered.
    pub replica: String,
    /// The replica that leads, if any does.
    pub leader: Option<String>,
    pub leader_since_unix: Option<u64>,
}

/// Every error body: what went wrong, in words an operator can act on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /api/v1/ca`: the roots, each cluster's intermediate, how many
/// connected workloads hold certificates under each, and any rotation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaView {
    pub trust_domain: String,
    /// Grows with every change of roots or CRLs.
    pub bundle_sequence: u64,
    /// Fingerprint of the root whose CA signs intermediates now.
    pub signing_root: String,
    pub roots: Vec<RootView>,
    pub clusters: Vec<IntermediateView>,
    pub rotation: Option<RotationView>,
    /// Connected workloads whose certificate chains to no known root.
    pub workloads_unknown: u64,
    /// Other trust domains this mesh federates with.
    #[serde(default)]
    pub federated: Vec<FederatedView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedView {
    pub trust_domain: String,
    /// SHA-256 fingerprints of its roots.
    pub roots: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootView {
    pub fingerprint: String,
    pub subject: String,
    pub not_after_unix: i64,
    /// When the CA that signs under this root expires: the root itself, or
    /// an imported signing CA below it. Cluster intermediates end no later.
    #[serde(default)]
    pub signer_not_after_unix: i64,
    pub imported: bool,
    pub signing: bool,
    /// Connected workloads holding a certificate that chains to this root.
    pub workloads: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IntermediateView {
    pub cluster: String,
    pub fingerprint: Option<String>,
    pub serial: Option<String>,
    /// Fingerprint of the root it chains to.
    pub root: Option<String>,
    pub not_after_unix: Option<i64>,
    /// Connected workloads of this cluster holding a certificate from it.
    pub workloads: u64,
    /// Workloads of this cluster still on a replaced intermediate.
    pub workloads_on_replaced: u64,
    /// `reissuing`, `revoking` or `done`, for the last intermediate rotation.
    pub rotation: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationView {
    pub from: String,
    pub to: String,
    /// 1: trust both roots; 2: re-issue under the new one; 3: drop the old
    /// one; 4: finished.
    pub phase: u8,
    /// The rotation pauses after this phase.
    pub until: u8,
    pub rolled_back: bool,
    pub started_unix: u64,
    pub phase_started_unix: u64,
    /// What the current phase still waits for, in words.
    pub waiting_for: Vec<String>,
}

/// `POST /api/v1/ca/rotate-root`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateRoot {
    /// Stop after this phase (1 to 3; 0 means 3). Calling again with a
    /// higher value resumes.
    #[serde(default)]
    pub until: u8,
    /// Undo a rotation that has not reached phase 3.
    #[serde(default)]
    pub rollback: bool,
}

/// `POST /api/v1/ca/import-root`: Istio's plug-in CA files, PEM.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImportRoot {
    /// `root-cert.pem`.
    pub root_cert: String,
    /// `ca-cert.pem`: the signing CA (may be the root itself).
    pub ca_cert: String,
    /// `ca-key.pem`.
    pub ca_key: String,
    /// `cert-chain.pem`: from the signing CA up to the root (optional).
    #[serde(default)]
    pub cert_chain: String,
    /// As for rotate-root.
    #[serde(default)]
    pub until: u8,
}
