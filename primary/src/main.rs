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
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    isthmus_primary::run(Cli::parse().config).await
}
