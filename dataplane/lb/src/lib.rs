//! weir's eBPF service load balancer: loads and pins the BPF programs and keeps their maps in
//! step with Services and EndpointSlices.
//!
//! Data flow: API server → [`watch`] (kube-rs reflectors: the snapshot) → [`model::desired`]
//! (what the maps should hold) → [`plan::plan`] (the diff against a mirror of the maps) →
//! [`maps::LbMaps::apply`] (only those writes). The BPF side is `ebpf/lb-ebpf`.

mod batch;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod netlab;
pub mod plan;
pub mod routes;
pub mod watch;

use std::net::{SocketAddr, SocketAddrV4};
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
}

impl Error {
    pub(crate) fn io(context: String, source: std::io::Error) -> Self {
        Self::Io { context, source }
    }
}

/// One frontend as `weir lb list` shows it, read from the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListRow {
    pub frontend: SocketAddrV4,
    pub proto: &'static str,
    pub id: u32,
    pub algorithm: Algorithm,
    pub affinity_timeout_secs: Option<u32>,
    pub backends: Vec<SocketAddrV4>,
    pub counters: Counters,
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

    fn write(&mut self, plan: Plan) -> Result<usize, Error> {
        if plan.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.maps.apply(&plan) {
            // Part of the plan may have landed: take the maps as the truth again.
            self.state = self.maps.read_state()?;
            return Err(e);
        }
        self.state.apply(&plan);
        Ok(plan.writes())
    }

    pub fn maps(&self) -> &LbMaps {
        &self.maps
    }

    pub fn state(&self) -> &MapState {
        &self.state
    }
}

/// `weir lb` / the load balancer part of `weir up`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = maps::DEFAULT_BPF_ROOT)]
    pub bpf_root: PathBuf,
    /// cgroup v2 directory whose processes get socket load balancing (created if missing;
    /// never the cgroup2 root).
    #[arg(long, default_value = "/sys/fs/cgroup/unified/weir")]
    pub cgroup: PathBuf,
    /// This node's name, for `internalTrafficPolicy: Local`.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
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
    ensure_cgroup(&args.cgroup)?;
    let maps = load_and_attach(&args.bpf_root, &args.cgroup)?;
    let syncer = Syncer::new(
        maps,
        MaglevConfig {
            table_size: args.maglev_table_size,
            seed: args.maglev_seed,
        },
    )?;
    let cfg = ModelConfig {
        node_name: args.node_name,
        default_algorithm: args.lb_algorithm,
    };
    let metrics = metrics::LbMetrics::new();
    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("bind metrics {addr}"), e))?;
        tokio::spawn(metrics.clone().serve(listener, shutdown.clone()));
    }
    watch::run(client, syncer, cfg, metrics, shutdown).await
}

/// Creates `cgroup` if needed and refuses a cgroup2 mount root: hooks there would catch every
/// process on the machine.
pub fn ensure_cgroup(cgroup: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(cgroup)
        .map_err(|e| Error::io(format!("create cgroup {}", cgroup.display()), e))?;
    let canon = cgroup
        .canonicalize()
        .map_err(|e| Error::io(format!("resolve {}", cgroup.display()), e))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read /proc/self/mountinfo".into(), e))?;
    let mut is_cgroup2 = false;
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.get(sep + 1) != Some(&"cgroup2") {
            continue;
        }
        let mnt = Path::new(f.get(4).copied().unwrap_or_default());
        if canon == mnt {
            return Err(Error::Config {
                field: "--cgroup",
                reason: format!(
                    "{} is a cgroup2 root; use a subtree of it",
                    cgroup.display()
                ),
            });
        }
        is_cgroup2 |= canon.starts_with(mnt);
    }
    if !is_cgroup2 {
        return Err(Error::Config {
            field: "--cgroup",
            reason: format!("{} is not inside a cgroup2 mount", cgroup.display()),
        });
    }
    Ok(())
}
