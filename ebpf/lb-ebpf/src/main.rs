//! weir's socket-level service load balancer: cgroup v2 hooks that rewrite a Service address
//! to a backend before a packet exists, so no per-packet NAT is ever needed.
//!
//! - `connect4`: TCP and connected UDP;
//! - `sendmsg4` / `recvmsg4`: unconnected UDP, and the reverse translation of replies;
//! - `getpeername4`: the application sees the ClusterIP it dialled, not the backend.
//!
//! And the per-packet path for traffic from outside the node (NodePorts, externalIPs), which
//! no socket hook sees: `tc_ingress` / `tc_egress` on the node's external interfaces.
#![no_std]
#![no_main]
// `atomic_cxchg` for round-robin (no `AtomicU32` on this target); the BPF build already runs with RUSTC_BOOTSTRAP (build-std).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod lb;
mod maps;
mod tc;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};

/// Verdicts of `cgroup/sock_addr` programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    lb::forward(&ctx, lb::Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    lb::forward(&ctx, lb::Hook::SendMsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    lb::reverse(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    lb::reverse(&ctx);
    ALLOW
}

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx)
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    tc::egress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
