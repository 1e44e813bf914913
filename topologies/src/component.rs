//! One Isthmus process, by kind. `isthmusctl component KIND ...` runs these;
//! so does the e2e harness's node binary. One binary that can be any
//! component is what lets `cargo run -p isthmusctl -- up` work from a fresh
//! clone.

#[derive(Debug, clap::Subcommand)]
pub enum Component {
    Primary(isthmus_primary::Config),
    Agent(isthmus_agent::Config),
    Gateway(isthmus_gateway::Config),
    Proxy(isthmus_proxy::Config),
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
