//! Topology templates: the layouts `isthmusctl up` can run, shipped in
//! `topologies/templates/`.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Template {
    pub name: String,
    pub description: String,
    /// Primary replicas. One runs on the embedded store; more share an
    /// etcd that the runner starts, and elect a leader.
    #[serde(default = "one")]
    pub primaries: usize,
    pub clusters: Vec<ClusterSpec>,
    pub services: Vec<ServiceSpec>,
    pub client: ClientSpec,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    pub name: String,
    pub network: String,
    pub region: String,
    pub zone: String,
    pub workloads: Vec<WorkloadSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The sample app this workload runs behind its sidecar, if any.
    #[serde(default)]
    pub app: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub port: u16,
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientSpec {
    pub cluster: String,
    pub workload: String,
    pub url: String,
}

const BUILTIN: &[(&str, &str)] = &[
    (
        "multi-network",
        include_str!("../templates/multi-network.yaml"),
    ),
    ("ha-primary", include_str!("../templates/ha-primary.yaml")),
    (
        "single-cluster",
        include_str!("../templates/single-cluster.yaml"),
    ),
    (
        "flat-multicluster",
        include_str!("../templates/flat-multicluster.yaml"),
    ),
];

/// Names of the templates this build ships.
pub fn names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

pub fn load(name: &str) -> anyhow::Result<Template> {
    let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        anyhow::anyhow!(
            "no topology template named {name:?}; available: {}",
            names().join(", ")
        )
    })?;
    let t: Template =
        serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("template {name}: {e}"))?;
    if !(1..=5).contains(&t.primaries) {
        anyhow::bail!(
            "template {name}: primaries: {} is out of range 1..=5",
            t.primaries
        );
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    #[test]
    fn builtin_templates_parse() {
        for name in super::names() {
            let t = super::load(name).unwrap();
            assert_eq!(t.name, name);
            assert!(t.clusters.iter().any(|c| c.name == t.client.cluster));
        }
    }
}
