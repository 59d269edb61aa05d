//! Snapshot → desired state: which Service frontends exist and which backends each may use,
//! from Services and EndpointSlices as kube-proxy reads them. Pure; no I/O.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use weir_lb_common::{ALG_MAGLEV, ALG_RANDOM, ALG_ROUND_ROBIN, PROTO_TCP, PROTO_UDP};

/// The annotation that picks a Service's backend selection.
pub const ALGORITHM_ANNOTATION: &str = "weir.dev/lb-algorithm";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The index of slices by Service is rebuilt on every call; SipHash's DoS resistance buys
/// nothing for names the API server already validated.
type FastHash = foldhash::fast::RandomState;

/// Backend selection of a Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    #[default]
    Random,
    RoundRobin,
    Maglev,
}

impl Algorithm {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "random" => Some(Self::Random),
            "round-robin" => Some(Self::RoundRobin),
            "maglev" => Some(Self::Maglev),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::RoundRobin => "round-robin",
            Self::Maglev => "maglev",
        }
    }

    pub(crate) fn to_map(self) -> u8 {
        match self {
            Self::Random => ALG_RANDOM,
            Self::RoundRobin => ALG_ROUND_ROBIN,
            Self::Maglev => ALG_MAGLEV,
        }
    }

    pub(crate) fn from_map(v: u8) -> Self {
        match v {
            ALG_ROUND_ROBIN => Self::RoundRobin,
            ALG_MAGLEV => Self::Maglev,
            _ => Self::Random,
        }
    }
}

/// Per-node settings that shape the desired state.
#[derive(Clone, Debug, Default)]
pub struct ModelConfig {
    /// This node's name, for `internalTrafficPolicy: Local` and `externalTrafficPolicy: Local`
    /// (EndpointSlice `endpoints[].nodeName`).
    pub node_name: Option<String>,
    /// This node's addresses: every NodePort is a frontend `nodeIP:nodePort` on each.
    pub node_ips: Vec<Ipv4Addr>,
    /// Used when a Service has no `weir.dev/lb-algorithm` annotation.
    pub default_algorithm: Algorithm,
}

/// A frontend: what an application dials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: SocketAddrV4,
    pub proto: u8,
}

/// Which Service port a frontend belongs to (for listings and metrics).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

/// The desired content for one frontend. The frontends of one Service port (ClusterIP,
/// externalIPs, one per node IP) share their `service` and `backends`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub service: Arc<ServiceRef>,
    /// Sorted and unique; empty means "refuse connections".
    pub backends: Arc<[SocketAddrV4]>,
    /// `Some` for an external frontend (externalIP, load balancer IP, NodePort) of an
    /// `externalTrafficPolicy: Local` Service: its cluster-wide endpoints, for clients on this
    /// node (pods, host processes: the socket hooks), while `backends` holds this node's
    /// endpoints, for traffic from outside the node (the tc path). kube-proxy does the same
    /// ("short-circuiting" in-cluster traffic to the Service's cluster endpoints), whatever
    /// the `internalTrafficPolicy`. Programmed as a second map entry (`SCOPE_INTERNAL`) when
    /// the maps have room for it ([`crate::Plan::no_id`]).
    pub internal_backends: Option<Arc<[SocketAddrV4]>>,
    pub algorithm: Algorithm,
    /// `Some(timeout)` for `sessionAffinity: ClientIP`.
    pub affinity_timeout_secs: Option<u32>,
}

pub type Desired = BTreeMap<Frontend, DesiredFrontend>;

/// A Service field weir could not use; the Service's other frontends are still programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub service: String,
    pub reason: String,
}

/// Computes the desired frontends of every Service, with the problems found on the way.
pub fn desired(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    cfg: &ModelConfig,
) -> (Desired, Vec<Problem>) {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>, FastHash> =
        HashMap::with_capacity_and_hasher(slices.len(), FastHash::default());
    for s in slices.iter().map(Borrow::borrow) {
        if s.address_type != "IPv4" {
            continue;
        }
        let ns = s.metadata.namespace.as_deref().unwrap_or("default");
        if let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            by_service.entry((ns, svc.as_str())).or_default().push(s);
        }
    }
    // Collected unordered and sorted once at the end: BTreeMap builds from sorted input in
    // bulk, much cheaper than one insert per frontend.
    let mut out = Vec::with_capacity(services.len());
    let mut problems = Vec::new();
    // Reused for every Service: most have one address of each kind.
    let mut cluster_vips: Vec<Ipv4Addr> = Vec::new();
    let mut external_vips: Vec<Ipv4Addr> = Vec::new();
    let mut ready = Vec::new();
    let mut terminating = Vec::new();
    for svc in services.iter().map(Borrow::borrow) {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let mut problem = |reason: String| {
            problems.push(Problem {
                service: format!("{ns}/{name}"),
                reason,
            })
        };
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let algorithm = match svc.metadata.annotations.as_ref().and_then(|a| a.get(ALGORITHM_ANNOTATION)) {
            None => cfg.default_algorithm,
            Some(v) => Algorithm::parse(v).unwrap_or_else(|| {
                problem(format!(
                    "metadata.annotations[{ALGORITHM_ANNOTATION}]: unknown algorithm {v:?} (want random, round-robin or maglev); using {}",
                    cfg.default_algorithm.as_str()
                ));
                cfg.default_algorithm
            }),
        };
        let affinity_timeout_secs =
            (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                spec.session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS)
            });
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        // ClusterIPs follow internalTrafficPolicy; what is reached from outside the cluster
        // (externalIPs, load balancer IPs, NodePorts) follows externalTrafficPolicy.
        cluster_vips.clear();
        external_vips.clear();
        let cluster_ips = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter());
        let lb_ips = svc
            .status
            .iter()
            .flat_map(|st| st.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter_map(|i| i.ip.as_ref());
        let externals = spec.external_ips.iter().flatten().chain(lb_ips);
        for (ip, external) in cluster_ips
            .map(|ip| (ip, false))
            .chain(externals.map(|ip| (ip, true)))
        {
            if ip == "None" || ip.is_empty() {
                continue;
            }
            match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(v4)) if external => external_vips.push(v4),
                Ok(std::net::IpAddr::V4(v4)) => cluster_vips.push(v4),
                Ok(std::net::IpAddr::V6(_)) => {}
                Err(_) => problem(format!(
                    "spec.clusterIPs/externalIPs/status.loadBalancer: {ip:?} is not an IP address"
                )),
            }
        }
        for vips in [&mut cluster_vips, &mut external_vips] {
            vips.sort_unstable();
            vips.dedup();
        }
        let has_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let slices = by_service
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let local = |on: bool| on.then_some(cfg.node_name.as_deref());
        for port in spec.ports.iter().flatten() {
            let proto = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => PROTO_TCP,
                "UDP" => PROTO_UDP,
                _ => continue, // SCTP: socket hooks do not see it.
            };
            let Ok(vport) = u16::try_from(port.port) else {
                problem(format!("spec.ports[].port: {} is out of range", port.port));
                continue;
            };
            let node_port = match port.node_port.filter(|_| has_node_ports) {
                None => None,
                Some(p) => match u16::try_from(p) {
                    Ok(p) if p != 0 => Some(p),
                    _ => {
                        problem(format!("spec.ports[].nodePort: {p} is out of range"));
                        None
                    }
                },
            };
            let service = Arc::new(ServiceRef {
                namespace: ns.to_string(),
                name: name.to_string(),
                port: port.name.clone().unwrap_or_default(),
            });
            let mut add =
                |addrs: &mut dyn Iterator<Item = SocketAddrV4>,
                 backends: &Arc<[SocketAddrV4]>,
                 internal_backends: Option<&Arc<[SocketAddrV4]>>| {
                    for addr in addrs {
                        out.push((
                            Frontend { addr, proto },
                            DesiredFrontend {
                                service: service.clone(),
                                backends: backends.clone(),
                                internal_backends: internal_backends.cloned(),
                                algorithm,
                                affinity_timeout_secs,
                            },
                        ));
                    }
                };
            if !cluster_vips.is_empty() {
                let backends = backends_for(
                    port,
                    slices,
                    local(internal_local),
                    (&mut ready, &mut terminating),
                );
                add(
                    &mut cluster_vips.iter().map(|ip| SocketAddrV4::new(*ip, vport)),
                    &backends,
                    None,
                );
            }
            let node_addrs = node_port.into_iter().flat_map(|np| {
                cfg.node_ips
                    .iter()
                    .map(move |ip| SocketAddrV4::new(*ip, np))
            });
            let mut external = external_vips
                .iter()
                .map(|ip| SocketAddrV4::new(*ip, vport))
                .chain(node_addrs)
                .peekable();
            if external.peek().is_some() {
                let backends = backends_for(
                    port,
                    slices,
                    local(external_local),
                    (&mut ready, &mut terminating),
                );
                let internal = external_local
                    .then(|| backends_for(port, slices, None, (&mut ready, &mut terminating)));
                add(&mut external, &backends, internal.as_ref());
            }
        }
    }
    // Two Services claiming one frontend: the later one wins, as with one insert each.
    out.sort_by_key(|e| e.0);
    out.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
    (out.into_iter().collect(), problems)
}

/// Ready endpoints of `port`; only when none is ready, the serving terminating ones (KEP-1669).
/// `local` = `Some(node)` keeps only endpoints on that node (`internalTrafficPolicy` or
/// `externalTrafficPolicy: Local`). `scratch` are buffers reused across calls.
fn backends_for(
    port: &ServicePort,
    slices: &[&EndpointSlice],
    local: Option<Option<&str>>,
    scratch: (&mut Vec<SocketAddrV4>, &mut Vec<SocketAddrV4>),
) -> Arc<[SocketAddrV4]> {
    let want_name = port.name.as_deref().unwrap_or_default();
    let want_proto = port.protocol.as_deref().unwrap_or("TCP");
    let (ready, terminating) = scratch;
    ready.clear();
    terminating.clear();
    for slice in slices {
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == want_name
                && p.protocol.as_deref().unwrap_or("TCP") == want_proto
        }) else {
            continue;
        };
        let Some(tport) = target.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in &slice.endpoints {
            if let Some(node) = local
                && ep.node_name.as_deref() != node
            {
                continue;
            }
            let cond = ep.conditions.as_ref();
            // API contract: an unset `ready` means ready; unset `serving` follows `ready`.
            let is_ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let is_serving = cond.and_then(|c| c.serving).unwrap_or(is_ready);
            let is_terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                    continue;
                };
                let b = SocketAddrV4::new(ip, tport);
                if is_ready && !is_terminating {
                    ready.push(b);
                } else if is_serving && is_terminating {
                    terminating.push(b);
                }
            }
        }
    }
    let chosen = if ready.is_empty() { terminating } else { ready };
    chosen.sort_unstable();
    chosen.dedup();
    Arc::from(chosen.as_slice())
}

#[cfg(test)]
mod tests;
