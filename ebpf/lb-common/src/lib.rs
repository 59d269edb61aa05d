//! `#[repr(C)]` map keys and values shared by the BPF programs in `ebpf/lb-ebpf` and the loader
//! in `dataplane/lb`: one definition of every map layout, pinned by size assertions.
//!
//! Byte order: addresses and ports are stored exactly as the kernel hands them to a
//! `cgroup/connect4` program (`bpf_sock_addr.user_ip4` / `user_port`), i.e. in network byte
//! order. Userspace converts with [`ip_to_map`] / [`port_to_map`] and back.
#![no_std]

use core::mem::size_of;

/// Capacity of the service map (ClusterIP/port/protocol triples) and of the per-service arrays.
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of the backend slot map, summed over all services.
pub const MAX_BACKEND_SLOTS: u32 = 262_144;
/// Largest Maglev table; the default table size is this prime.
pub const MAGLEV_MAX: usize = 16_381;
/// How many services may use Maglev at once (their tables are allocated on demand).
pub const MAX_MAGLEV_SERVICES: u32 = 4_096;
/// Capacity of the LRU maps (session affinity, reverse translation, connection tracking).
pub const LRU_ENTRIES: u32 = 262_144;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Backend selection, `ServiceValue::algorithm`.
pub const ALG_RANDOM: u8 = 0;
pub const ALG_ROUND_ROBIN: u8 = 1;
pub const ALG_MAGLEV: u8 = 2;

/// `ServiceValue::flags`: `sessionAffinity: ClientIP`.
pub const FLAG_AFFINITY: u8 = 1;
/// `ServiceValue::flags` of a `SCOPE_EXTERNAL` entry: the frontend also has a `SCOPE_INTERNAL`
/// entry, which the socket hooks use instead of this one.
pub const FLAG_TWO_SCOPES: u8 = 2;

/// `ServiceKey::scope` (after Cilium's `lb4_key.scope`). Every frontend has an entry of
/// `SCOPE_EXTERNAL`, the one every lookup tries first and the only one the tc path (traffic
/// from outside the node) uses. An external frontend of an `externalTrafficPolicy: Local`
/// Service holds this node's endpoints there, flagged `FLAG_TWO_SCOPES`, and has a second
/// entry of `SCOPE_INTERNAL` with the cluster-wide endpoints, which the socket hooks (clients
/// on this node) use: kube-proxy sends in-cluster traffic to external addresses to every
/// endpoint, not only to the node's own. (While the maps have no id for the second entry,
/// the first is unflagged and serves everyone.)
pub const SCOPE_EXTERNAL: u8 = 0;
pub const SCOPE_INTERNAL: u8 = 1;

/// Key of `SERVICES`: a Service's virtual address as the application dialled it, and which
/// of its entries (`SCOPE_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// Value of `SERVICES`. `count` is the number of backend slots `0..count` of `id` to choose from;
/// zero means "reject the connection".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    pub id: u32,
    pub count: u16,
    pub algorithm: u8,
    pub flags: u8,
    pub affinity_timeout_secs: u32,
    /// Table size when `algorithm == ALG_MAGLEV` (a prime <= `MAGLEV_MAX`).
    pub maglev_size: u32,
}

/// Key of `BACKENDS`: slot `slot` of service `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

/// Value of `BACKENDS`: where the connection is sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Key of `AFFINITY`. Socket hooks identify a client by its network namespace cookie: they run
/// before the source address is chosen, and in a cluster one pod is one network namespace.
/// The tc path sees packets from outside the node and uses `CLIENT_IP_TAG | source address`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityKey {
    pub client: u64,
    pub service_id: u32,
    pub _pad: u32,
}

/// Value of `AFFINITY`: the slot chosen last time, the backend that was in it (to notice when
/// the slot was reused for another backend), and when it was last used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: Backend,
    pub slot: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// Key of `REVNAT`: a socket (by cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatKey {
    pub cookie: u64,
    pub backend: Backend,
}

/// Value of `REVNAT`: the Service address the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Marks an [`AffinityKey::client`] that is a client IP (tc path), so it never equals a netns
/// cookie (the kernel hands those out from 1 upwards).
pub const CLIENT_IP_TAG: u64 = 1 << 63;

/// `CtKey::dir`: a packet from the client to a frontend (value: the backend), or a reply from
/// the backend to the client (value: the frontend to show as its source).
pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;
/// `CtKey::dir` of source NAT (`externalTrafficPolicy: Cluster`, backend on another node): a
/// DNAT'd packet leaving the node towards its backend (key: client → backend; value: the node
/// address and port to write as its source), and that backend's reply to the node (key:
/// backend → node address and port; value: the client to write as destination).
pub const CT_SNAT: u8 = 2;
pub const CT_UNSNAT: u8 = 3;

/// The source ports of source NAT: below the NodePort range (30000–32767) and Linux's
/// ephemeral range (32768–60999), so a translated flow never takes the reply of one of the
/// node's own connections.
pub const SNAT_PORT_MIN: u16 = 1024;
pub const SNAT_PORT_MAX: u16 = 29_999;

/// `CtValue::flags` of a `CT_UNSNAT` entry: the backend has answered; a TCP FIN or RST was seen.
pub const CT_FLAG_REPLIED: u16 = 1;
pub const CT_FLAG_CLOSING: u16 = 2;

/// How long an idle `CT_UNSNAT` entry keeps its port, in seconds (Cilium's conntrack
/// lifetimes): a closing TCP flow, a TCP flow that never got an answer, any other TCP flow,
/// a UDP flow.
pub const SNAT_TIMEOUT_CLOSING: u32 = 10;
pub const SNAT_TIMEOUT_TCP_SYN: u32 = 60;
pub const SNAT_TIMEOUT_TCP: u32 = 21_600;
pub const SNAT_TIMEOUT_UDP: u32 = 60;

/// Key of the `CT` LRU map of the tc path: a flow's addresses as seen on the wire, in
/// the direction `dir`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

/// Value of `CT`: the address to write (see the `CT_*` directions). For `CT_FORWARD` entries
/// `slot` is the backend's slot, so a flow whose backend left its slot is balanced again
/// instead of staying stuck on a removed backend; for `CT_UNSNAT` entries it is when the flow
/// was last seen (seconds of `bpf_ktime_get_ns`), and `flags` holds `CT_FLAG_*`, so an idle
/// or closed flow's port can be given to another flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    pub addr: u32,
    pub port: u16,
    pub flags: u16,
    pub slot: u32,
}

/// Capacity of `SNAT_ADDRS` (interfaces the tc programs are attached to).
pub const MAX_DEVICES: u32 = 256;

/// Value of the per-CPU `COUNTERS` array, indexed by service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connects (TCP and connected UDP) sent to a backend, and new flows the tc path balanced.
    pub connections: u64,
    /// Unconnected UDP datagrams sent to a backend.
    pub packets: u64,
    /// Connects and datagrams refused because the Service had no usable endpoint (packets
    /// from outside the node are answered with an ICMP "port unreachable").
    pub refused: u64,
}

/// Value of `MAGLEV`: slot numbers, one per table position; only `maglev_size` entries are used.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MaglevTable {
    pub slots: [u32; MAGLEV_MAX],
}

const _: () = assert!(size_of::<ServiceKey>() == 8);
const _: () = assert!(size_of::<ServiceValue>() == 16);
const _: () = assert!(size_of::<BackendKey>() == 8);
const _: () = assert!(size_of::<Backend>() == 8);
const _: () = assert!(size_of::<AffinityKey>() == 16);
const _: () = assert!(size_of::<AffinityValue>() == 24);
const _: () = assert!(size_of::<RevNatKey>() == 16);
const _: () = assert!(size_of::<RevNatValue>() == 8);
const _: () = assert!(size_of::<CtKey>() == 16);
const _: () = assert!(size_of::<CtValue>() == 12);
const _: () = assert!(size_of::<Counters>() == 24);
const _: () = assert!(size_of::<MaglevTable>() == MAGLEV_MAX * 4);

/// Flow hash used by Maglev: a 64-bit mix (splitmix64 finaliser). All 64 bits are kept: BPF
/// reduces it modulo the table size with a 64-bit modulo, which the verifier bounds (it loses
/// the upper half of a 32-bit one).
#[inline(always)]
pub fn flow_hash(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// An IPv4 address in the map's byte order.
pub fn ip_to_map(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The octets of an address stored in a map.
pub fn ip_from_map(addr: u32) -> [u8; 4] {
    addr.to_ne_bytes()
}

/// A port in the map's byte order.
pub fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

/// A port stored in a map, in host order.
pub fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are #[repr(C)], Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for MaglevTable {}
}
