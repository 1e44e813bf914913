//! The e2e harness's component binary: `isthmus-e2e-node component KIND ...`,
//! exactly what `isthmusctl component` runs. Cargo builds it for the tests,
//! so the suites need no separately built isthmusctl.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    top: Top,
}

#[derive(clap::Subcommand)]
enum Top {
    Component {
        #[command(subcommand)]
        component: isthmus_topology::component::Component,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Top::Component { component } = Cli::parse().top;
    component.run().await
}
