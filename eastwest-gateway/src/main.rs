//! `isthmus-gateway`: the east-west SNI passthrough gateway.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Isthmus east-west gateway")]
struct Cli {
    #[command(flatten)]
    config: isthmus_gateway::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    isthmus_transport::admin::init_logging("info");
    isthmus_gateway::run(Cli::parse().config).await
}
