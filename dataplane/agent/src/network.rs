//! The pod network of one node: the `weir0` bridge in the node's network namespace, one
//! network namespace per pod joined to it by a veth pair, IPAM persisted on disk, and routes
//! to the other nodes' pod CIDRs.
//!
//! Links, addresses and routes are configured with iproute2 (`ip -n <netns> …`) rather than
//! an rtnetlink crate: a netlink socket acts in the namespace it was opened in, so driving
//! several namespaces from one multi-threaded tokio process would need a `setns` thread per
//! namespace; `ip -n` does exactly that in its own process, is the reference tool operators
//! debug with, and reports failures as readable text that we pass on.

use std::fmt;
use std::io::{ErrorKind, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::process::Command;

/// The bridge every pod veth is a port of.
pub const BRIDGE: &str = "weir0";
/// The route protocol number weir tags its inter-node routes with, so that it only ever
/// removes routes it installed itself.
const ROUTE_PROTO: &str = "77";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid CIDR {value:?}: {reason}")]
    Cidr { value: String, reason: &'static str },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("IPAM state in {dir}: {source}")]
    Ipam {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("pod CIDR {cidr} has no free address left")]
    Exhausted { cidr: Ipv4Cidr },
}

/// An IPv4 network, e.g. `10.244.1.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, Error> {
        if prefix > 32 {
            return Err(Error::Cidr {
                value: format!("{addr}/{prefix}"),
                reason: "prefix length is larger than 32",
            });
        }
        let mask = Self::mask(prefix);
        Ok(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Number of addresses in the network, including network and broadcast address.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The `n`th address of the network (0 is the network address itself).
    pub fn nth(&self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(u32::from(self.network) + n as u32))
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask(self.prefix) == u32::from(self.network)
    }

    /// The first usable address: the node's bridge address and the pods' gateway.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.nth(1)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self, Error> {
        let err = |reason| Error::Cidr {
            value: value.to_string(),
            reason,
        };
        let (addr, prefix) = value.split_once('/').ok_or(err("missing /prefix"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err("not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| err("prefix is not a number"))?;
        let cidr = Self::new(addr, prefix)?;
        if cidr.network != addr {
            return Err(err("host bits are set"));
        }
        Ok(cidr)
    }
}

/// Runs `ip`/`bridge`/`sysctl` commands, optionally inside a named network namespace.
async fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip [-n netns] args…`
async fn ip(netns: Option<&str>, args: &[&str]) -> Result<String, Error> {
    match netns {
        Some(ns) => {
            let mut full = vec!["-n", ns];
            full.extend_from_slice(args);
            run("ip", &full).await
        }
        None => run("ip", args).await,
    }
}

/// Addresses handed to pods, one file per address holding the owner's pod UID — the
/// layout of the CNI host-local plugin. Creating a file with `O_EXCL` is the allocation, so
/// two allocators never hand out one address and a restart never forgets a used one.
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    cidr: Ipv4Cidr,
}

impl Ipam {
    pub fn new(dir: impl Into<PathBuf>, cidr: Ipv4Cidr) -> Self {
        Self {
            dir: dir.into(),
            cidr,
        }
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::Ipam {
            dir: self.dir.clone(),
            source,
        }
    }

    /// The address already held by `owner`, if any.
    pub fn lookup(&self, owner: &str) -> Result<Option<Ipv4Addr>, Error> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io(e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| self.io(e))?;
            let Some(addr) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if self.cidr.contains(addr)
                && std::fs::read_to_string(entry.path()).map_err(|e| self.io(e))? == owner
            {
                return Ok(Some(addr));
            }
        }
        Ok(None)
    }

    /// Gives `owner` an address: the one it already holds, or the lowest free one (the
    /// network address, the gateway and the broadcast address are never handed out).
    pub fn allocate(&self, owner: &str) -> Result<Ipv4Addr, Error> {
        if let Some(addr) = self.lookup(owner)? {
            return Ok(addr);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(e))?;
        for n in 2..self.cidr.size().saturating_sub(1) {
            let Some(addr) = self.cidr.nth(n) else { break };
            let path = self.dir.join(addr.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(owner.as_bytes())
                        .and_then(|()| file.sync_all())
                        .map_err(|e| self.io(e))?;
                    return Ok(addr);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(self.io(e)),
            }
        }
        Err(Error::Exhausted { cidr: self.cidr })
    }

    /// Frees the address held by `owner` (nothing if it holds none).
    pub fn release(&self, owner: &str) -> Result<(), Error> {
        if let Some(addr) = self.lookup(owner)? {
            match std::fs::remove_file(self.dir.join(addr.to_string())) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(())
    }
}

/// The network side of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNet {
    /// Name of the pod's network namespace (under `/run/netns`).
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl PodNet {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

/// The pod network of this node.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    node_netns: Option<String>,
    cidr: Ipv4Cidr,
    ipam: Ipam,
}

impl PodNetwork {
    /// `node_netns` is the named namespace that plays the node (`None`: the namespace the
    /// agent runs in, as on a real host).
    pub fn new(node_netns: Option<String>, cidr: Ipv4Cidr, ipam_dir: impl Into<PathBuf>) -> Self {
        Self {
            ipam: Ipam::new(ipam_dir, cidr),
            node_netns,
            cidr,
        }
    }

    pub fn cidr(&self) -> Ipv4Cidr {
        self.cidr
    }

    fn node(&self) -> Option<&str> {
        self.node_netns.as_deref()
    }

    /// Creates the bridge with the CIDR's first address and turns on forwarding. Idempotent.
    pub async fn ensure_bridge(&self) -> Result<(), Error> {
        let gateway = self
            .cidr
            .gateway()
            .ok_or(Error::Exhausted { cidr: self.cidr })?;
        if ip(self.node(), &["link", "show", BRIDGE]).await.is_err() {
            ip(self.node(), &["link", "add", BRIDGE, "type", "bridge"]).await?;
        }
        let addr = format!("{gateway}/{}", self.cidr.prefix);
        ip(self.node(), &["addr", "replace", &addr, "dev", BRIDGE]).await?;
        ip(self.node(), &["link", "set", BRIDGE, "up"]).await?;
        let sysctl = ["sysctl", "-qw", "net.ipv4.ip_forward=1"];
        match self.node() {
            Some(ns) => {
                let mut args = vec!["netns", "exec", ns];
                args.extend_from_slice(&sysctl);
                run("ip", &args).await?;
            }
            None => {
                run(sysctl[0], &sysctl[1..]).await?;
            }
        }
        Ok(())
    }

    /// The node's own network namespace, where host-network pods run.
    pub fn node_netns_path(&self) -> PathBuf {
        match &self.node_netns {
            Some(ns) => Path::new("/run/netns").join(ns),
            None => PathBuf::from("/proc/self/ns/net"),
        }
    }

    /// The namespace name of a pod: derived from its UID, so it is unique across nodes that
    /// share one kernel (the two-node test) and found again after an agent restart.
    pub fn netns_name(uid: &str) -> String {
        format!("weir-{uid}")
    }

    /// The node-side veth name: at most 15 bytes (IFNAMSIZ - 1).
    fn veth_name(uid: &str) -> String {
        let id: String = uid
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(11)
            .collect();
        format!("veth{id}")
    }

    /// The network of a pod whose namespace already exists (agent restart), or `None`.
    pub fn existing(&self, uid: &str) -> Result<Option<PodNet>, Error> {
        let netns = Self::netns_name(uid);
        if !Path::new("/run/netns").join(&netns).exists() {
            return Ok(None);
        }
        Ok(self.ipam.lookup(uid)?.map(|ip| PodNet { netns, ip }))
    }

    /// Creates the pod's namespace, veth pair, address and default route. A half-built
    /// namespace from an earlier failed attempt is removed first.
    pub async fn setup_pod(&self, uid: &str) -> Result<PodNet, Error> {
        if let Some(net) = self.existing(uid)? {
            let eth0_up = ip(Some(&net.netns), &["-o", "addr", "show", "dev", "eth0"])
                .await
                .map(|out| out.contains(&format!("inet {}/", net.ip)))
                .unwrap_or(false);
            if eth0_up {
                return Ok(net);
            }
        }
        let netns = Self::netns_name(uid);
        let _ = run("ip", &["netns", "del", &netns]).await;
        let result = self.build_pod(uid, &netns).await;
        if result.is_err() {
            let _ = run("ip", &["netns", "del", &netns]).await;
            let _ = ip(self.node(), &["link", "del", &Self::veth_name(uid)]).await;
        }
        result
    }

    async fn build_pod(&self, uid: &str, netns: &str) -> Result<PodNet, Error> {
        let addr = self.ipam.allocate(uid)?;
        let gateway = self
            .cidr
            .gateway()
            .ok_or(Error::Exhausted { cidr: self.cidr })?
            .to_string();
        let veth = Self::veth_name(uid);
        run("ip", &["netns", "add", netns]).await?;
        let _ = ip(self.node(), &["link", "del", &veth]).await;
        #[rustfmt::skip]
        ip(self.node(), &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", netns]).await?;
        ip(self.node(), &["link", "set", &veth, "master", BRIDGE]).await?;
        // Hairpin lets a pod reach itself through a service address that the load balancer
        // rewrote to its own IP: the frame leaves and re-enters the same bridge port.
        ip(
            self.node(),
            &[
                "link",
                "set",
                &veth,
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ],
        )
        .await?;
        ip(self.node(), &["link", "set", &veth, "up"]).await?;
        let cidr = format!("{addr}/{}", self.cidr.prefix);
        ip(Some(netns), &["link", "set", "lo", "up"]).await?;
        ip(Some(netns), &["addr", "add", &cidr, "dev", "eth0"]).await?;
        ip(Some(netns), &["link", "set", "eth0", "up"]).await?;
        ip(Some(netns), &["route", "add", "default", "via", &gateway]).await?;
        Ok(PodNet {
            netns: netns.to_string(),
            ip: addr,
        })
    }

    /// Removes the pod's veth pair and namespace, and frees its address. The veth is
    /// deleted first, explicitly: a deleted namespace frees its devices later, from a kernel
    /// work queue, and not at all while a process still holds the namespace.
    pub async fn teardown_pod(&self, uid: &str) -> Result<(), Error> {
        // Absent already when the pod's network was never built or was torn down before.
        let _ = ip(self.node(), &["link", "del", &Self::veth_name(uid)]).await;
        let netns = Self::netns_name(uid);
        if Path::new("/run/netns").join(&netns).exists() {
            run("ip", &["netns", "del", &netns]).await?;
        }
        self.ipam.release(uid)
    }

    /// Makes the whole cluster CIDR unreachable from the node, below the routes to this
    /// node's bridge and to other nodes: a pod address no node owns gets an ICMP error
    /// instead of leaving the host by its default route.
    pub async fn guard(&self, cluster: Ipv4Cidr) -> Result<(), Error> {
        let dst = cluster.to_string();
        #[rustfmt::skip]
        ip(self.node(), &["route", "replace", "unreachable", &dst, "proto", ROUTE_PROTO]).await?;
        Ok(())
    }

    /// Makes the node's routes to other nodes' pod CIDRs exactly `routes` (CIDR via node IP).
    pub async fn sync_routes(&self, routes: &[(Ipv4Cidr, Ipv4Addr)]) -> Result<(), Error> {
        let current = ip(self.node(), &["route", "show", "proto", ROUTE_PROTO]).await?;
        for line in current.lines() {
            // The `unreachable` guard route is kept (see `guard`).
            let Some(dst) = line
                .split_whitespace()
                .next()
                .filter(|d| *d != "unreachable")
            else {
                continue;
            };
            if !routes.iter().any(|(cidr, _)| cidr.to_string() == dst) {
                ip(self.node(), &["route", "del", dst, "proto", ROUTE_PROTO]).await?;
            }
        }
        for (cidr, via) in routes {
            if *cidr == self.cidr {
                continue;
            }
            let (dst, via) = (cidr.to_string(), via.to_string());
            #[rustfmt::skip]
            ip(self.node(), &["route", "replace", &dst, "via", &via, "proto", ROUTE_PROTO]).await?;
        }
        Ok(())
    }

    /// Removes the bridge (a node leaving for good, and tests).
    pub async fn remove_bridge(&self) -> Result<(), Error> {
        if ip(self.node(), &["link", "show", BRIDGE]).await.is_ok() {
            ip(self.node(), &["link", "del", BRIDGE]).await?;
        }
        Ok(())
    }
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns`: sockets it
/// creates belong to that namespace for their whole life, wherever they are used later.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let file = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| std::io::Error::other("network namespace thread panicked"))?
}

/// Opens a TCP connection from inside the network namespace at `netns` (probes, tests).
pub async fn connect_in(
    netns: &Path,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let netns = netns.to_path_buf();
    let stream = tokio::task::spawn_blocking(move || {
        in_netns(&netns, move || {
            std::net::TcpStream::connect_timeout(&addr, timeout)
        })
    })
    .await
    .map_err(std::io::Error::other)??;
    stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(stream)
}

#[cfg(test)]
mod tests;
