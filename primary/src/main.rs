//! `isthmus-primary`: runs the primary control plane.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Isthmus primary control plane")]
struct Cli {
    #[command(flatten)]
    config: isthmus_primary::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    isthmus_transport::admin::init_logging("info");
    isthmus_primary::run(Cli::parse().config).await
}
