//! Stale connected UDP. connect4 rewrites a connected UDP socket to one backend once; when that
//! backend leaves the Service, nothing fails (UDP has no handshake), so the socket would keep
//! sending to it. After a sync the watch layer hands the (Service address, backend) pairs that
//! went away to [`StaleUdp::destroy`], which visits the network namespaces of the processes in
//! weir's cgroup subtree, dumps their connected UDP sockets over sock_diag and destroys
//! (`SOCK_DESTROY`, what `ss -K` does) those connected to a gone backend *through that Service*,
//! as the REVNAT map (socket cookie + backend → Service address) records. The application's
//! next receive fails with ECONNABORTED and the socket is disconnected; when it connects again,
//! connect4 picks a live backend. kube-proxy flushes conntrack entries for the same reason;
//! Cilium destroys sockets from a BPF socket iterator, which this kernel's BPF cannot attach.
//!
//! Sockets the hooks never rewrote (no REVNAT entry, e.g. dialled to a pod IP directly) are
//! left alone, as are sockets reaching the same backend through a Service that still has it.
//! A REVNAT entry evicted by its LRU hides its socket from this sweep.
//!
//! The netlink messages are encoded here by hand: `nlmsghdr`, `inet_diag_req_v2` and
//! `inet_diag_msg` are fixed-layout structs (include/uapi/linux/{netlink,inet_diag}.h).
//! netlink-packet-sock-diag has no `SOCK_DESTROY` message (its message type follows its enum),
//! so a crate would cover the dump only.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use weir_lb_common::{Backend, PROTO_UDP, RevNatKey, RevNatValue, ServiceKey, ServiceValue};

use crate::Error;
use crate::model::Frontend;
use crate::plan::{MapState, backend_addr, backend_value, frontend_addr, service_keys};

/// (Service address, backend) pairs of UDP frontends, as the maps hold them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpPairs(HashSet<(SocketAddrV4, SocketAddrV4)>);

impl UdpPairs {
    /// The pairs of every UDP frontend in `state`: for a full sync.
    pub fn all(state: &MapState) -> Self {
        Self::collect(state, state.services.iter())
    }

    /// The pairs of the UDP frontends among `frontends`: for a sync scoped to them, so the
    /// cost follows the change, not the cluster. Both entries of an `externalTrafficPolicy:
    /// Local` frontend count: a backend is gone from its address once neither has it.
    pub fn of<'a>(state: &MapState, frontends: impl IntoIterator<Item = &'a Frontend>) -> Self {
        let keys: Vec<ServiceKey> = frontends
            .into_iter()
            .filter(|f| f.proto == PROTO_UDP)
            .flat_map(service_keys)
            .collect();
        Self::collect(
            state,
            keys.iter().filter_map(|k| state.services.get_key_value(k)),
        )
    }

    fn collect<'a>(
        state: &MapState,
        services: impl Iterator<Item = (&'a ServiceKey, &'a ServiceValue)>,
    ) -> Self {
        let mut pairs = HashSet::new();
        for (k, v) in services.filter(|(k, _)| k.proto == PROTO_UDP) {
            let vip = frontend_addr(k);
            for b in state
                .backends
                .get(&v.id)
                .into_iter()
                .flat_map(|s| s.values())
            {
                pairs.insert((vip, backend_addr(b)));
            }
        }
        Self(pairs)
    }

    /// The pairs of `self` that `after` no longer has.
    pub fn gone(&self, after: &Self) -> Self {
        Self(self.0.difference(&after.0).copied().collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, vip: SocketAddrV4, backend: SocketAddrV4) -> bool {
        self.0.contains(&(vip, backend))
    }
}

/// Destroys connected UDP sockets left aimed at removed backends (see the module docs).
#[derive(Clone, Debug)]
pub struct StaleUdp {
    cgroup: PathBuf,
    revnat: PathBuf,
}

impl StaleUdp {
    /// `bpf_root` is where [`crate::load_and_attach`] pinned the maps, `cgroup` the subtree
    /// the socket hooks are attached to.
    pub fn new(bpf_root: &Path, cgroup: &Path) -> Self {
        Self {
            cgroup: cgroup.to_path_buf(),
            revnat: bpf_root.join("maps").join("WEIR_REVNAT"),
        }
    }

    /// Destroys the sockets aimed at `gone` on a thread of its own (it enters other network
    /// namespaces, which must never leak into a shared thread), logs the outcome and returns
    /// the number destroyed. Callers may join the handle or let the sweep finish on its own.
    pub fn destroy(&self, gone: UdpPairs) -> std::thread::JoinHandle<Result<usize, Error>> {
        let this = self.clone();
        std::thread::spawn(move || {
            let result = this.sweep(&gone);
            match &result {
                Ok(0) => {}
                Ok(n) => tracing::info!(sockets = n, "destroyed UDP sockets of removed backends"),
                Err(e) => tracing::warn!(error = %e, "stale UDP sweep failed"),
            }
            result
        })
    }

    fn sweep(&self, gone: &UdpPairs) -> Result<usize, Error> {
        let pin = &self.revnat;
        let data = MapData::from_pin(pin)
            .map_err(|e| Error::Bpf(format!("open {}: {e}", pin.display())))?;
        let revnat: BpfHashMap<MapData, RevNatKey, RevNatValue> = Map::from_map_data(data)
            .map_err(|e| Error::Bpf(format!("map {}: {e}", pin.display())))?
            .try_into()
            .map_err(|e| Error::Bpf(format!("map {}: {e}", pin.display())))?;
        let backends: HashSet<SocketAddrV4> = gone.0.iter().map(|&(_, b)| b).collect();
        let mut destroyed = 0;
        for ns in namespaces(&self.cgroup)? {
            // SAFETY: setns on this thread only (spawned for the sweep); the fd is valid.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                tracing::warn!(error = %e, "enter a pod network namespace; skipped");
                continue;
            }
            match sweep_netns(&revnat, &backends, gone) {
                Ok(n) => destroyed += n,
                Err(e) => tracing::warn!(error = %e, "stale UDP sweep of one network namespace"),
            }
        }
        Ok(destroyed)
    }
}

/// Destroys, in the current thread's network namespace, the sockets to sweep.
fn sweep_netns(
    revnat: &BpfHashMap<MapData, RevNatKey, RevNatValue>,
    backends: &HashSet<SocketAddrV4>,
    gone: &UdpPairs,
) -> Result<usize, Error> {
    let diag = Diag::open()?;
    let mut destroyed = 0;
    for sock in diag.connected_udp()? {
        if !backends.contains(&sock.dst) {
            continue;
        }
        let key = RevNatKey {
            cookie: sock.cookie(),
            backend: backend_value(&sock.dst),
        };
        let Ok(rev) = revnat.get(&key, 0) else {
            continue;
        };
        let vip = backend_addr(&Backend {
            addr: rev.addr,
            port: rev.port,
            _pad: 0,
        });
        if gone.contains(vip, sock.dst) && diag.destroy(&sock)? {
            destroyed += 1;
        }
    }
    Ok(destroyed)
}

/// One open network namespace file per distinct namespace of a thread of a process in
/// `cgroup` or below. Threads count, not only processes: a thread may have entered a pod's
/// namespace on its own (as test harnesses do), and its sockets live there.
fn namespaces(cgroup: &Path) -> Result<Vec<File>, Error> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(p) => p,
            // A child cgroup removed since it was listed.
            Err(_) if dir != cgroup => continue,
            Err(e) => return Err(Error::io(format!("read {}/cgroup.procs", dir.display()), e)),
        };
        for pid in procs.lines() {
            // Processes and threads come and go during the walk: skip those already gone.
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let Ok(f) = File::open(task.path().join("ns/net")) else {
                    continue;
                };
                if let Ok(m) = f.metadata()
                    && seen.insert((m.dev(), m.ino()))
                {
                    out.push(f);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(out)
}

// include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h.
const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `inet_diag_req_v2`: family, protocol, ext, pad, states, then the socket id.
const REQ_LEN: usize = 8 + SOCK_ID_LEN;
/// `inet_diag_sockid`: sport, dport (big-endian), src[4], dst[4], if, cookie[2].
const SOCK_ID_LEN: usize = 48;
/// `inet_diag_msg`: family, state, timer, retrans, then the socket id, then five u32s.
const DIAG_MSG_LEN: usize = 4 + SOCK_ID_LEN + 20;
/// A connected UDP socket is in state TCP_ESTABLISHED for sock_diag.
const TCP_ESTABLISHED: u32 = 1;

/// A connected IPv4 UDP socket as sock_diag reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DiagSock {
    /// The `inet_diag_sockid` as the kernel sent it: sent back verbatim to destroy the socket.
    id: [u8; SOCK_ID_LEN],
    dst: SocketAddrV4,
}

impl DiagSock {
    fn parse(msg: &[u8]) -> Option<Self> {
        if msg.len() < DIAG_MSG_LEN || msg[0] != libc::AF_INET as u8 {
            return None;
        }
        let id: [u8; SOCK_ID_LEN] = msg[4..4 + SOCK_ID_LEN].try_into().ok()?;
        let dport = u16::from_be_bytes([id[2], id[3]]);
        let dst = Ipv4Addr::new(id[20], id[21], id[22], id[23]);
        Some(Self {
            id,
            dst: SocketAddrV4::new(dst, dport),
        })
    }

    /// The socket cookie, as `bpf_get_socket_cookie` returns it (cookie[0] is the low half).
    fn cookie(&self) -> u64 {
        let half = |at: usize| {
            u32::from_ne_bytes([
                self.id[at],
                self.id[at + 1],
                self.id[at + 2],
                self.id[at + 3],
            ])
        };
        half(40) as u64 | (half(44) as u64) << 32
    }
}

/// A NETLINK_SOCK_DIAG socket of the current thread's network namespace.
struct Diag(OwnedFd);

impl Diag {
    fn open() -> Result<Self, Error> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(Error::io(
                "open a sock_diag netlink socket".into(),
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, msg: &[u8]) -> Result<(), Error> {
        // SAFETY: zeroed sockaddr_nl with only the family set addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `kernel` are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(Error::io(
                "send to sock_diag".into(),
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Reads replies until `done` says the exchange is over; `done` sees each message's type
    /// and payload.
    fn recv(&self, mut done: impl FnMut(u16, &[u8]) -> Result<bool, Error>) -> Result<(), Error> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is valid for its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("receive from sock_diag".into(), e));
            }
            for (kind, payload) in messages(&buf[..n as usize])? {
                if done(kind, payload)? {
                    return Ok(());
                }
            }
        }
    }

    /// Every connected IPv4 UDP socket of this namespace.
    fn connected_udp(&self) -> Result<Vec<DiagSock>, Error> {
        self.send(&request(
            SOCK_DIAG_BY_FAMILY,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            1 << TCP_ESTABLISHED,
            &[0; SOCK_ID_LEN],
        ))?;
        let mut socks = Vec::new();
        self.recv(|kind, payload| match kind {
            NLMSG_DONE => Ok(true),
            NLMSG_ERROR => nlmsg_error(payload, "dump UDP sockets").map(|_| true),
            SOCK_DIAG_BY_FAMILY => {
                socks.extend(DiagSock::parse(payload));
                Ok(false)
            }
            _ => Ok(false),
        })?;
        Ok(socks)
    }

    /// Destroys `sock`; false when it was already gone.
    fn destroy(&self, sock: &DiagSock) -> Result<bool, Error> {
        self.send(&request(
            SOCK_DESTROY,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            u32::MAX,
            &sock.id,
        ))?;
        let mut found = true;
        self.recv(|kind, payload| {
            if kind != NLMSG_ERROR {
                return Ok(false);
            }
            match nlmsg_error(payload, "destroy a UDP socket") {
                Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                    found = false;
                    Ok(true)
                }
                r => r.map(|_| true),
            }
        })?;
        Ok(found)
    }
}

/// An `nlmsghdr` + `inet_diag_req_v2` for IPv4 UDP.
fn request(kind: u16, flags: u16, states: u32, id: &[u8; SOCK_ID_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
    m.extend(((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    m.extend(kind.to_ne_bytes());
    m.extend(flags.to_ne_bytes());
    m.extend(1u32.to_ne_bytes()); // sequence number: one exchange at a time
    m.extend(0u32.to_ne_bytes()); // port id: let the kernel assign it
    m.extend([libc::AF_INET as u8, libc::IPPROTO_UDP as u8, 0, 0]);
    m.extend(states.to_ne_bytes());
    m.extend(id);
    m
}

/// Splits a netlink datagram into (type, payload) messages.
fn messages(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, Error> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDR || len > buf.len() {
            return Err(Error::Bpf(format!(
                "sock_diag sent a malformed message (length {len} of {})",
                buf.len()
            )));
        }
        out.push((u16::from_ne_bytes([buf[4], buf[5]]), &buf[NLMSG_HDR..len]));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Ok(out)
}

/// The errno of an `NLMSG_ERROR` payload; 0 is an acknowledgement.
fn nlmsg_error(payload: &[u8], what: &str) -> Result<(), Error> {
    let errno = payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| Error::Bpf(format!("{what}: truncated netlink error")))?;
    if errno == 0 {
        Ok(())
    } else {
        Err(Error::io(
            format!("{what} (sock_diag)"),
            io::Error::from_raw_os_error(-errno),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::service_key;
    use std::collections::BTreeMap;
    use std::net::UdpSocket;
    use weir_lb_common::PROTO_TCP;

    fn addr(last: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new([10, 244, 0, last].into(), port)
    }

    fn state(services: &[(u8, u8, &[u8])]) -> MapState {
        let mut st = MapState::default();
        for (id, &(vip, proto, backends)) in (1u32..).zip(services) {
            let fe = Frontend {
                addr: SocketAddrV4::new([10, 96, 0, vip].into(), 53),
                proto,
            };
            st.services.insert(
                service_key(&fe),
                ServiceValue {
                    id,
                    count: backends.len() as u16,
                    algorithm: 0,
                    flags: 0,
                    affinity_timeout_secs: 0,
                    maglev_size: 0,
                },
            );
            let slots: BTreeMap<u32, Backend> = (0u32..)
                .zip(backends.iter().map(|&b| backend_value(&addr(b, 5353))))
                .collect();
            st.backends.insert(id, slots);
        }
        st
    }

    #[test]
    fn gone_pairs_are_per_service_and_udp_only() {
        let vip = |v: u8| SocketAddrV4::new([10, 96, 0, v].into(), 53);
        let before = state(&[
            (1, PROTO_UDP, &[11, 12]),
            (2, PROTO_UDP, &[12]),
            (3, PROTO_TCP, &[13]),
        ]);
        // Backend 12 leaves Service 1 but stays in Service 2; the TCP Service loses everything.
        let after = state(&[
            (1, PROTO_UDP, &[11]),
            (2, PROTO_UDP, &[12]),
            (3, PROTO_TCP, &[]),
        ]);
        let gone = UdpPairs::all(&before).gone(&UdpPairs::all(&after));
        assert!(gone.contains(vip(1), addr(12, 5353)));
        assert!(!gone.contains(vip(2), addr(12, 5353)));
        assert_eq!(gone.0.len(), 1, "{gone:?}");

        // Scoped to Service 1's frontend, the same answer without looking at the others.
        let fe = Frontend {
            addr: vip(1),
            proto: PROTO_UDP,
        };
        let scoped = UdpPairs::of(&before, [&fe]).gone(&UdpPairs::of(&after, [&fe]));
        assert_eq!(scoped, gone);
        // A deleted UDP Service: all its pairs are gone.
        let deleted = state(&[(2, PROTO_UDP, &[12])]);
        assert_eq!(
            UdpPairs::of(&before, [&fe])
                .gone(&UdpPairs::of(&deleted, [&fe]))
                .0
                .len(),
            2
        );
    }

    #[test]
    fn malformed_netlink_is_an_error_not_a_panic() {
        let mut m = request(SOCK_DIAG_BY_FAMILY, 1, 2, &[0; SOCK_ID_LEN]);
        assert_eq!(messages(&m).expect("well formed").len(), 1);
        m[0] = 200; // length beyond the datagram
        assert!(messages(&m).is_err());
        assert!(messages(&[]).expect("empty").is_empty());
        assert!(nlmsg_error(&[1], "x").is_err());
        assert!(DiagSock::parse(&[2u8; 10]).is_none());
    }

    /// Real sock_diag on loopback in this test's own namespace (needs root): a connected UDP
    /// socket is listed with its peer and cookie, and destroying it fails its next receive
    /// with ECONNABORTED.
    #[test]
    fn a_destroyed_connected_udp_socket_sees_econnaborted() {
        let peer = UdpSocket::bind("127.0.0.1:0").expect("bind peer");
        let app = UdpSocket::bind("127.0.0.1:0").expect("bind app");
        app.connect(peer.local_addr().expect("addr"))
            .expect("connect");
        let std::net::SocketAddr::V4(peer_addr) = peer.local_addr().expect("addr") else {
            unreachable!("bound to IPv4")
        };
        let diag = Diag::open().expect("sock_diag socket");
        let socks = diag.connected_udp().expect("dump");
        let sock = socks
            .iter()
            .find(|s| s.dst == peer_addr)
            .expect("the connected socket is listed");
        assert_ne!(sock.cookie(), 0);
        assert!(diag.destroy(sock).expect("destroy"));
        app.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        let err = app.recv(&mut [0u8; 8]).expect_err("destroyed socket");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        assert!(!diag.destroy(sock).expect("second destroy"), "already gone");
    }
}
