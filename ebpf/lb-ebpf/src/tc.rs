//! The per-packet path for traffic the socket hooks cannot see: packets that arrive from
//! outside the node for a NodePort (nodeIP:nodePort), an externalIP or any other frontend in
//! `SERVICES`, on the node's external interfaces.
//!
//! - `ingress` (tc ingress of an external interface): DNAT to a backend chosen by the same
//!   `select` as connect4, and a pair of `CT` entries, so later packets of the flow keep their
//!   backend and replies can be translated back.
//! - `egress` (tc egress of the same interfaces): reverse NAT of replies, so the client sees the
//!   address it dialled as the source. Replies of a pod to an outside client are routed out of
//!   an external interface, so its egress sees all of them, whatever pod veth or bridge they
//!   crossed on the way; the pod side needs no program.
//!
//! A frontend with no usable endpoint answers with an ICMP "port unreachable" sent back out
//! of the interface the packet came in on (`reject`), so the client fails at once.
//!
//! Source NAT only where it is needed: the client's address reaches a backend on this node
//! (what `externalTrafficPolicy: Local` promises; its replies come back through this node's
//! routing), while a flow DNAT'd to a backend on another node (`Cluster`) is masqueraded as
//! the device's address when it leaves through an external device (`egress` → `snat`), and
//! that backend's replies are translated back when they arrive (`ingress` → `unsnat`). The
//! programs must therefore run on every device that leads to other nodes.
//!
//! Anything that is not IPv4 TCP/UDP, a fragment, truncated, or not for a frontend passes
//! untouched.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
    },
    cty::c_long,
    helpers::{
        bpf_csum_diff, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail,
    },
    programs::TcContext,
};
use weir_lb_common::{
    Backend, CLIENT_IP_TAG, CT_FLAG_CLOSING, CT_FLAG_REPLIED, CT_FORWARD, CT_REPLY, CT_SNAT,
    CT_UNSNAT, CtKey, CtValue, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SNAT_PORT_MAX, SNAT_PORT_MIN,
    SNAT_TIMEOUT_CLOSING, SNAT_TIMEOUT_TCP, SNAT_TIMEOUT_TCP_SYN, SNAT_TIMEOUT_UDP, ServiceKey,
    port_to_map,
};

use crate::lb::{backend_in_slot, select};
use crate::maps::{COUNTERS, CT, SERVICES, SNAT_ADDRS};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
const IP_HLEN: usize = 20;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// What an ICMP error quotes of the packet it answers: the IP header and the first 8 bytes
/// of its payload (RFC 792), enough for the sender to find its socket by addresses and ports.
const QUOTE_LEN: usize = IP_HLEN + 8;

/// The addresses of a packet, as the maps store them (network byte order), and where its L4
/// header starts.
struct Flow {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    l4: usize,
}

impl Flow {
    fn key(&self, dir: u8) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            _pad: 0,
        }
    }
}

/// Reads the flow of an IPv4 TCP/UDP packet; `None` for anything this path leaves alone.
/// Every read goes through `bpf_skb_load_bytes`, which bounds-checks at run time, so a short
/// packet is a `None`, never a fault.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Flow> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    // A set MF bit or a non-zero offset: later fragments carry no ports to look up.
    let frag: u16 = ctx.load(ETH_HLEN + 6).ok()?;
    if u16::from_be(frag) & 0x3fff != 0 {
        return None;
    }
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = ETH_HLEN + ihl;
    // The checksum field is the last one rewritten; if it is there, so are the ports.
    let _: u16 = ctx.load(csum_offset(l4, proto)).ok()?;
    Some(Flow {
        saddr: ctx.load(IP_SADDR).ok()?,
        daddr: ctx.load(IP_DADDR).ok()?,
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
        proto,
        l4,
    })
}

#[inline(always)]
fn csum_offset(l4: usize, proto: u8) -> usize {
    if proto == PROTO_TCP { l4 + 16 } else { l4 + 6 }
}

/// Client → frontend: DNAT to the flow's backend.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Some(f) = parse(ctx) else {
        return TC_ACT_OK;
    };
    // Always the external scope: this packet comes from outside the node, so an
    // `externalTrafficPolicy: Local` frontend serves it from the node's own endpoints.
    let key = ServiceKey {
        addr: f.daddr,
        port: f.dport,
        proto: f.proto,
        scope: SCOPE_EXTERNAL,
    };
    let Some(svc) = SERVICES.get_ptr(key) else {
        return unsnat(ctx, &f);
    };
    let svc = unsafe { *svc };
    let fwd = f.key(CT_FORWARD);
    // A known flow keeps its backend while that backend still holds its slot.
    let known = CT.get_ptr(fwd).map(|v| unsafe { *v }).filter(|v| {
        v.slot < svc.count as u32
            && backend_in_slot(svc.id, v.slot)
                == Some(Backend {
                    addr: v.addr,
                    port: v.port,
                    _pad: 0,
                })
    });
    let (addr, port) = match known {
        Some(v) => (v.addr, v.port),
        None => {
            let counters = COUNTERS.get_ptr_mut(svc.id);
            let client = CLIENT_IP_TAG | f.saddr as u64;
            let flow = ((f.daddr as u64) << 32) | ((f.sport as u64) << 16) | f.dport as u64;
            let Some((b, slot)) = select(&svc, client, flow ^ f.proto as u64) else {
                // No usable endpoint: refuse at once, as the socket hooks do, instead of
                // letting the client wait for its timeout.
                if let Some(c) = counters {
                    unsafe { (*c).refused += 1 };
                }
                return reject(ctx, &f).unwrap_or(TC_ACT_SHOT);
            };
            if let Some(c) = counters {
                unsafe { (*c).connections += 1 };
            }
            let reply = CtKey {
                saddr: b.addr,
                daddr: f.saddr,
                sport: b.port,
                dport: f.sport,
                proto: f.proto,
                dir: CT_REPLY,
                _pad: 0,
            };
            let front = CtValue {
                addr: f.daddr,
                port: f.dport,
                flags: 0,
                slot: 0,
            };
            let back = CtValue {
                addr: b.addr,
                port: b.port,
                flags: 0,
                slot,
            };
            // Reply entry first: a forwarded packet whose reply could not be translated back
            // would be a broken flow. LRU inserts fail only on allocation failure.
            if CT.insert(reply, front, 0).is_err() || CT.insert(fwd, back, 0).is_err() {
                return TC_ACT_SHOT;
            }
            (b.addr, b.port)
        }
    };
    match rewrite(
        ctx,
        &f,
        IP_DADDR,
        f.l4 + 2,
        (f.daddr, f.dport),
        (addr, port),
    ) {
        Ok(()) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

/// Backend → client: put the frontend back as the source. And client → backend on another
/// node: source NAT ([`snat`]).
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Some(f) = parse(ctx) else {
        return TC_ACT_OK;
    };
    let Some(v) = CT.get_ptr(f.key(CT_REPLY)) else {
        return match snat(ctx, &f) {
            Ok(v) => v,
            Err(_) => TC_ACT_SHOT,
        };
    };
    let v = unsafe { *v };
    match rewrite(
        ctx,
        &f,
        IP_SADDR,
        f.l4,
        (f.saddr, f.sport),
        (v.addr, v.port),
    ) {
        Ok(()) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

/// A flow `ingress` DNAT'd that leaves the node through an external device goes to a backend
/// on another node (`externalTrafficPolicy: Cluster`; local backends sit behind the bridge).
/// That backend would answer the client directly, from its own address, and the client would
/// drop the answer; so, as kube-proxy's MASQUERADE does, the source becomes this device's
/// address on a port of `SNAT_PORT_MIN..=SNAT_PORT_MAX`, and `unsnat` turns the replies back.
/// Other packets pass untouched.
#[inline(always)]
fn snat(ctx: &TcContext, f: &Flow) -> Result<i32, c_long> {
    let key = f.key(CT_SNAT);
    let nat = match CT.get_ptr(key) {
        Some(v) => unsafe { *v },
        None => {
            // Only flows `ingress` translated: they have a reply entry for this tuple reversed.
            let reply = CtKey {
                saddr: f.daddr,
                daddr: f.saddr,
                sport: f.dport,
                dport: f.sport,
                proto: f.proto,
                dir: CT_REPLY,
                _pad: 0,
            };
            if CT.get_ptr(reply).is_none() {
                return Ok(TC_ACT_OK);
            }
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            // A device without an IPv4 address: nothing to masquerade as.
            let Some(addr) = (unsafe { SNAT_ADDRS.get(ifindex) }) else {
                return Ok(TC_ACT_OK);
            };
            let nat = CtValue {
                addr: *addr,
                port: allocate_port(f, *addr)?,
                flags: 0,
                slot: 0,
            };
            CT.insert(key, nat, 0)?;
            nat
        }
    };
    rewrite(
        ctx,
        f,
        IP_SADDR,
        f.l4,
        (f.saddr, f.sport),
        (nat.addr, nat.port),
    )?;
    Ok(TC_ACT_OK)
}

/// Picks a free source port for `f` leaving as `addr` and records the way back (`CT_UNSNAT`).
/// Free: no live flow from the same backend to `addr` holds it, and it is no frontend (a
/// reply to a frontend's address and port would be taken for new traffic). Tries random
/// ports, as Cilium does; a port whose flow is closed or idle past its timeout is taken over.
#[inline(always)]
fn allocate_port(f: &Flow, addr: u32) -> Result<u16, c_long> {
    let now = now_secs();
    let client = CtValue {
        addr: f.saddr,
        port: f.sport,
        flags: 0,
        slot: now,
    };
    let mut back = CtKey {
        saddr: f.daddr,
        daddr: addr,
        sport: f.dport,
        dport: 0,
        proto: f.proto,
        dir: CT_UNSNAT,
        _pad: 0,
    };
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    for _ in 0..32 {
        let port = SNAT_PORT_MIN + (unsafe { bpf_get_prandom_u32() } % span) as u16;
        back.dport = port_to_map(port);
        let frontend = ServiceKey {
            addr,
            port: back.dport,
            proto: f.proto,
            scope: SCOPE_EXTERNAL,
        };
        if SERVICES.get_ptr(frontend).is_some() {
            continue;
        }
        if CT.insert(back, client, BPF_NOEXIST as u64).is_ok() {
            return Ok(back.dport);
        }
        let Some(old) = CT.get_ptr(back) else {
            continue;
        };
        let old = unsafe { *old };
        if now.wrapping_sub(old.slot) <= idle_timeout(f.proto, old.flags) {
            continue;
        }
        // The old flow is over: forget its forward translation, so a late packet of it is
        // not sent out with a port that now belongs to another client.
        let stale = CtKey {
            saddr: old.addr,
            daddr: f.daddr,
            sport: old.port,
            dport: f.dport,
            proto: f.proto,
            dir: CT_SNAT,
            _pad: 0,
        };
        let _ = CT.remove(stale);
        CT.insert(back, client, BPF_ANY as u64)?;
        return Ok(back.dport);
    }
    Err(0)
}

#[inline(always)]
fn idle_timeout(proto: u8, flags: u16) -> u32 {
    if proto != PROTO_TCP {
        SNAT_TIMEOUT_UDP
    } else if flags & CT_FLAG_CLOSING != 0 {
        SNAT_TIMEOUT_CLOSING
    } else if flags & CT_FLAG_REPLIED != 0 {
        SNAT_TIMEOUT_TCP
    } else {
        SNAT_TIMEOUT_TCP_SYN
    }
}

#[inline(always)]
fn now_secs() -> u32 {
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}

/// A backend's reply to a source-NAT'd flow: the client becomes the destination again (and
/// `egress` then restores the frontend as the source on the way out). Notes when the flow was
/// last seen and whether it is closing, for `allocate_port`. Other packets pass untouched.
#[inline(always)]
fn unsnat(ctx: &TcContext, f: &Flow) -> i32 {
    let Some(v) = CT.get_ptr_mut(f.key(CT_UNSNAT)) else {
        return TC_ACT_OK;
    };
    let v = unsafe { &mut *v };
    let mut flags = v.flags | CT_FLAG_REPLIED;
    if f.proto == PROTO_TCP {
        // FIN or RST.
        let tcp_flags: u8 = ctx.load(f.l4 + 13).unwrap_or(0);
        if tcp_flags & 0x05 != 0 {
            flags |= CT_FLAG_CLOSING;
        }
    }
    let now = now_secs();
    if v.slot != now || v.flags != flags {
        v.slot = now;
        v.flags = flags;
    }
    let (addr, port) = (v.addr, v.port);
    match rewrite(ctx, f, IP_DADDR, f.l4 + 2, (f.daddr, f.dport), (addr, port)) {
        Ok(()) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

/// The IP header, ICMP header and quote of a "port unreachable", laid out as on the wire and
/// 4-byte aligned for `bpf_csum_diff`.
#[repr(C, align(4))]
struct Unreachable {
    ip: [u8; IP_HLEN],
    icmp: [u8; 8],
    quote: [u8; QUOTE_LEN],
}

/// Turns the packet into an ICMP "destination unreachable, port unreachable" back to its
/// sender and sends it out of the interface it came in on: the sender's kernel fails a TCP
/// connect with ECONNREFUSED and reports the error to a UDP socket, at once. Cilium's
/// `service-no-backend-response=reject` does the same. A packet with IP options is dropped
/// instead (they are never seen on NodePort traffic in practice, and quoting them would need
/// a variable-length quote).
#[inline(always)]
fn reject(ctx: &TcContext, f: &Flow) -> Result<i32, c_long> {
    if f.l4 != ETH_HLEN + IP_HLEN {
        return Err(0);
    }
    // Fixed-size loads: `load_bytes` clamps its length to the packet, which the verifier
    // rejects as a possibly zero-sized read.
    let macs: [u8; 12] = ctx.load(0)?;
    let mut r = Unreachable {
        ip: [0; IP_HLEN],
        icmp: [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0],
        quote: ctx.load(ETH_HLEN)?,
    };
    let tot_len = ((IP_HLEN + 8 + QUOTE_LEN) as u16).to_be_bytes();
    // TOS as Linux's icmp_send sets it: the original's TOS bits, precedence "internet control".
    let tos = (r.quote[1] & 0x1e) | 0xc0;
    let (saddr, daddr) = (f.daddr.to_ne_bytes(), f.saddr.to_ne_bytes());
    r.ip = [
        0x45,
        tos,
        tot_len[0],
        tot_len[1],
        0,
        0,
        0,
        0,
        64,
        IPPROTO_ICMP,
        0,
        0,
        saddr[0],
        saddr[1],
        saddr[2],
        saddr[3],
        daddr[0],
        daddr[1],
        daddr[2],
        daddr[3],
    ];
    let ip_csum = csum(r.ip.as_mut_ptr(), IP_HLEN)?.to_ne_bytes();
    r.ip[10] = ip_csum[0];
    r.ip[11] = ip_csum[1];
    // The ICMP checksum covers its header and the quote, which follow each other in `r`.
    let icmp_csum = csum(r.icmp.as_mut_ptr(), 8 + QUOTE_LEN)?.to_ne_bytes();
    r.icmp[2] = icmp_csum[0];
    r.icmp[3] = icmp_csum[1];
    let skb = ctx.skb.skb;
    let ret = unsafe { bpf_skb_change_tail(skb, (ETH_HLEN + IP_HLEN + 8 + QUOTE_LEN) as u32, 0) };
    if ret != 0 {
        return Err(ret);
    }
    // Back to where it came from: the sender's MAC becomes the destination.
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &eth, 0)?;
    ctx.store(ETH_HLEN, &r, 0)?;
    let ifindex = unsafe { (*skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

/// The Internet checksum of `len` bytes (a multiple of 4) at `data`, ready to store.
#[inline(always)]
fn csum(data: *mut u8, len: usize) -> Result<u16, c_long> {
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data.cast(), len as u32, 0) };
    if sum < 0 {
        return Err(sum);
    }
    let mut s = sum as u64 & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    Ok(!(s as u16))
}

/// Replaces one address/port pair and patches the IP and L4 checksums incrementally (the L4
/// one through the pseudo header). A UDP checksum of zero means "none" and stays zero.
/// A failure half-way leaves an inconsistent packet, which the caller drops.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    f: &Flow,
    addr_off: usize,
    port_off: usize,
    old: (u32, u16),
    new: (u32, u16),
) -> Result<(), c_long> {
    let csum = csum_offset(f.l4, f.proto);
    let udp = if f.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if old.0 != new.0 {
        ctx.l4_csum_replace(
            csum,
            old.0 as u64,
            new.0 as u64,
            udp | BPF_F_PSEUDO_HDR as u64 | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM, old.0 as u64, new.0 as u64, 4)?;
        ctx.store(addr_off, &new.0, 0)?;
    }
    if old.1 != new.1 {
        ctx.l4_csum_replace(csum, old.1 as u64, new.1 as u64, udp | 2)?;
        ctx.store(port_off, &new.1, 0)?;
    }
    Ok(())
}
