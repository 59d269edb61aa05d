//! `weir up` and `weir server`: open the store, start the API server, write the admin
//! kubeconfig, and run until Ctrl-C or SIGTERM. All state is in the store and the data
//! dir, so the next start comes back where this one stopped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use weir_apiserver::{Config, Server, ServiceCidr, kubeconfig};
use weir_store::StoreSpec;

/// Where the control plane keeps its state and how it is reached.
#[derive(clap::Args, Debug)]
pub struct ControlPlaneArgs {
    /// State directory: the embedded store, certificates, tokens and kubeconfig.
    #[arg(long, default_value = "/var/lib/weir")]
    data_dir: PathBuf,
    /// Address of the HTTPS API.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Use etcd at these client URLs (comma-separated) instead of the embedded store
    /// `<data-dir>/store.redb`.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// IPv4 range for Service cluster IPs.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: ServiceCidr,
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    control_plane: ControlPlaneArgs,
    /// Do not merge the `weir` context into ~/.kube/config (or $KUBECONFIG).
    #[arg(long)]
    no_kubeconfig_merge: bool,
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    run(args.control_plane, !args.no_kubeconfig_merge)
}

pub fn server(args: ControlPlaneArgs) -> anyhow::Result<()> {
    run(args, false)
}

fn run(args: ControlPlaneArgs, merge: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(run_async(args, merge))
}

async fn run_async(args: ControlPlaneArgs, merge: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data dir {}", args.data_dir.display()))?;
    let spec = if args.etcd.is_empty() {
        StoreSpec::Embedded(args.data_dir.join("store.redb"))
    } else {
        StoreSpec::Etcd(args.etcd.clone())
    };
    let store = weir_store::open(&spec)
        .await
        .with_context(|| format!("opening the store {spec:?}"))?;
    let mut config = Config::new(args.data_dir.clone(), store);
    config.listen = args.listen;
    config.service_cidr = args.service_cidr;
    let server = Server::bind(config).await?;
    let url = server.url();

    let entry = kubeconfig::Entry {
        name: "weir",
        user: "weir-admin",
        server: &url,
        ca_pem: &server.pki().ca_pem,
        token: &server.pki().admin_token,
    };
    let own = args.data_dir.join("kubeconfig");
    kubeconfig::write(&own, &entry)?;
    let merged = if merge {
        match kubeconfig::default_path() {
            Some(path) => {
                kubeconfig::merge_into(&path, &entry)?;
                Some(path)
            }
            None => None,
        }
    } else {
        None
    };
    print_banner(&url, &spec, &own, merged.as_deref());

    server.run(shutdown_signal()).await?;
    tracing::info!("stopped; state is kept in {}", args.data_dir.display());
    Ok(())
}

fn print_banner(url: &str, spec: &StoreSpec, own: &Path, merged: Option<&Path>) {
    let store = match spec {
        StoreSpec::Embedded(path) => format!("embedded, {}", path.display()),
        StoreSpec::Etcd(urls) => format!("etcd at {}", urls.join(",")),
    };
    println!("weir API server is serving at {url} (store: {store})");
    println!("  kubeconfig: {}", own.display());
    match merged {
        Some(path) => {
            println!(
                "  merged into {} as context \"weir\" (now current)",
                path.display()
            );
            println!("  try: kubectl get nodes");
        }
        None => println!("  try: KUBECONFIG={} kubectl get nodes", own.display()),
    }
    println!("Ctrl-C stops it; the next start comes back with the same state.");
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
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
}
