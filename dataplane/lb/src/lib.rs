//! weir's eBPF service load balancer: loads and pins the BPF programs and keeps their maps in
//! step with Services and EndpointSlices.
//!
//! Data flow: API server → [`watch`] (kube-rs reflectors: the snapshot) → [`model::desired`]
//! (what the maps should hold) → [`plan::plan`] (the diff against a mirror of the maps) →
//! [`maps::LbMaps::apply`] (only those writes). The BPF side is `ebpf/lb-ebpf`: socket hooks on
//! a cgroup ([`load_and_attach`]) and, for traffic from outside the node to NodePorts and
//! externalIPs, tc programs on the node's external interfaces ([`tc`]). [`health`] serves the
//! `healthCheckNodePort`s of `externalTrafficPolicy: Local` LoadBalancer Services.

mod batch;
pub mod health;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod netlab;
pub mod plan;
pub mod routes;
pub mod tc;
pub mod testrun;
pub mod watch;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

pub use tokio_util::sync::CancellationToken;
pub use weir_lb_common::Counters;

pub use maps::{LbMaps, load_and_attach, unpin_all};
pub use model::{Algorithm, Desired, ModelConfig};
pub use plan::{MaglevConfig, MapState, Plan};
pub use routes::install_unreachable_routes;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("BPF: {0}")]
    Bpf(String),
    #[error("invalid {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("watch: {0}")]
    Watch(String),
    /// The maps were written, but part of the desired state had no room ([`Plan::no_id`]).
    #[error("maps full: {0}")]
    Full(String),
}

impl Error {
    pub(crate) fn io(context: String, source: std::io::Error) -> Self {
        Self::Io { context, source }
    }
}

/// One frontend entry as `weir lb list` shows it, read from the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListRow {
    pub frontend: SocketAddrV4,
    pub proto: &'static str,
    /// Which clients this entry serves: an external frontend of an `externalTrafficPolicy:
    /// Local` Service has two rows (one, `All`, while the maps have no id for the second).
    pub scope: Scope,
    pub id: u32,
    pub algorithm: Algorithm,
    pub affinity_timeout_secs: Option<u32>,
    pub backends: Vec<SocketAddrV4>,
    pub counters: Counters,
}

/// The clients a frontend's map entry serves (`weir_lb_common::SCOPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every client: the frontend's only entry.
    All,
    /// Clients outside the node (the tc path): the node's own endpoints of an
    /// `externalTrafficPolicy: Local` Service.
    External,
    /// Clients on this node (the socket hooks): that Service's cluster-wide endpoints.
    Internal,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::External => "external",
            Self::Internal => "internal",
        }
    }
}

/// Keeps the maps equal to the desired state, writing only differences.
pub struct Syncer {
    maps: LbMaps,
    state: MapState,
    maglev: MaglevConfig,
}

impl Syncer {
    /// Starts from what the (possibly pinned, older) maps hold: reconcile, never flush.
    pub fn new(maps: LbMaps, maglev: MaglevConfig) -> Result<Self, Error> {
        let state = maps.read_state()?;
        Ok(Self {
            maps,
            state,
            maglev,
        })
    }

    /// Applies the difference between the maps and `desired`; returns the number of writes.
    pub fn sync(&mut self, desired: &Desired) -> Result<usize, Error> {
        self.write(plan::plan(&self.state, desired, self.maglev))
    }

    /// Applies `desired` for some Services only; of the existing frontends, only those in
    /// `removable` (what those Services had before) may be deleted. See [`plan::plan_scoped`].
    pub fn sync_scoped(
        &mut self,
        desired: &Desired,
        removable: &[model::Frontend],
    ) -> Result<usize, Error> {
        self.write(plan::plan_scoped(
            &self.state,
            desired,
            Some(removable),
            self.maglev,
        ))
    }

    /// Applies `plan`; if part of the desired state had no room, says so once the rest (the
    /// deletions that make room included) is written, so the caller retries.
    fn write(&mut self, plan: Plan) -> Result<usize, Error> {
        if !plan.is_empty() {
            if let Err(e) = self.maps.apply(&plan) {
                // Part of the plan may have landed: take the maps as the truth again.
                self.state = self.maps.read_state()?;
                return Err(e);
            }
            self.state.apply(&plan);
        }
        if plan.short_of_room() {
            return Err(Error::Full(short_of_room(&plan)));
        }
        Ok(plan.writes())
    }

    pub fn maps(&self) -> &LbMaps {
        &self.maps
    }

    pub fn state(&self) -> &MapState {
        &self.state
    }
}

/// What [`Error::Full`] says of `plan`: how many entries missed out, the first of them, and
/// the limit in the way.
fn short_of_room(plan: &Plan) -> String {
    use weir_lb_common::{MAX_BACKEND_SLOTS, MAX_MAGLEV_SERVICES, MAX_SERVICES};
    [
        (
            &plan.no_id,
            "are not written",
            "WEIR_SERVICES has ids for",
            MAX_SERVICES - 1,
            "entries",
        ),
        (
            &plan.no_slot,
            "hold only some of their backends",
            "WEIR_BACKENDS holds",
            MAX_BACKEND_SLOTS,
            "slots",
        ),
        (
            &plan.no_maglev,
            "pick at random, not by Maglev",
            "WEIR_MAGLEV holds",
            MAX_MAGLEV_SERVICES,
            "tables",
        ),
    ]
    .into_iter()
    .filter_map(|(keys, what, map, limit, unit)| {
        let k = keys.first()?;
        let (addr, proto) = (plan::frontend_addr(k), plan::proto_name(k.proto));
        Some(format!(
            "{} frontend entries {what} (first: {addr}/{proto}): {map} {limit} {unit}",
            keys.len()
        ))
    })
    .collect::<Vec<_>>()
    .join("; ")
}

/// `weir lb` / the load balancer part of `weir up`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = maps::DEFAULT_BPF_ROOT)]
    pub bpf_root: PathBuf,
    /// cgroup v2 directory whose processes get socket load balancing (created if missing;
    /// never the cgroup2 root). Default: `<cgroup2 mount>/weir`, the subtree the node agent
    /// puts pods in, wherever this host mounts cgroup2.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// This node's name, for `internalTrafficPolicy: Local` and `externalTrafficPolicy: Local`.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's IPv4 address(es), comma-separated: NodePorts are served on
    /// nodeIP:nodePort. Default: the IPv4 addresses of the devices.
    #[arg(long = "node-ip", env = "NODE_IP", value_delimiter = ',')]
    pub node_ips: Vec<Ipv4Addr>,
    /// Interfaces that get the tc programs for NodePort and externalIP traffic from outside the
    /// node, comma-separated, or `none`. Default: the interfaces holding a node IP and those of
    /// the default route (never loopback, bridges, bridge ports or veths).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Backend selection for Services without a `weir.dev/lb-algorithm` annotation.
    #[arg(long, value_enum, default_value_t = Algorithm::Random)]
    pub lb_algorithm: Algorithm,
    /// Maglev table size (a prime, at most 16381); must be equal on every node.
    #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE)]
    pub maglev_table_size: u32,
    /// Maglev seed; must be equal on every node.
    #[arg(long, default_value_t = maglev::DEFAULT_SEED)]
    pub maglev_seed: u64,
    /// Serve Prometheus metrics (per-Service counters) on this address at /metrics.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
}

/// Loads the programs, reconciles the maps with the API server and follows it until `shutdown`.
/// The programs keep serving from the pinned maps after this returns.
pub async fn run(
    args: Args,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    if !maglev::valid_table_size(args.maglev_table_size) {
        return Err(Error::Config {
            field: "--maglev-table-size",
            reason: format!(
                "{} is not a prime between 2 and {}",
                args.maglev_table_size,
                weir_lb_common::MAGLEV_MAX
            ),
        });
    }
    let cgroup = match args.cgroup {
        Some(path) => path,
        None => default_cgroup()?,
    };
    ensure_cgroup(&cgroup)?;
    let maps = load_and_attach(&args.bpf_root, &cgroup)?;
    let (devices, node_ips) = devices_and_node_ips(&args.devices, &args.node_ips)?;
    let attached = tc::TcPrograms::load(&args.bpf_root)
        .and_then(|mut progs| progs.attach(&args.bpf_root, &devices));
    match attached {
        Ok(()) => tracing::info!(
            ?devices,
            ?node_ips,
            "tc programs attached for NodePorts and externalIPs"
        ),
        // Devices the operator named must work; detected ones may not suit tc (the socket
        // path serves pods and the host either way).
        Err(e) if args.devices.is_empty() => tracing::warn!(
            ?devices,
            "no NodePort/externalIP service from outside the node: {e}"
        ),
        Err(e) => return Err(e),
    }
    let syncer = Syncer::new(
        maps,
        MaglevConfig {
            table_size: args.maglev_table_size,
            seed: args.maglev_seed,
        },
    )?;
    // kube-proxy's service health server, on the addresses NodePorts are served on.
    let health = health::HealthServer::new(&node_ips, shutdown.clone());
    let cfg = ModelConfig {
        node_name: args.node_name,
        node_ips,
        default_algorithm: args.lb_algorithm,
    };
    let metrics = metrics::LbMetrics::new();
    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("bind metrics {addr}"), e))?;
        tokio::spawn(metrics.clone().serve(listener, shutdown.clone()));
    }
    // Connected UDP sockets left on a removed backend are destroyed, so they reconnect.
    let stale = watch::stale::StaleUdp::new(&args.bpf_root, &cgroup);
    watch::run_with(
        client,
        syncer,
        cfg,
        metrics,
        Some(stale),
        Some(health),
        shutdown,
    )
    .await
}

/// The `--devices` and `--node-ip` in effect: given ones as they are, missing ones detected.
/// `--devices none` attaches to no interface (the detached state is then reconciled too).
fn devices_and_node_ips(
    devices: &[String],
    node_ips: &[Ipv4Addr],
) -> Result<(Vec<String>, Vec<Ipv4Addr>), Error> {
    let devices = match devices {
        [] => tc::detect_devices(node_ips)?,
        [none] if none == "none" => Vec::new(),
        given => given.to_vec(),
    };
    let node_ips = if node_ips.is_empty() {
        tc::detect_node_ips(&devices)?
    } else {
        node_ips.to_vec()
    };
    Ok((devices, node_ips))
}

/// `<cgroup2 mount>/weir`: the subtree the node agent puts pods in.
pub fn default_cgroup() -> Result<PathBuf, Error> {
    cgroup2_mounts()?
        .into_iter()
        .next()
        .map(|mnt| mnt.join("weir"))
        .ok_or_else(|| Error::Config {
            field: "--cgroup",
            reason: "no cgroup2 mount on this host".into(),
        })
}

/// Mount points of cgroup2, in /proc/self/mountinfo order.
fn cgroup2_mounts() -> Result<Vec<PathBuf>, Error> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read /proc/self/mountinfo".into(), e))?;
    Ok(parse_cgroup2_mounts(&mountinfo))
}

fn parse_cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let mount_point = f.get(4)?;
            (f.get(sep + 1) == Some(&"cgroup2")).then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// Creates `cgroup` if needed and refuses a cgroup2 mount root: hooks there would catch every
/// process on the machine.
pub fn ensure_cgroup(cgroup: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(cgroup)
        .map_err(|e| Error::io(format!("create cgroup {}", cgroup.display()), e))?;
    let canon = cgroup
        .canonicalize()
        .map_err(|e| Error::io(format!("resolve {}", cgroup.display()), e))?;
    let mounts = cgroup2_mounts()?;
    if mounts.contains(&canon) {
        return Err(Error::Config {
            field: "--cgroup",
            reason: format!(
                "{} is a cgroup2 root; use a subtree of it",
                cgroup.display()
            ),
        });
    }
    if !mounts.iter().any(|mnt| canon.starts_with(mnt)) {
        return Err(Error::Config {
            field: "--cgroup",
            reason: format!("{} is not inside a cgroup2 mount", cgroup.display()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mount_is_found_on_hybrid_and_unified_hosts() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/cpu rw,relatime shared:12 - cgroup cgroup rw,cpu\n\
                      41 25 0:36 / /sys/fs/cgroup/unified rw,relatime shared:18 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mounts(hybrid),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        let unified =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mounts(unified),
            vec![PathBuf::from("/sys/fs/cgroup")]
        );
        assert!(parse_cgroup2_mounts("garbage\n\n1 2 3\n").is_empty());
    }

    #[test]
    fn the_default_cgroup_is_weir_under_this_hosts_cgroup2_mount() {
        let cgroup = default_cgroup().expect("this host mounts cgroup2");
        assert_eq!(cgroup.file_name().and_then(|n| n.to_str()), Some("weir"));
        assert!(
            cgroup2_mounts()
                .expect("mounts")
                .iter()
                .any(|m| cgroup.starts_with(m))
        );
    }
}
