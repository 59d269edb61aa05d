//! `weir up` and `weir server`: open the store, start the API server, write the admin
//! kubeconfig, start the scheduler and controllers, and (for `up`) this machine's node
//! roles: the node agent, the eBPF load balancer, cluster DNS and ingress. Runs until Ctrl-C
//! or SIGTERM. All state is in the store and the data dir, so the next start comes back
//! where this one stopped.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
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
    /// How long a node's Lease may go unrenewed before the node turns NotReady
    /// (kube-controller-manager's flag of this name).
    #[arg(long, default_value = "40s", value_parser = weir_controllers::nodelifecycle::parse_duration)]
    node_monitor_grace_period: std::time::Duration,
    /// How long pods without a toleration of their own stay on an unreachable node before
    /// they are evicted (kube-apiserver's flag of this name: weir applies it in the node
    /// lifecycle controller rather than as an admission-added toleration).
    #[arg(long, default_value = "300")]
    default_unreachable_toleration_seconds: u64,
}

impl ControlPlaneArgs {
    fn controllers(&self) -> weir_controllers::Config {
        weir_controllers::Config {
            node_lifecycle: weir_controllers::nodelifecycle::Config {
                grace_period: self.node_monitor_grace_period,
                default_toleration: std::time::Duration::from_secs(
                    self.default_unreachable_toleration_seconds,
                ),
            },
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    control_plane: ControlPlaneArgs,
    /// Do not merge the `weir` context into ~/.kube/config (or $KUBECONFIG).
    #[arg(long)]
    no_kubeconfig_merge: bool,
    #[command(flatten)]
    node: NodeArgs,
}

/// This machine as a node of the cluster `weir up` starts.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// Run only the control plane: no node agent, load balancer, DNS or ingress here.
    #[arg(long)]
    control_plane_only: bool,
    /// Name of this machine's Node; default: the host name.
    #[arg(long)]
    node_name: Option<String>,
    /// This node's address; default: the first global IPv4 address of its namespace.
    #[arg(long)]
    node_ip: Option<Ipv4Addr>,
    /// Extra flags for the node agent (as `weir node` takes them), e.g. `--agent-arg=--backoff=2`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Extra flags for the load balancer (as `weir lb run` takes them).
    #[arg(long = "lb-arg", allow_hyphen_values = true)]
    lb_args: Vec<String>,
    /// Extra flags for cluster DNS (as `weir dns` takes them), e.g. `--dns-arg=--dns-listen=0.0.0.0:5353`.
    #[arg(long = "dns-arg", allow_hyphen_values = true)]
    dns_args: Vec<String>,
    /// Extra flags for the ingress proxy (as `weir ingress` takes them).
    #[arg(long = "ingress-arg", allow_hyphen_values = true)]
    ingress_args: Vec<String>,
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    let node = (!args.node.control_plane_only).then_some(args.node);
    run(args.control_plane, !args.no_kubeconfig_merge, node)
}

pub fn server(args: ControlPlaneArgs) -> anyhow::Result<()> {
    run(args, false, None)
}

fn run(args: ControlPlaneArgs, merge: bool, node: Option<NodeArgs>) -> anyhow::Result<()> {
    crate::roles::runtime()?.block_on(run_async(args, merge, node))
}

async fn run_async(
    args: ControlPlaneArgs,
    merge: bool,
    node: Option<NodeArgs>,
) -> anyhow::Result<()> {
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

    let shutdown = crate::roles::shutdown_on_signal();
    let ca = server.pki().dir().join("ca.crt");
    let token = server.pki().admin_token.clone();
    let ca_pem = server.pki().ca_pem.clone();
    let mut bootstrapped = server.bootstrapped();
    let serving = tokio::spawn(server.run(shutdown.clone().cancelled_owned()));
    // Kubeconfigs are written once the initial namespaces exist: whoever waits for the file
    // (a user, a test, a script) can use `default` at once.
    tokio::select! {
        ready = bootstrapped.wait_for(|b| *b) => {
            ready.context("the API server stopped before creating the initial namespaces")?;
        }
        _ = shutdown.cancelled() => {
            serving.await.context("API server task")??;
            return Ok(());
        }
    }
    let entry = kubeconfig::Entry {
        name: "weir",
        user: "weir-admin",
        server: &url,
        ca_pem: &ca_pem,
        token: &token,
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
    let client = crate::roles::client(Some(&own)).await?;

    let mut roles = tokio::task::JoinSet::new();
    roles.spawn(role(
        "scheduler",
        weir_scheduler::run(
            client.clone(),
            weir_scheduler::RunConfig::default(),
            shutdown.clone().cancelled_owned(),
        ),
        shutdown.clone(),
    ));
    let controllers = weir_controllers::run(
        client.clone(),
        args.controllers(),
        shutdown.clone().cancelled_owned(),
    );
    roles.spawn(role(
        "controllers",
        async move {
            controllers.await;
            Ok::<(), std::convert::Infallible>(())
        },
        shutdown.clone(),
    ));
    if let Some(node) = node {
        // One node address for every role: the agent's Node, NodePorts on the tc path, and
        // the address the ingress publishes in Ingress status.
        let node_ip = match node.node_ip {
            Some(ip) => Some(ip),
            None => weir_agent::detect_node_ip(None).await,
        };
        let node_roles = NodeRoles::parse(&node, node_ip, &url, &token, &ca, &args)?;
        node_roles.spawn(&mut roles, client, shutdown.clone());
    }

    // The first role to fail stops the others: a half-running node is worse than none.
    while let Some(done) = roles.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::error!("{e:#}");
            shutdown.cancel();
        }
    }
    serving.await.context("API server task")??;
    tracing::info!("stopped; state is kept in {}", args.data_dir.display());
    Ok(())
}

/// Run one role until it ends; an error is reported with the role's name.
async fn role<E: std::fmt::Display>(
    name: &'static str,
    task: impl std::future::Future<Output = Result<(), E>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let result = task.await;
    match result {
        Ok(()) if shutdown.is_cancelled() => Ok(()),
        Ok(()) => anyhow::bail!("{name} stopped unexpectedly"),
        Err(e) => anyhow::bail!("{name}: {e}"),
    }
}

/// The node roles of `weir up`, each parsed from its own flag definitions.
struct NodeRoles {
    agent: weir_agent::Args,
    lb: weir_lb::Args,
    dns: weir_dns::Args,
    ingress: weir_ingress::Args,
    service_cidr: String,
}

/// Whether `argv` sets `flag` (as `--flag=v` or `--flag v`).
fn has_flag(argv: &[String], flag: &str) -> bool {
    argv.iter().any(|a| {
        a == flag
            || a.strip_prefix(flag)
                .is_some_and(|rest| rest.starts_with('='))
    })
}

impl NodeRoles {
    fn parse(
        node: &NodeArgs,
        node_ip: Option<Ipv4Addr>,
        url: &str,
        token: &str,
        ca: &Path,
        cp: &ControlPlaneArgs,
    ) -> anyhow::Result<Self> {
        let mut agent = vec![
            format!("--server={url}"),
            format!("--token={token}"),
            format!("--certificate-authority={}", ca.display()),
            format!("--state-dir={}", cp.data_dir.join("agent").display()),
        ];
        // One node name for every role, so the load balancer's `Local` traffic policies see
        // the endpoints the agent's pods publish.
        let node_name = node
            .node_name
            .clone()
            .unwrap_or_else(weir_agent::default_node_name);
        agent.push(format!("--node-name={node_name}"));
        if let Some(ip) = node_ip {
            agent.push(format!("--node-ip={ip}"));
        }
        agent.extend(node.agent_args.iter().cloned());
        let mut lb = node.lb_args.clone();
        lb.push(format!("--node-name={node_name}"));
        let mut ingress = node.ingress_args.clone();
        if let Some(ip) = node_ip {
            if !has_flag(&lb, "--node-ip") {
                lb.push(format!("--node-ip={ip}"));
            }
            if !has_flag(&ingress, "--publish-address") {
                ingress.push(format!("--publish-address={ip}"));
            }
        }
        Ok(Self {
            agent: crate::roles::role_args(&agent).context("node agent flags")?,
            lb: crate::roles::role_args(&lb).context("load balancer flags (--lb-arg)")?,
            dns: crate::roles::role_args(&node.dns_args).context("DNS flags (--dns-arg)")?,
            ingress: crate::roles::role_args(&ingress).context("ingress flags (--ingress-arg)")?,
            service_cidr: cp.service_cidr.to_string(),
        })
    }

    fn spawn(
        self,
        roles: &mut tokio::task::JoinSet<anyhow::Result<()>>,
        client: kube::Client,
        shutdown: CancellationToken,
    ) {
        // Traffic to a Service address that no hook rewrote must never leave the host.
        if let Err(e) = weir_lb::install_unreachable_routes(&[&self.service_cidr]) {
            tracing::warn!(
                "cannot install the unreachable route for {}: {e}",
                self.service_cidr
            );
        }
        let node_name = self.agent.node_name.clone();
        roles.spawn(role(
            "node agent",
            weir_agent::run(
                self.agent,
                client.clone(),
                shutdown.clone().cancelled_owned(),
            ),
            shutdown.clone(),
        ));
        roles.spawn(role(
            "load balancer",
            weir_lb::run(self.lb, client.clone(), shutdown.clone()),
            shutdown.clone(),
        ));
        let dns_port = self.dns.listen.port();
        roles.spawn(role(
            "cluster DNS",
            weir_dns::run(self.dns, client.clone(), shutdown.clone()),
            shutdown.clone(),
        ));
        roles.spawn(role(
            "ingress",
            weir_ingress::run(self.ingress, client.clone(), shutdown.clone()),
            shutdown.clone(),
        ));
        roles.spawn(role(
            "cluster DNS Service",
            crate::cluster_dns::publish(client, node_name, dns_port, shutdown.clone()),
            shutdown,
        ));
    }
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
