//! The process runtime: a container is a process tree started from the node's file system
//! (`image` is recorded in status but never pulled — this runtime runs `command` as found on
//! the node), inside the pod's network namespace and cgroups, with a mount namespace of its
//! own (bind-mounted `/etc/resolv.conf` and `/etc/hosts`, a fresh `/proc`), a UTS namespace
//! whose hostname is the pod name, and a PID namespace in which the command is PID 1.
//!
//! Each container has a small shim: the forked child that entered the namespaces. It forks
//! the command (the first process of the new PID namespace), forwards termination signals to
//! it, and when it exits writes the exit status to a file in the pod's state directory. The
//! shim outlives the agent, so a restarted agent adopts running containers and still learns
//! how they ended. Like a container's PID 1 under Docker or containerd, a command that
//! installs no SIGTERM handler ignores SIGTERM (kernel rule for namespace init processes) and
//! is SIGKILLed when the grace period ends.

use std::ffi::CString;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};

use tokio::io::unix::AsyncFd;

/// The PATH used to find a command when the container sets none (runc's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The container cannot start as specified (not found, not executable, bad workingDir).
    #[error("{0}")]
    Start(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start container process: {0}")]
    Spawn(std::io::Error),
}

/// Everything needed to start one container process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// command + args; the first element is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// The pod's network namespace (`/run/netns/<name>`).
    pub netns: PathBuf,
    pub hostname: String,
    /// Files bind-mounted over paths of the node's file system: (source, target).
    pub bind_mounts: Vec<(PathBuf, PathBuf)>,
    /// `cgroup.procs` files the process joins.
    pub cgroup_procs: Vec<PathBuf>,
    /// stdout and stderr go here (appended).
    pub log: PathBuf,
    /// The shim writes `exit <code>` or `signal <n>` here when the command ends.
    pub exit_file: PathBuf,
}

/// A running container: its shim's PID, and that process's start time (clock ticks since
/// boot) so that a reused PID is never mistaken for the container after an agent restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Process {
    pub pid: i32,
    pub start_time: u64,
}

/// How a container process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + signal number when a signal killed it (Kubernetes' convention).
    pub code: i32,
    pub signal: Option<i32>,
    /// False when no one could observe the end (the shim itself was killed while the agent
    /// was down): Kubernetes reports such a container as `ContainerStatusUnknown`.
    pub known: bool,
}

/// Finds `command` the way `execvp` would, with the container's `PATH`, and returns the
/// error text runc gives when it cannot.
pub fn resolve(command: &str, env: &[(String, String)]) -> Result<PathBuf, Error> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if command.is_empty() {
        return Err(Error::Start("exec: no command given".into()));
    }
    if command.contains('/') {
        let path = PathBuf::from(command);
        return match std::fs::metadata(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::Start(format!(
                "exec: \"{command}\": stat {command}: no such file or directory"
            ))),
            _ if executable(&path) => Ok(path),
            _ => Err(Error::Start(format!(
                "exec: \"{command}\": permission denied"
            ))),
        };
    }
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    path_var
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(command))
        .find(|p| executable(p))
        .ok_or_else(|| {
            Error::Start(format!(
                "exec: \"{command}\": executable file not found in $PATH"
            ))
        })
}

fn cstring(what: &'static str, path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::Io {
        what,
        path: path.to_path_buf(),
        source: std::io::Error::new(ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

fn open(
    what: &'static str,
    path: &Path,
    options: &mut std::fs::OpenOptions,
) -> Result<std::fs::File, Error> {
    options.open(path).map_err(|source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The command's PID as seen by the shim (set in the shim only).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Formats `<word> <n>\n` into `buf` without allocating (we are between fork and exec).
fn format_status(buf: &mut [u8; 32], word: &[u8], n: i32) -> usize {
    let mut len = 0;
    for b in word.iter().chain(b" ") {
        buf[len] = *b;
        len += 1;
    }
    let mut digits = [0u8; 12];
    let mut d = 0;
    let mut v = n.unsigned_abs();
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        buf[len] = b'-';
        len += 1;
    }
    while d > 0 {
        d -= 1;
        buf[len] = digits[d];
        len += 1;
    }
    buf[len] = b'\n';
    len + 1
}

/// The shim's life after forking the command: forward signals, wait, record, exit.
/// Only async-signal-safe calls: this runs in a forked child of a multi-threaded process.
fn shim(child: libc::pid_t, exit_fd: libc::c_int) -> ! {
    // SAFETY: plain syscalls on values owned by this (single-threaded) forked process.
    unsafe {
        CHILD.store(child, Ordering::Relaxed);
        // Handlers first: the agent may signal the shim as soon as `spawn` returns, and
        // before this point a SIGTERM would end the shim instead of reaching the command.
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = forward_signal as *const () as usize;
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ] {
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        // Drop every inherited descriptor (std's exec-status pipe among them, so the agent's
        // spawn returns as soon as the command has exec'd) except the exit file.
        if exit_fd > 3 {
            libc::syscall(libc::SYS_close_range, 3, exit_fd - 1, 0);
        }
        libc::syscall(libc::SYS_close_range, exit_fd + 1, u32::MAX, 0);
        let mut status = 0;
        loop {
            let r = libc::waitpid(child, &mut status, 0);
            if r == child {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(255);
            }
        }
        let mut buf = [0u8; 32];
        let (len, code) = if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            (format_status(&mut buf, b"signal", sig), 128 + sig)
        } else {
            let code = libc::WEXITSTATUS(status);
            (format_status(&mut buf, b"exit", code), code)
        };
        libc::write(exit_fd, buf.as_ptr().cast(), len);
        libc::fsync(exit_fd);
        libc::_exit(code)
    }
}

/// Starts a container process. Returns once the command has been exec'd (or failed to).
pub fn spawn(spec: &ProcessSpec) -> Result<Process, Error> {
    let Some((command, args)) = spec.argv.split_first() else {
        return Err(Error::Start("exec: no command given".into()));
    };
    let program = resolve(command, &spec.env)?;
    if let Some(dir) = &spec.working_dir
        && !Path::new(dir).is_dir()
    {
        return Err(Error::Start(format!(
            "chdir to cwd (\"{dir}\") set in config.json failed: no such file or directory"
        )));
    }
    let log = open(
        "container log",
        &spec.log,
        std::fs::OpenOptions::new().create(true).append(true),
    )?;
    let log_err = log.try_clone().map_err(|source| Error::Io {
        what: "container log",
        path: spec.log.clone(),
        source,
    })?;
    let exit_file = open(
        "exit file",
        &spec.exit_file,
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true),
    )?;
    let netns = open(
        "network namespace",
        &spec.netns,
        std::fs::OpenOptions::new().read(true),
    )?;
    let cgroups = spec
        .cgroup_procs
        .iter()
        .map(|p| open("cgroup", p, std::fs::OpenOptions::new().write(true)))
        .collect::<Result<Vec<_>, _>>()?;
    let mounts = spec
        .bind_mounts
        .iter()
        .map(|(src, dst)| Ok((cstring("bind mount", src)?, cstring("bind mount", dst)?)))
        .collect::<Result<Vec<_>, Error>>()?;
    let hostname = spec.hostname.clone().into_bytes();
    let exit_fd: OwnedFd = exit_file.into();
    let exit_raw = exit_fd.as_raw_fd();
    let netns_raw = netns.as_raw_fd();
    let cgroup_raw: Vec<i32> = cgroups.iter().map(AsRawFd::as_raw_fd).collect();

    let mut cmd = Command::new(&program);
    cmd.arg0(command)
        .args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if let Some(dir) = &spec.working_dir {
        cmd.current_dir(dir);
    }
    // SAFETY: the closure only makes async-signal-safe syscalls on data prepared above (no
    // allocation, no locks), as required between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            for fd in &cgroup_raw {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            check(libc::setns(netns_raw, libc::CLONE_NEWNET))?;
            check(libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWPID,
            ))?;
            // Mounts made below must not propagate back to the node.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for (src, dst) in &mounts {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            check(libc::sethostname(hostname.as_ptr().cast(), hostname.len()))?;
            // A session of its own: signals aimed at the agent's terminal or process group
            // never reach containers, and the agent can die without taking them along.
            libc::setsid();
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                0 => {
                    libc::close(exit_raw);
                    // PID 1 of the new namespace: /proc must show this namespace.
                    check(libc::mount(
                        c"proc".as_ptr(),
                        c"/proc".as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        std::ptr::null(),
                    ))?;
                    Ok(())
                }
                child => shim(child, exit_raw),
            }
        });
    }
    let child = cmd.spawn().map_err(Error::Spawn)?;
    drop((exit_fd, netns, cgroups));
    let pid = i32::try_from(child.id())
        .map_err(|_| Error::Spawn(std::io::Error::other("pid out of range")))?;
    let start_time = start_time(pid).ok_or_else(|| {
        Error::Spawn(std::io::Error::other(format!(
            "process {pid} vanished at start"
        )))
    })?;
    Ok(Process { pid, start_time })
}

/// The start time of a process (field 22 of `/proc/<pid>/stat`), if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Process {
    /// True while this very process (not a later one with the same PID) is alive.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }

    /// Sends a signal to the shim, which forwards it to the command.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if self.alive() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig);
        }
    }

    /// Waits until the process has ended and returns how, from the shim's exit file.
    pub async fn wait(&self, exit_file: &Path) -> Exit {
        if self.alive()
            && let Some(fd) = pidfd_open(self.pid)
            // Re-checked after opening: the pidfd must refer to this process, not a successor.
            && start_time(self.pid) == Some(self.start_time)
            // SAFETY: the pidfd is owned by the AsyncFd and closed only when it is dropped.
            && let Ok(fd) = unsafe { AsyncFd::register(fd) }
        {
            let _ = fd.readable().await;
        }
        let reaped = reap(self.pid);
        read_exit(exit_file).unwrap_or(match reaped {
            Some(exit) => exit,
            None => Exit {
                code: 137,
                signal: None,
                known: false,
            },
        })
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(false)
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor that we own, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
    Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Reaps the shim if it is our child (not after an agent restart: then init reaps it).
fn reap(pid: i32) -> Option<Exit> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(Exit {
            code,
            signal: None,
            known: true,
        }),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(Exit {
            code: 128 + sig as i32,
            signal: Some(sig as i32),
            known: true,
        }),
        _ => None,
    }
}

/// Reads the shim's record of how the command ended.
pub fn read_exit(path: &Path) -> Option<Exit> {
    let text = std::fs::read_to_string(path).ok()?;
    let (word, n) = text.trim().split_once(' ')?;
    let n: i32 = n.parse().ok()?;
    match word {
        "exit" => Some(Exit {
            code: n,
            signal: None,
            known: true,
        }),
        "signal" => Some(Exit {
            code: 128 + n,
            signal: Some(n),
            known: true,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
