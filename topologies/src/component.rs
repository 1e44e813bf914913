//! One Isthmus process, by kind. `isthmusctl component KIND ...` runs these;
//! so does the e2e harness's node binary. One binary that can be any
//! component is what lets `cargo run -p isthmusctl -- up` work from a fresh
//! clone.

#[derive(Debug, clap::Subcommand)]
pub enum Component {
    /// The control plane: store, CA root, agent sync and xDS on 15012, REST
    /// API on 15014 (what `isthmus-primary` runs).
    Primary(isthmus_primary::Config),
    /// A cluster's agent: joins the primary, streams the cluster's services
    /// from a file registry or Kubernetes, signs workload certificates on a
    /// Unix socket (what `isthmus-agent` runs).
    Agent(isthmus_agent::Config),
    /// An east-west gateway: routes mesh mTLS into its network by SNI on
    /// 15443 without decrypting it (what `isthmus-gateway` runs).
    Gateway(isthmus_gateway::Config),
    /// A workload's sidecar: outbound HTTP from the app on 15001, inbound
    /// mesh mTLS on 15006 (what `isthmus-proxy` runs).
    Proxy(isthmus_proxy::Config),
    /// The sample echo service: answers with its cluster, workload and the
    /// request's headers (what `isthmus-echo` runs).
    Echo(isthmus_echo::Config),
}

impl Component {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Component::Primary(c) => isthmus_primary::run(c).await,
            Component::Agent(c) => isthmus_agent::run(c).await,
            Component::Gateway(c) => isthmus_gateway::run(c).await,
            Component::Proxy(c) => isthmus_proxy::run(c).await,
            Component::Echo(c) => isthmus_echo::run(c).await,
        }
    }
}
