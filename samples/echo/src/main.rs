//! `isthmus-echo`: the sample echo service.

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Isthmus sample echo service")]
struct Cli {
    #[command(flatten)]
    config: isthmus_echo::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    isthmus_echo::run(Cli::parse().config).await
}
