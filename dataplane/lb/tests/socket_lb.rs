//! End-to-end tests of the socket load balancer: real BPF programs attached to a cgroup of the
//! test's own, pods as network namespaces on a bridge in a node namespace with no route out,
//! backends answering with their pod name (and, for `externalTrafficPolicy: Local`, another
//! node holding the only endpoint and an outside client on the tc path). Needs root. Tests
//! share the process-wide cgroup membership, so they run one at a time.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use weir_lb::netlab::{Lab, Pod, TestBpfRoot, TestCgroup, in_netns, ip};
use weir_lb::tc::TcPrograms;
use weir_lb::{LbMaps, MaglevConfig, ModelConfig, Scope, Syncer, load_and_attach, model};

static SERIAL: Mutex<()> = Mutex::new(());
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(2);

/// Ports every backend pod serves: 8080/8081 send the pod name and close (server closes first,
/// so clients can reuse source ports); 9000 sends the name and then echoes; UDP 5353 answers
/// each datagram with the pod name.
fn serve(pod: &Pod, name: &str) -> Result<()> {
    for port in [8080u16, 8081] {
        let name = format!("{name}:{port}");
        in_netns(&pod.ns, move || -> std::io::Result<()> {
            let l = TcpListener::bind(("0.0.0.0", port))?;
            for s in l.incoming() {
                let _ = s.and_then(|mut s| s.write_all(format!("{name}\n").as_bytes()));
            }
            Ok(())
        })?;
    }
    let n = name.to_string();
    in_netns(&pod.ns, move || -> std::io::Result<()> {
        let l = TcpListener::bind(("0.0.0.0", 9000))?;
        for s in l.incoming() {
            let n = n.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut s = s?;
                s.write_all(format!("{n}\n").as_bytes())?;
                let mut buf = [0u8; 256];
                loop {
                    let k = s.read(&mut buf)?;
                    if k == 0 {
                        return Ok(());
                    }
                    s.write_all(&buf[..k])?;
                }
            });
        }
        Ok(())
    })?;
    let n = name.to_string();
    in_netns(&pod.ns, move || -> std::io::Result<()> {
        let u = UdpSocket::bind(("0.0.0.0", 5353))?;
        let mut buf = [0u8; 64];
        loop {
            let (_, from) = u.recv_from(&mut buf)?;
            u.send_to(n.as_bytes(), from)?;
        }
    })?;
    Ok(())
}

/// Fields drop in order: the process leaves the cgroup before the lock lets the next test in.
struct Env {
    syncer: Option<Syncer>,
    bpf: TestBpfRoot,
    backends: Vec<Pod>,
    client: Pod,
    // The namespaces live as long as the test.
    lab: Lab,
    cg: TestCgroup,
    _guard: std::sync::MutexGuard<'static, ()>,
}

impl Env {
    fn new() -> Result<Self> {
        let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let mut cg = TestCgroup::new().context("create test cgroup")?;
        cg.enter().context("join test cgroup")?;
        let bpf = TestBpfRoot::new();
        let mut lab = Lab::new().context("create node netns")?;
        let mut backends = Vec::new();
        for n in 1..=3 {
            let pod = lab.add_pod(n)?;
            serve(&pod, &format!("pod{n}"))?;
            backends.push(pod);
        }
        let client = lab.add_pod(9)?;
        // Anything that escapes rewriting dies in the node namespace.
        in_netns(&lab.host, || {
            weir_lb::install_unreachable_routes(&["10.96.0.0/12"])
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("route thread panicked"))??;
        let maps = load_and_attach(&bpf.0, &cg.path)?;
        let syncer = Some(Syncer::new(maps, MaglevConfig::default())?);
        Ok(Self {
            _guard: guard,
            syncer,
            bpf,
            backends,
            client,
            lab,
            cg,
        })
    }

    fn syncer(&mut self) -> &mut Syncer {
        self.syncer.as_mut().expect("syncer loaded")
    }

    /// Programs Service `web` (TCP 80→8080, 81→8081, 90→9000, UDP 53→5353) with `extra` spec
    /// fields, `annotations`, and the backend pods `ready` (by index).
    fn program(
        &mut self,
        extra: serde_json::Value,
        annotations: serde_json::Value,
        ready: &[usize],
    ) -> Result<usize> {
        let mut svc = json!({
            "metadata": {"name": "web", "namespace": "default", "annotations": annotations},
            "spec": {"clusterIP": VIP.to_string(), "ports": [
                {"name": "a", "port": 80}, {"name": "b", "port": 81},
                {"name": "echo", "port": 90}, {"name": "dns", "port": 53, "protocol": "UDP"}]}
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            svc["spec"][k] = v.clone();
        }
        let eps: Vec<_> = ready
            .iter()
            .map(|&i| json!({"addresses": [self.backends[i].ip.to_string()]}))
            .collect();
        let slice = json!({
            "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "a", "port": 8080}, {"name": "b", "port": 8081}, {"name": "echo", "port": 9000},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": eps
        });
        let svc: Service = serde_json::from_value(svc)?;
        let slice: EndpointSlice = serde_json::from_value(slice)?;
        let (want, problems) = model::desired(&[svc], &[slice], &ModelConfig::default());
        ensure!(problems.is_empty(), "{problems:?}");
        Ok(self.syncer().sync(&want)?)
    }

    /// Runs `f` in the client pod and returns its result.
    fn client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        in_netns(&self.client.ns, f)?
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Maps and links go with the bpffs directory; field drops then remove netns and cgroup.
        self.syncer = None;
        let _ = weir_lb::unpin_all(&self.bpf.0);
    }
}

fn name_of(port: u16) -> std::io::Result<(String, SocketAddr)> {
    name_at(SocketAddr::from((VIP, port)))
}

/// The first line a TCP backend reached through `to` sends (its name), and the peer address
/// the socket reports.
fn name_at(to: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok((line.trim().to_string(), s.peer_addr()?))
}

fn pod_of(name: &str) -> &str {
    name.split(':').next().unwrap_or(name)
}

#[test]
fn tcp_and_udp_reach_every_backend_and_the_app_sees_the_cluster_ip() -> Result<()> {
    let mut env = Env::new()?;
    env.program(
        json!({}),
        json!({"weir.dev/lb-algorithm": "round-robin"}),
        &[0, 1, 2],
    )?;
    let (names, peers) = env.client(|| -> std::io::Result<_> {
        let mut names = std::collections::BTreeMap::<String, usize>::new();
        let mut peers = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let (n, peer) = name_of(80)?;
            *names.entry(n).or_default() += 1;
            peers.insert(peer);
        }
        Ok((names, peers))
    })??;
    assert_eq!(
        names.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "round robin: {names:?}"
    );
    assert_eq!(
        peers.into_iter().collect::<Vec<_>>(),
        [SocketAddr::from((VIP, 80))],
        "getpeername"
    );

    env.program(json!({}), json!({}), &[0, 1, 2])?;
    let (udp, froms, connected) = env.client(|| -> std::io::Result<_> {
        let u = UdpSocket::bind("0.0.0.0:0")?;
        u.set_read_timeout(Some(TIMEOUT))?;
        let (mut seen, mut froms) = (
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        );
        let mut buf = [0u8; 64];
        for _ in 0..60 {
            u.send_to(b"q", (VIP, 53))?;
            let (k, from) = u.recv_from(&mut buf)?;
            seen.insert(String::from_utf8_lossy(&buf[..k]).to_string());
            froms.insert(from);
        }
        let c = UdpSocket::bind("0.0.0.0:0")?;
        c.set_read_timeout(Some(TIMEOUT))?;
        c.connect((VIP, 53))?;
        c.send(b"q")?;
        let k = c.recv(&mut buf)?;
        Ok((
            seen,
            froms,
            (
                String::from_utf8_lossy(&buf[..k]).to_string(),
                c.peer_addr()?,
            ),
        ))
    })??;
    assert_eq!(
        udp.len(),
        3,
        "unconnected UDP spreads over every backend: {udp:?}"
    );
    assert_eq!(
        froms.into_iter().collect::<Vec<_>>(),
        [SocketAddr::from((VIP, 53))],
        "recvmsg reverse"
    );
    assert!(connected.0.starts_with("pod"), "{connected:?}");
    assert_eq!(connected.1, SocketAddr::from((VIP, 53)));

    let rows = env.syncer().maps().list()?;
    let tcp80 = rows
        .iter()
        .find(|r| r.frontend.port() == 80)
        .context("row for :80")?;
    assert_eq!(tcp80.backends.len(), 3);
    assert_eq!(tcp80.counters.connections, 30);
    let udp53 = rows
        .iter()
        .find(|r| r.frontend.port() == 53)
        .context("row for :53")?;
    assert_eq!(udp53.counters.packets, 60);
    assert_eq!(udp53.counters.connections, 1);
    Ok(())
}

#[test]
fn scale_3_to_1_to_3_under_traffic_and_zero_endpoints_refuse() -> Result<()> {
    let mut env = Env::new()?;
    env.program(json!({}), json!({}), &[0, 1, 2])?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let phase = stop.clone();
    // Background traffic. Each result is tagged with its phase, or with none when the phase
    // changed while it ran: its connect may have seen either map contents.
    let traffic = in_netns(&env.client.ns, move || {
        let mut seen = Vec::new();
        loop {
            let p = phase.load(std::sync::atomic::Ordering::SeqCst);
            if p == 9 {
                return seen;
            }
            let result = name_of(80).map(|(n, _)| n).map_err(|e| e.kind());
            let same = phase.load(std::sync::atomic::Ordering::SeqCst) == p;
            seen.push((same.then_some(p), result));
        }
    })?;
    let wait = || std::thread::sleep(Duration::from_millis(200));
    wait();
    env.program(json!({}), json!({}), &[1])?;
    stop.store(1, std::sync::atomic::Ordering::SeqCst);
    wait();
    env.program(json!({}), json!({}), &[0, 1, 2])?;
    stop.store(2, std::sync::atomic::Ordering::SeqCst);
    wait();
    stop.store(9, std::sync::atomic::Ordering::SeqCst);
    let seen = traffic
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?;
    let errors: Vec<_> = seen.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        errors.is_empty(),
        "no connection may fail while scaling: {errors:?}"
    );
    let names = |phase| {
        seen.iter()
            .filter(move |(p, _)| *p == Some(phase))
            .filter_map(|(_, r)| r.as_ref().ok())
            .map(|n| pod_of(n))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(
        names(1).into_iter().collect::<Vec<_>>(),
        ["pod2"],
        "after scaling to 1 only pod2 gets new connections"
    );
    assert_eq!(names(2).len(), 3, "scaled back to 3: {:?}", names(2));

    env.program(json!({}), json!({}), &[])?;
    let (tcp, udp) = env.client(|| {
        let tcp = name_of(80).map_err(|e| e.kind());
        let udp = UdpSocket::bind("0.0.0.0:0")
            .and_then(|u| u.send_to(b"q", (VIP, 53)))
            .map_err(|e| e.kind());
        (tcp, udp)
    })?;
    assert_eq!(
        tcp,
        Err(ErrorKind::ConnectionRefused),
        "no endpoints: refused, not a timeout"
    );
    assert_eq!(udp, Err(ErrorKind::ConnectionRefused));
    let rows = env.syncer().maps().list()?;
    assert_eq!(
        rows.iter()
            .find(|r| r.frontend.port() == 80)
            .map(|r| r.counters.refused),
        Some(1)
    );
    Ok(())
}

#[test]
fn session_affinity_sticks_and_maglev_moves_only_the_removed_backends_flows() -> Result<()> {
    let mut env = Env::new()?;
    env.program(
        json!({"sessionAffinity": "ClientIP"}),
        json!({}),
        &[0, 1, 2],
    )?;
    let sticky = env.client(|| {
        (0..20)
            .map(|_| name_of(80).map(|(n, _)| n))
            .collect::<std::io::Result<std::collections::BTreeSet<_>>>()
    })??;
    assert_eq!(
        sticky.len(),
        1,
        "ClientIP affinity: one backend for every connect: {sticky:?}"
    );

    // Six backends (3 pods × ports 8080/8081 through frontends 80/81 on one Service port
    // each) would need two Services; instead use flows from fixed source ports to :80.
    env.program(
        json!({}),
        json!({"weir.dev/lb-algorithm": "maglev"}),
        &[0, 1, 2],
    )?;
    let flows = || -> std::io::Result<Vec<String>> {
        (0..300u16)
            .map(|i| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.set_reuse_address(true)?;
                s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 40000 + i)).into())?;
                s.connect_timeout(&SocketAddr::from((VIP, 80)).into(), TIMEOUT)?;
                let s: TcpStream = s.into();
                s.set_read_timeout(Some(TIMEOUT))?;
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line)?;
                Ok(line.trim().to_string())
            })
            .collect()
    };
    let before = env.client(flows)??;
    let again = env.client(flows)??;
    assert_eq!(
        before, again,
        "Maglev: the same flow lands on the same backend"
    );
    let per: std::collections::BTreeSet<_> = before.iter().collect();
    assert_eq!(per.len(), 3, "flows spread over every backend");
    env.program(
        json!({}),
        json!({"weir.dev/lb-algorithm": "maglev"}),
        &[0, 2],
    )?;
    let after = env.client(flows)??;
    let mut moved_others = 0;
    for (b, a) in before.iter().zip(&after) {
        if pod_of(b) == "pod2" {
            assert_ne!(pod_of(a), "pod2");
        } else if a != b {
            moved_others += 1;
        }
    }
    let removed = before.iter().filter(|b| pod_of(b) == "pod2").count();
    // Only the removed backend's ~1/3 must move; Maglev may disturb a few percent more.
    assert!(
        moved_others * 100 <= before.len() * 6,
        "{moved_others} of {} flows on surviving backends moved",
        before.len() - removed
    );
    Ok(())
}

#[test]
fn agent_restart_keeps_established_connections_and_replaces_links() -> Result<()> {
    let mut env = Env::new()?;
    env.program(json!({}), json!({}), &[0, 1, 2])?;
    let ids_before = env.syncer().state().services.clone();
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<std::io::Result<String>>();
    in_netns(&env.client.ns, move || {
        let run = || -> std::io::Result<String> {
            let s = TcpStream::connect_timeout(&SocketAddr::from((VIP, 90)), TIMEOUT)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut who = String::new();
            r.read_line(&mut who)?;
            let mut w = &s;
            while let Ok(msg) = rx.recv() {
                w.write_all(format!("{msg}\n").as_bytes())?;
                let mut line = String::new();
                r.read_line(&mut line)?;
                if line.trim() != msg {
                    return Err(std::io::Error::other(format!("echo {line:?} for {msg:?}")));
                }
            }
            Ok(who)
        };
        let _ = done_tx.send(run());
    })?;
    tx.send("before")?;
    // The agent goes away: every fd it held is closed; pins keep programs and maps alive.
    env.syncer = None;
    tx.send("while-down")?;
    let maps = load_and_attach(&env.bpf.0, &env.cg.path)?;
    env.syncer = Some(Syncer::new(maps, MaglevConfig::default())?);
    assert_eq!(
        env.syncer().state().services,
        ids_before,
        "the new agent reads the old state back"
    );
    assert_eq!(
        env.program(json!({}), json!({}), &[0, 1, 2])?,
        0,
        "reconcile, not rewrite"
    );
    tx.send("after")?;
    drop(tx);
    let who = done_rx.recv_timeout(Duration::from_secs(10))??;
    assert!(who.starts_with("pod"));
    // One program per hook: the old run's links were replaced, not stacked.
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&env.cg.path)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    for hook in ["connect4", "sendmsg4", "recvmsg4", "getpeername4"] {
        assert_eq!(
            text.matches(hook).count(),
            1,
            "{hook} attached once:\n{text}"
        );
    }
    let (n, _) = env.client(|| name_of(80))??;
    assert!(n.starts_with("pod"));
    Ok(())
}

#[test]
fn pods_reach_a_local_policy_load_balancer_whose_only_endpoint_is_on_another_node() -> Result<()> {
    const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
    const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
    let mut env = Env::new()?;
    let remote = env.lab.add_remote_node()?;
    // Pod CIDRs are routed between nodes: the other node answers this node's pods from its
    // pod address.
    ip(
        Some(&remote.ns),
        &[
            "route",
            "add",
            "10.244.0.0/24",
            "via",
            &remote.node_ip.to_string(),
            "src",
            &remote.pod_ip.to_string(),
        ],
    )?;
    let far = Pod {
        ns: remote.ns.clone(),
        ip: remote.pod_ip,
    };
    serve(&far, "far")?;
    let ext = env
        .lab
        .add_external(&[&format!("{EXTERNAL_IP}/32"), &format!("{LB_IP}/32")])?;
    let (bpf, devices) = (
        env.bpf.0.clone(),
        vec![ext.node_dev.clone(), remote.node_dev.clone()],
    );
    in_netns(&env.lab.host, move || -> Result<()> {
        TcPrograms::load(&bpf)?.attach(&bpf, &devices)?;
        Ok(())
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("attach thread panicked"))??;
    let node_ip = ext.node_ip;
    let program = |env: &mut Env, policy: &str| -> Result<usize> {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "lb", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.20", "externalIPs": [EXTERNAL_IP.to_string()],
                     "externalTrafficPolicy": policy,
                     "ports": [{"name": "echo", "port": 90, "nodePort": 30090},
                               {"name": "dns", "port": 53, "nodePort": 30091, "protocol": "UDP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}}
        }))?;
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "lb-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "lb"}},
            "addressType": "IPv4",
            "ports": [{"name": "echo", "port": 9000}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": [remote.pod_ip.to_string()], "nodeName": "n2"}]
        }))?;
        let cfg = ModelConfig {
            node_name: Some("n1".into()),
            node_ips: vec![node_ip],
            ..Default::default()
        };
        let (want, problems) = model::desired(&[svc], &[slice], &cfg);
        ensure!(problems.is_empty(), "{problems:?}");
        Ok(env.syncer().sync(&want)?)
    };
    // From a pod on this node, every external address of the Service (TCP through connect4,
    // unconnected UDP through sendmsg4/recvmsg4) reaches the endpoint on the other node, and
    // the socket shows the address it dialled (getpeername4, recvmsg4).
    let in_node = |env: &Env| -> Result<()> {
        let (names, udp) = env.client(move || -> std::io::Result<_> {
            let mut names = Vec::new();
            for to in [
                SocketAddr::from((EXTERNAL_IP, 90)),
                SocketAddr::from((LB_IP, 90)),
                SocketAddr::from((node_ip, 30090)),
            ] {
                names.push((to, name_at(to)?));
            }
            let u = UdpSocket::bind("0.0.0.0:0")?;
            u.set_read_timeout(Some(TIMEOUT))?;
            u.send_to(b"q", (EXTERNAL_IP, 53))?;
            let mut buf = [0u8; 64];
            let (k, from) = u.recv_from(&mut buf)?;
            Ok((
                names,
                (String::from_utf8_lossy(&buf[..k]).to_string(), from),
            ))
        })??;
        for (to, (name, peer)) in names {
            ensure!(name == "far", "{to} answered by {name:?}");
            ensure!(peer == to, "{to} shows peer {peer}");
        }
        ensure!(
            udp == ("far".to_string(), SocketAddr::from((EXTERNAL_IP, 53))),
            "UDP answer {udp:?}"
        );
        Ok(())
    };
    // From outside the node (the process out of the cgroup: no socket hook sees these).
    let from_outside = |env: &mut Env| -> Result<Vec<std::io::Result<String>>> {
        env.cg.leave()?;
        let out = in_netns(&ext.ns, move || {
            [
                SocketAddr::from((EXTERNAL_IP, 90)),
                SocketAddr::from((node_ip, 30090)),
            ]
            .map(|to| name_at(to).map(|(n, _)| n))
            .into_iter()
            .collect::<Vec<_>>()
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("outside client panicked"));
        env.cg.enter()?;
        out
    };
    let refused = |r: &std::io::Result<String>| matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionRefused);

    program(&mut env, "Local")?;
    // A restarted agent reads both entries of each frontend back from the pinned maps and
    // finds nothing to write.
    env.syncer = Some(Syncer::new(
        LbMaps::open_pinned(&env.bpf.0)?,
        MaglevConfig::default(),
    )?);
    assert_eq!(program(&mut env, "Local")?, 0, "writes after a restart");
    in_node(&env)?;
    // The tc path keeps Local's promise: no endpoint on this node, so outside clients are
    // refused (ICMP port unreachable), not sent to the other node.
    let outside = from_outside(&mut env)?;
    ensure!(outside.iter().all(refused), "from outside: {outside:?}");
    let rows = env.syncer().maps().list()?;
    let lb_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.frontend == std::net::SocketAddrV4::new(EXTERNAL_IP, 90))
        .map(|r| {
            (
                r.scope,
                r.backends.len(),
                r.counters.connections,
                r.counters.refused,
            )
        })
        .collect();
    assert_eq!(
        lb_rows,
        [(Scope::External, 0, 0, 1), (Scope::Internal, 1, 1, 0)],
        "externalIP rows: (scope, backends, connections, refused)"
    );
    assert_eq!(
        rows.len(),
        14,
        "per port: the ClusterIP once, externalIP, LB IP and nodePort twice"
    );

    // Cluster: one entry per frontend again, and outside clients reach the other node too.
    assert!(program(&mut env, "Cluster")? > 0);
    let rows = env.syncer().maps().list()?;
    assert_eq!(rows.len(), 8);
    assert!(rows.iter().all(|r| r.scope == Scope::All));
    in_node(&env)?;
    let outside = from_outside(&mut env)?;
    ensure!(
        outside.iter().all(|r| matches!(r, Ok(n) if n == "far")),
        "from outside under Cluster: {outside:?}"
    );

    // And back.
    program(&mut env, "Local")?;
    in_node(&env)?;
    let outside = from_outside(&mut env)?;
    ensure!(outside.iter().all(refused), "from outside: {outside:?}");
    Ok(())
}
