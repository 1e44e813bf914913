//! `isthmus-proxy`: the sidecar.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Isthmus sidecar proxy")]
struct Cli {
    #[command(flatten)]
    config: isthmus_proxy::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    isthmus_transport::admin::init_logging("info");
    isthmus_proxy::run(Cli::parse().config).await
}
