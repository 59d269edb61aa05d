//! Stale connected UDP, end to end: real connect4 on a cgroup of the test's own, pods as
//! network namespaces on a bridge in a node namespace with no route out. A client pod's UDP
//! socket connected to a ClusterIP is pinned to one backend; the syncer removes that backend,
//! the sweep destroys the socket (sock_diag SOCK_DESTROY inside the pod's namespace), the
//! application sees ECONNABORTED, and connecting again reaches the remaining backend. Sockets
//! that were not rewritten to the removed backend through that Service are left alone.
//! Needs root.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use weir_lb::netlab::{Lab, Pod, TestBpfRoot, TestCgroup, in_netns};
use weir_lb::watch::stale::{StaleUdp, UdpPairs};
use weir_lb::{MaglevConfig, ModelConfig, Syncer, load_and_attach, model};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const PORT: u16 = 5353;

/// Answers every datagram on UDP 5353 with the pod's name.
fn serve(pod: &Pod, name: &str) -> Result<()> {
    let name = name.to_string();
    in_netns(&pod.ns, move || -> std::io::Result<()> {
        let u = UdpSocket::bind(("0.0.0.0", PORT))?;
        let mut buf = [0u8; 64];
        loop {
            let (_, from) = u.recv_from(&mut buf)?;
            u.send_to(name.as_bytes(), from)?;
        }
    })?;
    Ok(())
}

/// Service `dns` (UDP 53 → 5353) with the given backend pods.
fn desired(backends: &[&Pod]) -> Result<model::Desired> {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "dns", "namespace": "default"},
        "spec": {"clusterIP": VIP.to_string(), "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}
    }))?;
    let eps: Vec<_> = backends
        .iter()
        .map(|p| json!({"addresses": [p.ip.to_string()]}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "dns-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "dns"}},
        "addressType": "IPv4",
        "ports": [{"name": "dns", "port": PORT, "protocol": "UDP"}],
        "endpoints": eps
    }))?;
    let (want, problems) = model::desired(&[svc], &[slice], &ModelConfig::default());
    ensure!(problems.is_empty(), "{problems:?}");
    Ok(want)
}

/// Sends on a connected socket and returns the name of the pod that answered.
fn ask(s: &UdpSocket) -> std::io::Result<String> {
    s.send(b"?")?;
    let mut buf = [0u8; 64];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn a_udp_socket_on_a_removed_backend_is_destroyed_and_reconnects_to_a_live_one() -> Result<()> {
    let mut cg = TestCgroup::new().context("create test cgroup")?;
    cg.enter().context("join test cgroup")?;
    let bpf = TestBpfRoot::new();
    let mut lab = Lab::new().context("create node netns")?;
    let pods = [lab.add_pod(1)?, lab.add_pod(2)?];
    serve(&pods[0], "pod1")?;
    serve(&pods[1], "pod2")?;
    let client = lab.add_pod(9)?;
    in_netns(&lab.host, || {
        weir_lb::install_unreachable_routes(&["10.96.0.0/12"])
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("route thread panicked"))??;
    let maps = load_and_attach(&bpf.0, &cg.path)?;
    let mut syncer = Syncer::new(maps, MaglevConfig::default())?;
    syncer.sync(&desired(&[&pods[0], &pods[1]])?)?;

    // The pod's "process": a thread that stays in the client namespace while the test runs,
    // so the sweep finds that namespace through the cgroup, as it finds a real pod's. Sockets
    // keep the namespace they were created in, so it hands them over and waits.
    let (stop, parked) = std::sync::mpsc::channel::<()>();
    let (tx, rx) = std::sync::mpsc::channel();
    let pod_process = in_netns(&client.ns, move || {
        let socks = (0..3)
            .map(|_| UdpSocket::bind("0.0.0.0:0"))
            .collect::<std::io::Result<Vec<_>>>();
        let _ = tx.send(socks);
        let _ = parked.recv();
    })?;
    let socks = rx.recv_timeout(Duration::from_secs(5))??;
    let [via, direct, other]: [UdpSocket; 3] = socks
        .try_into()
        .map_err(|_| anyhow::anyhow!("three sockets"))?;
    for s in [&via, &direct, &other] {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
    }

    let vip = SocketAddr::from((VIP, 53));
    via.connect(vip)?;
    let pinned = ask(&via)?;
    let (gone_pod, live_pod) = match pinned.as_str() {
        "pod1" => (&pods[0], &pods[1]),
        "pod2" => (&pods[1], &pods[0]),
        other => bail!("unexpected answer {other:?}"),
    };
    let live_name = if pinned == "pod1" { "pod2" } else { "pod1" };
    // Straight to the backend that will leave, no Service: not the sweep's business.
    direct.connect((gone_pod.ip, PORT))?;
    ensure!(ask(&direct)? == pinned);
    // Through the Service to the backend that stays: connect4 picks at random, so retry.
    let mut reached = String::new();
    for _ in 0..64 {
        other.connect(vip)?;
        reached = ask(&other)?;
        if reached == live_name {
            break;
        }
    }
    ensure!(reached == live_name, "connect4 never picked {live_name}");

    let before = UdpPairs::all(syncer.state());
    syncer.sync(&desired(&[live_pod])?)?;
    let gone = before.gone(&UdpPairs::all(syncer.state()));
    let gone_backend = SocketAddrV4::new(gone_pod.ip, PORT);
    ensure!(
        gone.contains(SocketAddrV4::new(VIP, 53), gone_backend),
        "{gone:?}"
    );
    let destroyed = StaleUdp::new(&bpf.0, &cg.path)
        .destroy(gone)
        .join()
        .map_err(|_| anyhow::anyhow!("sweep thread panicked"))??;
    assert_eq!(
        destroyed, 1,
        "exactly the socket pinned to the removed backend"
    );

    let err = via
        .recv(&mut [0u8; 64])
        .expect_err("the stale socket must fail, not wait for a dead backend");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
    via.connect(vip)?;
    assert_eq!(
        ask(&via)?,
        live_name,
        "connecting again reaches a live backend"
    );
    assert_eq!(
        ask(&direct)?,
        pinned,
        "a socket not rewritten by connect4 is kept"
    );
    assert_eq!(
        ask(&other)?,
        live_name,
        "a socket on a live backend is kept"
    );

    drop(stop);
    pod_process
        .join()
        .map_err(|_| anyhow::anyhow!("pod thread panicked"))?;
    drop(syncer);
    weir_lb::unpin_all(&bpf.0)?;
    Ok(())
}
