//! End-to-end test of the tc path on a real kernel: a node namespace with three backend pods
//! on a bridge, a client namespace outside the node linked to it by a veth (`ext0`, which gets
//! the tc programs), and NodePort / externalIP traffic from the client. Backends answer with
//! their name and the peer address they see, so the test checks the client's source address
//! survives (`externalTrafficPolicy: Local`). Needs root.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use serde_json::json;
use weir_lb::netlab::{External, Lab, Pod, TestBpfRoot, in_netns};
use weir_lb::tc::TcPrograms;
use weir_lb::{LbMaps, MaglevConfig, ModelConfig, Syncer, model};
use weir_lb_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};

const TIMEOUT: Duration = Duration::from_secs(2);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// TCP 9000: sends "<name> <peer>" and then echoes lines; UDP 5353: answers "<name> <peer>".
fn serve(pod: &Pod, name: &str) -> Result<()> {
    let n = name.to_string();
    in_netns(&pod.ns, move || -> std::io::Result<()> {
        let l = TcpListener::bind(("0.0.0.0", 9000))?;
        for s in l.incoming() {
            let n = n.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut s = s?;
                let peer = s.peer_addr()?;
                s.write_all(format!("{n} {peer}\n").as_bytes())?;
                let mut r = BufReader::new(s.try_clone()?);
                let mut line = String::new();
                while r.read_line(&mut line)? > 0 {
                    s.write_all(line.as_bytes())?;
                    line.clear();
                }
                Ok(())
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
            u.send_to(format!("{n} {from}").as_bytes(), from)?;
        }
    })?;
    Ok(())
}

/// Runs `f` in the client namespace outside the node.
fn outside<T: Send + 'static>(ext: &External, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    in_netns(&ext.ns, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))
}

/// What the backend said: (pod name, the peer address it saw).
fn hello(line: &str) -> Result<(String, SocketAddr)> {
    let (name, peer) = line
        .trim()
        .split_once(' ')
        .with_context(|| format!("answer {line:?}"))?;
    Ok((name.to_string(), peer.parse()?))
}

fn tcp_hello(to: SocketAddr) -> std::io::Result<String> {
    let s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

fn udp_hello(to: SocketAddr) -> std::io::Result<String> {
    let u = UdpSocket::bind("0.0.0.0:0")?;
    u.set_read_timeout(Some(TIMEOUT))?;
    u.send_to(b"hi", to)?;
    let mut buf = [0u8; 64];
    let (n, from) = u.recv_from(&mut buf)?;
    if from != to {
        return Err(std::io::Error::other(format!(
            "answer from {from}, want {to}"
        )));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Loads the tc programs and attaches them to the node's external devices, as an agent start
/// does (in the node namespace: interface names are per namespace).
fn start_agent(lab: &Lab, bpf: &Path, devices: &[String]) -> Result<()> {
    let (bpf, devices) = (bpf.to_path_buf(), devices.to_vec());
    in_netns(&lab.host, move || -> Result<()> {
        TcPrograms::load(&bpf)?.attach(&bpf, &devices)?;
        Ok(())
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("attach thread panicked"))?
}

/// Waits until `dev` has `want` programs per direction: an unpinned link is released by the
/// kernel shortly after, not during, the unlink.
fn wait_attached(lab: &Lab, dev: &str, want: (usize, usize)) -> Result<()> {
    let mut last = attached(lab, dev)?;
    for _ in 0..40 {
        if last == want {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
        last = attached(lab, dev)?;
    }
    anyhow::bail!("{dev} has {last:?} programs (ingress, egress), want {want:?}")
}

/// Programs attached to `dev` in the node namespace, per direction.
fn attached(lab: &Lab, dev: &str) -> Result<(usize, usize)> {
    let dev = dev.to_string();
    in_netns(&lab.host, move || -> Result<(usize, usize)> {
        let n = |kind| -> Result<usize> { Ok(SchedClassifier::query_tcx(&dev, kind)?.1.len()) };
        Ok((n(TcAttachType::Ingress)?, n(TcAttachType::Egress)?))
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("query thread panicked"))?
}

fn program(syncer: &mut Syncer, node_ip: Ipv4Addr, backends: &[Pod]) -> Result<()> {
    let eps: Vec<_> = backends
        .iter()
        .map(|p| json!({"addresses": [p.ip.to_string()], "nodeName": "n1"}))
        .collect();
    let objs = |name: &str, node_port: u16, udp_port: u16, eps: &[serde_json::Value]| {
        (
            json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalIPs": [EXTERNAL_IP.to_string()],
                         "externalTrafficPolicy": "Local",
                         "ports": [{"name": "echo", "port": 90, "nodePort": node_port},
                                   {"name": "dns", "port": 53, "nodePort": udp_port, "protocol": "UDP"}]}
            }),
            json!({
                "metadata": {"name": format!("{name}-1"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "echo", "port": 9000}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
                "endpoints": eps
            }),
        )
    };
    let (web, web_eps) = objs("web", 30080, 30053, &eps);
    let (mut empty, empty_eps) = objs("empty", 30099, 30098, &[]);
    empty["spec"]["clusterIP"] = json!("10.96.0.11");
    empty["spec"]["externalIPs"] = json!([]);
    let svcs: Vec<k8s_openapi::api::core::v1::Service> =
        vec![serde_json::from_value(web)?, serde_json::from_value(empty)?];
    let slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice> = vec![
        serde_json::from_value(web_eps)?,
        serde_json::from_value(empty_eps)?,
    ];
    let cfg = ModelConfig {
        node_name: Some("n1".into()),
        node_ips: vec![node_ip],
        ..Default::default()
    };
    let (desired, problems) = model::desired(&svcs, &slices, &cfg);
    ensure!(problems.is_empty(), "{problems:?}");
    syncer.sync(&desired)?;
    Ok(())
}

#[test]
fn nodeport_and_external_ip_from_outside_the_node() -> Result<()> {
    let bpf = TestBpfRoot::new();
    let mut lab = Lab::new().context("create node netns")?;
    let mut backends = Vec::new();
    for n in 1..=3 {
        let pod = lab.add_pod(n)?;
        serve(&pod, &format!("pod{n}"))?;
        backends.push(pod);
    }
    let ext = lab.add_external(&[&format!("{EXTERNAL_IP}/32")])?;
    start_agent(&lab, &bpf.0, std::slice::from_ref(&ext.node_dev))?;
    let mut syncer = Syncer::new(LbMaps::open_pinned(&bpf.0)?, MaglevConfig::default())?;
    program(&mut syncer, ext.node_ip, &backends)?;

    // TCP and UDP to nodeIP:nodePort and TCP to externalIP:port reach every backend, and every
    // backend sees the client's own address (Local: no SNAT).
    let node_ip = ext.node_ip;
    let answers = outside(&ext, move || -> std::io::Result<Vec<String>> {
        let mut out = Vec::new();
        for _ in 0..24 {
            out.push(tcp_hello((node_ip, 30080).into())?);
            out.push(udp_hello((node_ip, 30053).into())?);
            out.push(tcp_hello((EXTERNAL_IP, 90).into())?);
        }
        Ok(out)
    })??;
    let mut seen = [BTreeSet::new(), BTreeSet::new(), BTreeSet::new()];
    for (i, a) in answers.iter().enumerate() {
        let (pod, peer) = hello(a)?;
        ensure!(
            peer.ip() == std::net::IpAddr::V4(ext.ip),
            "backend saw {peer}, not the client {}",
            ext.ip
        );
        seen[i % 3].insert(pod);
    }
    for (what, pods) in ["TCP nodePort", "UDP nodePort", "TCP externalIP"]
        .iter()
        .zip(&seen)
    {
        ensure!(pods.len() == 3, "{what} reached only {pods:?}");
    }

    // No endpoints: the node answers with ICMP port unreachable, so the client's connect fails
    // with "connection refused" (a drop would end in a timeout, a different error) and a
    // connected UDP socket gets the same error on its next receive.
    let (tcp, udp) = outside(&ext, move || {
        let tcp = TcpStream::connect_timeout(&(node_ip, 30099).into(), Duration::from_secs(20));
        let udp = (|| -> std::io::Result<usize> {
            let u = UdpSocket::bind("0.0.0.0:0")?;
            u.connect((node_ip, 30098))?;
            u.set_read_timeout(Some(Duration::from_secs(20)))?;
            u.send(b"hi")?;
            u.recv(&mut [0u8; 64])
        })();
        (tcp.map(|_| ()), udp.map(|_| ()))
    })?;
    let kind = |r: &std::io::Result<_>| r.as_ref().err().map(std::io::Error::kind);
    ensure!(
        kind(&tcp) == Some(ErrorKind::ConnectionRefused),
        "TCP connect to an empty NodePort: {tcp:?}"
    );
    ensure!(
        kind(&udp) == Some(ErrorKind::ConnectionRefused),
        "UDP to an empty NodePort: {udp:?}"
    );
    let rows = syncer.maps().list()?;
    let empty = rows
        .iter()
        .find(|r| r.frontend == std::net::SocketAddrV4::new(node_ip, 30099))
        .context("empty NodePort listed")?;
    ensure!(empty.counters.refused >= 1, "{:?}", empty.counters);
    let empty_udp = rows
        .iter()
        .find(|r| r.frontend == std::net::SocketAddrV4::new(node_ip, 30098))
        .context("empty UDP NodePort listed")?;
    ensure!(empty_udp.counters.refused >= 1, "{:?}", empty_udp.counters);

    // Restart during a long-lived connection: new links replace the old ones (one program per
    // direction), the pinned CT map keeps the flow on its backend.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let conn = in_netns(&ext.ns, move || -> std::io::Result<()> {
        let s = TcpStream::connect_timeout(&(node_ip, 30080).into(), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut w = s;
        let mut line = String::new();
        r.read_line(&mut line)?;
        let mut echo = |msg: &str| -> std::io::Result<()> {
            w.write_all(format!("{msg}\n").as_bytes())?;
            let mut back = String::new();
            r.read_line(&mut back)?;
            if back.trim() != msg {
                return Err(std::io::Error::other(format!("echo {back:?} for {msg:?}")));
            }
            Ok(())
        };
        echo("before")?;
        let _ = ready_tx.send(());
        let _ = rx.recv();
        echo("after")
    })?;
    ready_rx
        .recv_timeout(TIMEOUT * 2)
        .context("long-lived connection")?;
    drop(syncer);
    start_agent(&lab, &bpf.0, std::slice::from_ref(&ext.node_dev))?;
    let mut syncer = Syncer::new(LbMaps::open_pinned(&bpf.0)?, MaglevConfig::default())?;
    program(&mut syncer, ext.node_ip, &backends)?;
    wait_attached(&lab, &ext.node_dev, (1, 1)).context("after the restart")?;
    tx.send(())?;
    conn.join()
        .map_err(|_| anyhow::anyhow!("connection thread panicked"))?
        .context("connection across the restart")?;

    // A restart without the device takes the programs off it; uninstall does too.
    start_agent(&lab, &bpf.0, &[])?;
    wait_attached(&lab, &ext.node_dev, (0, 0)).context("after dropping the device")?;
    start_agent(&lab, &bpf.0, std::slice::from_ref(&ext.node_dev))?;
    wait_attached(&lab, &ext.node_dev, (1, 1))?;
    weir_lb::unpin_all(&bpf.0)?;
    wait_attached(&lab, &ext.node_dev, (0, 0)).context("after unpin_all")?;
    Ok(())
}

#[test]
fn cluster_policy_nodeport_reaches_a_backend_on_another_node_through_source_nat() -> Result<()> {
    let bpf = TestBpfRoot::new();
    let mut lab = Lab::new().context("create node netns")?;
    let ext = lab.add_external(&[])?;
    let remote = lab.add_remote_node()?;
    // The backend listens in the other node's namespace, on every address, so it answers on
    // its pod address.
    let far = Pod {
        ns: remote.ns.clone(),
        ip: remote.pod_ip,
    };
    serve(&far, "far")?;
    start_agent(
        &lab,
        &bpf.0,
        &[ext.node_dev.clone(), remote.node_dev.clone()],
    )?;
    let mut syncer = Syncer::new(LbMaps::open_pinned(&bpf.0)?, MaglevConfig::default())?;
    let svc = json!({
        "metadata": {"name": "far", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.12", "externalTrafficPolicy": "Cluster",
                 "ports": [{"name": "echo", "port": 90, "nodePort": 30070},
                           {"name": "dns", "port": 53, "nodePort": 30071, "protocol": "UDP"}]}
    });
    let eps = json!({
        "metadata": {"name": "far-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "far"}},
        "addressType": "IPv4",
        "ports": [{"name": "echo", "port": 9000}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": [{"addresses": [remote.pod_ip.to_string()], "nodeName": "n2"}]
    });
    let svcs: Vec<k8s_openapi::api::core::v1::Service> = vec![serde_json::from_value(svc)?];
    let slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice> =
        vec![serde_json::from_value(eps)?];
    let cfg = ModelConfig {
        node_name: Some("n1".into()),
        node_ips: vec![ext.node_ip],
        ..Default::default()
    };
    let (desired, problems) = model::desired(&svcs, &slices, &cfg);
    ensure!(problems.is_empty(), "{problems:?}");
    syncer.sync(&desired)?;

    // The other node has no route to the client: only answers sent to this node arrive. The
    // backend sees this node's address on the link, with a port of the SNAT range; the client
    // sees the nodePort it dialled (TCP: the connection; UDP: the answer's source).
    let node_ip = ext.node_ip;
    let answers = outside(&ext, move || -> std::io::Result<Vec<String>> {
        let mut out = Vec::new();
        for _ in 0..4 {
            out.push(tcp_hello((node_ip, 30070).into())?);
            out.push(udp_hello((node_ip, 30071).into())?);
        }
        // A connection carries more than its first packets both ways.
        let s = TcpStream::connect_timeout(&(node_ip, 30070).into(), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut w = s;
        let mut line = String::new();
        r.read_line(&mut line)?;
        for i in 0..20 {
            w.write_all(format!("ping {i}\n").as_bytes())?;
            line.clear();
            r.read_line(&mut line)?;
            if line.trim() != format!("ping {i}") {
                return Err(std::io::Error::other(format!("echo {line:?}")));
            }
        }
        Ok(out)
    })??;
    for a in &answers {
        let (pod, peer) = hello(a)?;
        ensure!(pod == "far", "answer from {pod}");
        ensure!(
            peer.ip() == std::net::IpAddr::V4(remote.node_ip)
                && (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&peer.port()),
            "backend saw {peer}, want {}:<{SNAT_PORT_MIN}-{SNAT_PORT_MAX}>",
            remote.node_ip
        );
    }
    weir_lb::unpin_all(&bpf.0)?;
    Ok(())
}
