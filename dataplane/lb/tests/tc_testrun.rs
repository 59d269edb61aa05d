//! Table tests of the tc programs with `BPF_PROG_TEST_RUN`: real programs and maps (programmed
//! through the model and the syncer from Service and EndpointSlice objects), synthetic packets
//! in, verdict and packet bytes out. Expected packets are built by etherparse, so their
//! checksums are computed independently of the BPF code that patched them. Needs root.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use aya::maps::{HashMap, Map, MapData};
use etherparse::{
    Icmpv4Type, IpDscp, IpHeaders, IpNumber, Ipv4Header, PacketBuilder,
    icmpv4::DestUnreachableHeader,
};
use serde_json::json;
use weir_lb::netlab::TestBpfRoot;
use weir_lb::tc::TcPrograms;
use weir_lb::{LbMaps, MaglevConfig, ModelConfig, Syncer, model, testrun};
use weir_lb_common::{SNAT_PORT_MAX, SNAT_PORT_MIN, ip_to_map};

const OK: i32 = 0; // TC_ACT_OK
const REDIRECT: i32 = 7; // TC_ACT_REDIRECT

const NODE: [u8; 4] = [192, 168, 77, 2];
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const EXTERNAL_IP: [u8; 4] = [203, 0, 113, 10];
const BACKEND: [u8; 4] = [10, 244, 0, 11];
/// A backend on another node, and the address of the device that leads there.
const REMOTE: [u8; 4] = [10, 244, 1, 5];
const DEVICE_ADDR: [u8; 4] = [192, 168, 78, 1];
/// `BPF_PROG_TEST_RUN` runs tc programs on the loopback device, index 1 in every namespace.
const TEST_RUN_IFINDEX: u32 = 1;
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

#[derive(Clone, Copy)]
enum L4 {
    Syn,
    Ack,
    Udp,
}

/// An Ethernet/IPv4 packet from `src` to `dst` with a valid IP and L4 checksum.
fn packet(src: ([u8; 4], u16), dst: ([u8; 4], u16), l4: L4) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src.0, dst.0, 64);
    let mut out = Vec::new();
    let payload = b"hello";
    let res = match l4 {
        L4::Syn => ip
            .tcp(src.1, dst.1, 1000, 64_000)
            .syn()
            .write(&mut out, &[]),
        L4::Ack => ip
            .tcp(src.1, dst.1, 1001, 64_000)
            .ack(5000)
            .write(&mut out, payload),
        L4::Udp => ip.udp(src.1, dst.1).write(&mut out, payload),
    };
    res.expect("build test packet");
    out
}

/// The ICMP "port unreachable" the node sends back for `original`, a frame the client sent to
/// `frontend`: as Linux's icmp_send builds it (TOS precedence "internet control", no DF),
/// quoting the original IP header and 8 bytes of L4.
fn port_unreachable(original: &[u8], frontend: [u8; 4]) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, 64, IpNumber::ICMP, frontend, CLIENT).expect("IPv4 header");
    ip.dont_fragment = false;
    ip.dscp = IpDscp::try_new(0xc0 >> 2).expect("DSCP");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut out, &original[14..14 + 28])
        .expect("build ICMP packet");
    out
}

const UDP_CSUM: usize = 14 + 20 + 6;

fn without_udp_checksum(mut p: Vec<u8>) -> Vec<u8> {
    p[UDP_CSUM] = 0;
    p[UDP_CSUM + 1] = 0;
    p
}

struct Case {
    name: &'static str,
    prog: &'static str,
    input: Vec<u8>,
    verdict: i32,
    /// `None`: the packet must come out unchanged.
    output: Option<Vec<u8>>,
}

fn services() -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    let web = json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalIPs": ["203.0.113.10"],
                 "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                           {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"}]}
    });
    let web_eps = json!({
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": [{"addresses": ["10.244.0.11"], "nodeName": "n1"}]
    });
    // Local policy, and the only endpoint is on another node.
    let local = json!({
        "metadata": {"name": "local", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "externalTrafficPolicy": "Local",
                 "ports": [{"name": "http", "port": 80, "nodePort": 30090}]}
    });
    let local_eps = json!({
        "metadata": {"name": "local-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "local"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "n2"}]
    });
    // Cluster policy, the only endpoint on another node.
    let remote = json!({
        "metadata": {"name": "remote", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.40",
                 "ports": [{"name": "http", "port": 80, "nodePort": 30060}]}
    });
    let remote_eps = json!({
        "metadata": {"name": "remote-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "remote"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "n2"}]
    });
    // No EndpointSlice at all.
    let empty = json!({
        "metadata": {"name": "empty", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.30",
                 "ports": [{"name": "http", "port": 80, "nodePort": 30070},
                           {"name": "dns", "port": 53, "nodePort": 30071, "protocol": "UDP"}]}
    });
    (
        vec![
            serde_json::from_value(web).expect("svc"),
            serde_json::from_value(local).expect("svc"),
            serde_json::from_value(empty).expect("svc"),
            serde_json::from_value(remote).expect("svc"),
        ],
        vec![
            serde_json::from_value(web_eps).expect("eps"),
            serde_json::from_value(local_eps).expect("eps"),
            serde_json::from_value(remote_eps).expect("eps"),
        ],
    )
}

#[test]
fn tc_programs_translate_nodeport_and_external_ip_flows_and_pass_everything_else() -> Result<()> {
    let bpf = TestBpfRoot::new();
    let progs = TcPrograms::load(&bpf.0).context("load tc programs")?;
    let mut syncer = Syncer::new(LbMaps::open_pinned(&bpf.0)?, MaglevConfig::default())?;
    let (svcs, slices) = services();
    let cfg = ModelConfig {
        node_name: Some("n1".into()),
        node_ips: vec![NODE.into()],
        ..Default::default()
    };
    let (desired, problems) = model::desired(&svcs, &slices, &cfg);
    ensure!(problems.is_empty(), "{problems:?}");
    syncer.sync(&desired)?;

    let nodeport = (NODE, 30080);
    let client = (CLIENT, 40000);
    let backend = (BACKEND, 8080);
    let syn = packet(client, nodeport, L4::Syn);
    // The kernel's test run refuses packets shorter than an IPv4 header; these are the shortest
    // it admits: no L4 header at all, and an IHL that claims options past the end.
    let mut no_l4 = syn.clone();
    no_l4.truncate(14 + 20);
    let mut long_ihl = no_l4.clone();
    long_ihl[14] = 0x4f;
    let mut truncated_tcp = syn.clone();
    truncated_tcp.truncate(14 + 20 + 10);
    let mut fragment = syn.clone();
    fragment[14 + 6] = 0x20; // More Fragments
    let mut ipv6 = syn.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let empty_syn = packet((CLIENT, 40004), (NODE, 30070), L4::Syn);
    let empty_udp = packet((CLIENT, 5002), (NODE, 30071), L4::Udp);
    let local_syn = packet((CLIENT, 40002), (NODE, 30090), L4::Syn);
    let udp_zero = without_udp_checksum(packet((CLIENT, 5001), (NODE, 30053), L4::Udp));

    let cases = vec![
        Case {
            name: "TCP SYN to nodeIP:nodePort is DNAT'd to the backend",
            prog: "tc_ingress",
            input: syn.clone(),
            verdict: OK,
            output: Some(packet(client, backend, L4::Syn)),
        },
        Case {
            name: "later packet of the flow goes to the same backend",
            prog: "tc_ingress",
            input: packet(client, nodeport, L4::Ack),
            verdict: OK,
            output: Some(packet(client, backend, L4::Ack)),
        },
        Case {
            name: "the backend's reply leaves with nodeIP:nodePort as source",
            prog: "tc_egress",
            input: packet(backend, client, L4::Ack),
            verdict: OK,
            output: Some(packet(nodeport, client, L4::Ack)),
        },
        Case {
            name: "UDP to the nodePort is DNAT'd with a valid checksum",
            prog: "tc_ingress",
            input: packet((CLIENT, 5000), (NODE, 30053), L4::Udp),
            verdict: OK,
            output: Some(packet((CLIENT, 5000), (BACKEND, 5353), L4::Udp)),
        },
        Case {
            name: "UDP reply is reverse-NAT'd",
            prog: "tc_egress",
            input: packet((BACKEND, 5353), (CLIENT, 5000), L4::Udp),
            verdict: OK,
            output: Some(packet((NODE, 30053), (CLIENT, 5000), L4::Udp)),
        },
        Case {
            name: "UDP without checksum keeps checksum 0",
            prog: "tc_ingress",
            input: udp_zero,
            verdict: OK,
            output: Some(without_udp_checksum(packet(
                (CLIENT, 5001),
                (BACKEND, 5353),
                L4::Udp,
            ))),
        },
        Case {
            name: "externalIP:port is DNAT'd like the nodePort",
            prog: "tc_ingress",
            input: packet((CLIENT, 40001), (EXTERNAL_IP, 80), L4::Syn),
            verdict: OK,
            output: Some(packet((CLIENT, 40001), backend, L4::Syn)),
        },
        Case {
            name: "TCP SYN to a NodePort without endpoints is answered with port unreachable",
            prog: "tc_ingress",
            output: Some(port_unreachable(&empty_syn, NODE)),
            input: empty_syn,
            verdict: REDIRECT,
        },
        Case {
            name: "UDP to a NodePort without endpoints is answered with port unreachable",
            prog: "tc_ingress",
            output: Some(port_unreachable(&empty_udp, NODE)),
            input: empty_udp,
            verdict: REDIRECT,
        },
        Case {
            name: "Local policy with no endpoint on this node is answered with port unreachable",
            prog: "tc_ingress",
            output: Some(port_unreachable(&local_syn, NODE)),
            input: local_syn,
            verdict: REDIRECT,
        },
        Case {
            name: "a port that is no frontend passes untouched",
            prog: "tc_ingress",
            input: packet((CLIENT, 40003), (NODE, 22), L4::Syn),
            verdict: OK,
            output: None,
        },
        Case {
            name: "a packet of no tracked flow leaves untouched",
            prog: "tc_egress",
            input: packet((BACKEND, 8080), (CLIENT, 49999), L4::Ack),
            verdict: OK,
            output: None,
        },
        Case {
            name: "IPv4 without L4 header passes",
            prog: "tc_ingress",
            input: no_l4,
            verdict: OK,
            output: None,
        },
        Case {
            name: "IHL past the end of the packet passes",
            prog: "tc_ingress",
            input: long_ihl,
            verdict: OK,
            output: None,
        },
        Case {
            name: "truncated TCP header passes",
            prog: "tc_ingress",
            input: truncated_tcp,
            verdict: OK,
            output: None,
        },
        Case {
            name: "fragment passes",
            prog: "tc_ingress",
            input: fragment,
            verdict: OK,
            output: None,
        },
        Case {
            name: "non-IPv4 passes",
            prog: "tc_ingress",
            input: ipv6,
            verdict: OK,
            output: None,
        },
    ];
    let mut failures = Vec::new();
    for c in cases {
        let (verdict, out) = testrun::run(progs.fd(c.prog)?, &c.input)
            .with_context(|| format!("{}: BPF_PROG_TEST_RUN", c.name))?;
        let want = c.output.unwrap_or_else(|| c.input.clone());
        if verdict != c.verdict || out != want {
            failures.push(format!(
                "{}: verdict {verdict} (want {}), packet\n  got  {out:02x?}\n  want {want:02x?}",
                c.name, c.verdict
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));

    // Counters: a new flow counts once (the ACK was no new flow); a reject counts as refused.
    let rows = syncer.maps().list()?;
    let row = |addr: Ipv4Addr, port: u16| {
        rows.iter()
            .find(|r| *r.frontend.ip() == addr && r.frontend.port() == port)
            .map(|r| r.counters)
            .context("frontend listed")
    };
    ensure!(row(NODE.into(), 30080)?.connections == 1);
    ensure!(row(NODE.into(), 30053)?.connections == 2);
    ensure!(row(EXTERNAL_IP.into(), 80)?.connections == 1);
    ensure!(row(NODE.into(), 30090)?.refused == 1);
    ensure!(row(NODE.into(), 30070)?.refused == 1);
    ensure!(row(NODE.into(), 30071)?.refused == 1);
    Ok(())
}

/// The source port a packet carries.
fn sport(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[34], p[35]])
}

#[test]
fn tc_programs_masquerade_flows_to_a_backend_on_another_node() -> Result<()> {
    let bpf = TestBpfRoot::new();
    let progs = TcPrograms::load(&bpf.0).context("load tc programs")?;
    let mut syncer = Syncer::new(LbMaps::open_pinned(&bpf.0)?, MaglevConfig::default())?;
    let (svcs, slices) = services();
    let cfg = ModelConfig {
        node_name: Some("n1".into()),
        node_ips: vec![NODE.into()],
        ..Default::default()
    };
    let (desired, problems) = model::desired(&svcs, &slices, &cfg);
    ensure!(problems.is_empty(), "{problems:?}");
    syncer.sync(&desired)?;
    // What `TcPrograms::attach` writes for each device; the test run's device is loopback.
    let pin = bpf.0.join("maps/WEIR_SNAT_ADDRS");
    let mut addrs: HashMap<MapData, u32, u32> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(&pin)?))?;
    addrs.insert(TEST_RUN_IFINDEX, ip_to_map(DEVICE_ADDR), 0)?;

    let run = |prog: &str, input: &[u8]| -> Result<Vec<u8>> {
        let (verdict, out) = testrun::run(progs.fd(prog)?, input)?;
        ensure!(verdict == OK, "{prog}: verdict {verdict}");
        Ok(out)
    };
    let frontend = (NODE, 30060);
    let backend = (REMOTE, 8080);
    let client = (CLIENT, 40100);

    // In: DNAT, as for a local backend.
    let dnat = run("tc_ingress", &packet(client, frontend, L4::Syn))?;
    ensure!(
        dnat == packet(client, backend, L4::Syn),
        "DNAT: {dnat:02x?}"
    );
    // Out of the device towards the other node: the device's address, a port of the range.
    let out = run("tc_egress", &dnat)?;
    let port = sport(&out);
    ensure!(
        (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port),
        "source port {port}"
    );
    ensure!(
        out == packet((DEVICE_ADDR, port), backend, L4::Syn),
        "SNAT: {out:02x?}"
    );
    // Later packets of the flow keep their port.
    let out = run("tc_egress", &packet(client, backend, L4::Ack))?;
    ensure!(
        out == packet((DEVICE_ADDR, port), backend, L4::Ack),
        "{out:02x?}"
    );
    // The backend's answer: back to the client on the way in, the frontend as its source on
    // the way out.
    let back = run("tc_ingress", &packet(backend, (DEVICE_ADDR, port), L4::Ack))?;
    ensure!(
        back == packet(backend, client, L4::Ack),
        "un-SNAT: {back:02x?}"
    );
    let reply = run("tc_egress", &back)?;
    ensure!(
        reply == packet(frontend, client, L4::Ack),
        "reverse DNAT: {reply:02x?}"
    );

    // Another client of the same backend gets another port (allocation never shares one).
    let other = (CLIENT, 40101);
    let out = run(
        "tc_egress",
        &run("tc_ingress", &packet(other, frontend, L4::Syn))?,
    )?;
    ensure!(
        sport(&out) != port && out == packet((DEVICE_ADDR, sport(&out)), backend, L4::Syn),
        "second flow: {out:02x?}"
    );
    // A packet to the backend that the node never translated leaves as it is.
    let own = packet((CLIENT, 40102), backend, L4::Syn);
    ensure!(
        run("tc_egress", &own)? == own,
        "untranslated flow was rewritten"
    );
    // A device without an address masquerades nothing.
    addrs.remove(&TEST_RUN_IFINDEX)?;
    let third = run("tc_ingress", &packet((CLIENT, 40103), frontend, L4::Syn))?;
    ensure!(
        run("tc_egress", &third)? == third,
        "SNAT without a device address"
    );
    Ok(())
}
