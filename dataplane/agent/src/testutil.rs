//! Test helpers: named network namespaces that play a node, removed again on drop (also
//! when the test fails), and unique names so tests can run in parallel.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A unique identifier per call in this test process, usable as a pod UID.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:x}", std::process::id())
}

/// A named network namespace (`/run/netns/<name>`) with nothing but `lo`: no route leaves it.
pub struct NetnsGuard {
    pub name: String,
}

impl NetnsGuard {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name} failed");
        run_in(&name, &["ip", "link", "set", "lo", "up"]);
        Self { name }
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command inside a named network namespace; true when it exits 0.
pub fn run_in(netns: &str, argv: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .args(argv)
        .status()
        .is_ok_and(|s| s.success())
}
