use super::*;
use crate::cgroup::Limits;
use crate::testutil::{CgroupGuard, NetnsGuard, unique};

struct Fixture {
    netns: NetnsGuard,
    cgroups: CgroupGuard,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            netns: NetnsGuard::new("wrt"),
            cgroups: CgroupGuard::new(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn spec(&self, argv: &[&str]) -> ProcessSpec {
        let pod = self.cgroups.cgroups.pod(&unique("p"));
        pod.create(Limits::default()).unwrap();
        let resolv = self.dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 10.96.0.10\noptions ndots:5\n").unwrap();
        ProcessSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![
                ("FOO".into(), "bar".into()),
                ("PATH".into(), DEFAULT_PATH.into()),
            ],
            working_dir: Some("/tmp".into()),
            netns: Path::new("/run/netns").join(&self.netns.name),
            hostname: "my-pod".into(),
            bind_mounts: vec![(resolv, "/etc/resolv.conf".into())],
            cgroup_procs: pod.prepare_container("app").unwrap(),
            log: self.dir.path().join("app.log"),
            exit_file: self.dir.path().join("app.exit"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("app.log")).unwrap_or_default()
    }
}

#[tokio::test]
async fn container_runs_in_its_own_namespaces_and_reports_its_exit() {
    let fx = Fixture::new();
    let script = "echo FOO=$FOO; hostname; cat /etc/resolv.conf; echo pid=$$; pwd; \
                  cat /proc/net/dev | grep -c eth0; grep -c . /proc/1/cmdline; exit 3";
    let spec = fx.spec(&["sh", "-c", script]);
    let process = spawn(&spec).unwrap();
    let exit = process.wait(&spec.exit_file).await;
    let log = fx.log();
    assert_eq!(
        exit,
        Exit {
            code: 3,
            signal: None,
            known: true
        },
        "{log}"
    );
    for want in [
        "FOO=bar\n",
        "my-pod\n",
        "nameserver 10.96.0.10\n",
        "pid=1\n",
        "/tmp\n",
    ] {
        assert!(log.contains(want), "{want:?} missing from:\n{log}");
    }
    assert!(log.contains("\n0\n"), "the test netns has no eth0:\n{log}");
    // The node's own resolv.conf and hostname are untouched.
    assert!(
        !std::fs::read_to_string("/etc/resolv.conf")
            .unwrap()
            .contains("10.96.0.10")
    );
}

#[tokio::test]
async fn sigterm_is_forwarded_and_signals_are_reported() {
    let fx = Fixture::new();
    let spec = fx.spec(&[
        "sh",
        "-c",
        "trap 'exit 7' TERM; echo ready; while :; do sleep 0.05; done",
    ]);
    let process = spawn(&spec).unwrap();
    // Until the trap is set, PID 1 of the namespace ignores SIGTERM and would never exit.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !fx.log().contains("ready") {
        assert!(
            std::time::Instant::now() < deadline,
            "the script never got ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    process.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(process.wait(&spec.exit_file).await.code, 7);

    // A PID 1 without a handler ignores SIGTERM; SIGKILL ends it and is reported as 137.
    let spec = fx.spec(&["sleep", "30"]);
    let process = spawn(&spec).unwrap();
    process.signal(nix::sys::signal::Signal::SIGKILL);
    let exit = process.wait(&spec.exit_file).await;
    assert_eq!((exit.code, exit.known), (137, true));
}

#[tokio::test]
async fn an_adopted_process_is_recognised_and_a_reused_pid_is_not() {
    let fx = Fixture::new();
    let spec = fx.spec(&["sleep", "30"]);
    let process = spawn(&spec).unwrap();
    let adopted = Process {
        pid: process.pid,
        start_time: process.start_time,
    };
    assert!(adopted.alive());
    assert!(
        !Process {
            pid: process.pid,
            start_time: process.start_time + 1
        }
        .alive()
    );
    adopted.signal(nix::sys::signal::Signal::SIGKILL);
    assert_eq!(adopted.wait(&spec.exit_file).await.code, 137);
    assert!(!adopted.alive());
}

#[test]
fn missing_commands_and_directories_fail_with_runc_messages() {
    let fx = Fixture::new();
    let err = spawn(&fx.spec(&["no-such-command-xyz"]))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "exec: \"no-such-command-xyz\": executable file not found in $PATH"
    );
    let err = spawn(&fx.spec(&["/no/such/bin"])).unwrap_err().to_string();
    assert!(err.contains("no such file or directory"), "{err}");
    let mut spec = fx.spec(&["true"]);
    spec.working_dir = Some("/no/such/dir".into());
    assert!(spawn(&spec).unwrap_err().to_string().contains("chdir"));
}
