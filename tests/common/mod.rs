//! Helpers shared by the end-to-end tests that run weir in namespaces and cgroups of their
//! own (`up_netns.rs`, `two_node.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The cgroup2 mount point, read from /proc/mounts.
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 mount")
}

/// Kills every process in the test's cgroup2 subtree `dir`, waits until the kernel has
/// finished their exits (a populated group cannot be removed; on a loaded machine that
/// takes a while), then removes the subtree and its namesakes in the v1 cpu and memory
/// hierarchies; best effort.
pub fn kill_and_remove_cgroups(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && std::fs::read_to_string(dir.join("cgroup.events"))
            .is_ok_and(|events| events.lines().any(|l| l == "populated 1"))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    remove_cgroup_tree(dir);
    if let Some(name) = dir.file_name() {
        for v1 in ["cpu", "memory"] {
            remove_cgroup_tree(&Path::new("/sys/fs/cgroup").join(v1).join(name));
        }
    }
}

/// Removes `dir` and every cgroup below it, deepest first; best effort.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Runs `cmd`, which must succeed.
pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
