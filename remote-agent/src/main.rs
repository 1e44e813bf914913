//! `isthmus-agent`: joins a cluster to the mesh.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Isthmus remote agent")]
struct Cli {
    #[command(flatten)]
    config: isthmus_agent::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    isthmus_transport::admin::init_logging("info");
    isthmus_agent::run(Cli::parse().config).await
}
