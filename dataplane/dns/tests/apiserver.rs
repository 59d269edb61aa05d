//! weir DNS fed by the real weir API server: `weir server` (the binary from the target dir,
//! temp data dir, a port it picks itself, the kubeconfig it writes) stores Services and an EndpointSlice
//! created through kube-rs; the DNS server's watches pick them up, and a change or delete
//! made through the API reaches the answers without a restart.
//!
//! Needs the `weir` binary: `cargo build -p weir` (or set WEIR_BIN).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use tokio::net::UdpSocket;
use weir_dns::{Args, CancellationToken};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn weir_bin() -> PathBuf {
    std::env::var_os("WEIR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/weir")
        })
}

fn service(name: &str, cluster_ip: Option<&str>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: cluster_ip.map(str::to_string),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Ask `name`/`rtype` until `done` accepts the answer, or fail after 60 s with the last one.
async fn eventually(
    dns: SocketAddr,
    name: &str,
    rtype: RecordType,
    done: impl Fn(&Message) -> bool,
) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    let mut buf = vec![0u8; 65535];
    while Instant::now() < deadline {
        let mut q = Message::new(rand::random(), MessageType::Query, OpCode::Query);
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        sock.send_to(&q.to_vec().unwrap(), dns).await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await
        {
            let m = Message::from_vec(&buf[..n]).unwrap();
            if done(&m) {
                return m;
            }
            last = Some(m);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{name} {rtype} never reached the expected answer; last: {last:?}");
}

fn addresses(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_the_api_server_reach_dns_answers() {
    let bin = weir_bin();
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p weir` or set WEIR_BIN",
        bin.display()
    );
    let data = tempfile::tempdir().expect("tempdir");
    // Port 0: the server binds a free port and writes it into its kubeconfig, which it
    // does only once it listens. A port found free here could be taken before it binds.
    let _server = Kill(
        Command::new(&bin)
            .arg("server")
            .arg("--data-dir")
            .arg(data.path())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .stdout(Stdio::null())
            .spawn()
            .expect("start weir server"),
    );
    let kubeconfig = data.path().join("kubeconfig");
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        // Read until it parses: the file may be caught half-written.
        if let Ok(kc) = kube::config::Kubeconfig::read_from(&kubeconfig)
            && let Ok(config) = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await
        {
            break kube::Client::try_from(config).expect("kube client");
        }
        assert!(Instant::now() < deadline, "weir server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The server creates the `default` namespace just after it starts listening.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    while namespaces.get_opt("default").await.ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "weir server never created the default namespace"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    // One Service exists before the DNS server starts (the initial list), one comes later
    // (the watch).
    let hello = services
        .create(&pp, &service("hello", None))
        .await
        .expect("create hello");
    let hello_ip = hello
        .spec
        .unwrap()
        .cluster_ip
        .expect("cluster IP allocated");

    let args = Args {
        listen: "127.0.0.1:0".parse().unwrap(),
        zone: "cluster.local".into(),
        ttl: 5,
        upstreams: Vec::new(),
        resolv_conf: "/dev/null".into(),
        forward_timeout_ms: 500,
        cache_size: 100,
        udp_workers: 1,
        no_autopath: false,
        metrics: None,
    };
    let built = weir_dns::build(&args).expect("DNS server binds");
    let dns: SocketAddr = built.bound.local_addr();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(built.serve_from(client.clone(), shutdown.clone()));

    let m = eventually(
        dns,
        "hello.default.svc.cluster.local.",
        RecordType::A,
        |m| !m.answers.is_empty(),
    )
    .await;
    assert_eq!(addresses(&m), [hello_ip]);
    let srv = eventually(
        dns,
        "_http._tcp.hello.default.svc.cluster.local.",
        RecordType::SRV,
        |m| !m.answers.is_empty(),
    )
    .await;
    assert!(matches!(&srv.answers[0].data, RData::SRV(s) if s.port == 80));

    // A headless Service and its EndpointSlice, created after the server started.
    services
        .create(&pp, &service("db", Some("None")))
        .await
        .expect("create db");
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some("db-1".into()),
            labels: Some([("kubernetes.io/service-name".to_string(), "db".to_string())].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: ["10.244.0.5", "10.244.0.6"]
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                ..Default::default()
            })
            .collect(),
        ports: None,
    };
    slices.create(&pp, &slice).await.expect("create slice");
    let m = eventually(dns, "db.default.svc.cluster.local.", RecordType::A, |m| {
        m.answers.len() == 2
    })
    .await;
    assert_eq!(addresses(&m), ["10.244.0.5", "10.244.0.6"]);

    // Deleting through the API turns the answer into NXDOMAIN.
    services
        .delete("hello", &DeleteParams::default())
        .await
        .expect("delete hello");
    let m = eventually(
        dns,
        "hello.default.svc.cluster.local.",
        RecordType::A,
        |m| m.metadata.response_code == ResponseCode::NXDomain,
    )
    .await;
    assert!(m.answers.is_empty());

    shutdown.cancel();
    server.await.expect("DNS server ran cleanly");
}
