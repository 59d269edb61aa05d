//! The agent's side of the API: `weir node`. It registers the Node (capacity, addresses,
//! the log endpoint), obtains the node's pod CIDR, heartbeats through a Lease in
//! `kube-node-lease`, keeps routes to the other nodes' pod CIDRs, runs the pods bound to it
//! and writes their status back, and finishes graceful deletions.
//!
//! Pod CIDRs: when the control plane has not set `spec.podCIDR`, the agent claims the first
//! free /24 of the cluster CIDR itself by creating a Lease `podcidr-<a.b.c.d>-<len>` in
//! `kube-system` held by the node. A create is atomic in the store, so two agents never
//! claim one CIDR; a claim held by a node that no longer exists is taken over with a
//! compare-and-swap replace.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt, future::BoxFuture};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::cgroup::Cgroups;
use crate::env::Lookup;
use crate::logs::LogServer;
use crate::network::{Ipv4Cidr, PodNetwork};
use crate::pod::{Runtime, Update};

/// `weir node`: run this machine (or a network namespace playing one) as a cluster node.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// URL of the API server.
    #[arg(long)]
    pub server: String,
    /// Bearer token for the API server.
    #[arg(long, env = "WEIR_TOKEN", hide_env_values = true)]
    pub token: String,
    /// CA certificate (PEM) that signed the API server's certificate.
    #[arg(long)]
    pub certificate_authority: Option<PathBuf>,
    /// Skip verifying the API server's certificate (tests only).
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,
    /// Name of the Node object; defaults to the host name.
    #[arg(long)]
    pub node_name: Option<String>,
    /// The node's address (InternalIP, pods' hostIP, next hop for other nodes' pod routes);
    /// defaults to the first global IPv4 address of the node's namespace.
    #[arg(long)]
    pub node_ip: Option<Ipv4Addr>,
    /// Named network namespace (under /run/netns) that plays the node: the bridge and pod
    /// routes live there. Default: the agent's own namespace, as on a real host.
    #[arg(long)]
    pub netns: Option<String>,
    /// Pods, IPAM and logs are kept here.
    #[arg(long, default_value = "/var/lib/weir/agent")]
    pub state_dir: PathBuf,
    /// The cluster DNS address written into pods' resolv.conf.
    #[arg(long, default_value = "10.96.0.10")]
    pub cluster_dns: Ipv4Addr,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The range node pod CIDRs (/24 each) are taken from.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: Ipv4Cidr,
    /// Address of the agent's log endpoint (the `pods/log` backend).
    #[arg(long, default_value = "127.0.0.1:10250")]
    pub listen: std::net::SocketAddr,
    /// The URL the API server uses to reach the log endpoint; defaults to `http://<listen>`,
    /// with the node IP in place of an unspecified address such as `0.0.0.0`.
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// cgroup subtree of this agent's pods; defaults to `weir/<node name>`.
    #[arg(long)]
    pub cgroup_subtree: Option<String>,
    /// Heartbeat (Lease renewal and node status) interval.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub heartbeat: Duration,
    /// `spec.leaseDurationSeconds` of the node's Lease: how long each renewal claims the
    /// node is alive (the kubelet's flag of this name, default 40).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(i32).range(1..))]
    pub node_lease_duration_seconds: i32,
    /// First delay of the restart back-off (doubling up to 300 s).
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub backoff: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.trim_end_matches('s')
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("invalid duration {s:?}: give seconds, e.g. 10 or 0.5"))
}

/// The annotation on the Node that tells the API server where `pods/log` is served.
pub const LOG_ENDPOINT_ANNOTATION: &str = "weir.dev/agent-endpoint";
/// Name prefix of the Leases that record pod CIDR claims (in `kube-system`).
pub const CIDR_LEASE_PREFIX: &str = "podcidr-";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("API server: {context}: {source}")]
    Api {
        context: String,
        source: kube::Error,
    },
    #[error("invalid API client configuration: {0}")]
    Client(String),
    #[error("no node address: pass --node-ip (no global IPv4 address in the node's namespace)")]
    NoNodeIp,
    #[error("no free /24 left in the cluster CIDR {0}")]
    NoCidr(Ipv4Cidr),
    #[error("node's spec.podCIDR {value:?} is invalid: {source}")]
    BadPodCidr {
        value: String,
        source: crate::network::Error,
    },
    #[error(transparent)]
    Network(#[from] crate::network::Error),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::Error),
    #[error("log endpoint {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

fn api(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let context = context.into();
    move |source| Error::Api { context, source }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl Args {
    /// A kube client for `--server`, `--token` and the TLS flags.
    pub fn client(&self) -> Result<kube::Client, Error> {
        let uri: http::Uri = self
            .server
            .parse()
            .map_err(|e| Error::Client(format!("--server {:?}: {e}", self.server)))?;
        let mut config = kube::Config::new(uri);
        config.auth_info.token = Some(self.token.clone().into());
        config.root_cert_file = self.certificate_authority.clone();
        config.accept_invalid_certs = self.insecure_skip_tls_verify;
        kube::Client::try_from(config).map_err(|e| Error::Client(e.to_string()))
    }
}

/// ConfigMaps and Secrets for container environments, read from the API server.
struct ApiLookup(kube::Client);

impl Lookup for ApiLookup {
    fn config_map<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, String>> {
        async move {
            let api: Api<ConfigMap> = Api::namespaced(self.0.clone(), namespace);
            let cm = api
                .get_opt(name)
                .await
                .map_err(|e| format!("configmap {name:?}: {e}"))?;
            Ok(cm.map(|cm| cm.data.unwrap_or_default()))
        }
        .boxed()
    }

    fn secret<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, String>> {
        async move {
            let api: Api<Secret> = Api::namespaced(self.0.clone(), namespace);
            let secret = api
                .get_opt(name)
                .await
                .map_err(|e| format!("secret {name:?}: {e}"))?;
            Ok(secret.map(|s| {
                let mut data: BTreeMap<String, String> = s.string_data.unwrap_or_default();
                for (k, v) in s.data.unwrap_or_default() {
                    data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
                }
                data
            }))
        }
        .boxed()
    }
}

/// The Node name an agent registers when `--node-name` is not given: the host name, lower-cased.
pub fn default_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
        .to_lowercase()
}

/// The first global IPv4 address in the node's namespace (not on the pod bridge).
pub async fn detect_node_ip(netns: Option<&str>) -> Option<Ipv4Addr> {
    let mut cmd = tokio::process::Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let out = cmd
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.get(1) == Some(&crate::network::BRIDGE) {
                return None;
            }
            let i = words.iter().position(|w| *w == "inet")?;
            words.get(i + 1)?.split('/').next()?.parse().ok()
        })
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Capacity of the machine: CPUs, memory, and the kubelet's default of 110 pods.
fn capacity() -> BTreeMap<String, Quantity> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_kib = read_trim("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    BTreeMap::from([
        ("cpu".to_string(), Quantity(cpus.to_string())),
        ("memory".to_string(), Quantity(format!("{mem_kib}Ki"))),
        ("pods".to_string(), Quantity("110".into())),
    ])
}

/// The Node's status; `ready_since` is when this agent turned the node Ready.
fn node_status(
    node_ip: Ipv4Addr,
    name: &str,
    advertise: &str,
    ready_since: &Time,
) -> serde_json::Value {
    let capacity = capacity();
    let now = Time(Timestamp::now());
    let port: u16 = advertise
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(10250);
    let os = read_trim("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into());
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "addresses": [
            {"type": "InternalIP", "address": node_ip.to_string()},
            {"type": "Hostname", "address": name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "weir agent is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": ready_since,
        }],
        "nodeInfo": {
            "machineID": read_trim("/etc/machine-id"),
            "systemUUID": read_trim("/sys/class/dmi/id/product_uuid"),
            "bootID": read_trim("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": read_trim("/proc/sys/kernel/osrelease"),
            "osImage": os,
            "containerRuntimeVersion": concat!("weir-process://", env!("CARGO_PKG_VERSION")),
            "kubeletVersion": "v1.33.0-weir",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        },
    })
}

/// Creates the Node if missing and returns it.
async fn register(nodes: &Api<Node>, name: &str, advertise: &str) -> Result<Node, Error> {
    if let Some(node) = nodes
        .get_opt(name)
        .await
        .map_err(api(format!("get node {name}")))?
    {
        let patch = json!({"metadata": {"annotations": {LOG_ENDPOINT_ANNOTATION: advertise}}});
        return nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api(format!("annotate node {name}")))
            .or(Ok(node));
    }
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            },
            "annotations": {LOG_ENDPOINT_ANNOTATION: advertise},
        },
        "spec": {},
    }))
    .map_err(|e| Error::Client(e.to_string()))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(node) => Ok(node),
        Err(e) if is_status(&e, 409) => nodes
            .get(name)
            .await
            .map_err(api(format!("get node {name}"))),
        Err(e) => Err(api(format!("create node {name}"))(e)),
    }
}

fn cidr_lease_name(cidr: Ipv4Cidr) -> String {
    format!("{CIDR_LEASE_PREFIX}{}-{}", cidr.network(), cidr.prefix())
}

/// The node's pod CIDR: `spec.podCIDR` if set, else a /24 claimed race-free (module docs).
async fn pod_cidr(
    client: &kube::Client,
    node: &Node,
    cluster: Ipv4Cidr,
) -> Result<Ipv4Cidr, Error> {
    let name = node.metadata.name.clone().unwrap_or_default();
    if let Some(value) = node.spec.as_ref().and_then(|s| s.pod_cidr.clone()) {
        return value
            .parse()
            .map_err(|source| Error::BadPodCidr { value, source });
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let nodes: Api<Node> = Api::all(client.clone());
    let count = 1u64 << 24u32.saturating_sub(u32::from(cluster.prefix())).min(16);
    let mut claimed = None;
    for i in 0..count {
        let Some(base) = cluster.nth(i * 256) else {
            break;
        };
        let cidr = Ipv4Cidr::new(base, 24)?;
        let lease_name = cidr_lease_name(cidr);
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(lease_name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.clone()),
                ..Default::default()
            }),
        };
        match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => {
                claimed = Some(cidr);
                break;
            }
            Err(e) if is_status(&e, 409) => {}
            Err(e) => return Err(api(format!("claim pod CIDR {cidr}"))(e)),
        }
        let Some(existing) = leases
            .get_opt(&lease_name)
            .await
            .map_err(api(format!("get lease {lease_name}")))?
        else {
            continue;
        };
        let holder = existing
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        if holder == name {
            claimed = Some(cidr);
            break;
        }
        let holder_exists = nodes
            .get_opt(&holder)
            .await
            .map_err(api(format!("get node {holder}")))?
            .is_some();
        if !holder_exists {
            let mut takeover = existing.clone();
            takeover.spec = lease.spec.clone();
            // replace carries the lease's resourceVersion: a compare-and-swap.
            if leases
                .replace(&lease_name, &PostParams::default(), &takeover)
                .await
                .is_ok()
            {
                claimed = Some(cidr);
                break;
            }
        }
    }
    let cidr = claimed.ok_or(Error::NoCidr(cluster))?;
    let patch = json!({"spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}});
    nodes
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(api(format!("set podCIDR of node {name}")))?;
    tracing::info!(node = %name, %cidr, "claimed pod CIDR");
    Ok(cidr)
}

/// Renews the node's Lease in kube-node-lease (creating it on first use).
async fn renew_lease(leases: &Api<Lease>, name: &str, duration_seconds: i32) -> Result<(), Error> {
    let now = MicroTime(Timestamp::now());
    let patch = json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": duration_seconds, "renewTime": now}});
    match leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => {
            let lease = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name.into()),
                    lease_duration_seconds: Some(duration_seconds),
                    renew_time: Some(now.clone()),
                    acquire_time: Some(now),
                    ..Default::default()
                }),
            };
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map(drop)
                .map_err(api("create node lease"))
        }
        Err(e) => Err(api("renew node lease")(e)),
    }
}

/// Where the API server reaches the log endpoint bound to `listen`: that address, or the
/// node's own address when it is bound to all addresses (`0.0.0.0` is no address to dial,
/// and an API server on another host reaches this node by its InternalIP).
fn default_advertise_url(listen: std::net::SocketAddr, node_ip: Ipv4Addr) -> String {
    if listen.ip().is_unspecified() {
        format!("http://{node_ip}:{}", listen.port())
    } else {
        format!("http://{listen}")
    }
}

/// Routes to every other node's pod CIDR via its InternalIP.
fn routes_from(nodes: &HashMap<String, Node>, me: &str) -> Vec<(Ipv4Cidr, Ipv4Addr)> {
    nodes
        .values()
        .filter(|n| n.metadata.name.as_deref() != Some(me))
        .filter_map(|n| {
            let cidr: Ipv4Cidr = n.spec.as_ref()?.pod_cidr.as_ref()?.parse().ok()?;
            let ip = n
                .status
                .as_ref()?
                .addresses
                .iter()
                .flatten()
                .find(|a| a.type_ == "InternalIP")?
                .address
                .parse()
                .ok()?;
            Some((cidr, ip))
        })
        .collect()
}

/// Runs the node agent until `shutdown`. Pods keep running when it returns: a restarted
/// agent adopts them.
pub async fn run(
    args: Args,
    client: kube::Client,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let name = args.node_name.clone().unwrap_or_else(default_node_name);
    let node_ip = match args.node_ip {
        Some(ip) => ip,
        None => detect_node_ip(args.netns.as_deref())
            .await
            .ok_or(Error::NoNodeIp)?,
    };
    let log_server = LogServer::bind(args.listen, &args.state_dir)
        .await
        .map_err(|source| Error::Listen {
            addr: args.listen,
            source,
        })?;
    let listen = log_server.local_addr().map_err(|source| Error::Listen {
        addr: args.listen,
        source,
    })?;
    let advertise = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| default_advertise_url(listen, node_ip));

    let nodes: Api<Node> = Api::all(client.clone());
    let mut shutdown = std::pin::pin!(shutdown);
    // The API server may still be starting (`weir up` starts both at once): retry what
    // fails for lack of it, give up on anything else.
    let mut delay = Duration::from_millis(200);
    let cidr = loop {
        let attempt = async {
            let node = register(&nodes, &name, &advertise).await?;
            pod_cidr(&client, &node, args.cluster_cidr).await
        };
        match attempt.await {
            Ok(cidr) => break cidr,
            Err(Error::Api { context, source }) => {
                tracing::warn!(%context, error = %source, retry_in = ?delay, "cannot register node yet");
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    };
    let network = PodNetwork::new(args.netns.clone(), cidr, args.state_dir.join("ipam"));
    network.ensure_bridge().await?;
    network.guard(args.cluster_cidr).await?;
    let subtree = args
        .cgroup_subtree
        .clone()
        .unwrap_or_else(|| format!("weir/{name}"));
    let cgroups = Cgroups::detect(&subtree)?;
    let ready_since = Time(Timestamp::now());
    let status = node_status(node_ip, &name, &advertise, &ready_since);
    nodes
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await
        .map_err(api(format!("update status of node {name}")))?;
    tracing::info!(node = %name, %node_ip, %cidr, logs = %advertise, "node registered");

    let stop = CancellationToken::new();
    let rt = Arc::new(Runtime {
        node_name: name.clone(),
        node_ip,
        state_dir: args.state_dir.clone(),
        cluster_dns: args.cluster_dns,
        cluster_domain: args.cluster_domain.clone(),
        backoff_initial: args.backoff,
        backoff_max: Duration::from_secs(300).max(args.backoff),
        network: network.clone(),
        cgroups,
        lookup: Arc::new(ApiLookup(client.clone())),
    });
    let (mut agent, mut updates) = Agent::new(rt, stop.clone());
    let logs = tokio::spawn(log_server.serve(stop.clone()));

    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let pods: Api<Pod> = Api::all(client.clone());
    let mut pod_events = watcher(
        pods,
        watcher::Config::default().fields(&format!("spec.nodeName={name}")),
    )
    .default_backoff()
    .boxed();
    let mut node_events = watcher(nodes.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut heartbeat = tokio::time::interval(args.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listing: Option<Vec<Pod>> = None;
    let mut all_nodes: HashMap<String, Node> = HashMap::new();
    let mut node_listing: Option<HashMap<String, Node>> = None;
    let mut publisher = Publisher {
        client: client.clone(),
        node: name.clone(),
        pending: HashMap::new(),
    };

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = heartbeat.tick() => {
                publisher.retry().await;
                if let Err(e) = renew_lease(&leases, &name, args.node_lease_duration_seconds).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
                let status = node_status(node_ip, &name, &advertise, &ready_since);
                let patch = json!({"status": {"conditions": status["conditions"]}});
                if let Err(e) = nodes.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    tracing::warn!(error = %e, "node status update failed");
                }
            }
            Some(event) = pod_events.next() => match event {
                Ok(watcher::Event::Init) => listing = Some(Vec::new()),
                Ok(watcher::Event::InitApply(pod)) => listing.get_or_insert_with(Vec::new).push(pod),
                Ok(watcher::Event::InitDone) => agent.resync(listing.take().unwrap_or_default()).await,
                Ok(watcher::Event::Apply(pod)) => agent.sync(pod),
                Ok(watcher::Event::Delete(pod)) => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        agent.delete(uid);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
            },
            Some(event) = node_events.next() => {
                let changed = match event {
                    Ok(watcher::Event::Init) => { node_listing = Some(HashMap::new()); false }
                    Ok(watcher::Event::InitApply(n)) => {
                        node_listing.get_or_insert_with(HashMap::new).insert(n.metadata.name.clone().unwrap_or_default(), n);
                        false
                    }
                    Ok(watcher::Event::InitDone) => { all_nodes = node_listing.take().unwrap_or_default(); true }
                    Ok(watcher::Event::Apply(n)) => { all_nodes.insert(n.metadata.name.clone().unwrap_or_default(), n); true }
                    Ok(watcher::Event::Delete(n)) => { all_nodes.remove(n.metadata.name.as_deref().unwrap_or_default()); true }
                    Err(e) => { tracing::warn!(error = %e, "node watch failed; retrying"); false }
                };
                if changed && let Err(e) = network.sync_routes(&routes_from(&all_nodes, &name)).await {
                    tracing::warn!(error = %e, "cannot sync routes to other nodes");
                }
            }
            Some(update) = updates.recv() => publisher.publish(update).await,
        }
    }
    stop.cancel();
    let _ = logs.await;
    tracing::info!(node = %name, "agent stopped; pods keep running");
    Ok(())
}

/// Writes worker updates to the API server, keeping the ones that failed for a transient
/// reason to retry on the next heartbeat, so pod status converges after an API outage.
struct Publisher {
    client: kube::Client,
    node: String,
    pending: HashMap<String, Update>,
}

impl Publisher {
    async fn publish(&mut self, update: Update) {
        let (uid, result) = match &update {
            Update::Event {
                namespace,
                name,
                uid,
                warning,
                reason,
                message,
            } => {
                // Events are best effort, as the kubelet's: never retried.
                let events: Api<CoreEvent> = Api::namespaced(self.client.clone(), namespace);
                let now = Timestamp::now();
                let event = json!({
                    "metadata": {"name": format!("{name}.{:x}", now.as_nanosecond()), "namespace": namespace},
                    "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name, "uid": uid},
                    "reason": reason,
                    "message": message,
                    "type": if *warning { "Warning" } else { "Normal" },
                    "source": {"component": "kubelet", "host": self.node},
                    "reportingComponent": "kubelet",
                    "reportingInstance": self.node,
                    "firstTimestamp": Time(now),
                    "lastTimestamp": Time(now),
                    "count": 1,
                });
                let created = match serde_json::from_value::<CoreEvent>(event) {
                    Ok(event) => events
                        .create(&PostParams::default(), &event)
                        .await
                        .map(drop),
                    Err(e) => Err(kube::Error::SerdeError(e)),
                };
                if let Err(e) = created {
                    tracing::debug!(pod = %format!("{namespace}/{name}"), error = %e, "cannot record event");
                }
                return;
            }
            Update::Status {
                namespace,
                name,
                uid,
                status,
            } => {
                // The `test` op makes the patch fail for a newer pod that reuses the name.
                let patch = json!([
                    {"op": "test", "path": "/metadata/uid", "value": uid},
                    {"op": "add", "path": "/status", "value": status},
                ]);
                let url = format!("/api/v1/namespaces/{namespace}/pods/{name}/status");
                let result = match serde_json::to_vec(&patch).map(|body| {
                    http::Request::patch(url)
                        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
                        .body(body)
                }) {
                    Ok(Ok(req)) => self.client.request::<Pod>(req).await.map(drop),
                    Ok(Err(e)) => Err(kube::Error::HttpError(e)),
                    Err(e) => Err(kube::Error::SerdeError(e)),
                };
                (uid.clone(), result)
            }
            Update::Gone {
                namespace,
                name,
                uid,
            } => {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                (uid.clone(), pods.delete(name, &params).await.map(drop))
            }
        };
        match result {
            Ok(()) => {
                self.pending.remove(&uid);
            }
            // Gone, or a different pod by now: nothing left to write.
            Err(e) if [404, 409, 422].iter().any(|c| is_status(&e, *c)) => {
                self.pending.remove(&uid);
            }
            Err(e) => {
                tracing::warn!(%uid, error = %e, "pod update failed; will retry");
                self.pending.insert(uid, update);
            }
        }
    }

    async fn retry(&mut self) {
        let pending: Vec<Update> = self.pending.drain().map(|(_, u)| u).collect();
        for update in pending {
            self.publish(update).await;
        }
    }
}

#[cfg(test)]
mod tests;
