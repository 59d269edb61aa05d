//! The `weir` binary: one entry point, one subcommand per role.

mod cli;
mod cluster_dns;
mod roles;
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
    /// Run the control plane alone: API server, scheduler and controllers.
    Server(up::ControlPlaneArgs),
    /// Run this machine as a cluster node: pods as processes in their own namespaces.
    Node(weir_agent::Args),
    /// Run the eBPF service load balancer, or list what its maps hold.
    #[command(subcommand)]
    Lb(roles::LbCmd),
    /// Serve cluster DNS for Service and Pod records.
    Dns(roles::DnsCmd),
    /// Run the ingress proxy for Ingress objects of class `weir`.
    Ingress(roles::IngressCmd),
    /// Serve the HTTP/TCP/UDP echo backend used by examples, tests and benchmarks.
    Echo(roles::EchoCmd),
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
        Cli::Node(args) => roles::node(args),
        Cli::Lb(cmd) => roles::lb(cmd),
        Cli::Dns(cmd) => roles::dns(cmd),
        Cli::Ingress(cmd) => roles::ingress(cmd),
        Cli::Echo(cmd) => roles::echo(cmd),
        Cli::Client(cmd) => tokio::runtime::Runtime::new()?.block_on(cli::run(cmd, None)),
    }
}
