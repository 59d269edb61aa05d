//! The per-node roles as standalone subcommands (`weir node`, `weir dns`, `weir ingress`,
//! `weir lb`, `weir echo`), and what they share with `weir up`: a Kubernetes client from a
//! kubeconfig, one shutdown token for Ctrl-C/SIGTERM, and parsing a role's own flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Where a role finds the API server.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeconfigArg {
    /// kubeconfig of the cluster; default: $KUBECONFIG, then ~/.kube/config.
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
}

/// A client for the cluster of `kubeconfig` (or the default kubeconfig).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding a kubeconfig (set --kubeconfig or KUBECONFIG)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// A token cancelled on Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops weir");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// Parse a role's own flags from `argv`, so `weir up` gets each role's defaults and
/// validation from the one definition the standalone subcommand uses.
pub fn role_args<A: clap::Args>(argv: &[String]) -> anyhow::Result<A> {
    #[derive(Parser)]
    struct Wrap<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    let argv = std::iter::once("weir".to_string()).chain(argv.iter().cloned());
    Ok(Wrap::<A>::try_parse_from(argv)?.args)
}

#[derive(clap::Args, Debug)]
pub struct DnsCmd {
    #[command(flatten)]
    kube: KubeconfigArg,
    #[command(flatten)]
    args: weir_dns::Args,
}

#[derive(clap::Args, Debug)]
pub struct IngressCmd {
    #[command(flatten)]
    kube: KubeconfigArg,
    #[command(flatten)]
    args: weir_ingress::Args,
}

#[derive(clap::Subcommand, Debug)]
pub enum LbCmd {
    /// Load the BPF programs and keep their maps in step with Services and EndpointSlices.
    Run {
        #[command(flatten)]
        kube: KubeconfigArg,
        #[command(flatten)]
        args: weir_lb::Args,
    },
    /// Show Services, backends and counters as the pinned BPF maps hold them.
    List {
        #[arg(long, default_value = weir_lb::maps::DEFAULT_BPF_ROOT)]
        bpf_root: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct EchoCmd {
    /// HTTP listen address (HTTP/1.1 and h2c).
    #[arg(long, default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// TCP echo listen address.
    #[arg(long)]
    tcp: Option<SocketAddr>,
    /// UDP echo listen address.
    #[arg(long)]
    udp: Option<SocketAddr>,
    /// Name in every answer; default: $POD_NAME, then the host name.
    #[arg(long, env = "POD_NAME")]
    name: Option<String>,
}

pub fn node(args: weir_agent::Args) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let client = args.client()?;
        let shutdown = shutdown_on_signal();
        weir_agent::run(args, client, shutdown.cancelled_owned()).await?;
        Ok(())
    })
}

pub fn dns(cmd: DnsCmd) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let client = client(cmd.kube.kubeconfig.as_deref()).await?;
        weir_dns::run(cmd.args, client, shutdown_on_signal()).await?;
        Ok(())
    })
}

pub fn ingress(cmd: IngressCmd) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let client = client(cmd.kube.kubeconfig.as_deref()).await?;
        weir_ingress::run(cmd.args, client, shutdown_on_signal()).await?;
        Ok(())
    })
}

pub fn lb(cmd: LbCmd) -> anyhow::Result<()> {
    match cmd {
        LbCmd::Run { kube, args } => runtime()?.block_on(async move {
            let client = client(kube.kubeconfig.as_deref()).await?;
            weir_lb::run(args, client, shutdown_on_signal()).await?;
            Ok(())
        }),
        LbCmd::List { bpf_root } => {
            let maps = weir_lb::LbMaps::open_pinned(&bpf_root)
                .with_context(|| format!("opening the pinned maps in {}", bpf_root.display()))?;
            print_lb_rows(&maps.list()?);
            Ok(())
        }
    }
}

fn print_lb_rows(rows: &[weir_lb::ListRow]) {
    println!(
        "{:<22} {:<5} {:<8} {:<12} {:>11} {:>9} {:>8}  BACKENDS",
        "FRONTEND", "PROTO", "SCOPE", "ALGORITHM", "CONNECTIONS", "PACKETS", "REFUSED"
    );
    for r in rows {
        let backends: Vec<String> = r.backends.iter().map(|b| b.to_string()).collect();
        let algorithm = match r.affinity_timeout_secs {
            Some(t) => format!("{:?}+affinity({t}s)", r.algorithm),
            None => format!("{:?}", r.algorithm),
        };
        println!(
            "{:<22} {:<5} {:<8} {:<12} {:>11} {:>9} {:>8}  {}",
            r.frontend.to_string(),
            r.proto,
            r.scope.as_str(),
            algorithm,
            r.counters.connections,
            r.counters.packets,
            r.counters.refused,
            if backends.is_empty() {
                "<none>".to_string()
            } else {
                backends.join(",")
            }
        );
    }
}

pub fn echo(cmd: EchoCmd) -> anyhow::Result<()> {
    let name = cmd.name.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "weir-echo".into())
    });
    runtime()?.block_on(async move {
        let config = weir_echo::EchoConfig {
            http: Some(cmd.http),
            tcp: cmd.tcp,
            udp: cmd.udp,
            name,
        };
        weir_echo::serve(config, shutdown_on_signal()).await?;
        Ok(())
    })
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_args_take_the_roles_own_defaults_and_reject_bad_flags() {
        let dns: weir_dns::Args =
            role_args(&["--dns-listen".into(), "127.0.0.1:5353".into()]).expect("dns args");
        assert_eq!(dns.listen, "127.0.0.1:5353".parse().expect("addr"));
        assert_eq!(dns.zone, "cluster.local");
        let err = role_args::<weir_dns::Args>(&["--dns-listen".into(), "nope".into()])
            .expect_err("bad address must fail");
        assert!(err.to_string().contains("--dns-listen"), "{err}");
    }
}
