//! Network-namespace fixtures for the load balancer's tests and benchmarks: a "node" namespace
//! with a bridge and no route off the machine, pods as namespaces on veths into that bridge, a
//! cgroup v2 subtree for the socket hooks, a client namespace outside the node (for NodePort
//! traffic), another node holding a backend, and threads that run inside a namespace.
//! Everything is removed on drop, also when a test panics.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The cgroup2 mount of this machine (hybrid layout: v1 at /sys/fs/cgroup).
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

/// A unique short name for this process: netns and interface names are length-limited.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ip args…` (in netns `ns` if given) and fails with its stderr.
pub fn ip(ns: Option<&str>, args: &[&str]) -> io::Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let out = cmd.args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Sets sysctl `key` inside network namespace `ns`.
pub fn sysctl(ns: &str, key: &str, value: &str) -> io::Result<()> {
    let kv = format!("{key}={value}");
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw", &kv])
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "sysctl {kv} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs `f` on a new thread that has entered network namespace `ns`; sockets it opens live there.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<T>> {
    let file = File::open(Path::new("/run/netns").join(ns))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        // SAFETY: setns on this thread only; the fd is valid for the call.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        let ok = rc == 0;
        let _ = tx.send(if ok {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        });
        if !ok {
            // The caller gets the error from the channel; this thread's result is never used.
            loop {
                std::thread::park();
            }
        }
        f()
    });
    rx.recv()
        .map_err(|_| io::Error::other("netns thread died"))??;
    Ok(handle)
}

/// A node: network namespace `host` with bridge `br0` at 10.244.0.1/24, forwarding on, and
/// only the bridge route — no way off the machine.
pub struct Lab {
    pub host: String,
    /// Every namespace besides `host` (pods, outside clients), deleted on drop.
    pods: Vec<String>,
}

/// A pod: its own namespace, `eth0` on the node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl Lab {
    pub fn new() -> io::Result<Self> {
        let host = unique("wlbh");
        ip(None, &["netns", "add", &host])?;
        let lab = Self {
            host,
            pods: Vec::new(),
        };
        let h = Some(lab.host.as_str());
        ip(h, &["link", "set", "lo", "up"])?;
        ip(h, &["link", "add", "br0", "type", "bridge"])?;
        ip(h, &["addr", "add", "10.244.0.1/24", "dev", "br0"])?;
        ip(h, &["link", "set", "br0", "up"])?;
        lab.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(lab)
    }

    /// Sets a sysctl inside the node namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        sysctl(&self.host, key, value)
    }

    /// Adds pod number `n` (1..=240) at 10.244.0.(10+n).
    pub fn add_pod(&mut self, n: u8) -> io::Result<Pod> {
        let ns = format!("{}p{n}", self.host);
        let pod_ip = Ipv4Addr::new(10, 244, 0, 10 + n);
        ip(None, &["netns", "add", &ns])?;
        self.pods.push(ns.clone());
        let (veth, peer) = (format!("v{n}"), format!("e{n}"));
        let h = Some(self.host.as_str());
        ip(
            h,
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", &ns,
            ],
        )?;
        ip(h, &["link", "set", &veth, "master", "br0"])?;
        ip(h, &["link", "set", &veth, "up"])?;
        // Hairpin: a pod that picks itself as a Service backend goes out and back on one port.
        ip(
            h,
            &[
                "link",
                "set",
                "dev",
                &veth,
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ],
        )?;
        let p = Some(ns.as_str());
        ip(p, &["link", "set", "lo", "up"])?;
        ip(p, &["link", "set", &peer, "name", "eth0"])?;
        ip(p, &["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"])?;
        ip(p, &["link", "set", "eth0", "up"])?;
        ip(p, &["route", "add", "default", "via", "10.244.0.1"])?;
        Ok(Pod { ns, ip: pod_ip })
    }
}

/// A machine outside the node, linked to it by a veth: what sends NodePort traffic from
/// outside. Its only routes lead to the node.
#[derive(Clone, Debug)]
pub struct External {
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The node's address on the link (its node IP) and the node-side interface.
    pub node_ip: Ipv4Addr,
    pub node_dev: String,
}

impl Lab {
    /// Adds a client outside the node: namespace `<host>x` at 192.168.77.1/24 on `eth0`, the
    /// node at 192.168.77.2/24 on `ext0`, and in the client a route via the node for each
    /// prefix of `via_node` (e.g. externalIPs).
    pub fn add_external(&mut self, via_node: &[&str]) -> io::Result<External> {
        let ns = format!("{}x", self.host);
        ip(None, &["netns", "add", &ns])?;
        self.pods.push(ns.clone());
        let ext = External {
            ns,
            ip: Ipv4Addr::new(192, 168, 77, 1),
            node_ip: Ipv4Addr::new(192, 168, 77, 2),
            node_dev: "ext0".into(),
        };
        let h = Some(self.host.as_str());
        ip(
            h,
            &[
                "link",
                "add",
                &ext.node_dev,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ext.ns,
            ],
        )?;
        ip(
            h,
            &[
                "addr",
                "add",
                &format!("{}/24", ext.node_ip),
                "dev",
                &ext.node_dev,
            ],
        )?;
        ip(h, &["link", "set", &ext.node_dev, "up"])?;
        let c = Some(ext.ns.as_str());
        ip(c, &["link", "set", "lo", "up"])?;
        ip(
            c,
            &["addr", "add", &format!("{}/24", ext.ip), "dev", "eth0"],
        )?;
        ip(c, &["link", "set", "eth0", "up"])?;
        for prefix in via_node {
            ip(
                c,
                &["route", "add", prefix, "via", &ext.node_ip.to_string()],
            )?;
        }
        Ok(ext)
    }
}

/// Another node, linked to this one by a veth, holding one backend pod's address: what a
/// Service endpoint on another node looks like from this node. Its only route is the link
/// itself, so it can answer this node but not an outside client directly.
#[derive(Clone, Debug)]
pub struct RemoteNode {
    pub ns: String,
    /// The other node's address on the link.
    pub ip: Ipv4Addr,
    /// The pod address it holds (10.244.1.x, routed by this node via `ip`).
    pub pod_ip: Ipv4Addr,
    /// This node's interface and address on the link.
    pub node_dev: String,
    pub node_ip: Ipv4Addr,
}

impl Lab {
    /// Adds a remote node: namespace `<host>r` at 192.168.78.2/24 on `eth0` holding
    /// 10.244.1.5/32, this node at 192.168.78.1/24 on `nb0` with a route to 10.244.1.0/24 via
    /// the remote node, as a node agent installs one per peer pod CIDR.
    pub fn add_remote_node(&mut self) -> io::Result<RemoteNode> {
        let ns = format!("{}r", self.host);
        ip(None, &["netns", "add", &ns])?;
        self.pods.push(ns.clone());
        let remote = RemoteNode {
            ns,
            ip: Ipv4Addr::new(192, 168, 78, 2),
            pod_ip: Ipv4Addr::new(10, 244, 1, 5),
            node_dev: "nb0".into(),
            node_ip: Ipv4Addr::new(192, 168, 78, 1),
        };
        let h = Some(self.host.as_str());
        let dev = remote.node_dev.as_str();
        ip(
            h,
            &[
                "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", &remote.ns,
            ],
        )?;
        ip(
            h,
            &["addr", "add", &format!("{}/24", remote.node_ip), "dev", dev],
        )?;
        ip(h, &["link", "set", dev, "up"])?;
        let r = Some(remote.ns.as_str());
        ip(r, &["link", "set", "lo", "up"])?;
        ip(
            r,
            &["addr", "add", &format!("{}/24", remote.ip), "dev", "eth0"],
        )?;
        ip(
            r,
            &["addr", "add", &format!("{}/32", remote.pod_ip), "dev", "lo"],
        )?;
        ip(r, &["link", "set", "eth0", "up"])?;
        // Answers leave from the pod address, as from a pod that has no other (an unconnected
        // UDP socket's source is the route's preferred source).
        let link = format!("{}/24", Ipv4Addr::from(remote.ip.to_bits() & !0xff));
        let src = remote.pod_ip.to_string();
        ip(r, &["route", "replace", &link, "dev", "eth0", "src", &src])?;
        ip(
            h,
            &[
                "route",
                "add",
                "10.244.1.0/24",
                "via",
                &remote.ip.to_string(),
            ],
        )?;
        Ok(remote)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.pods.iter().chain(std::iter::once(&self.host)) {
            let _ = ip(None, &["netns", "del", ns]);
        }
    }
}

/// A cgroup v2 directory of the test's own. [`TestCgroup::enter`] moves this whole process in
/// (cgroup membership is per process), drop moves it back and removes the directory.
pub struct TestCgroup {
    pub path: PathBuf,
    home: Option<PathBuf>,
}

impl TestCgroup {
    pub fn new() -> io::Result<Self> {
        let path = Path::new(CGROUP2_ROOT).join(unique("weir-lb-test-"));
        std::fs::create_dir(&path)?;
        Ok(Self { path, home: None })
    }

    pub fn enter(&mut self) -> io::Result<()> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/");
        self.home = Some(Path::new(CGROUP2_ROOT).join(rel.trim_start_matches('/')));
        std::fs::write(
            self.path.join("cgroup.procs"),
            std::process::id().to_string(),
        )
    }

    /// Moves this process back to where [`TestCgroup::enter`] found it.
    pub fn leave(&mut self) -> io::Result<()> {
        match self.home.take() {
            Some(home) => std::fs::write(home.join("cgroup.procs"), std::process::id().to_string()),
            None => Ok(()),
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = self.leave();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A bpffs directory of the test's own, removed (with every pin under it) on drop.
pub struct TestBpfRoot(pub PathBuf);

impl TestBpfRoot {
    pub fn new() -> Self {
        Self(Path::new("/sys/fs/bpf").join(unique("weir-lb-test-")))
    }
}

impl Default for TestBpfRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestBpfRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
