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
