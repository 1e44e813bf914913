//! The file registry: services and workloads for VMs and for `isthmusctl up`,
//! in YAML, reloaded whenever the file changes.
//!
//! ```yaml
//! services:
//!   - name: echo
//!     namespace: demo
//!     ports: [{name: http, port: 8080}]
//!     selector: {app: echo}
//! workloads:
//!   - name: echo-1
//!     namespace: demo
//!     serviceAccount: echo
//!     address: 198.51.100.3
//!     labels: {app: echo}
//!     tokenSha256: <sha256 hex of the workload's credential>
//! ```
//!
//! A workload belongs to every service of its namespace whose selector its
//! labels match. Its credential authenticates it to the agent's CA; only
//! the digest is stored here. `tokenSha256` is the hex SHA-256 of the
//! credential, which is the token file's bytes with one trailing newline
//! removed ([`isthmus_api::workload_credential`]): `sha256sum` of a token
//! file written without a newline, as `isthmusctl workload credential --out
//! FILE` writes it (and prints the hash).

use std::collections::BTreeMap;
use std::path::Path;

use isthmus_api::names::check_label;
use isthmus_api::pb::sync::{Endpoint, Port, Service};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registry {
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
    #[serde(default)]
    pub workloads: Vec<WorkloadEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub ports: Vec<PortEntry>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortEntry {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default = "http")]
    pub protocol: String,
}

fn http() -> String {
    "http".into()
}
fn inbound() -> u16 {
    isthmus_api::ports::INBOUND
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub address: std::net::IpAddr,
    #[serde(default = "inbound")]
    pub inbound_port: u16,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "yes")]
    pub ready: bool,
    /// SHA-256 (hex) of the workload's credential for the agent's CA.
    #[serde(default)]
    pub token_sha256: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Registry {
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| RegistryError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and validates; errors name the field path.
    pub fn parse(text: &str) -> Result<Self, String> {
        let reg: Registry = if text.trim().is_empty() {
            Registry::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| e.to_string())?
        };
        for (i, s) in reg.services.iter().enumerate() {
            check_label(&s.name)
                .map_err(|_| format!("services[{i}].name: {:?} is not a DNS label", s.name))?;
            check_label(&s.namespace).map_err(|_| {
                format!(
                    "services[{i}].namespace: {:?} is not a DNS label",
                    s.namespace
                )
            })?;
            for (j, p) in s.ports.iter().enumerate() {
                if p.port == 0 {
                    return Err(format!(
                        "services[{i}].ports[{j}].port: must be from 1 to 65535"
                    ));
                }
            }
        }
        for (i, w) in reg.workloads.iter().enumerate() {
            check_label(&w.namespace).map_err(|_| {
                format!(
                    "workloads[{i}].namespace: {:?} is not a DNS label",
                    w.namespace
                )
            })?;
            if w.namespace == isthmus_ca::spiffe::SYSTEM_NAMESPACE {
                return Err(format!(
                    "workloads[{i}].namespace: {:?} is reserved for Isthmus's own identities (the agent's); put the workload in another namespace",
                    w.namespace
                ));
            }
            check_label(&w.service_account).map_err(|_| {
                format!(
                    "workloads[{i}].serviceAccount: {:?} is not a DNS label",
                    w.service_account
                )
            })?;
            if let Some(h) = &w.token_sha256
                && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(format!("workloads[{i}].tokenSha256: must be 64 hex digits"));
            }
        }
        Ok(reg)
    }

    /// The services with their endpoints, as the primary wants them.
    pub fn snapshot(&self) -> Vec<Service> {
        self.services
            .iter()
            .map(|s| Service {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| Port {
                        name: p.name.clone(),
                        port: u32::from(p.port),
                        protocol: p.protocol.clone(),
                    })
                    .collect(),
                endpoints: self
                    .workloads
                    .iter()
                    .filter(|w| {
                        w.namespace == s.namespace
                            && !s.selector.is_empty()
                            && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                    .map(|w| Endpoint {
                        workload: w.name.clone(),
                        address: w.address.to_string(),
                        inbound_port: u32::from(w.inbound_port),
                        service_account: w.service_account.clone(),
                        ready: w.ready,
                        labels: w.labels.clone().into_iter().collect(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// The workload whose credential digests to `token_sha256`.
    pub fn workload_by_token(&self, token_sha256: &str) -> Option<&WorkloadEntry> {
        self.workloads.iter().find(|w| {
            w.token_sha256
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(token_sha256))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_endpoints_by_labels_and_namespace() {
        let reg = Registry::parse(
            r#"
services:
  - {name: echo, namespace: demo, ports: [{port: 8080}], selector: {app: echo}}
workloads:
  - {name: e1, namespace: demo, serviceAccount: echo, address: 198.51.100.3, labels: {app: echo}}
  - {name: e2, namespace: other, serviceAccount: echo, address: 198.51.100.4, labels: {app: echo}}
  - {name: c1, namespace: demo, serviceAccount: client, address: 198.51.100.5, labels: {app: client}}
"#,
        )
        .unwrap();
        let snap = reg.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].endpoints.len(), 1);
        assert_eq!(snap[0].endpoints[0].address, "198.51.100.3");
        assert_eq!(snap[0].endpoints[0].inbound_port, 15006);
    }

    #[test]
    fn bad_registries_name_the_field() {
        for (text, want) in [
            (
                "services: [{name: Echo, namespace: demo, ports: []}]",
                "services[0].name",
            ),
            (
                "workloads: [{name: a, namespace: demo, serviceAccount: x, address: nope}]",
                "address",
            ),
            (
                "workloads: [{name: a, namespace: demo, serviceAccount: x, address: 192.0.2.9, tokenSha256: zz}]",
                "tokenSha256",
            ),
            (
                "services: [{name: a, namespace: demo, ports: [{port: 0}]}]",
                "ports[0].port",
            ),
            ("servics: []", "servics"),
            ("services: [", ""),
        ] {
            let err = Registry::parse(text).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
    }
    /// The hash `isthmusctl workload credential` prints, or `sha256sum`
    /// gives in either case, finds the workload whose token file holds the
    /// credential, with or without its trailing newline.
    #[test]
    fn the_credential_of_a_token_file_finds_its_workload() {
        use isthmus_api::workload_credential::{from_file_bytes, sha256_hex};
        // `printf s3cret | sha256sum`, in capitals as some tools print it.
        let upper = sha256_hex("s3cret").to_ascii_uppercase();
        let reg = Registry::parse(&format!(
            "workloads: [{{name: w, namespace: demo, serviceAccount: x, address: 192.0.2.9, tokenSha256: {upper}}}]"
        ))
        .expect("a registry");
        for file in [&b"s3cret"[..], b"s3cret\n"] {
            let credential = from_file_bytes(file).expect("a credential");
            let found = reg.workload_by_token(&sha256_hex(credential));
            assert_eq!(found.map(|w| w.name.as_str()), Some("w"));
        }
        assert!(reg.workload_by_token(&sha256_hex("other")).is_none());
    }
}
