//! The `weir` binary: one entry point, one subcommand per role.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "A small Kubernetes-compatible orchestrator"
)]
enum Cli {}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    match Cli::parse() {}
}
