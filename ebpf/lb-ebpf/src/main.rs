//! weir's socket-level service load balancer: cgroup v2 hooks that rewrite a Service address
//! to a backend before a packet exists, so no per-packet NAT is ever needed.
//!
//! - `connect4`: TCP and connected UDP;
//! - `sendmsg4` / `recvmsg4`: unconnected UDP, and the reverse translation of replies;
//! - `getpeername4`: the application sees the ClusterIP it dialled, not the backend.
#![no_std]
#![no_main]

mod lb;
mod maps;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
