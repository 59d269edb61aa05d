//! Test helpers: named network namespaces that play a node, removed again on drop (also
//! when the test fails), and unique names so tests can run in parallel.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cgroup::Cgroups;
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

/// The agent's cgroup subtree for one test (`weir-test/<unique>`), killed and removed on drop.
pub struct CgroupGuard {
    pub cgroups: Cgroups,
    pub subtree: String,
}

impl CgroupGuard {
    pub fn new() -> Self {
        let subtree = format!("weir-test/{}", unique("cg"));
        let cgroups = Cgroups::detect(&subtree).expect("detect the test cgroup subtree");
        Self { cgroups, subtree }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let dirs = self.cgroups.dirs();
        // Killed processes leave the group only once the kernel has finished their exit,
        // which on a loaded machine can take a while: a group still populated cannot be
        // removed, so wait for `populated 0` (generously) before removing the tree.
        let _ = std::fs::write(dirs[0].join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline
            && std::fs::read_to_string(dirs[0].join("cgroup.events"))
                .is_ok_and(|events| events.lines().any(|l| l == "populated 1"))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        for dir in &dirs {
            remove_tree(dir);
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}
