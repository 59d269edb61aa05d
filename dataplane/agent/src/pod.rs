//! One pod's worker: builds its sandbox (network namespace, cgroups, resolv.conf and hosts),
//! runs init containers in order and then the app containers, restarts them by
//! `restartPolicy` with exponential back-off, acts on probe results, terminates the pod
//! gracefully when it is deleted, and reports a pod status that tells the truth about all
//! of it. Container records are persisted under the pod's state directory, so a restarted
//! agent adopts the processes that are still running instead of starting them again.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cgroup::{Cgroups, Limits, PodCgroup};
use crate::env::{Lookup, PodFields};
use crate::network::{PodNet, PodNetwork};
use crate::probe;
use crate::runtime::{self, Exit, Process, ProcessSpec};

/// The node-wide settings and services every pod worker uses.
pub struct Runtime {
    pub node_name: String,
    /// The node's address: the pods' `hostIP`.
    pub node_ip: Ipv4Addr,
    /// Pods' state lives in `<state_dir>/pods/<uid>/`.
    pub state_dir: PathBuf,
    pub cluster_dns: Ipv4Addr,
    pub cluster_domain: String,
    /// First restart delay after the immediate first restart, doubled up to `backoff_max`
    /// (the kubelet's 10 s and 300 s).
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub network: PodNetwork,
    pub cgroups: Cgroups,
    pub lookup: Arc<dyn Lookup>,
}

impl Runtime {
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.state_dir.join("pods").join(uid)
    }
}

/// What pod workers tell the API side.
#[derive(Debug, Clone)]
pub enum Update {
    Status {
        namespace: String,
        name: String,
        uid: String,
        status: Box<PodStatus>,
    },
    /// Something operators should see in `kubectl describe pod`: a core/v1 Event with the
    /// kubelet's reasons (Started, Failed, BackOff, Unhealthy, Killing, FailedCreatePodSandBox).
    Event {
        namespace: String,
        name: String,
        uid: String,
        warning: bool,
        reason: &'static str,
        message: String,
    },
    /// A deleted pod's processes are gone and its resources released: finish the deletion.
    Gone {
        namespace: String,
        name: String,
        uid: String,
    },
}

/// How a container run ended, as recorded in status.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Termination {
    exit_code: i32,
    signal: Option<i32>,
    reason: String,
    message: Option<String>,
    started_at: Option<Time>,
    finished_at: Time,
}

impl Termination {
    fn to_state(&self) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: self.exit_code,
                signal: self.signal,
                reason: Some(self.reason.clone()),
                message: self.message.clone(),
                started_at: self.started_at.clone(),
                finished_at: Some(self.finished_at.clone()),
                container_id: None,
            }),
            ..Default::default()
        }
    }
}

/// The persisted part of a container's state (`<pod dir>/<container>/state.json`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Record {
    /// Start attempts so far; restartCount is one less. Run `n`'s log is `<n>.log`.
    starts: u32,
    process: Option<Process>,
    started_at: Option<Time>,
    /// The previous run's end (status `lastState`).
    last: Option<Termination>,
    /// The end of the current run when it will not be restarted (status `state`).
    terminated: Option<Termination>,
}

/// Identity of the pod on disk, so the agent can find pods again after a restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodMeta {
    pub fn load(dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(dir.join("pod.json")).ok()?).ok()
    }
}

/// Log and exit-status files of run `n` of a container.
pub fn run_files(pod_dir: &Path, container: &str, n: u32) -> (PathBuf, PathBuf) {
    let dir = pod_dir.join(container);
    (dir.join(format!("{n}.log")), dir.join(format!("{n}.exit")))
}

struct Ctr {
    spec: Container,
    init: bool,
    rec: Record,
    /// Incremented per start (also per adoption), to ignore events of earlier runs.
    run: u64,
    waiting: Option<(String, String)>,
    next_start: Option<Instant>,
    /// Delay before the next restart after a failure; zero until the first one.
    backoff: Duration,
    started: bool,
    ready: bool,
    /// Why the agent killed the current run (a failed probe), for its termination message.
    kill_reason: Option<String>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Ctr {
    fn running(&self) -> bool {
        self.rec.process.is_some()
    }

    fn abort_tasks(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

enum Event {
    Exited {
        name: String,
        run: u64,
        exit: Exit,
    },
    Probe {
        name: String,
        run: u64,
        event: probe::Event,
    },
}

/// A running pod worker.
pub struct Worker {
    pod: watch::Sender<Pod>,
    deleted: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// Starts the worker of `pod`. `stop` ends it without touching the pod's processes (the
    /// agent shutting down); deletion goes through [`Worker::update`] or [`Worker::delete`].
    pub fn start(
        rt: Arc<Runtime>,
        pod: Pod,
        updates: mpsc::UnboundedSender<Update>,
        stop: CancellationToken,
    ) -> Self {
        let (pod_tx, pod_rx) = watch::channel(pod);
        let deleted = CancellationToken::new();
        let task = tokio::spawn(run(rt, pod_rx, updates, stop, deleted.clone()));
        Self {
            pod: pod_tx,
            deleted,
            task,
        }
    }

    pub fn update(&self, pod: Pod) {
        self.pod.send_replace(pod);
    }

    /// The pod is gone from the API (deleted with grace 0, or the node lost it): stop it.
    pub fn delete(&self) {
        self.deleted.cancel();
    }

    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }
}

struct State {
    rt: Arc<Runtime>,
    pod: Pod,
    uid: String,
    namespace: String,
    name: String,
    dir: PathBuf,
    net: Option<PodNet>,
    cgroup: PodCgroup,
    sandbox_error: Option<String>,
    ctrs: Vec<Ctr>,
    events: mpsc::UnboundedSender<Event>,
    updates: mpsc::UnboundedSender<Update>,
    conditions: BTreeMap<String, (bool, Time)>,
    start_time: Option<Time>,
    last_status: Option<PodStatus>,
}

fn now() -> Time {
    Time(Timestamp::now())
}

async fn run(
    rt: Arc<Runtime>,
    mut pod_rx: watch::Receiver<Pod>,
    updates: mpsc::UnboundedSender<Update>,
    stop: CancellationToken,
    deleted: CancellationToken,
) {
    let pod = pod_rx.borrow_and_update().clone();
    let (events, mut event_rx) = mpsc::unbounded_channel();
    let mut st = State::new(rt, pod, events, updates.clone());
    st.adopt();
    loop {
        if st.pod.metadata.deletion_timestamp.is_some() || deleted.is_cancelled() {
            st.terminate(&mut event_rx).await;
            let _ = updates.send(Update::Gone {
                namespace: st.namespace.clone(),
                name: st.name.clone(),
                uid: st.uid.clone(),
            });
            return;
        }
        st.reconcile().await;
        if let Some(status) = st.status_changed() {
            let _ = updates.send(Update::Status {
                namespace: st.namespace.clone(),
                name: st.name.clone(),
                uid: st.uid.clone(),
                status: Box::new(status),
            });
        }
        let wake = st.next_wake();
        tokio::select! {
            () = stop.cancelled() => return,
            () = deleted.cancelled() => {}
            changed = pod_rx.changed() => match changed {
                Ok(()) => st.pod = pod_rx.borrow_and_update().clone(),
                Err(_) => return,
            },
            Some(event) = event_rx.recv() => st.handle(event),
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

impl State {
    fn new(
        rt: Arc<Runtime>,
        pod: Pod,
        events: mpsc::UnboundedSender<Event>,
        updates: mpsc::UnboundedSender<Update>,
    ) -> Self {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let ctr = |spec: &Container, init| Ctr {
            spec: spec.clone(),
            init,
            rec: Record::default(),
            run: 0,
            waiting: None,
            next_start: None,
            backoff: Duration::ZERO,
            started: false,
            ready: false,
            kill_reason: None,
            tasks: Vec::new(),
        };
        let mut ctrs: Vec<Ctr> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| ctr(c, true))
            .collect();
        ctrs.extend(spec.containers.iter().map(|c| ctr(c, false)));
        // What the API already shows (an agent restart) keeps its times.
        let conditions = pod
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .filter_map(|c| {
                let time = c.last_transition_time.clone()?;
                Some((c.type_.clone(), (c.status == "True", time)))
            })
            .collect();
        let start_time = pod.status.as_ref().and_then(|s| s.start_time.clone());
        Self {
            dir: rt.pod_dir(&uid),
            cgroup: rt.cgroups.pod(&uid),
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid,
            pod,
            rt,
            net: None,
            sandbox_error: None,
            ctrs,
            events,
            updates,
            conditions,
            start_time,
            last_status: None,
        }
    }

    fn event(&self, warning: bool, reason: &'static str, message: String) {
        let _ = self.updates.send(Update::Event {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            warning,
            reason,
            message,
        });
    }

    fn host_network(&self) -> bool {
        self.pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
    }

    /// The network namespace the pod's containers join.
    fn netns_path(&self) -> PathBuf {
        match &self.net {
            Some(net) if !self.host_network() => net.netns_path(),
            _ => self.rt.network.node_netns_path(),
        }
    }

    /// A host-network pod's "network": the node's namespace and address.
    fn host_net(&self) -> PodNet {
        PodNet {
            netns: String::new(),
            ip: self.rt.node_ip,
        }
    }

    fn restart_policy(&self) -> &str {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    fn grace(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    }

    fn save(&self, i: usize) {
        let c = &self.ctrs[i];
        let dir = self.dir.join(&c.spec.name);
        let result = std::fs::create_dir_all(&dir).and_then(|()| {
            let json = serde_json::to_vec(&c.rec).map_err(std::io::Error::other)?;
            let tmp = dir.join("state.json.tmp");
            std::fs::write(&tmp, json)?;
            std::fs::rename(&tmp, dir.join("state.json"))
        });
        if let Err(e) = result {
            tracing::error!(pod = %self.name, container = %c.spec.name, error = %e, "cannot persist container state");
        }
    }

    /// Picks up what an earlier agent left: the sandbox and container records, watching
    /// processes that still run and treating the others as exited.
    fn adopt(&mut self) {
        if self.host_network() {
            // Its sandbox is only the state directory and cgroups: built if pod.json is there.
            if self.dir.join("pod.json").exists() {
                self.net = Some(self.host_net());
            }
        } else if let Ok(Some(net)) = self.rt.network.existing(&self.uid) {
            self.net = Some(net);
        }
        for i in 0..self.ctrs.len() {
            let path = self.dir.join(&self.ctrs[i].spec.name).join("state.json");
            let Some(rec) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            else {
                continue;
            };
            self.ctrs[i].rec = rec;
            if let Some(process) = self.ctrs[i].rec.process {
                tracing::info!(pod = %self.name, container = %self.ctrs[i].spec.name, pid = process.pid, "adopting container");
                self.watch(i, process);
            }
        }
        if self.ctrs.iter().any(|c| c.rec.starts > 0) {
            self.start_time.get_or_insert_with(now);
        }
    }

    /// Starts the tasks that wait for a run's exit and run its probes.
    fn watch(&mut self, i: usize, process: Process) {
        let netns = self.netns_path();
        let c = &mut self.ctrs[i];
        c.run += 1;
        let run = c.run;
        let name = c.spec.name.clone();
        let (_, exit_file) = run_files(&self.dir, &name, c.rec.starts.saturating_sub(1));
        let events = self.events.clone();
        let wait = tokio::spawn({
            let name = name.clone();
            async move {
                let exit = process.wait(&exit_file).await;
                let _ = events.send(Event::Exited { name, run, exit });
            }
        });
        c.tasks.push(wait.abort_handle());
        // Without probes a running container is started and ready at once, also when it is
        // adopted after an agent restart: its Ready condition must not flap.
        c.started = c.spec.startup_probe.is_none();
        c.ready = c.started && c.spec.readiness_probe.is_none();
        if c.init {
            return;
        }
        let Some(net) = &self.net else { return };
        let target = probe::Target {
            netns,
            pod_ip: net.ip,
            shim_pid: process.pid,
        };
        let events = self.events.clone();
        let probes = tokio::spawn(probe::supervise(c.spec.clone(), target, move |event| {
            let _ = events.send(Event::Probe {
                name: name.clone(),
                run,
                event,
            });
        }));
        c.tasks.push(probes.abort_handle());
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Exited { name, run, exit } => {
                if let Some(i) = self
                    .ctrs
                    .iter()
                    .position(|c| c.spec.name == name && c.run == run)
                {
                    self.exited(i, exit);
                }
            }
            Event::Probe { name, run, event } => {
                let Some(i) = self
                    .ctrs
                    .iter()
                    .position(|c| c.spec.name == name && c.run == run)
                else {
                    return;
                };
                let c = &mut self.ctrs[i];
                match event {
                    probe::Event::Started => c.started = true,
                    probe::Event::Ready(ready) => c.ready = ready,
                    probe::Event::Failed { message } => {
                        tracing::info!(pod = %self.name, container = %name, %message, "killing container");
                        c.ready = false;
                        c.kill_reason = Some(message.clone());
                        let process = c.rec.process;
                        let kind = if message.starts_with("Startup") {
                            "startup"
                        } else {
                            "liveness"
                        };
                        self.event(true, "Unhealthy", message);
                        self.event(
                            false,
                            "Killing",
                            format!("Container {name} failed {kind} probe, will be restarted"),
                        );
                        if let Some(process) = process {
                            let cgroup = self.cgroup.clone();
                            let grace = self.grace();
                            tokio::spawn(async move {
                                stop_container(process, &cgroup, &name, grace).await
                            });
                        }
                    }
                }
            }
        }
    }

    /// Records a run's end and decides, by restart policy, whether and when it restarts.
    fn exited(&mut self, i: usize, exit: Exit) {
        let policy = self.restart_policy().to_string();
        let pod_label = format!("{}_{}({})", self.name, self.namespace, self.uid);
        let c = &mut self.ctrs[i];
        c.abort_tasks();
        c.started = false;
        c.ready = false;
        let reason = if !exit.known {
            "ContainerStatusUnknown"
        } else if exit.code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let term = Termination {
            exit_code: exit.code,
            signal: exit.signal,
            reason: reason.into(),
            message: c.kill_reason.take(),
            started_at: c.rec.started_at.take(),
            finished_at: now(),
        };
        c.rec.process = None;
        tracing::info!(pod = %self.name, container = %c.spec.name, code = exit.code, "container exited");
        let restart = match (c.init, policy.as_str()) {
            (_, "Never") => false,
            (true, _) | (false, "OnFailure") => exit.code != 0,
            _ => true,
        };
        schedule(
            c,
            term,
            restart,
            &pod_label,
            None,
            self.rt.backoff_initial,
            self.rt.backoff_max,
        );
        self.save(i);
        self.backoff_event(i);
    }

    fn backoff_event(&self, i: usize) {
        let c = &self.ctrs[i];
        if c.waiting.is_some() {
            let message = format!(
                "Back-off restarting failed container {} in pod {}_{}({})",
                c.spec.name, self.name, self.namespace, self.uid
            );
            self.event(true, "BackOff", message);
        }
    }

    fn sandbox_ready(&self) -> bool {
        self.net.is_some() && self.sandbox_error.is_none()
    }

    async fn ensure_sandbox(&mut self) {
        if self.sandbox_ready() {
            return;
        }
        let spec = self.pod.spec.clone().unwrap_or_default();
        let result: Result<PodNet, String> = async {
            let limits = Limits::of_pod(
                &spec.containers,
                spec.init_containers.as_deref().unwrap_or_default(),
            )
            .map_err(|e| e.to_string())?;
            std::fs::create_dir_all(&self.dir)
                .map_err(|e| format!("{}: {e}", self.dir.display()))?;
            let meta = PodMeta {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                uid: self.uid.clone(),
            };
            let meta = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
            self.cgroup.create(limits).map_err(|e| e.to_string())?;
            let net = if self.host_network() {
                self.host_net()
            } else {
                let setup = self.rt.network.setup_pod(&self.uid).await;
                setup.map_err(|e| e.to_string())?
            };
            self.write_dns_files(net.ip)
                .map_err(|e| format!("{}: {e}", self.dir.display()))?;
            // Written last: its presence means the sandbox is complete (see `adopt`).
            std::fs::write(self.dir.join("pod.json"), meta).map_err(|e| e.to_string())?;
            Ok(net)
        }
        .await;
        match result {
            Ok(net) => {
                self.net = Some(net);
                self.sandbox_error = None;
                self.start_time.get_or_insert_with(now);
            }
            Err(e) => {
                tracing::warn!(pod = %self.name, error = %e, "cannot create pod sandbox");
                let message = format!("Failed to create pod sandbox: {e}");
                self.event(true, "FailedCreatePodSandBox", message.clone());
                self.sandbox_error = Some(message);
            }
        }
    }

    /// `/etc/resolv.conf` and `/etc/hosts` of the pod, as the kubelet writes them.
    fn write_dns_files(&self, ip: Ipv4Addr) -> std::io::Result<()> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let domain = &self.rt.cluster_domain;
        // ClusterFirst falls back to the node's resolver for host-network pods; they opt in
        // to cluster DNS with ClusterFirstWithHostNet.
        let policy = match (self.host_network(), spec.dns_policy.as_deref()) {
            (true, None | Some("ClusterFirst")) => Some("Default"),
            (_, policy) => policy,
        };
        let (mut nameservers, mut searches, mut options) = match policy {
            Some("Default") => {
                let node = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                let mut ns = Vec::new();
                let mut search = Vec::new();
                let mut opts = Vec::new();
                for line in node.lines() {
                    let mut words = line.split_whitespace();
                    match words.next() {
                        Some("nameserver") => ns.extend(words.map(str::to_string)),
                        Some("search") => search.extend(words.map(str::to_string)),
                        Some("options") => opts.extend(words.map(str::to_string)),
                        _ => {}
                    }
                }
                (ns, search, opts)
            }
            Some("None") => (Vec::new(), Vec::new(), Vec::new()),
            _ => (
                vec![self.rt.cluster_dns.to_string()],
                vec![
                    format!("{}.svc.{domain}", self.namespace),
                    format!("svc.{domain}"),
                    domain.clone(),
                ],
                vec!["ndots:5".to_string()],
            ),
        };
        if let Some(cfg) = &spec.dns_config {
            nameservers.extend(cfg.nameservers.iter().flatten().cloned());
            searches.extend(cfg.searches.iter().flatten().cloned());
            for o in cfg.options.iter().flatten() {
                let Some(name) = &o.name else { continue };
                options.retain(|x| x.split(':').next() != Some(name.as_str()));
                options.push(match &o.value {
                    Some(v) => format!("{name}:{v}"),
                    None => name.clone(),
                });
            }
        }
        let mut resolv = String::new();
        if !searches.is_empty() {
            resolv.push_str(&format!("search {}\n", searches.join(" ")));
        }
        for ns in &nameservers {
            resolv.push_str(&format!("nameserver {ns}\n"));
        }
        if !options.is_empty() {
            resolv.push_str(&format!("options {}\n", options.join(" ")));
        }
        std::fs::write(self.dir.join("resolv.conf"), resolv)?;

        let hostname = spec.hostname.clone().unwrap_or_else(|| self.name.clone());
        let mut hosts = String::from(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
        );
        match &spec.subdomain {
            Some(sub) => hosts.push_str(&format!(
                "{ip}\t{hostname}.{sub}.{}.svc.{domain}\t{hostname}\n",
                self.namespace
            )),
            None => hosts.push_str(&format!("{ip}\t{hostname}\n")),
        }
        for alias in spec.host_aliases.iter().flatten() {
            hosts.push_str(&format!(
                "{}\t{}\n",
                alias.ip,
                alias.hostnames.clone().unwrap_or_default().join("\t")
            ));
        }
        std::fs::write(self.dir.join("hosts"), hosts)
    }

    /// Starts whatever should run now: the next init container, or the app containers.
    async fn reconcile(&mut self) {
        self.ensure_sandbox().await;
        if !self.sandbox_ready() {
            return;
        }
        let now = Instant::now();
        let due = |c: &Ctr| c.next_start.is_none_or(|t| t <= now);
        for i in 0..self.ctrs.len() {
            let c = &self.ctrs[i];
            if !c.init {
                break;
            }
            if c.rec.terminated.as_ref().is_some_and(|t| t.exit_code == 0) {
                continue;
            }
            if c.rec.terminated.is_none() && !c.running() && due(c) {
                self.start(i).await;
            }
            return;
        }
        for i in 0..self.ctrs.len() {
            let c = &self.ctrs[i];
            if !c.init && !c.running() && c.rec.terminated.is_none() && due(c) {
                self.start(i).await;
            }
        }
    }

    async fn start(&mut self, i: usize) {
        let Some(net) = self.net.clone() else { return };
        let pod_label = format!("{}_{}({})", self.name, self.namespace, self.uid);
        let (b0, bmax) = (self.rt.backoff_initial, self.rt.backoff_max);
        let spec = self.ctrs[i].spec.clone();
        let ip = net.ip.to_string();
        let host_ip = self.rt.node_ip.to_string();
        let fields = PodFields {
            pod: &self.pod,
            pod_ip: &ip,
            host_ip: &host_ip,
        };
        let env = match crate::env::build(&fields, &spec, self.rt.lookup.as_ref()).await {
            Ok(env) => env,
            Err(message) => {
                // Not a run: the container was never created (restartCount stays), retried.
                self.event(true, "Failed", format!("Error: {message}"));
                let c = &mut self.ctrs[i];
                c.waiting = Some(("CreateContainerConfigError".into(), message));
                c.next_start = Some(Instant::now() + b0);
                return;
            }
        };
        let argv = crate::env::argv(&spec, &env);
        let n = self.ctrs[i].rec.starts;
        let (log, exit_file) = run_files(&self.dir, &spec.name, n);
        let prepared = self
            .cgroup
            .prepare_container(&spec.name)
            .map_err(|e| e.to_string())
            .and_then(|procs| {
                std::fs::create_dir_all(self.dir.join(&spec.name)).map_err(|e| e.to_string())?;
                Ok(procs)
            });
        let host_network = self.host_network();
        // A host-network pod shares the node's name, as under the kubelet.
        let hostname = if host_network {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| self.rt.node_name.clone())
        } else {
            self.pod
                .spec
                .as_ref()
                .and_then(|s| s.hostname.clone())
                .unwrap_or_else(|| self.name.clone())
        };
        let netns = self.netns_path();
        let mut bind_mounts = vec![(self.dir.join("resolv.conf"), "/etc/resolv.conf".into())];
        if !host_network {
            bind_mounts.push((self.dir.join("hosts"), "/etc/hosts".into()));
        }
        let result = prepared.and_then(|cgroup_procs| {
            runtime::spawn(&ProcessSpec {
                argv,
                env,
                working_dir: spec.working_dir.clone(),
                netns,
                hostname,
                bind_mounts,
                cgroup_procs,
                log,
                exit_file,
            })
            .map_err(|e| e.to_string())
        });
        let policy = self.restart_policy().to_string();
        let c = &mut self.ctrs[i];
        c.rec.starts += 1;
        c.waiting = None;
        match result {
            Ok(process) => {
                tracing::info!(pod = %self.name, container = %spec.name, pid = process.pid, "container started");
                c.rec.process = Some(process);
                c.rec.started_at = Some(now());
                self.watch(i, process);
                self.event(false, "Started", format!("Started container {}", spec.name));
            }
            Err(message) => {
                tracing::warn!(pod = %self.name, container = %spec.name, %message, "container failed to start");
                let term = Termination {
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(message.clone()),
                    started_at: None,
                    finished_at: now(),
                };
                let restart = policy != "Never";
                schedule(
                    c,
                    term,
                    restart,
                    &pod_label,
                    Some(message.clone()),
                    b0,
                    bmax,
                );
                self.event(true, "Failed", format!("Error: {message}"));
                self.backoff_event(i);
            }
        }
        self.save(i);
    }

    fn next_wake(&self) -> Instant {
        let retry = Instant::now() + Duration::from_secs(2);
        let pending = self.ctrs.iter().filter_map(|c| c.next_start).min();
        match (self.sandbox_ready(), pending) {
            (false, _) => retry,
            (true, Some(t)) => t.max(Instant::now()),
            (true, None) => Instant::now() + Duration::from_secs(3600),
        }
    }

    /// Graceful termination: SIGTERM to every running container, SIGKILL to what is left
    /// after the grace period, then the sandbox is removed.
    async fn terminate(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
        let grace = self.grace();
        tracing::info!(pod = %self.name, grace_s = grace.as_secs(), "terminating pod");
        for c in &self.ctrs {
            if let Some(p) = c.rec.process {
                self.event(
                    false,
                    "Killing",
                    format!("Stopping container {}", c.spec.name),
                );
                p.signal(Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        while self.ctrs.iter().any(Ctr::running) {
            tokio::select! {
                Some(event) = events.recv() => {
                    if let Event::Exited { name, run, exit } = event
                        && let Some(i) = self.ctrs.iter().position(|c| c.spec.name == name && c.run == run)
                    {
                        let c = &mut self.ctrs[i];
                        c.abort_tasks();
                        c.rec.process = None;
                        tracing::debug!(pod = %self.name, container = %name, code = exit.code, "container stopped");
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        for c in &mut self.ctrs {
            c.abort_tasks();
        }
        if let Err(e) = self.cgroup.remove().await {
            tracing::error!(pod = %self.name, error = %e, "cannot remove pod cgroup");
        }
        if let Err(e) = self.rt.network.teardown_pod(&self.uid).await {
            tracing::error!(pod = %self.name, error = %e, "cannot remove pod network");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(pod = %self.name, error = %e, "cannot remove pod state");
        }
    }

    fn set_condition(&mut self, kind: &'static str, value: bool) -> PodCondition {
        let entry = self
            .conditions
            .entry(kind.to_string())
            .or_insert_with(|| (value, now()));
        if entry.0 != value {
            *entry = (value, now());
        }
        PodCondition {
            type_: kind.into(),
            status: if value { "True" } else { "False" }.into(),
            last_transition_time: Some(entry.1.clone()),
            ..Default::default()
        }
    }

    fn container_status(&self, c: &Ctr) -> ContainerStatus {
        let state = if c.running() {
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: c.rec.started_at.clone(),
                }),
                ..Default::default()
            }
        } else if let Some(t) = &c.rec.terminated {
            t.to_state()
        } else {
            let (reason, message) = match (&c.waiting, &self.sandbox_error) {
                (Some((r, m)), _) => (r.clone(), Some(m.clone())),
                (None, Some(e)) => ("ContainerCreating".to_string(), Some(e.clone())),
                (None, None) if c.init || self.init_done() => ("ContainerCreating".into(), None),
                (None, None) => ("PodInitializing".into(), None),
            };
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason),
                    message,
                }),
                ..Default::default()
            }
        };
        let started = c.running() && c.started;
        ContainerStatus {
            name: c.spec.name.clone(),
            image: c.spec.image.clone().unwrap_or_default(),
            image_id: String::new(),
            container_id: c
                .rec
                .process
                .map(|p| format!("weir://{}/{}/{}", self.uid, c.spec.name, p.pid)),
            ready: c.running() && c.ready && !c.init,
            started: Some(started),
            restart_count: i32::try_from(c.rec.starts.saturating_sub(1)).unwrap_or(i32::MAX),
            state: Some(state),
            last_state: c.rec.last.as_ref().map(Termination::to_state),
            ..Default::default()
        }
    }

    fn init_done(&self) -> bool {
        self.ctrs
            .iter()
            .filter(|c| c.init)
            .all(|c| c.rec.terminated.as_ref().is_some_and(|t| t.exit_code == 0))
    }

    fn phase(&self) -> &'static str {
        let apps: Vec<&Ctr> = self.ctrs.iter().filter(|c| !c.init).collect();
        let failed_for_good =
            |c: &&Ctr| c.rec.terminated.as_ref().is_some_and(|t| t.exit_code != 0);
        if self
            .ctrs
            .iter()
            .filter(|c| c.init)
            .any(|c| failed_for_good(&c))
        {
            return "Failed";
        }
        if !self.sandbox_ready() || !self.init_done() {
            return "Pending";
        }
        if apps.iter().any(|c| c.running()) {
            return "Running";
        }
        if !apps.is_empty() && apps.iter().all(|c| c.rec.terminated.is_some()) {
            return if apps.iter().any(failed_for_good) {
                "Failed"
            } else {
                "Succeeded"
            };
        }
        if apps.iter().any(|c| c.rec.starts > 0) {
            "Running"
        } else {
            "Pending"
        }
    }

    fn status(&mut self) -> PodStatus {
        let init_done = self.init_done();
        let apps_ready = self
            .ctrs
            .iter()
            .filter(|c| !c.init)
            .all(|c| c.running() && c.ready);
        let sandbox = self.sandbox_ready();
        let phase = self.phase();
        let ready = apps_ready && phase == "Running";
        let conditions = vec![
            self.set_condition("PodReadyToStartContainers", sandbox),
            self.set_condition("Initialized", init_done),
            self.set_condition("Ready", ready),
            self.set_condition("ContainersReady", ready),
            self.set_condition("PodScheduled", true),
        ];
        let ip = self
            .net
            .as_ref()
            .filter(|_| sandbox)
            .map(|n| n.ip.to_string());
        let host_ip = self.rt.node_ip.to_string();
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(conditions),
            host_ip: Some(host_ip.clone()),
            host_ips: Some(vec![HostIP { ip: host_ip }]),
            pod_ip: ip.clone(),
            pod_ips: ip.map(|ip| vec![PodIP { ip }]),
            start_time: self.start_time.clone(),
            init_container_statuses: Some(
                self.ctrs
                    .iter()
                    .filter(|c| c.init)
                    .map(|c| self.container_status(c))
                    .collect(),
            )
            .filter(|v: &Vec<_>| !v.is_empty()),
            container_statuses: Some(
                self.ctrs
                    .iter()
                    .filter(|c| !c.init)
                    .map(|c| self.container_status(c))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn status_changed(&mut self) -> Option<PodStatus> {
        let status = self.status();
        if self.last_status.as_ref() == Some(&status) {
            return None;
        }
        self.last_status = Some(status.clone());
        Some(status)
    }
}

/// After a run ended (or failed to start): record it and, when it restarts, when.
fn schedule(
    c: &mut Ctr,
    term: Termination,
    restart: bool,
    pod_label: &str,
    start_error: Option<String>,
    initial: Duration,
    max: Duration,
) {
    if !restart {
        c.rec.terminated = Some(term);
        c.next_start = None;
        return;
    }
    // A run that lasted long enough resets the back-off, as the kubelet's does.
    let long_run = term.started_at.as_ref().is_some_and(|s| {
        term.finished_at.0.duration_since(s.0).as_secs_f64() > 2.0 * max.as_secs_f64()
    });
    if long_run {
        c.backoff = Duration::ZERO;
    }
    let delay = c.backoff;
    c.backoff = if delay.is_zero() {
        initial
    } else {
        (delay * 2).min(max)
    };
    c.rec.last = Some(term);
    c.rec.terminated = None;
    c.next_start = Some(Instant::now() + delay);
    let backoff = format!(
        "back-off {}s restarting failed container={} pod={pod_label}",
        delay.as_secs(),
        c.spec.name
    );
    c.waiting = match start_error {
        Some(message) => Some(("RunContainerError".into(), format!("{message}; {backoff}"))),
        None if delay.is_zero() => None,
        None => Some(("CrashLoopBackOff".into(), backoff)),
    };
}

/// Stops one container: SIGTERM, then SIGKILL to all its processes after `grace`.
async fn stop_container(process: Process, cgroup: &PodCgroup, name: &str, grace: Duration) {
    process.signal(Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while process.alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if process.alive()
        && let Err(e) = cgroup.kill_container(name).await
    {
        tracing::error!(container = %name, error = %e, "cannot kill container");
    }
}

#[cfg(test)]
mod tests;
