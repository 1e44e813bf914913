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
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    isthmus_proxy::run(Cli::parse().config).await
}
