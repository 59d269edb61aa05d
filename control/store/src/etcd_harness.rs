//! A real etcd server for tests: [`EtcdProcess`] runs `etcd` (from PATH, else Debian
//! etcd-server's `/usr/bin/etcd`) on free loopback ports with a temporary data dir, and
//! kills it on drop. It can be stopped and started again on the same ports and data, or
//! frozen, to test what happens while etcd is away or hung.
//!
//! Public (not test-only) because the API server's tests and the end-to-end tests reuse it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{EtcdStore, Store};

/// How long a fresh etcd may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts with fresh ports when etcd dies at start (another process took a port).
const START_ATTEMPTS: usize = 3;
/// Log bytes quoted in an error.
const LOG_TAIL: u64 = 2_000;

/// Why the test etcd could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    #[error(
        "the etcd binary was not found (looked for `etcd` on PATH and /usr/bin/etcd); \
         install it with `apt-get install etcd-server`"
    )]
    EtcdMissing,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd exited ({status}) before it answered; its log ends with:\n{log}")]
    Exited { status: String, log: String },
    #[error("etcd did not answer within {}s; its log ends with:\n{log}", READY_TIMEOUT.as_secs())]
    NotReady { log: String },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// A running (or stopped) etcd server owned by a test.
pub struct EtcdProcess {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    // Dropped after the child is killed (fields drop in order, and Drop kills first).
    dir: tempfile::TempDir,
}

impl EtcdProcess {
    /// Starts etcd on free loopback ports and waits until it answers.
    pub async fn start() -> Result<Self, HarnessError> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let mut etcd = Self {
                child: None,
                client_port: free_port()?,
                peer_port: free_port()?,
                dir: tempfile::Builder::new()
                    .prefix("weir-etcd-")
                    .tempdir()
                    .map_err(io("creating the etcd data dir"))?,
            };
            match etcd.start_again().await {
                Ok(()) => return Ok(etcd),
                // A port taken between probing and binding makes etcd exit; try new ones.
                Err(e @ HarnessError::Exited { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(HarnessError::NotReady { log: String::new() }))
    }

    /// `http://127.0.0.1:<port>`: the URL clients connect to.
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data directory (kept across [`stop`](Self::stop) / [`start_again`](Self::start_again)).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills etcd (SIGKILL, as a crash would) and keeps its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused process dies of SIGKILL too; CONT first so no stopped zombie lingers.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes etcd (SIGSTOP): it keeps its connections but answers nothing, like a hung or
    /// partitioned server. [`resume`](Self::resume) lets it go on.
    pub fn pause(&self) -> Result<(), HarnessError> {
        self.signal("-STOP")
    }

    /// Resumes a [`pause`](Self::pause)d etcd (SIGCONT).
    pub fn resume(&self) -> Result<(), HarnessError> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<(), HarnessError> {
        let Some(child) = &self.child else {
            return Ok(());
        };
        let pid = child.id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .map_err(io(format!("running kill {signal} {pid}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(HarnessError::Io {
                context: format!("kill {signal} {pid}"),
                source: std::io::Error::other(status.to_string()),
            })
        }
    }

    /// Starts etcd again on the same ports and data, and waits until it answers.
    /// Does nothing if it is running.
    pub async fn start_again(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log_path = self.dir.path().join("etcd.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(io("duplicating the log file"))?;
        let client = self.client_url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let args = [
            "--name".to_owned(),
            "weir-test".to_owned(),
            "--data-dir".to_owned(),
            self.dir.path().join("data").display().to_string(),
            "--listen-client-urls".to_owned(),
            client.clone(),
            "--advertise-client-urls".to_owned(),
            client.clone(),
            "--listen-peer-urls".to_owned(),
            peer.clone(),
            "--initial-advertise-peer-urls".to_owned(),
            peer.clone(),
            "--initial-cluster".to_owned(),
            format!("weir-test={peer}"),
        ];
        let child = spawn_etcd(&args, log, log_err)?;
        self.child = Some(child);
        self.wait_ready(&log_path).await
    }

    async fn wait_ready(&mut self, log_path: &Path) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = vec![self.client_url()];
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(HarnessError::Exited {
                    status: status.to_string(),
                    log: log_tail(log_path),
                });
            }
            if let Ok(store) = EtcdStore::connect(&url).await
                && store.current_revision().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(HarnessError::NotReady {
                    log: log_tail(log_path),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_etcd(args: &[String], out: File, err: File) -> Result<Child, HarnessError> {
    let binary = find_etcd(std::env::var_os("PATH"), Path::new(DEBIAN_ETCD))?;
    Command::new(&binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io(format!("starting {}", binary.display())))
}

/// Where Debian's etcd-server package installs etcd.
const DEBIAN_ETCD: &str = "/usr/bin/etcd";

/// `etcd` on `path` (a PATH value), else `fallback`.
fn find_etcd(path: Option<std::ffi::OsString>, fallback: &Path) -> Result<PathBuf, HarnessError> {
    let on_path = path
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("etcd"));
    on_path
        .chain([fallback.to_path_buf()])
        .find(|p| p.is_file())
        .ok_or(HarnessError::EtcdMissing)
}

/// A loopback port nobody listens on now. etcd binds it a moment later; a race with another
/// process is caught by etcd exiting and [`EtcdProcess::start`] trying again.
fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("probing for a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("probing for a free port"))?
        .port())
}

fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    read().unwrap_or_else(|e| format!("(log {} unreadable: {e})", PathBuf::from(path).display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_etcd_says_how_to_install_it() {
        let empty = tempfile::tempdir().expect("temp dir");
        let err = find_etcd(Some(empty.path().into()), &empty.path().join("etcd"))
            .expect_err("no etcd in an empty dir");
        assert!(
            err.to_string().contains("apt-get install etcd-server"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn stop_and_start_again_keep_data_and_ports() {
        let mut etcd = EtcdProcess::start().await.expect("start etcd");
        let url = etcd.client_url();
        let store = EtcdStore::connect(std::slice::from_ref(&url))
            .await
            .expect("connect");
        store.create("/k", b"v".to_vec()).await.expect("create");
        etcd.stop();
        etcd.stop();
        etcd.start_again().await.expect("start again");
        assert_eq!(etcd.client_url(), url);
        let store = EtcdStore::connect(&[url]).await.expect("reconnect");
        assert!(store.get("/k").await.expect("get").is_some(), "data kept");
    }
}
