//! What the primary stores, as JSON under the keys in [`crate::store::keys`].

use serde::{Deserialize, Serialize};

/// A registered cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    pub name: String,
    pub network: String,
    pub region: String,
    pub zone: String,
    pub gateways: Vec<String>,
    pub trust_domain: String,
    pub registered_unix: u64,
    /// SHA-256 of the unused join token; cleared when it is used.
    pub join_token_sha256: Option<String>,
    pub join_token_expires_unix: u64,
    pub joined_unix: Option<u64>,
    /// SHA-256 fingerprints of the intermediates issued to this cluster's
    /// agent. A peer whose chain holds one of these speaks for the cluster.
    pub intermediates: Vec<String>,
    /// SHA-256 of the cluster's gateway credential.
    pub gateway_token_sha256: Option<String>,
    /// The intermediate the agent signs with now.
    #[serde(default)]
    pub current_intermediate: Option<IntermediateRecord>,
    /// Intermediates replaced but not yet revoked.
    #[serde(default)]
    pub replaced_intermediates: Vec<IntermediateRecord>,
    /// The agent must fetch a new intermediate (RenewIntermediate).
    #[serde(default)]
    pub reissue_requested: bool,
    /// An intermediate rotation in progress, or the last one.
    #[serde(default)]
    pub intermediate_rotation: Option<IntermediateRotation>,
    /// SHA-256 of the agent's identity key (SPKI DER), pinned at join: only
    /// a certificate over that key is the agent. None for clusters that
    /// joined before agents sent one.
    #[serde(default)]
    pub agent_key_sha256: Option<String>,
}

/// A cluster intermediate the primary issued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IntermediateRecord {
    pub fingerprint: String,
    pub pem: String,
    pub serial_hex: String,
    /// Fingerprint of the root it chains to.
    pub root: String,
    pub not_after_unix: i64,
    pub issued_unix: u64,
}

/// `isthmusctl ca rotate-intermediate`: re-issue, wait until no workload
/// holds a certificate from the old intermediate, revoke it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IntermediateRotation {
    /// Fingerprint of the intermediate being replaced.
    pub old: String,
    /// `reissuing`, `revoking` (CRL published, waiting until every proxy
    /// holds it) or `done`.
    pub state: String,
    pub started_unix: u64,
}

/// The agent's liveness, kept apart from the cluster so heartbeats do not
/// rebuild the model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRecord {
    pub agent_version: String,
    pub last_heartbeat_unix: u64,
    pub last_sync_unix: Option<u64>,
    /// The intermediate the agent signs with, as it reported.
    #[serde(default)]
    pub intermediate_fingerprint: Option<String>,
    /// The trust bundle sequence the agent holds, as it reported.
    #[serde(default)]
    pub bundle_sequence: u64,
}

/// One service as one cluster's agent reported it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRecord {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<PortRecord>,
    pub endpoints: Vec<EndpointRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortRecord {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRecord {
    pub workload: String,
    pub address: String,
    pub inbound_port: u16,
    pub service_account: String,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
