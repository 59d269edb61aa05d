//! Backend selection (shared by the socket hooks and the tc path) and the socket hooks'
//! address rewrite.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    programs::SockAddrContext,
};
use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use weir_lb_common::{
    ALG_MAGLEV, ALG_ROUND_ROBIN, AffinityKey, AffinityValue, Backend, BackendKey, FLAG_AFFINITY,
    FLAG_TWO_SCOPES, MAGLEV_MAX, PROTO_TCP, PROTO_UDP, RevNatKey, RevNatValue, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, ServiceKey, ServiceValue, flow_hash,
};

use crate::maps::{AFFINITY, BACKENDS, COUNTERS, MAGLEV, REVNAT, RR, SERVICES};
use crate::{ALLOW, REJECT};

const ECONNREFUSED: i32 = 111;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    SendMsg,
}

/// Rewrites a Service destination to one of its backends, or refuses it when the Service
/// has none: an empty Service must fail fast, never black-hole.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let mut key = ServiceKey {
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        proto,
        scope: SCOPE_EXTERNAL,
    };
    let Some(svc) = SERVICES.get_ptr(key) else {
        return ALLOW;
    };
    let mut svc = unsafe { *svc };
    // This socket's owner is on this node: an `externalTrafficPolicy: Local` frontend gives it
    // the cluster-wide endpoints. Should that entry be missing, the node's own still serve.
    if svc.flags & FLAG_TWO_SCOPES != 0 {
        key.scope = SCOPE_INTERNAL;
        if let Some(internal) = SERVICES.get_ptr(key) {
            svc = unsafe { *internal };
        }
    }
    let counters = COUNTERS.get_ptr_mut(svc.id);
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some((backend, _)) = select(&svc, netns, flow_id(ctx)) else {
        if let Some(c) = counters {
            unsafe { (*c).refused += 1 };
        }
        // The kernel turns a 0 verdict into EPERM unless the program set another error.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    };
    if let Some(c) = counters {
        unsafe {
            match hook {
                Hook::Connect => (*c).connections += 1,
                Hook::SendMsg => (*c).packets += 1,
            }
        }
    }
    sa.user_ip4 = backend.addr;
    sa.user_port = backend.port as u32;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev = RevNatValue {
        addr: key.addr,
        port: key.port,
        _pad: 0,
    };
    // Losing this entry only costs getpeername/recvmsg their ClusterIP view; the flow still works.
    let _ = REVNAT.insert(RevNatKey { cookie, backend }, rev, 0);
    ALLOW
}

/// Restores the Service address on replies (recvmsg) and peer queries (getpeername).
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) {
    let sa = unsafe { &mut *ctx.sock_addr };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let backend = Backend {
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        _pad: 0,
    };
    if let Some(rev) = REVNAT.get_ptr(RevNatKey { cookie, backend }) {
        let rev = unsafe { *rev };
        sa.user_ip4 = rev.addr;
        sa.user_port = rev.port as u32;
    }
}

/// Picks a backend of `svc` (which has `count > 0` or yields `None`) for a flow that Maglev
/// hashes as `flow` and session affinity knows as `client`. Shared by the socket hooks and
/// the tc path, so a Service balances the same whichever way its traffic arrives.
/// Returns the backend and its slot.
#[inline(always)]
pub fn select(svc: &ServiceValue, client: u64, flow: u64) -> Option<(Backend, u32)> {
    if svc.count == 0 {
        return None;
    }
    let count = svc.count as u32;
    let affinity = svc.flags & FLAG_AFFINITY != 0;
    let now = unsafe { bpf_ktime_get_ns() };
    let akey = AffinityKey {
        client,
        service_id: svc.id,
        _pad: 0,
    };
    if affinity && let Some(a) = AFFINITY.get_ptr_mut(akey) {
        let a = unsafe { &mut *a };
        let fresh =
            now.wrapping_sub(a.last_used_ns) <= svc.affinity_timeout_secs as u64 * 1_000_000_000;
        if fresh && a.slot < count {
            // A slot reused for another backend means ours went away: choose again.
            if backend_in_slot(svc.id, a.slot) == Some(a.backend) {
                a.last_used_ns = now;
                return Some((a.backend, a.slot));
            }
        }
    }
    let slot = match svc.algorithm {
        ALG_ROUND_ROBIN => {
            let p = RR.get_ptr_mut(svc.id)?;
            // Compare-and-swap on the shared array value, so CPUs racing for the same Service
            // take consecutive positions. Not fetch-and-add: LLVM 22 turns this program's
            // BPF_FETCH add into a plain add (its pre-emit pass wrongly finds the result dead).
            // After 8 lost races (never seen) the position read last is used, as before.
            let mut n = unsafe { core::ptr::read_volatile(p) };
            for _ in 0..8 {
                let (seen, won) = unsafe {
                    atomic_cxchg::<u32, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                        p,
                        n,
                        n.wrapping_add(1),
                    )
                };
                if won {
                    break;
                }
                n = seen;
            }
            n % count
        }
        ALG_MAGLEV => {
            let table = MAGLEV.get_ptr(svc.id)?;
            let size = svc.maglev_size;
            if size == 0 {
                return None;
            }
            let idx = (flow_hash(client, flow) % size as u64) as usize;
            if idx >= MAGLEV_MAX {
                return None;
            }
            unsafe { (*table).slots[idx] }
        }
        _ => (unsafe { bpf_get_prandom_u32() }) % count,
    };
    let b = backend_in_slot(svc.id, slot)?;
    if affinity {
        let v = AffinityValue {
            backend: b,
            slot,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(akey, v, 0);
    }
    Some((b, slot))
}

#[inline(always)]
pub fn backend_in_slot(service_id: u32, slot: u32) -> Option<Backend> {
    let b = BACKENDS.get_ptr(BackendKey { service_id, slot })?;
    Some(unsafe { *b })
}

/// What identifies a flow for Maglev: the bound source port when the socket has one (so a
/// client that reuses a port lands on the same backend), else the socket itself.
#[inline(always)]
fn flow_id(ctx: &SockAddrContext) -> u64 {
    let sa = unsafe { &*ctx.sock_addr };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let port = if sk.is_null() {
        0
    } else {
        unsafe { (*sk).src_port }
    };
    if port != 0 {
        port as u64
    } else {
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
    }
}
