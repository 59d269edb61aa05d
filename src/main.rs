//! The `weir` binary: one entry point, one subcommand per role.

mod cli;
mod up;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "A small Kubernetes-compatible orchestrator"
)]
enum Cli {
    /// Start a one-node cluster on this machine and point kubectl at it.
    Up(up::UpArgs),
    /// Run the control plane (the API server) alone.
    Server(up::ControlPlaneArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse() {
        Cli::Up(args) => up::up(args),
        Cli::Server(args) => up::server(args),
        Cli::Client(cmd) => tokio::runtime::Runtime::new()?.block_on(cli::run(cmd, None)),
    }
}
