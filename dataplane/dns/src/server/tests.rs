//! The server over real sockets on loopback: real DNS packets from hickory-built messages and
//! from `dig`, a real upstream resolver process-in-a-task, and hostile input.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::records::tests::{pod, service, slice};
use crate::zone::Zone;
use crate::{Args, build};

struct TestDns {
    addr: SocketAddr,
    zone: Zone,
    server: Arc<super::Server>,
    shutdown: CancellationToken,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn args(upstreams: Vec<SocketAddr>, forward_timeout_ms: u64) -> Args {
    Args {
        listen: "127.0.0.1:0".parse().unwrap(),
        zone: "cluster.local".into(),
        ttl: 5,
        upstreams,
        resolv_conf: "/dev/null".into(),
        forward_timeout_ms,
        cache_size: 100,
        udp_workers: 2,
        no_autopath: false,
        metrics: None,
    }
}

async fn start(args: Args, search: &[&str]) -> TestDns {
    let mut dns = build(&args).unwrap();
    let addr = dns.bound.local_addr();
    Arc::get_mut(&mut dns.server).unwrap().search = search.iter().map(|s| s.to_string()).collect();
    let shutdown = CancellationToken::new();
    tokio::spawn(dns.server.clone().serve(dns.bound, shutdown.clone()));
    TestDns {
        addr,
        zone: dns.zone,
        server: dns.server,
        shutdown,
    }
}

fn query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// How long a client waits for an answer that must come: generous, since a loaded CI
/// machine can stall the server's threads for seconds; a passing test never waits it out.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

async fn udp_raw(addr: SocketAddr, msg: &[u8], wait: Duration) -> Option<Message> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(msg, addr).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(wait, sock.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(Message::from_vec(&buf[..n]).unwrap())
}

async fn udp(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
    udp_raw(addr, &query(name, rtype, true), ANSWER_WAIT)
        .await
        .unwrap_or_else(|| panic!("no answer for {name} {rtype}"))
}

async fn tcp(addr: SocketAddr, msg: &[u8]) -> Message {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&(msg.len() as u16).to_be_bytes())
        .await
        .unwrap();
    s.write_all(msg).await.unwrap();
    let len = s.read_u16().await.unwrap();
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// A real upstream resolver for the tests: answers `*.example.` A queries with 192.0.2.1
/// after `delay`, NXDOMAIN (with an SOA) for `nx.*` and the rest, and counts what it was asked.
struct Upstream {
    addr: SocketAddr,
    asked: Arc<AtomicUsize>,
}

async fn upstream(delay: Duration) -> Upstream {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let req = Message::from_vec(&buf[..n]).unwrap();
            let sock = sock.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let q = req.queries[0].clone();
                let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
                resp.add_query(q.clone());
                let name = q.name().to_ascii().to_ascii_lowercase();
                if name.ends_with("example.") && !name.starts_with("nx.") {
                    resp.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(A::new(192, 0, 2, 1)),
                    ));
                } else {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                    let zone = Name::from_ascii("example.").unwrap();
                    let soa = SOA::new(zone.clone(), zone.clone(), 1, 1, 1, 1, 30);
                    resp.add_authority(Record::from_rdata(zone, 30, RData::SOA(soa)));
                }
                let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
            });
        }
    });
    Upstream { addr, asked }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_records_are_answered_over_udp_and_tcp() {
    let mut dns = start(args(vec![], 500), &[]).await;
    dns.zone
        .apply_service(&service("default", "hello", "10.96.0.20", &[("http", 80)]));
    let mut ext = service("default", "ext", "", &[]);
    let spec = ext.spec.as_mut().unwrap();
    spec.type_ = Some("ExternalName".into());
    spec.external_name = Some("example.com".into());
    dns.zone.apply_service(&ext);
    dns.zone.publish();

    let m = udp(dns.addr, "hello.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(a_records(&m), ["10.96.0.20"]);
    assert_eq!(m.answers[0].ttl, 5);
    assert!(m.edns.is_some(), "an EDNS query gets an OPT back");

    // Case-insensitive match, with the question's casing echoed.
    let m = udp(dns.addr, "HeLLo.Default.SVC.cluster.LOCAL.", RecordType::A).await;
    assert_eq!(a_records(&m), ["10.96.0.20"]);
    assert_eq!(
        m.queries[0].name().to_ascii(),
        "HeLLo.Default.SVC.cluster.LOCAL."
    );

    let m = udp(
        dns.addr,
        "_http._tcp.hello.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    match &m.answers[0].data {
        RData::SRV(srv) => {
            assert_eq!(srv.port, 80);
            assert_eq!(srv.target.to_ascii(), "hello.default.svc.cluster.local.");
        }
        other => panic!("expected SRV, got {other:?}"),
    }

    let m = udp(dns.addr, "20.0.96.10.in-addr.arpa.", RecordType::PTR).await;
    match &m.answers[0].data {
        RData::PTR(ptr) => assert_eq!(ptr.0.to_ascii(), "hello.default.svc.cluster.local."),
        other => panic!("expected PTR, got {other:?}"),
    }

    let m = udp(
        dns.addr,
        "ext.default.svc.cluster.local.",
        RecordType::CNAME,
    )
    .await;
    assert!(matches!(&m.answers[0].data, RData::CNAME(c) if c.0.to_ascii() == "example.com."));

    let m = udp(dns.addr, "dns-version.cluster.local.", RecordType::TXT).await;
    assert!(matches!(&m.answers[0].data, RData::TXT(t) if t.to_string() == "1.1.0"));

    // NXDOMAIN and NODATA carry the zone's SOA in the authority section.
    let m = udp(dns.addr, "nope.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.answers.is_empty());
    assert!(
        matches!(&m.authorities[0].data, RData::SOA(s) if s.mname.to_ascii() == "ns.dns.cluster.local.")
    );
    assert_eq!(m.authorities[0].name.to_ascii(), "cluster.local.");
    let m = udp(
        dns.addr,
        "hello.default.svc.cluster.local.",
        RecordType::AAAA,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert!(matches!(&m.authorities[0].data, RData::SOA(_)));
    let m = udp(dns.addr, "default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NoError,
        "empty non-terminal"
    );

    let m = tcp(
        dns.addr,
        &query("hello.default.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(a_records(&m), ["10.96.0.20"]);

    // Deleting the Service turns the answer into NXDOMAIN at the next publish.
    dns.zone.delete_service(&crate::records::ObjKey {
        namespace: "default".into(),
        name: "hello".into(),
    });
    dns.zone.publish();
    let m = udp(dns.addr, "hello.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    let text = {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &dns.server.metrics.registry()).unwrap();
        s
    };
    assert!(
        text.contains(r#"weir_dns_queries_total{type="A",rcode="NXDOMAIN"} 2"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_answers_truncate_over_udp_and_complete_over_tcp() {
    let mut dns = start(args(vec![], 500), &[]).await;
    dns.zone.apply_service(&service("db", "big", "None", &[]));
    let endpoints: Vec<String> = (0..100).map(|i| format!("10.244.3.{i}")).collect();
    let eps: Vec<(&str, Option<&str>, Option<bool>)> = endpoints
        .iter()
        .map(|ip| (ip.as_str(), None, None))
        .collect();
    dns.zone
        .apply_slice(&slice("db", "big-1", "big", &eps, &[]));
    dns.zone.publish();

    for edns in [false, true] {
        let q = query("big.db.svc.cluster.local.", RecordType::A, edns);
        let m = udp_raw(dns.addr, &q, ANSWER_WAIT).await.unwrap();
        assert!(
            m.metadata.truncation,
            "100 A records exceed the UDP limit (EDNS: {edns})"
        );
        assert!(m.answers.is_empty());
        let m = tcp(dns.addr, &q).await;
        assert!(!m.metadata.truncation);
        assert_eq!(a_records(&m).len(), 100);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_coalesces_in_flight_queries_and_caches_answers() {
    // The upstream's delay is the window in which the 20 queries coalesce; wide enough that
    // a loaded machine still sends them all inside it.
    let up = upstream(Duration::from_millis(500)).await;
    let dns = start(args(vec![up.addr], 2000), &[]).await;
    let addr = dns.addr;
    let clients: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { udp(addr, "www.example.", RecordType::A).await }))
        .collect();
    for c in clients {
        let m = c.await.unwrap();
        assert_eq!(a_records(&m), ["192.0.2.1"]);
        assert!(m.metadata.recursion_available && !m.metadata.authoritative);
    }
    assert_eq!(
        up.asked.load(Ordering::SeqCst),
        1,
        "20 identical queries, one upstream query"
    );
    let m = udp(addr, "WWW.example.", RecordType::A).await;
    assert_eq!(a_records(&m), ["192.0.2.1"]);
    assert_eq!(m.queries[0].name().to_ascii(), "WWW.example.");
    assert_eq!(
        up.asked.load(Ordering::SeqCst),
        1,
        "answered from the cache"
    );
    assert!(dns.server.metrics.cache_hits.get() >= 1);
    assert!(dns.server.metrics.coalesced.get() >= 1);

    // An ExternalName's CNAME comes with the answer for its target.
    let mut dns = dns;
    let mut ext = service("default", "ext", "", &[]);
    let spec = ext.spec.as_mut().unwrap();
    spec.type_ = Some("ExternalName".into());
    spec.external_name = Some("www.example".into());
    dns.zone.apply_service(&ext);
    dns.zone.publish();
    let m = udp(addr, "ext.default.svc.cluster.local.", RecordType::A).await;
    assert!(matches!(&m.answers[0].data, RData::CNAME(c) if c.0.to_ascii() == "www.example."));
    assert_eq!(a_records(&m), ["192.0.2.1"]);

    // Negative answers are cached too.
    for _ in 0..2 {
        let m = udp(addr, "nx.example.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(matches!(&m.authorities[0].data, RData::SOA(_)));
    }
    assert_eq!(up.asked.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresponsive_upstream_is_servfail_in_bounded_time_and_cluster_names_still_answer() {
    // An upstream that never answers: a bound socket nobody reads.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut dns = start(args(vec![silent.local_addr().unwrap()], 300), &[]).await;
    dns.zone
        .apply_service(&service("default", "hello", "10.96.0.20", &[]));
    dns.zone.publish();
    let addr = dns.addr;
    let stuck: Vec<_> = (0..50)
        .map(|i| {
            let name = format!("host{i}.unreachable.test.");
            tokio::spawn(async move {
                udp_raw(addr, &query(&name, RecordType::A, false), ANSWER_WAIT).await
            })
        })
        .collect();
    let m = udp(addr, "hello.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(a_records(&m), ["10.96.0.20"]);
    for s in stuck {
        let m = s
            .await
            .unwrap()
            .expect("SERVFAIL after the 300 ms forward timeout, not silence");
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
    assert!(dns.server.metrics.forward_errors.get() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_formerr_or_is_dropped_and_never_stops_service() {
    let mut dns = start(args(vec![], 300), &[]).await;
    dns.zone
        .apply_service(&service("default", "hello", "10.96.0.20", &[]));
    dns.zone.publish();
    let addr = dns.addr;
    // A dropped message is one that gets no answer within this time; answers that must
    // come are waited for with ANSWER_WAIT.
    let silence = Duration::from_millis(300);
    let wait = ANSWER_WAIT;
    let good = query("hello.default.svc.cluster.local.", RecordType::A, false);

    // Garbage and truncated headers: dropped.
    assert!(udp_raw(addr, b"\xff\xfe garbage", silence).await.is_none());
    assert!(udp_raw(addr, &good[..7], silence).await.is_none());
    let formerr = |m: Option<Message>| {
        let m = m.expect("a FORMERR answer");
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    };
    // Truncated question.
    formerr(udp_raw(addr, &good[..20], wait).await);
    // Compression-pointer loop in the question.
    let mut looped = good[..12].to_vec();
    looped.extend([0xC0, 0x0C, 0, 1, 0, 1]);
    formerr(udp_raw(addr, &looped, wait).await);
    // Oversized label (length byte 64..).
    let mut oversized = good[..12].to_vec();
    oversized.push(0x7f);
    oversized.extend([b'a'; 0x7f]);
    oversized.extend([0, 0, 1, 0, 1]);
    formerr(udp_raw(addr, &oversized, wait).await);
    // Many questions.
    let mut many = Message::new(9, MessageType::Query, OpCode::Query);
    for i in 0..40 {
        let name = Name::from_ascii(format!("q{i}.default.svc.cluster.local.")).unwrap();
        many.add_query(Query::query(name, RecordType::A));
    }
    formerr(udp_raw(addr, &many.to_vec().unwrap(), wait).await);
    // The same over TCP: a FORMERR, and the connection keeps serving.
    let mut s = TcpStream::connect(addr).await.unwrap();
    for msg in [&looped[..], &good[..]] {
        s.write_all(&(msg.len() as u16).to_be_bytes())
            .await
            .unwrap();
        s.write_all(msg).await.unwrap();
        let len = s.read_u16().await.unwrap();
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(m.metadata.id, u16::from_be_bytes([msg[0], msg[1]]));
    }

    // A flood from one client (garbage, bad queries and forwardable names at full speed)
    // while another client keeps getting its answers. The other client starts once the
    // flood is well under way. Like a stub resolver it retries a query that got no answer:
    // a full socket queue drops datagrams from any sender, which says nothing about
    // the server; a server wedged by the flood fails every retry.
    let flood_stop = CancellationToken::new();
    let stop = flood_stop.clone();
    let sent = Arc::new(AtomicUsize::new(0));
    let flood_sent = sent.clone();
    let flood = tokio::spawn(async move {
        let sock = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let fwd = query("flood.unreachable.test.", RecordType::A, false);
        while !stop.is_cancelled() {
            for msg in [&b"\x00\x01garbage"[..], &looped, &fwd, &good] {
                let _ = sock.send_to(msg, addr).await;
                flood_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    while sent.load(Ordering::Relaxed) < 1000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flood never ran"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let q = query("hello.default.svc.cluster.local.", RecordType::A, true);
    for i in 0..50 {
        let mut answer = None;
        for _ in 0..5 {
            answer = udp_raw(addr, &q, Duration::from_secs(2)).await;
            if answer.is_some() {
                break;
            }
        }
        let m = answer.unwrap_or_else(|| panic!("query {i}: five tries went unanswered"));
        assert_eq!(a_records(&m), ["10.96.0.20"]);
    }
    flood_stop.cancel();
    flood.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autopath_answers_the_first_search_expanded_query() {
    let up = upstream(Duration::ZERO).await;
    let mut dns = start(args(vec![up.addr], 1000), &["corp.example"]).await;
    // The querying pod: 127.0.0.1 in namespace "team".
    dns.zone.apply_pod(&pod("team", "client", "127.0.0.1"));
    dns.zone
        .apply_service(&service("other", "api", "10.96.0.30", &[]));
    dns.zone.publish();

    // `api.other` from a pod in `team`: the resolver's first try is
    // api.other.team.svc.cluster.local; the server finds api.other.svc.cluster.local.
    let m = udp(dns.addr, "api.other.team.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(&m.answers[0].data,
        RData::CNAME(c) if c.0.to_ascii() == "api.other.svc.cluster.local."));
    assert_eq!(a_records(&m), ["10.96.0.30"]);

    // An external name walks on to the node's search domain (answered upstream).
    let m = udp(dns.addr, "db.team.svc.cluster.local.", RecordType::A).await;
    assert!(matches!(&m.answers[0].data,
        RData::CNAME(c) if c.0.to_ascii() == "db.corp.example."));
    assert_eq!(a_records(&m), ["192.0.2.1"]);

    // A name found nowhere keeps its NXDOMAIN.
    let m = udp(dns.addr, "nx.team.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // Clients that are not pods of that namespace get no autopath.
    let m = udp(
        dns.addr,
        "api.other.elsewhere.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_gets_the_answers() {
    let mut dns = start(args(vec![], 300), &[]).await;
    dns.zone
        .apply_service(&service("default", "hello", "10.96.0.20", &[("http", 80)]));
    dns.zone.publish();
    let port = dns.addr.port().to_string();
    let dig = |extra: &'static [&'static str]| {
        let port = port.clone();
        async move {
            let out = tokio::process::Command::new("dig")
                .args(["@127.0.0.1", "-p", &port, "+short", "+time=5", "+tries=3"])
                .args(extra)
                .output()
                .await
                .expect("dig (dnsutils) is installed");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    };
    assert_eq!(
        dig(&["hello.default.svc.cluster.local"]).await,
        "10.96.0.20"
    );
    assert_eq!(
        dig(&["+tcp", "hello.default.svc.cluster.local"]).await,
        "10.96.0.20"
    );
    assert_eq!(
        dig(&["-x", "10.96.0.20"]).await,
        "hello.default.svc.cluster.local."
    );
    assert_eq!(
        dig(&["SRV", "_http._tcp.hello.default.svc.cluster.local"]).await,
        "0 100 80 hello.default.svc.cluster.local."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_http() {
    let mut dns = start(args(vec![], 300), &[]).await;
    dns.zone
        .apply_service(&service("default", "hello", "10.96.0.20", &[]));
    dns.zone.publish();
    udp(dns.addr, "hello.default.svc.cluster.local.", RecordType::A).await;
    let addr = crate::serve_metrics(
        "127.0.0.1:0".parse().unwrap(),
        dns.server.metrics.clone(),
        dns.shutdown.clone(),
    )
    .await
    .unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(
        body.contains(r#"weir_dns_queries_total{type="A",rcode="NOERROR"} 1"#),
        "{body}"
    );
    assert!(
        body.contains("weir_dns_forward_latency_seconds_bucket"),
        "{body}"
    );
    assert!(body.contains("weir_dns_cache_hits_total 0"), "{body}");
}

/// (owner, address) of the A records in the additional section.
fn additional_a(m: &Message) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = m
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.to_ascii(), a.0.to_string())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_answers_carry_their_targets_addresses_as_additional_records() {
    let mut dns = start(args(vec![], 300), &[]).await;
    dns.zone.apply_service(&service(
        "default",
        "hello",
        "10.96.0.20",
        &[("http", 80), ("https", 443)],
    ));
    dns.zone.apply_service(&service("db", "pg", "None", &[]));
    let pg = [
        ("10.244.1.5", Some("pg-0"), None),
        ("10.244.1.6", None, None),
    ];
    dns.zone
        .apply_slice(&slice("db", "pg-1", "pg", &pg, &[("sql", 5432)]));
    // The same endpoint on another port in a second slice: two SRV records, one target.
    dns.zone
        .apply_slice(&slice("db", "pg-2", "pg", &pg[..1], &[("sql", 5433)]));
    dns.zone.publish();

    // ClusterIP: the Service name, once, whichever port was asked for.
    let name = "_http._tcp.hello.default.svc.cluster.local.";
    let m = udp(dns.addr, name, RecordType::SRV).await;
    assert_eq!(m.answers.len(), 1);
    assert_eq!(
        additional_a(&m),
        [(
            "hello.default.svc.cluster.local.".to_string(),
            "10.96.0.20".to_string()
        )]
    );
    assert!(m.edns.is_some(), "the OPT record is still there");

    // Headless: one A per endpoint target, hostname or dashed address; the same over TCP.
    let want = [
        ("10-244-1-6.pg.db.svc.cluster.local.", "10.244.1.6"),
        ("pg-0.pg.db.svc.cluster.local.", "10.244.1.5"),
    ]
    .map(|(n, ip)| (n.to_string(), ip.to_string()));
    let name = "_sql._tcp.pg.db.svc.cluster.local.";
    let m = udp(dns.addr, name, RecordType::SRV).await;
    assert_eq!(m.answers.len(), 3);
    assert_eq!(additional_a(&m), want, "each target once");
    let m = tcp(dns.addr, &query(name, RecordType::SRV, false)).await;
    assert_eq!(additional_a(&m), want);

    // An A query gets no additional records.
    let m = udp(dns.addr, "hello.default.svc.cluster.local.", RecordType::A).await;
    assert!(additional_a(&m).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_additional_records_that_do_not_fit_udp_are_left_out_without_truncation() {
    let mut dns = start(args(vec![], 300), &[]).await;
    // Nine endpoints: their SRV records fit a 512-byte classic UDP answer, their addresses
    // only partly. Twelve: the SRV records alone do not fit.
    for (svc, n) in [("big", 9), ("bigger", 12)] {
        dns.zone.apply_service(&service("db", svc, "None", &[]));
        let hosts: Vec<(String, String)> = (0..n)
            .map(|i| (format!("10.244.2.{i}"), format!("h{i}")))
            .collect();
        let eps: Vec<(&str, Option<&str>, Option<bool>)> = hosts
            .iter()
            .map(|(ip, h)| (ip.as_str(), Some(h.as_str()), None))
            .collect();
        dns.zone.apply_slice(&slice(
            "db",
            &format!("{svc}-1"),
            svc,
            &eps,
            &[("sql", 5432)],
        ));
    }
    dns.zone.publish();
    let is_endpoint = |(owner, ip): &(String, String)| {
        let i = ip.trim_start_matches("10.244.2.");
        owner == &format!("h{i}.big.db.svc.cluster.local.")
    };

    let q = query(
        "_sql._tcp.big.db.svc.cluster.local.",
        RecordType::SRV,
        false,
    );
    let m = udp_raw(dns.addr, &q, ANSWER_WAIT).await.unwrap();
    assert!(!m.metadata.truncation, "additional data is never required");
    assert_eq!(m.answers.len(), 9);
    let some = additional_a(&m);
    assert!(!some.is_empty() && some.len() < 9, "{some:?}");
    assert!(some.iter().all(is_endpoint), "{some:?}");
    // With EDNS (1232 bytes) and over TCP, every target's address comes along.
    for m in [
        udp(
            dns.addr,
            "_sql._tcp.big.db.svc.cluster.local.",
            RecordType::SRV,
        )
        .await,
        tcp(dns.addr, &q).await,
    ] {
        let all = additional_a(&m);
        assert_eq!(all.len(), 9, "{all:?}");
        assert!(all.iter().all(is_endpoint), "{all:?}");
    }

    // SRV records that do not fit: TC, and no partial answer or additional data.
    let q = query(
        "_sql._tcp.bigger.db.svc.cluster.local.",
        RecordType::SRV,
        false,
    );
    let m = udp_raw(dns.addr, &q, ANSWER_WAIT).await.unwrap();
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty() && m.additionals.is_empty());
    let m = tcp(dns.addr, &q).await;
    assert_eq!((m.answers.len(), additional_a(&m).len()), (12, 12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_additional_records_beyond_pointer_range_spell_out_their_owner() {
    // 400 targets make a TCP answer of ~19 KB: targets past offset 16383 cannot be named by
    // a compression pointer.
    let mut dns = start(args(vec![], 300), &[]).await;
    dns.zone.apply_service(&service("db", "huge", "None", &[]));
    let hosts: Vec<(String, String)> = (0..400)
        .map(|i| {
            (
                format!("10.244.{}.{}", 3 + i / 200, i % 200),
                format!("h{i}"),
            )
        })
        .collect();
    let eps: Vec<(&str, Option<&str>, Option<bool>)> = hosts
        .iter()
        .map(|(ip, h)| (ip.as_str(), Some(h.as_str()), None))
        .collect();
    dns.zone
        .apply_slice(&slice("db", "huge-1", "huge", &eps, &[("sql", 5432)]));
    dns.zone.publish();
    let q = query(
        "_sql._tcp.huge.db.svc.cluster.local.",
        RecordType::SRV,
        false,
    );
    let m = tcp(dns.addr, &q).await;
    let mut want: Vec<(String, String)> = hosts
        .iter()
        .map(|(ip, h)| (format!("{h}.huge.db.svc.cluster.local."), ip.clone()))
        .collect();
    want.sort();
    assert_eq!(m.answers.len(), 400);
    assert_eq!(additional_a(&m), want);
}
