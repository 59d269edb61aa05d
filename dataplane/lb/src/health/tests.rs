use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::*;

fn service(name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": "shop"}, "spec": spec}))
        .expect("test Service")
}

fn lb_local(name: &str, port: u16) -> Service {
    service(
        name,
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
               "healthCheckNodePort": port, "ports": [{"port": 80}]}),
    )
}

fn slice(service: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-x"), "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints
    }))
    .expect("test EndpointSlice")
}

fn http() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

fn name(n: &str) -> ServiceName {
    ("shop".into(), n.into())
}

#[test]
fn only_load_balancer_local_services_with_a_port_get_a_health_check() {
    let services = [
        lb_local("web", 31000),
        service(
            "cluster",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Cluster", "ports": [{"port": 80}]}),
        ),
        service(
            "nodeport",
            json!({"type": "NodePort", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
        ),
        // Not yet allocated, or out of range: nothing to listen on.
        service(
            "unset",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
        ),
        lb_local("zero", 0),
    ];
    let got = health_checks(&services, &[] as &[EndpointSlice], Some("n1"));
    assert_eq!(
        got.into_iter().collect::<Vec<_>>(),
        [(
            name("web"),
            HealthCheck {
                port: 31000,
                local_endpoints: 0
            }
        )]
    );
}

#[test]
fn local_endpoints_are_ready_ones_on_this_node_counted_by_ip() {
    let slices = [
        slice(
            "web",
            http(),
            json!([
                {"addresses": ["10.244.1.2"], "nodeName": "n1"},
                {"addresses": ["10.244.1.3"], "nodeName": "n1", "conditions": {"ready": true}},
                {"addresses": ["10.244.1.4"], "nodeName": "n1", "conditions": {"ready": false}},
                {"addresses": ["10.244.1.5"], "nodeName": "n1",
                 "conditions": {"ready": true, "serving": true, "terminating": true}},
                {"addresses": ["10.244.2.2"], "nodeName": "n2"},
                {"addresses": ["10.244.1.6"]}
            ]),
        ),
        // The same pod in a second slice (another port) is one endpoint.
        slice(
            "web",
            json!([{"name": "https", "port": 8443, "protocol": "TCP"}]),
            json!([{"addresses": ["10.244.1.2"], "nodeName": "n1"}]),
        ),
        // A slice without ports serves nothing; another Service's slice is not counted.
        slice(
            "web",
            json!([]),
            json!([{"addresses": ["10.244.1.9"], "nodeName": "n1"}]),
        ),
        slice(
            "other",
            http(),
            json!([{"addresses": ["10.244.1.7"], "nodeName": "n1"}]),
        ),
    ];
    let services = [lb_local("web", 31000), lb_local("other", 31001)];
    let got = health_checks(&services, &slices, Some("n1"));
    assert_eq!(got[&name("web")].local_endpoints, 2);
    assert_eq!(got[&name("other")].local_endpoints, 1);
    let got = health_checks(&services, &slices, Some("n2"));
    assert_eq!(got[&name("web")].local_endpoints, 1);
    assert_eq!(got[&name("other")].local_endpoints, 0);
}

#[test]
fn the_body_is_kube_proxys() {
    assert_eq!(
        body("shop", "web", 2, true),
        "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );
}

/// GET `path` from 127.0.0.1:`port` with hyper: status, the two headers kube-proxy sets, body.
async fn get(port: u16, path: &str) -> std::io::Result<(u16, String, String, Value)> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let other = |e: hyper::Error| std::io::Error::other(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(other)?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "lb.example")
        .body(Empty::<Bytes>::new())
        .map_err(std::io::Error::other)?;
    let resp = sender.send_request(req).await.map_err(other)?;
    let header = |h: header::HeaderName| {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (status, ctype, nosniff) = (
        resp.status().as_u16(),
        header(header::CONTENT_TYPE),
        header(header::X_CONTENT_TYPE_OPTIONS),
    );
    let body = resp.into_body().collect().await.map_err(other)?.to_bytes();
    let body = serde_json::from_slice(&body).map_err(std::io::Error::other)?;
    Ok((status, ctype, nosniff, body))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "never saw {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_local_endpoint_turns_the_health_check_from_503_to_200_and_back() {
    let shutdown = CancellationToken::new();
    let mut server = HealthServer::new(&[Ipv4Addr::LOCALHOST], shutdown.clone());
    let port = free_port();
    let services = [lb_local("web", port)];
    let expect = |count: u64| {
        json!({"service": {"namespace": "shop", "name": "web"},
               "localEndpoints": count, "serviceProxyHealthy": true})
    };
    let sync = |server: &mut HealthServer, endpoints: Value| {
        let slices = [slice("web", http(), endpoints)];
        server.sync_all(health_checks(&services, &slices, Some("n1")));
    };

    sync(
        &mut server,
        json!([{"addresses": ["10.244.2.2"], "nodeName": "n2"}]),
    );
    let (status, ctype, nosniff, body) = get(port, "/").await.expect("GET");
    assert_eq!(
        (status, ctype.as_str(), nosniff.as_str()),
        (503, "application/json", "nosniff")
    );
    assert_eq!(body, expect(0));

    sync(
        &mut server,
        json!([{"addresses": ["10.244.1.2"], "nodeName": "n1"}]),
    );
    let (status, _, _, body) = get(port, "/any/path?x=1").await.expect("GET");
    assert_eq!((status, body), (200, expect(1)));

    // The load balancer out of step: kube-proxy's serviceProxyHealthy false fails the check.
    server.set_proxy_healthy(false);
    let (status, _, _, body) = get(port, "/healthz").await.expect("GET");
    assert_eq!(status, 503);
    assert_eq!(body["serviceProxyHealthy"], false);
    server.set_proxy_healthy(true);

    sync(
        &mut server,
        json!([{"addresses": ["10.244.1.2"], "nodeName": "n1",
                               "conditions": {"ready": false, "terminating": true}}]),
    );
    let (status, _, _, body) = get(port, "/").await.expect("GET");
    assert_eq!((status, body), (503, expect(0)));

    // The Service gone: the port closes.
    server.sync_all(BTreeMap::new());
    eventually("the health check port closed", async || {
        get(port, "/").await.is_err().then_some(())
    })
    .await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_port_in_use_is_retried_on_the_next_change() {
    let shutdown = CancellationToken::new();
    let mut server = HealthServer::new(&[Ipv4Addr::LOCALHOST], shutdown.clone());
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = squatter.local_addr().expect("addr").port();
    let (busy, free) = (name("busy"), name("free"));
    let free_port = free_port();
    let want = |local_endpoints| {
        BTreeMap::from([
            (
                busy.clone(),
                HealthCheck {
                    port,
                    local_endpoints,
                },
            ),
            (
                free.clone(),
                HealthCheck {
                    port: free_port,
                    local_endpoints,
                },
            ),
        ])
    };
    // The busy port does not keep the other Service's check from being served.
    server.sync_all(want(1));
    assert_eq!(get(free_port, "/").await.expect("GET").0, 200);
    assert!(!server.open.contains_key(&port));

    drop(squatter);
    // A change to another Service retries it.
    let touched = HashSet::from([free.clone()]);
    server.sync_some(
        &touched,
        BTreeMap::from([(
            free.clone(),
            HealthCheck {
                port: free_port,
                local_endpoints: 2,
            },
        )]),
    );
    let (status, _, _, body) = get(port, "/").await.expect("GET");
    assert_eq!((status, &body["service"]["name"]), (200, &json!("busy")));
    assert_eq!(
        get(free_port, "/").await.expect("GET").3["localEndpoints"],
        2
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_port_moved_to_another_service_is_served_for_it_at_once() {
    let shutdown = CancellationToken::new();
    let mut server = HealthServer::new(&[Ipv4Addr::LOCALHOST], shutdown.clone());
    let port = free_port();
    let check = |local_endpoints| HealthCheck {
        port,
        local_endpoints,
    };
    server.sync_all(BTreeMap::from([(name("old"), check(1))]));
    assert_eq!(
        get(port, "/").await.expect("GET").3["service"]["name"],
        "old"
    );
    // One sync deletes the old Service and adds a new one the API server gave its port.
    server.sync_all(BTreeMap::from([(name("new"), check(2))]));
    let (status, _, _, body) = get(port, "/").await.expect("GET");
    assert_eq!((status, &body["service"]["name"]), (200, &json!("new")));
    assert_eq!(body["localEndpoints"], 2);
    shutdown.cancel();
}

/// Reads `stream` until the server closes it; false if it is still open after 10 s.
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let read_to_end = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_to_end)
        .await
        .is_ok()
}

/// A connection to 127.0.0.1:`port` that has sent `bytes`.
async fn sent(port: u16, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.write_all(bytes).await.expect("write");
    stream
}

#[tokio::test]
async fn closing_a_health_check_closes_its_connections_too() {
    let shutdown = CancellationToken::new();
    let mut server = HealthServer::new(&[Ipv4Addr::LOCALHOST], shutdown.clone());
    let (port, other_port) = (free_port(), free_port());
    let check = |port, local_endpoints| HealthCheck {
        port,
        local_endpoints,
    };
    server.sync_all(BTreeMap::from([
        (name("web"), check(port, 1)),
        (name("other"), check(other_port, 0)),
    ]));
    // A client that never finishes its request, an idle one, and one that sends garbage.
    let mut stalled = sent(port, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    let mut idle = sent(other_port, b"").await;
    let mut garbage = sent(port, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n").await;
    assert!(closed_by_server(&mut garbage).await, "garbage left open");
    // The server still answers.
    assert_eq!(get(port, "/").await.expect("GET").0, 200);

    // HEAD: kube-proxy's status and headers, no body.
    let mut head = sent(
        port,
        b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let mut reply = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut head, &mut reply)
        .await
        .expect("read");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(
        reply.contains("content-type: application/json\r\n"),
        "{reply}"
    );
    assert!(reply.ends_with("\r\n\r\n"), "{reply}");

    // The other Service's check stays up while this one closes; shutdown closes it.
    server.sync_all(BTreeMap::from([(name("other"), check(other_port, 0))]));
    assert!(
        closed_by_server(&mut stalled).await,
        "stalled client left open"
    );
    assert_eq!(get(other_port, "/").await.expect("GET").0, 503);
    shutdown.cancel();
    assert!(closed_by_server(&mut idle).await, "idle client left open");
    eventually("every health check port closed", async || {
        tokio::net::TcpStream::connect(("127.0.0.1", other_port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

/// A health server on 127.0.0.1 serving `web` on a free port with `local_endpoints`.
fn serving_web(local_endpoints: usize) -> (CancellationToken, HealthServer, u16) {
    let shutdown = CancellationToken::new();
    let mut server = HealthServer::new(&[Ipv4Addr::LOCALHOST], shutdown.clone());
    let port = free_port();
    let check = HealthCheck {
        port,
        local_endpoints,
    };
    server.sync_all(BTreeMap::from([(name("web"), check)]));
    (shutdown, server, port)
}

#[tokio::test]
async fn many_clients_at_once_are_all_answered() {
    let (shutdown, _server, port) = serving_web(3);
    let clients: Vec<_> = (0..100)
        .map(|_| tokio::spawn(async move { get(port, "/").await.map(|r| r.0) }))
        .collect();
    for c in clients {
        assert_eq!(c.await.expect("join").expect("GET"), 200);
    }
    shutdown.cancel();
}

#[tokio::test]
async fn dropping_the_server_closes_its_health_checks() {
    let (shutdown, server, port) = serving_web(1);
    let mut idle = sent(port, b"").await;
    drop(server);
    assert!(closed_by_server(&mut idle).await, "idle client left open");
    eventually("the health check port closed", async || {
        get(port, "/").await.is_err().then_some(())
    })
    .await;
    assert!(!shutdown.is_cancelled());
}
