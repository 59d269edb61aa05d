//! End-to-end tests of the proxy on real loopback sockets: real HTTP/1.1 and h2c clients,
//! real TLS handshakes with SNI and ALPN, real WebSocket-style upgrades, real backends that
//! answer, hang, reset or vanish. The routing table is built from constructed Kubernetes
//! objects; `watch` is exercised against the API server in `tests/apiserver.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::fixtures::*;
use crate::metrics::Metrics;
use crate::table::{Builder, Snapshot, Table};
use crate::{Args, IngressServer};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

/// A test backend. Paths: `/headers` lists the request headers, `/echo` streams the body
/// back, `/hang` never answers, `/reset` drops the connection without an answer, `/slow`
/// answers after 300 ms; an Upgrade request gets 101 and an echo over the upgraded stream.
/// Everything else answers `pod=<name>`.
async fn upstream(name: &'static str) -> SocketAddr {
    upstream_counted(name).await.0
}

/// [`upstream`], and how many connections it accepted.
async fn upstream_counted(name: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| answer(name, req));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

async fn answer(
    name: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    if req.headers().contains_key("upgrade") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::default())
            .expect("response"));
    }
    let body = match req.uri().path() {
        p if p.ends_with("/headers") => {
            let mut s = format!("pod={name} version={:?}\n", req.version());
            for (k, v) in req.headers() {
                s.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
            }
            s
        }
        "/echo" => {
            let body = req
                .into_body()
                .collect()
                .await
                .map_err(std::io::Error::other)?
                .to_bytes();
            return Ok(Response::new(Full::new(body)));
        }
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            String::new()
        }
        "/reset" => return Err(std::io::Error::other("backend drops this connection")),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            format!("pod={name} slow")
        }
        _ => format!("pod={name}"),
    };
    Ok(Response::new(Full::new(Bytes::from(body))))
}

/// A running ingress with a table the test controls.
struct Harness {
    table: Arc<ArcSwap<Table>>,
    builder: Builder,
    snap: Snapshot,
    http: SocketAddr,
    https: SocketAddr,
    metrics: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(extra: &[&str]) -> Harness {
        let mut argv = vec![
            "weir-ingress",
            "--http-addr=127.0.0.1:0",
            "--https-addr=127.0.0.1:0",
            "--metrics-addr=127.0.0.1:0",
            "--header-read-timeout=500ms",
            "--max-body-bytes=1024",
            "--max-header-bytes=8192",
            "--access-log=false",
            "--shutdown-grace=5s",
        ];
        argv.extend_from_slice(extra);
        let args = Cli::try_parse_from(argv).expect("flags").args;
        let table = Arc::new(ArcSwap::from_pointee(Table::default()));
        let server = IngressServer::bind(&args, table.clone(), Arc::new(Metrics::default()))
            .await
            .expect("bind");
        let (http, https, metrics) = server.addrs();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(shutdown.clone()));
        Harness {
            table,
            builder: Builder::default(),
            snap: Snapshot::default(),
            http,
            https,
            metrics,
            shutdown,
            task,
        }
    }

    /// Every host and path routed to Service `web` with `endpoints`.
    async fn serving(extra: &[&str], endpoints: &[SocketAddr]) -> Harness {
        let mut h = Harness::start(extra).await;
        h.service("web", endpoints, None);
        h.ingress(ingress(
            "ns",
            "web",
            vec![("", "/", "Prefix", backend("web", 80))],
        ));
        h.apply();
        h
    }

    /// Service `ns/name` port 80 (named `http`, with `app_protocol`), one slice per endpoint.
    fn service(&mut self, name: &str, endpoints: &[SocketAddr], app_protocol: Option<&str>) {
        self.snap
            .services
            .push(Arc::new(service("ns", name, &[("http", 80, app_protocol)])));
        for (i, e) in endpoints.iter().enumerate() {
            let ip = e.ip().to_string();
            let s = slice(
                "ns",
                &format!("{name}-{i}"),
                name,
                ("http", e.port() as i32),
                &[(ip.as_str(), true)],
            );
            self.snap.slices.push(Arc::new(s));
        }
    }

    fn ingress(&mut self, ing: Ingress) {
        self.snap
            .ingresses
            .retain(|i| i.metadata.name != ing.metadata.name);
        self.snap.ingresses.push(Arc::new(ing));
    }

    fn secret(&mut self, s: Secret) {
        self.snap
            .secrets
            .retain(|i| i.metadata.name != s.metadata.name);
        self.snap.secrets.push(Arc::new(s));
    }

    fn apply(&mut self) {
        let t = self.builder.build(&self.snap);
        self.table.store(Arc::new(t));
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }
}

fn h1_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    host: &str,
) -> (StatusCode, String) {
    let req = Request::get(url)
        .header("host", host)
        .body(Full::default())
        .expect("request");
    let resp = client.request(req).await.expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Write raw bytes, read until the server closes (or 2 s), return what came back.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn routes_by_host_and_path_and_balances_round_robin() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let mut h = Harness::start(&[]).await;
    h.service("web", &[a, b], None);
    let mut ing = ingress(
        "ns",
        "web",
        vec![(
            "hello.example.com",
            "/",
            "Prefix",
            backend_named("web", "http"),
        )],
    );
    annotate(
        &mut ing.metadata,
        &[("ingress.weir.io/load-balance", "round_robin")],
    );
    h.ingress(ing);
    h.apply();
    let c = h1_client();
    let mut pods = Vec::new();
    for _ in 0..4 {
        let (status, body) = get(&c, &h.url("/x"), "hello.example.com").await;
        assert_eq!(status, StatusCode::OK);
        pods.push(body);
    }
    assert_ne!(pods[0], pods[1], "{pods:?}");
    assert_eq!(
        (&pods[0], &pods[1]),
        (&pods[2], &pods[3]),
        "in turn: {pods:?}"
    );

    let (status, body) = get(&c, &h.url("/x"), "other.example.com").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body.contains("no Ingress rule matches host \"other.example.com\""),
        "{body}"
    );
}

#[tokio::test]
async fn forwarded_headers_are_set_and_hop_by_hop_stripped() {
    let a = upstream("a").await;
    let mut h = Harness::start(&[]).await;
    h.service("web", &[a], None);
    h.ingress(ingress(
        "ns",
        "web",
        vec![("h.example.com", "/", "Prefix", backend("web", 80))],
    ));
    h.apply();
    let req = Request::get(h.url("/headers"))
        .header("host", "h.example.com:8080")
        .header("x-forwarded-for", "6.6.6.6")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("proxy-authorization", "basic x")
        .body(Full::default())
        .expect("request");
    let resp = h1_client().request(req).await.expect("response");
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
        .into_owned();
    for want in [
        "host: h.example.com:8080",
        "x-forwarded-for: 127.0.0.1\n",
        "x-forwarded-proto: http",
        "x-forwarded-host: h.example.com:8080",
        "forwarded: for=127.0.0.1;proto=http;host=\"h.example.com:8080\"",
    ] {
        assert!(body.contains(want), "missing {want:?} in\n{body}");
    }
    for gone in ["x-private", "proxy-authorization", "6.6.6.6"] {
        assert!(!body.contains(gone), "{gone:?} leaked in\n{body}");
    }
}

#[tokio::test]
async fn h2c_prior_knowledge_downstream_and_h2_upstream_by_app_protocol() {
    let a = upstream("a").await;
    let mut h = Harness::start(&[]).await;
    h.service("web", &[a], None);
    h.service("grpc", &[a], Some("kubernetes.io/h2c"));
    h.ingress(ingress(
        "ns",
        "web",
        vec![
            ("", "/", "Prefix", backend("web", 80)),
            ("", "/g", "Prefix", backend("grpc", 80)),
        ],
    ));
    h.apply();
    let c: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // Over h2 the host is the :authority, here 127.0.0.1:port, so these rules have no host.
    let req = Request::get(h.url("/headers"))
        .body(Full::default())
        .expect("req");
    let resp = c.request(req).await.expect("h2c response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
        .into_owned();
    assert!(
        body.contains("version=HTTP/1.1"),
        "upstream spoke h1: {body}"
    );

    let req = Request::get(h.url("/g/headers"))
        .body(Full::default())
        .expect("req");
    let resp = c.request(req).await.expect("h2c response");
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
        .into_owned();
    assert!(
        body.contains("version=HTTP/2.0"),
        "upstream spoke h2: {body}"
    );
}

/// Accepts any server certificate so tests can look at which one was presented.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS-connect to `addr` with `sni` and `alpn`; returns the stream.
async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(sni.to_string()).expect("sni");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("handshake")
}

fn presented(s: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default()
}

fn secret_cert_der(s: &Secret) -> Vec<u8> {
    let pem = &s
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .expect("tls.crt")
        .0;
    rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .expect("one cert")
        .expect("pem")
        .to_vec()
}

#[tokio::test]
async fn tls_sni_alpn_default_certificate_and_live_certificate_swap() {
    let a = upstream("a").await;
    let mut h = Harness::start(&[]).await;
    h.service("web", &[a], None);
    let first = tls_secret("ns", "cert", &["secure.example.com"]).expect("rcgen");
    h.secret(first.clone());
    h.ingress(with_tls(
        ingress(
            "ns",
            "web",
            vec![("secure.example.com", "/", "Prefix", backend("web", 80))],
        ),
        &["secure.example.com"],
        "cert",
    ));
    h.apply();

    // ALPN h2 over TLS, the certificate chosen by SNI.
    let tls = tls_connect(h.https, "secure.example.com", &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(presented(&tls), secret_cert_der(&first));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2");
    tokio::spawn(conn);
    let req = Request::get("https://secure.example.com/headers")
        .body(Full::<Bytes>::default())
        .expect("req");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes())
        .into_owned();
    assert!(body.contains("x-forwarded-proto: https"), "{body}");

    // HTTP/1.1 over TLS.
    let tls = tls_connect(h.https, "secure.example.com", &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "secure.example.com")
        .body(Full::<Bytes>::default())
        .expect("req");
    assert_eq!(
        send.send_request(req).await.expect("response").status(),
        StatusCode::OK
    );
    // A second request on the same connection (the fast path keeps TLS connections alive).
    let req = Request::get("/headers")
        .header("host", "secure.example.com")
        .body(Full::<Bytes>::default())
        .expect("req");
    let resp = send.send_request(req).await.expect("second response");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("x-forwarded-proto: https"), "{body}");

    // Unknown SNI: the default certificate, not an error and not a panic.
    let tls = tls_connect(h.https, "unknown.example.org", &[b"http/1.1"]).await;
    let default = presented(&tls);
    assert!(!default.is_empty() && default != secret_cert_der(&first));

    // The Secret changes: the next handshake presents the new certificate, no restart.
    let second = tls_secret("ns", "cert", &["secure.example.com"]).expect("rcgen");
    h.secret(second.clone());
    h.apply();
    let tls = tls_connect(h.https, "secure.example.com", &[b"http/1.1"]).await;
    assert_eq!(presented(&tls), secret_cert_der(&second));

    // Plain HTTP to a TLS host is redirected (ssl-redirect defaults to true).
    let (status, body) = get(&h1_client(), &h.url("/p?q=1"), "secure.example.com").await;
    assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
    assert!(
        body.contains(&format!(
            "https://secure.example.com:{}/p?q=1",
            h.https.port()
        )),
        "{body}"
    );
}

/// Send an Upgrade request on a raw connection and return it once 101 has been read.
async fn open_websocket(addr: SocketAddr, host: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("read 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

async fn ping(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("tunnel write");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(back, msg);
}

#[tokio::test]
async fn websockets_and_keepalive_connections_survive_route_changes() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let mut h = Harness::start(&[]).await;
    h.service("web", &[a], None);
    h.service("other", &[b], None);
    h.ingress(ingress(
        "ns",
        "web",
        vec![("ws.example.com", "/", "Prefix", backend("web", 80))],
    ));
    h.apply();
    let mut ws = open_websocket(h.http, "ws.example.com").await;
    ping(&mut ws, b"hello").await;

    // A slow request in flight across the changes.
    let c = h1_client();
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), h.url("/slow"));
        async move { get(&c, &url, "ws.example.com").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..=20 {
        // Alternate the route between two services and add unrelated routes.
        let svc = if i % 2 == 0 { "other" } else { "web" };
        h.ingress(ingress(
            "ns",
            "web",
            vec![("ws.example.com", "/", "Prefix", backend(svc, 80))],
        ));
        h.ingress(ingress(
            "ns",
            &format!("extra-{i}"),
            vec![(
                &*format!("x{i}.example.com"),
                "/",
                "Prefix",
                backend("web", 80),
            )],
        ));
        h.apply();
        ping(&mut ws, format!("msg {i}").as_bytes()).await;
        let (status, _) = get(&c, &h.url("/"), "ws.example.com").await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        slow.await.expect("join"),
        (StatusCode::OK, "pod=a slow".to_string())
    );
    // The last change (i = 20) routes to `other`: new requests see it.
    assert_eq!(get(&c, &h.url("/"), "ws.example.com").await.1, "pod=b");
}

#[tokio::test]
async fn slow_loris_is_cut_off_by_the_header_read_timeout() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(h.http).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    // Trickle a header byte every 100 ms; the server must close within its 500 ms timeout.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(b"X").await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(1), s.read_to_end(&mut out)).await {
            Ok(_) => break,
            Err(_) if started.elapsed() > Duration::from_secs(3) => {
                panic!("slow client still connected")
            }
            Err(_) => {}
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );

    // A client that connects and sends nothing is closed too.
    let started = Instant::now();
    let mut s = TcpStream::connect(h.http).await.expect("connect");
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut [0u8; 16]))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn oversized_headers_get_431_and_invalid_requests_400() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let resp = raw(h.http, big.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    let resp = raw(h.http, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // The proxy keeps serving.
    assert_eq!(get(&h1_client(), &h.url("/"), "x").await.0, StatusCode::OK);
}

#[tokio::test]
async fn bodies_stream_and_oversized_bodies_get_413() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    let c = h1_client();
    let ok = Request::post(h.url("/echo"))
        .body(Full::new(Bytes::from(vec![b'x'; 1000])))
        .expect("req");
    let resp = c.request(ok).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .len(),
        1000
    );

    let big = Request::post(h.url("/echo"))
        .body(Full::new(Bytes::from(vec![b'x'; 2000])))
        .expect("req");
    assert_eq!(
        c.request(big).await.expect("response").status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // Chunked, no Content-Length: the limit is enforced while streaming.
    let chunk = "x".repeat(600);
    let chunked = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let resp = raw(h.http, chunked.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
}

#[tokio::test]
async fn upstream_reset_gets_502_and_hang_gets_504_within_the_route_timeout() {
    let mut h = Harness::start(&[]).await;
    h.service("web", &[upstream("a").await], None);
    let mut ing = ingress("ns", "web", vec![("", "/", "Prefix", backend("web", 80))]);
    annotate(
        &mut ing.metadata,
        &[("nginx.ingress.kubernetes.io/proxy-read-timeout", "300ms")],
    );
    h.ingress(ing);
    h.apply();
    let c = h1_client();
    let started = Instant::now();
    let (status, body) = get(&c, &h.url("/hang"), "x").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(body.contains("sent no response within 300ms"), "{body}");

    let (status, body) = get(&c, &h.url("/reset"), "x").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("upstream failed (upstream)"), "{body}");

    let metrics = get(&c, &format!("http://{}/metrics", h.metrics), "m")
        .await
        .1;
    assert!(
        metrics
            .contains(r#"weir_ingress_errors_total{side="upstream",kind="upstream timed out"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"status="504""#), "{metrics}");
}

/// Everything routed round-robin to Service `web`: first a port nothing listens on (its
/// address is returned), then backend `a`; one connect failure ejects an endpoint.
async fn dead_then_alive(annotations: &[(&str, &str)]) -> (Harness, SocketAddr) {
    let a = upstream("a").await;
    // A port nothing listens on: bind, learn the port, close.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let mut h = Harness::start(&["--eject-after-failures=1", "--eject-duration=60s"]).await;
    h.service("web", &[dead, a], None);
    let mut ing = ingress("ns", "web", vec![("", "/", "Prefix", backend("web", 80))]);
    let mut all = vec![("ingress.weir.io/load-balance", "round_robin")];
    all.extend_from_slice(annotations);
    annotate(&mut ing.metadata, &all);
    h.ingress(ing);
    h.apply();
    (h, dead)
}

#[tokio::test]
async fn connect_failures_retry_on_another_endpoint_and_eject() {
    let (h, dead) = dead_then_alive(&[]).await;
    let c = h1_client();
    for _ in 0..6 {
        assert_eq!(
            get(&c, &h.url("/"), "x").await,
            (StatusCode::OK, "pod=a".to_string())
        );
    }
    let t = h.table.load();
    let ep = &t.route("x", "/").expect("route").backend.endpoints;
    let dead_ep = ep.iter().find(|e| e.addr == dead).expect("dead endpoint");
    assert!(
        dead_ep.is_ejected(crate::balance::now_ms()),
        "ejected after a connect failure"
    );

    // A POST is not retried: the dead endpoint's failure is the answer when it is picked.
    let mut h2 = Harness::start(&["--eject-after-failures=100"]).await;
    h2.service("web", &[dead], None);
    h2.ingress(ingress(
        "ns",
        "web",
        vec![("", "/", "Prefix", backend("web", 80))],
    ));
    h2.apply();
    let req = Request::post(h2.url("/echo"))
        .body(Full::new(Bytes::from_static(b"x")))
        .expect("req");
    assert_eq!(
        c.request(req).await.expect("response").status(),
        StatusCode::BAD_GATEWAY
    );
}

#[tokio::test]
async fn endpoint_vanishing_mid_request_is_retried_only_when_safe() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let mut h = Harness::start(&[]).await;
    h.service("web", &[a, b], None);
    // `/reset` on both would fail twice; route the reset path to a service whose first
    // endpoint drops the connection and whose second is a plain backend.
    let dropper = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let drop_addr = dropper.local_addr().expect("addr");
    tokio::spawn(async move {
        // Reads the request, then vanishes without answering.
        while let Ok((mut s, _)) = dropper.accept().await {
            let _ = s.read(&mut [0u8; 4096]).await;
            drop(s);
        }
    });
    h.service("flaky", &[drop_addr, a], None);
    let mut ing = ingress("ns", "web", vec![("", "/", "Prefix", backend("flaky", 80))]);
    annotate(
        &mut ing.metadata,
        &[("ingress.weir.io/load-balance", "round_robin")],
    );
    h.ingress(ing);
    h.apply();
    let c = h1_client();
    for _ in 0..4 {
        assert_eq!(
            get(&c, &h.url("/"), "x").await,
            (StatusCode::OK, "pod=a".to_string()),
            "GET retried"
        );
    }
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let req = Request::post(h.url("/echo"))
            .body(Full::new(Bytes::from_static(b"x")))
            .expect("req");
        statuses.push(c.request(req).await.expect("response").status());
    }
    assert!(
        statuses.contains(&StatusCode::BAD_GATEWAY),
        "POST not retried: {statuses:?}"
    );
    assert!(statuses.contains(&StatusCode::OK), "{statuses:?}");
}

#[tokio::test]
async fn no_endpoints_is_503_and_default_backend_catches_the_rest() {
    let a = upstream("a").await;
    let mut h = Harness::start(&[]).await;
    h.service("web", &[a], None);
    h.service("empty", &[], None);
    let mut d = ingress(
        "ns",
        "default",
        vec![("e.example.com", "/", "Prefix", backend("empty", 80))],
    );
    if let Some(s) = d.spec.as_mut() {
        s.default_backend = Some(backend("web", 80));
    }
    h.ingress(d);
    h.apply();
    let c = h1_client();
    let (status, body) = get(&c, &h.url("/"), "e.example.com").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body.contains("service ns/empty:80 has no ready endpoints"),
        "{body}"
    );
    assert_eq!(
        get(&c, &h.url("/anything"), "nomatch").await,
        (StatusCode::OK, "pod=a".to_string())
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_stops_accepting() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    let c = h1_client();
    let url = h.url("/slow");
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move { get(&c, &url, "x").await }
    });
    // Shut down once the request is at the endpoint, however long a loaded machine takes.
    let table = h.table.load();
    let endpoint = &table.route("x", "/slow").expect("route").backend.endpoints[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    while endpoint.outstanding() == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the endpoint"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.shutdown.cancel();
    assert_eq!(
        in_flight.await.expect("join"),
        (StatusCode::OK, "pod=a slow".to_string())
    );
    tokio::time::timeout(Duration::from_secs(5), h.task)
        .await
        .expect("drained in time")
        .expect("join");
    assert!(TcpStream::connect(h.http).await.is_err(), "listener closed");
}

/// A scripted HTTP/1.1 backend on raw sockets: for each request head it reads, it writes
/// `reply(method, path)` and then closes if the reply says `close`. A `|` in the reply
/// splits it into two writes 20 ms apart, so the proxy must read a response in pieces.
/// Counts connections.
async fn scripted(
    reply: fn(&str, &str) -> (&'static str, bool),
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let mut line = head.split(' ');
                    let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
                    let (bytes, close) = reply(method, path);
                    for (i, part) in bytes.split('|').enumerate() {
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if s.write_all(part.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// Write `request` on a raw connection and read the one response it gets.
async fn exchange(s: &mut TcpStream, request: &[u8]) -> (String, String) {
    s.write_all(request).await.expect("write");
    read_response(s).await
}

/// Read one response with a Content-Length body from a raw connection.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("read head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.expect("read body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// A [`scripted`] reply in every response framing: chunked with a trailer (`/chunked`),
/// chunked beside a length (`/both`), after an interim response (`/interim`), 204, a
/// HEAD's, until close (`/close`), and a length with a `Connection`-named header.
fn every_framing(method: &str, path: &str) -> (&'static str, bool) {
    match (method, path) {
        (_, "/chunked") => (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\r\n5\r\nhello\r\n7;x=y\r\n, wo|rld\r\n0\r\nx-checksum: 1|2\r\n\r\n",
            false,
        ),
        (_, "/both") => (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            false,
        ),
        (_, "/interim") => (
            "HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n|HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\ninte|rim",
            false,
        ),
        (_, "/nocontent") => ("HTTP/1.1 204 No Content\r\n\r\n", false),
        ("HEAD", _) => ("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", false),
        (_, "/close") => ("HTTP/1.1 200 OK\r\n\r\nuntil |the end", true),
        _ => (
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-private\r\nx-private: 1\r\nx-app: 2\r\n\r\nok",
            false,
        ),
    }
}

#[tokio::test]
async fn fast_path_passes_every_response_framing_through_on_one_upstream_connection() {
    let (up, accepted) = scripted(every_framing).await;
    let h = Harness::serving(&[], &[up]).await;
    let c = h1_client();
    for _ in 0..2 {
        assert_eq!(
            get(&c, &h.url("/chunked"), "x").await,
            (StatusCode::OK, "hello, world".to_string())
        );
        assert_eq!(
            get(&c, &h.url("/interim"), "x").await,
            (StatusCode::OK, "interim".to_string())
        );
        assert_eq!(
            get(&c, &h.url("/nocontent"), "x").await,
            (StatusCode::NO_CONTENT, String::new())
        );
        let head = Request::head(h.url("/"))
            .header("host", "x")
            .body(Full::default())
            .expect("request");
        let resp = c.request(head).await.expect("HEAD");
        assert_eq!(resp.headers()["content-length"], "10");
        assert!(
            resp.into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
                .is_empty()
        );
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "chunked, interim, 204 and HEAD responses all left the upstream connection reusable"
    );
    // A body delimited by the upstream closing reaches the client, which is told to close.
    let resp = raw(h.http, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.contains("connection: close\r\n"), "{resp}");
    assert!(resp.ends_with("\r\n\r\nuntil the end"), "{resp}");
    // Hop-by-hop headers of the response are gone, framing stays.
    let resp = raw(
        h.http,
        b"GET /chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.contains("transfer-encoding: chunked\r\n"), "{resp}");
    assert!(!resp.contains("keep-alive"), "{resp}");
    assert!(resp.ends_with("0\r\nx-checksum: 12\r\n\r\n"), "{resp}");
}

#[tokio::test]
async fn a_connection_hands_over_to_hyper_for_a_chunked_body_and_an_upgrade() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    let mut s = TcpStream::connect(h.http).await.expect("connect");
    // Served by the fast path.
    let (head, body) = exchange(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "pod=a");
    // A chunked request body: hyper takes over the connection from here.
    let (head, body) = exchange(&mut s, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "abc");
    // And an upgrade on the same connection becomes a tunnel.
    let (head, _) = exchange(
        &mut s,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ping(&mut s, b"through the tunnel").await;
}

#[tokio::test]
async fn pooled_connections_the_endpoint_closed_are_replaced_without_an_error() {
    // Each connection answers one request, without saying it will close.
    let (up, accepted) =
        scripted(|_, _| ("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true)).await;
    let h = Harness::serving(&[], &[up]).await;
    let c = h1_client();
    for _ in 0..5 {
        assert_eq!(
            get(&c, &h.url("/"), "x").await,
            (StatusCode::OK, "ok".to_string())
        );
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);
}

#[tokio::test]
async fn fast_path_reads_heads_in_pieces_answers_pipelined_requests_in_order_and_survives_garbage()
{
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    // A head that arrives a byte at a time.
    let mut s = TcpStream::connect(h.http).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    for b in b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n" {
        s.write_all(std::slice::from_ref(b)).await.expect("write");
    }
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "pod=a");
    // Three requests in one write, answered in order on the same connection.
    let (_, first) = exchange(&mut s, b"GET /headers HTTP/1.1\r\nHost: x\r\nX-N: 1\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /headers HTTP/1.1\r\nHost: x\r\nX-N: 3\r\n\r\n").await;
    assert!(first.contains("x-n: 1"), "{first}");
    let (_, second) = read_response(&mut s).await;
    assert_eq!(second, "abc");
    let (_, third) = read_response(&mut s).await;
    assert!(third.contains("x-n: 3"), "{third}");
    // Garbage in several shapes: an error or a close, never a hang or a crash.
    for junk in [
        &b"\x00\x01\x02\xff\xfe\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    ] {
        let resp = raw(h.http, junk).await;
        assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
            "{junk:?}: {resp}"
        );
    }
    assert_eq!(get(&h1_client(), &h.url("/"), "x").await.0, StatusCode::OK);
}

#[tokio::test]
async fn connection_options_never_remove_a_requests_framing_or_host() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    let mut s = TcpStream::connect(h.http).await.expect("connect");
    // Were Content-Length dropped as a connection option, the body would reach the
    // endpoint as the next request on a pooled connection: a smuggled request.
    let (head, body) = exchange(&mut s, b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\nabc").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "abc");
    let (head, body) = exchange(
        &mut s,
        b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("\nhost: x\n"), "{body}");
}

#[tokio::test]
async fn a_response_with_both_framings_reaches_the_client_without_its_content_length() {
    let (up, _) = scripted(|_, _| {
        (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            false,
        )
    })
    .await;
    let h = Harness::serving(&[], &[up]).await;
    // RFC 9112 §6.3: an intermediary removes Content-Length before forwarding such a
    // message; a client that trusted it would read the chunked bytes as two responses.
    let resp = raw(
        h.http,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.contains("transfer-encoding: chunked\r\n"), "{resp}");
    assert!(
        !resp.to_ascii_lowercase().contains("content-length"),
        "{resp}"
    );
    assert!(resp.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{resp}");
    // hyper (an absolute-form target takes that path) decodes the chunks and re-frames
    // them: a Content-Length left behind would cut the body short.
    let resp = raw(
        h.http,
        b"GET http://x/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(
        !resp.to_ascii_lowercase().contains("content-length: 2\r\n"),
        "{resp}"
    );
    assert!(resp.contains("hello"), "{resp}");
}

#[tokio::test]
async fn a_streamed_response_reaches_a_slow_tls_client_while_the_upstream_pauses() {
    // The upstream sends one large chunk and then nothing, as a server-sent event stream
    // between events: everything sent so far must reach the client.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = listener.local_addr().expect("addr");
    let mut data = vec![b'a'; (2 << 20) - 4];
    data.extend_from_slice(b"END!");
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
            data.len()
        );
        if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&data).await.is_err() {
            return;
        }
        // Hold the connection open, sending nothing more, until the proxy closes it.
        let _ = s.read(&mut chunk).await;
    });
    let mut h = Harness::start(&[]).await;
    h.service("web", &[up], None);
    h.secret(tls_secret("ns", "cert", &["s.example.com"]).expect("rcgen"));
    h.ingress(with_tls(
        ingress(
            "ns",
            "web",
            vec![("s.example.com", "/", "Prefix", backend("web", 80))],
        ),
        &["s.example.com"],
        "cert",
    ));
    h.apply();
    let mut tls = tls_connect(h.https, "s.example.com", &[b"http/1.1"]).await;
    tls.write_all(b"GET /events HTTP/1.1\r\nHost: s.example.com\r\n\r\n")
        .await
        .expect("write");
    // Read slowly, so that the proxy's writes keep meeting a full socket buffer.
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 16384];
        while !got.ends_with(b"END!") {
            let n = tls.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(20), read).await;
    assert!(finished.is_ok(), "stalled after {} bytes", got.len());
}

#[tokio::test]
async fn a_head_over_the_limit_gets_431_when_it_arrives_in_pieces() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    // 10,000 bytes against --max-header-bytes=8192: the first 7,000 are read while the
    // head is still short of the limit, the rest in one later read.
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10_000 - 36)
    );
    assert_eq!(head.len(), 10_000);
    let mut s = TcpStream::connect(h.http).await.expect("connect");
    s.write_all(&head.as_bytes()[..7_000]).await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&head.as_bytes()[7_000..]).await.expect("write");
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
}

#[tokio::test]
async fn an_upstream_connection_that_answered_connect_is_never_reused() {
    // An endpoint that tunnels after a 2xx to CONNECT (RFC 9112 §6.3: whatever its
    // framing headers say) and echoes the tunnel's bytes; other requests get "ok".
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let connect = buf.starts_with(b"CONNECT ");
                    buf.drain(..end + 4);
                    if !connect {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let tunnel = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if s.write_all(tunnel).await.is_err() || s.write_all(&buf).await.is_err() {
                        return;
                    }
                    loop {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&chunk[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    let h = Harness::serving(&[], &[up]).await;
    // Whatever the answer, hyper's or the endpoint's.
    let _ = raw(
        h.http,
        b"CONNECT /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    // No other client's request may go into that tunnel, on whichever worker it lands.
    for _ in 0..16 {
        assert_eq!(
            get(&h1_client(), &h.url("/"), "x").await,
            (StatusCode::OK, "ok".to_string())
        );
    }
}

#[tokio::test]
async fn a_response_in_flight_when_shutdown_begins_tells_the_client_to_close() {
    // The second request's chunked body makes hyper serve it: both paths must agree.
    for req in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        // An endpoint that answers once the test says so.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let up = listener.local_addr().expect("addr");
        let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
        let (answer, answer_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = arrived_tx.send(());
            let _ = answer_rx.await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            let _ = s.read(&mut chunk).await;
        });
        let mut h = Harness::start(&[]).await;
        h.service("web", &[up], None);
        h.ingress(ingress(
            "ns",
            "web",
            vec![("", "/", "Prefix", backend("web", 80))],
        ));
        h.apply();
        let mut s = TcpStream::connect(h.http).await.expect("connect");
        s.write_all(req).await.expect("write");
        tokio::time::timeout(Duration::from_secs(10), arrived)
            .await
            .expect("request reached the endpoint")
            .expect("endpoint");
        h.shutdown.cancel();
        // Every worker has stopped accepting once the port refuses, and it signals its
        // hyper connections in the same step: only then may the response come.
        let refused = async {
            while TcpStream::connect(h.http).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), refused)
            .await
            .expect("listeners closed");
        answer.send(()).expect("endpoint waits");
        let (head, body) = read_response(&mut s).await;
        assert_eq!(body, "ok");
        assert!(
            head.to_ascii_lowercase().contains("connection: close\r\n"),
            "{:?}: {head}",
            String::from_utf8_lossy(req)
        );
    }
}

#[tokio::test]
async fn the_proxys_own_answers_to_head_have_no_body() {
    let mut h = Harness::start(&[]).await;
    h.service("web", &[upstream("a").await], None);
    h.service("empty", &[], None);
    h.ingress(ingress(
        "ns",
        "web",
        vec![
            ("x", "/", "Prefix", backend("web", 80)),
            ("e.example.com", "/", "Prefix", backend("empty", 80)),
        ],
    ));
    h.apply();
    let mut s = TcpStream::connect(h.http).await.expect("connect");
    // A 404 (no route) and a 503 (no endpoints), each followed by a GET on the same
    // connection: a body after a HEAD answer would be read as the GET's response.
    for (host, status) in [("nomatch", "404"), ("e.example.com", "503")] {
        let head =
            format!("HEAD / HTTP/1.1\r\nHost: {host}\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(head.as_bytes()).await.expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.expect("read head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        let (next, body) = read_response(&mut s).await;
        assert!(next.starts_with("HTTP/1.1 200"), "{next}");
        assert_eq!(body, "pod=a");
    }
}

#[tokio::test]
async fn answers_and_undated_responses_carry_a_date_as_hyper_adds() {
    let (up, _) = scripted(|_, path| match path {
        "/dated" => (
            "HTTP/1.1 200 OK\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        _ => ("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
    })
    .await;
    let mut h = Harness::start(&[]).await;
    h.service("web", &[up], None);
    h.ingress(ingress(
        "ns",
        "web",
        vec![("x", "/", "Prefix", backend("web", 80))],
    ));
    h.apply();
    let mut s = TcpStream::connect(h.http).await.expect("connect");
    // RFC 9110 §6.6.1: an undated response is dated where it is forwarded, and the
    // proxy dates its own answers; an upstream's Date is left alone.
    for (host, path) in [("x", "/"), ("nomatch", "/"), ("x", "/dated")] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let (head, _) = exchange(&mut s, req.as_bytes()).await;
        let dates: Vec<&str> = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("date: "))
            .collect();
        assert_eq!(dates.len(), 1, "{host}{path}: {head}");
        assert!(dates[0].ends_with(" GMT"), "{head}");
        if path == "/dated" {
            assert_eq!(dates[0], "Date: Tue, 01 Jan 2030 00:00:00 GMT");
        }
    }
}

#[tokio::test]
async fn an_http11_request_without_exactly_one_host_gets_400() {
    let mut h = Harness::start(&[]).await;
    h.service("web", &[upstream("a").await], None);
    let mut d = ingress("ns", "default", vec![]);
    if let Some(s) = d.spec.as_mut() {
        s.default_backend = Some(backend("web", 80));
    }
    h.ingress(d);
    h.apply();
    for req in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ] {
        let resp = raw(h.http, req).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{req:?}: {resp}");
        assert!(resp.contains("exactly one Host header"), "{resp}");
    }
    // HTTP/1.0 has no Host requirement; the default backend answers.
    let resp = raw(h.http, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(resp.contains("pod=a"), "{resp}");
}

#[tokio::test]
async fn request_headers_with_underscores_are_dropped_on_both_paths() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    // A plain GET takes the fast path; a chunked POST is served by hyper.
    for req in [
        &b"GET /headers HTTP/1.1\r\nHost: x\r\nX_User: evil\r\nX-User: good\r\nConnection: close\r\n\r\n"[..],
        b"POST /headers HTTP/1.1\r\nHost: x\r\nX_User: evil\r\nX-User: good\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    ] {
        let resp = raw(h.http, req).await;
        assert!(resp.contains("x-user: good"), "{resp}");
        assert!(!resp.contains("evil"), "{resp}");
    }
}

#[tokio::test]
async fn an_idle_keepalive_connection_outlives_the_header_timeout_until_the_keepalive_timeout() {
    // Header timeout 500 ms (the harness's); keep-alive 5 s.
    let h = Harness::serving(&["--keepalive-timeout=5s"], &[upstream("a").await]).await;
    let mut s = TcpStream::connect(h.http).await.expect("connect");
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(req).await.expect("write");
    assert_eq!(read_response(&mut s).await.1, "pod=a");
    // Idle for longer than the header timeout: the connection is still served.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.write_all(req).await.expect("write after idling");
    assert_eq!(read_response(&mut s).await.1, "pod=a");
    // Left idle, it is closed once the keep-alive timeout has passed.
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut [0u8; 16]))
        .await
        .expect("closed by the proxy");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

fn h2c_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// An h2 request's status, body (or the error that cut it off) and trailers.
async fn h2_exchange(
    c: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, Result<String, String>, Option<http::HeaderMap>) {
    let resp = c.request(req).await.expect("h2 response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let status = resp.status();
    match resp.into_body().collect().await {
        Ok(b) => {
            let trailers = b.trailers().cloned();
            let body = String::from_utf8_lossy(&b.to_bytes()).into_owned();
            (status, Ok(body), trailers)
        }
        Err(e) => (status, Err(e.to_string()), None),
    }
}

fn h2_get(url: String) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).expect("request")
}

#[tokio::test]
async fn h2_requests_decode_every_upstream_framing_over_one_pooled_connection() {
    let (up, accepted) = scripted(every_framing).await;
    let h = Harness::serving(&[], &[up]).await;
    let c = h2c_client();
    for _ in 0..2 {
        let (status, body, trailers) = h2_exchange(&c, h2_get(h.url("/chunked"))).await;
        assert_eq!((status, body), (StatusCode::OK, Ok("hello, world".into())));
        let trailers = trailers.expect("the chunked body's trailers");
        assert_eq!(trailers["x-checksum"], "12");
        let (status, body, _) = h2_exchange(&c, h2_get(h.url("/interim"))).await;
        assert_eq!((status, body), (StatusCode::OK, Ok("interim".into())));
        let (status, body, _) = h2_exchange(&c, h2_get(h.url("/nocontent"))).await;
        assert_eq!((status, body), (StatusCode::NO_CONTENT, Ok(String::new())));
        let head = Request::head(h.url("/"))
            .body(Full::default())
            .expect("request");
        let resp = c.request(head).await.expect("HEAD");
        assert_eq!(resp.headers()["content-length"], "10");
        let resp = c.request(h2_get(h.url("/"))).await.expect("GET");
        let headers = resp.headers().clone();
        assert_eq!(headers["x-app"], "2");
        assert!(headers.contains_key("date"), "{headers:?}");
        for gone in ["x-private", "connection", "keep-alive", "transfer-encoding"] {
            assert!(!headers.contains_key(gone), "{gone} in {headers:?}");
        }
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "chunked, interim, 204, HEAD and length responses all left the upstream connection reusable"
    );
    // A body delimited by the upstream closing arrives whole; that connection is not reused.
    let (status, body, _) = h2_exchange(&c, h2_get(h.url("/close"))).await;
    assert_eq!((status, body), (StatusCode::OK, Ok("until the end".into())));
    let (_, body, _) = h2_exchange(&c, h2_get(h.url("/"))).await;
    assert_eq!(body, Ok("ok".into()));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Both framings: chunked decides, the length goes, and the connection is not reused.
    let resp = c.request(h2_get(h.url("/both"))).await.expect("GET");
    assert!(!resp.headers().contains_key("content-length"), "{resp:?}");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"hello");
    let (_, body, _) = h2_exchange(&c, h2_get(h.url("/"))).await;
    assert_eq!(body, Ok("ok".into()));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_h2_response_cut_off_mid_body_is_reset_and_the_proxy_keeps_serving() {
    let (up, _) = scripted(|_, path| match path {
        "/cut" => ("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf", true),
        "/garbled" => (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            false,
        ),
        _ => ("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
    })
    .await;
    let h = Harness::serving(&[], &[up]).await;
    let c = h2c_client();
    for path in ["/cut", "/garbled"] {
        // The stream is reset: the client sees the error on the response or on its body,
        // depending on whether the reset overtook the head, but never a whole body.
        match c.request(h2_get(h.url(path))).await {
            Ok(resp) => {
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                assert!(body.is_err(), "{path}: {body:?}");
            }
            Err(e) => assert!(format!("{e:?}").contains("Reset"), "{path}: {e:?}"),
        }
        let (_, body, _) = h2_exchange(&c, h2_get(h.url("/"))).await;
        assert_eq!(body, Ok("ok".into()), "after {path}");
    }
}

#[tokio::test]
async fn h2_requests_get_forwarded_headers_retries_502_504_and_bodies_both_ways() {
    let (h, dead) =
        dead_then_alive(&[("nginx.ingress.kubernetes.io/proxy-read-timeout", "300ms")]).await;
    let c = h2c_client();
    // Every GET reaches `a`, the dead endpoint's connect failures retried and ejecting it.
    for _ in 0..4 {
        let req = Request::get(h.url("/headers"))
            .header("x_user", "evil")
            .header("x-forwarded-for", "6.6.6.6")
            .header("te", "trailers")
            .body(Full::default())
            .expect("request");
        let (status, body, _) = h2_exchange(&c, req).await;
        let body = body.expect("body");
        assert_eq!(status, StatusCode::OK, "{body}");
        let host = h.http.to_string();
        for want in [
            "pod=a version=HTTP/1.1".to_string(),
            format!("host: {host}"),
            "x-forwarded-for: 127.0.0.1".into(),
            "x-forwarded-proto: http".into(),
            format!("x-forwarded-host: {host}"),
            format!("forwarded: for=127.0.0.1;proto=http;host=\"{host}\""),
        ] {
            assert!(body.contains(&want), "{want:?} missing in\n{body}");
        }
        for gone in ["x_user", "6.6.6.6", "te:"] {
            assert!(!body.contains(gone), "{gone:?} leaked in\n{body}");
        }
    }
    let t = h.table.load();
    let eps = &t.route("x", "/").expect("route").backend.endpoints;
    let dead_ep = eps.iter().find(|e| e.addr == dead).expect("dead endpoint");
    assert!(dead_ep.is_ejected(crate::balance::now_ms()));

    let started = Instant::now();
    let (status, body, _) = h2_exchange(&c, h2_get(h.url("/hang"))).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let (status, body, _) = h2_exchange(&c, h2_get(h.url("/reset"))).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body:?}");

    // Bodies go both ways over h2, and the body limit holds.
    let req = Request::post(h.url("/echo"))
        .body(Full::new(Bytes::from_static(b"up and back")))
        .expect("request");
    let (status, body, _) = h2_exchange(&c, req).await;
    assert_eq!((status, body), (StatusCode::OK, Ok("up and back".into())));
    let req = Request::post(h.url("/echo"))
        .body(Full::new(Bytes::from(vec![b'x'; 2048])))
        .expect("request");
    assert_eq!(h2_exchange(&c, req).await.0, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn h2_uploads_reach_the_backend_whole_whether_they_arrive_with_the_request_or_later() {
    let (a, accepted) = upstream_counted("a").await;
    let h = Harness::serving(&[], &[a]).await;
    let c = h2c_client();
    // Small bodies with a length, GETs and a PUT, all over one pooled upstream connection.
    for i in 0..3 {
        let body = format!("upload {i}");
        let req = Request::put(h.url("/echo"))
            .body(Full::new(Bytes::from(body.clone())))
            .expect("request");
        assert_eq!(h2_exchange(&c, req).await.1, Ok(body));
        assert_eq!(
            h2_exchange(&c, h2_get(h.url("/"))).await.1,
            Ok("pod=a".into())
        );
    }
    // Bodies that arrived with their request go over the plain upstream socket, and others
    // through hyper's client: which one a body takes depends on how the client's frames
    // happened to arrive, so only the bound is certain.
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) <= 2);

    // A body still on its way when the request is routed (and one without a length) is
    // streamed, with whatever of it had arrived first.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
    let io = TcpStream::connect(h.http).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::post(format!("http://{}/echo", h.http))
        .header("content-length", "11")
        .body(body)
        .expect("request");
    let pending = tokio::spawn(send.send_request(req));
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"first "))))
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"later"))))
        .await
        .expect("send");
    drop(tx);
    let resp = pending.await.expect("task").expect("response");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"first later");
}

/// A body stream fed by a channel.
fn tokio_stream_from<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// An h2 frame: 9-byte header and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame size");
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The client preface, an empty SETTINGS frame, and the HEADERS frame of stream 1 with
/// `fields` as HPACK literals without indexing (so the head is readable here), ending the
/// stream if `end`.
fn h2_opening(fields: &[(&str, &str)], end: bool) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0);
        block.push(u8::try_from(name.len()).expect("short"));
        block.extend_from_slice(name.as_bytes());
        block.push(u8::try_from(value.len()).expect("short"));
        block.extend_from_slice(value.as_bytes());
    }
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(h2_frame(0x4, 0, 0, &[]));
    bytes.extend(h2_frame(0x1, if end { 0x5 } else { 0x4 }, 1, &block));
    bytes
}

/// A connection to `addr` that opened stream 1 with a POST to `path` (`fields` added)
/// and sent `data`, ending the stream if `end`.
async fn h2_post(
    addr: SocketAddr,
    path: &str,
    fields: &[(&str, &str)],
    data: &[u8],
    end: bool,
) -> TcpStream {
    let mut all = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "x"),
    ];
    all.extend_from_slice(fields);
    let mut bytes = h2_opening(&all, false);
    bytes.extend(h2_frame(0x0, u8::from(end), 1, data));
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&bytes).await.expect("write");
    s
}

/// The data of stream 1's response, read frame by frame until it ends.
async fn h2_stream_one_data(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await.expect("frame header");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.expect("frame payload");
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            assert_ne!(head[3], 0x3, "stream reset: {payload:?}");
            if head[3] == 0x0 && stream == 1 {
                got.extend_from_slice(&payload);
                if head[4] & 0x1 != 0 {
                    return;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "response incomplete: {got:?}");
    got
}

#[tokio::test]
async fn an_h2_body_whose_start_came_with_the_request_is_forwarded_with_the_rest() {
    // A backend that says when the start of the body has reached it, then echoes it all.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = listener.local_addr().expect("addr");
    let (started, reached) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut b, _)) = listener.accept().await else {
            return;
        };
        let mut buf = Vec::new();
        let mut started = Some(started);
        while !buf.ends_with(b"first later") {
            let mut chunk = [0u8; 4096];
            match b.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.ends_with(b"first ") {
                started.take().map(|s| s.send(()));
            }
        }
        let _ = b
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nfirst later")
            .await;
    });
    let h = Harness::serving(&[], &[up]).await;
    // The head and the first part of the body in one write; the rest only once the start
    // has been forwarded, so the body cannot have been whole when it was routed.
    let fields = [("content-length", "11")];
    let mut s = h2_post(h.http, "/echo", &fields, b"first ", false).await;
    tokio::time::timeout(Duration::from_secs(10), reached)
        .await
        .expect("the start of the body reached the backend")
        .expect("backend");
    s.write_all(&h2_frame(0x0, 0x1, 1, b"later"))
        .await
        .expect("write");
    let got = h2_stream_one_data(&mut s).await;
    assert_eq!(String::from_utf8_lossy(&got), "first later");
}

/// The header lines `/headers` listed under `name`.
fn listed<'a>(body: &'a str, name: &str) -> Vec<&'a str> {
    body.lines()
        .filter(|l| l.split(':').next() == Some(name))
        .collect()
}

#[tokio::test]
async fn h2_cookie_crumbs_reach_an_http11_backend_as_one_cookie_header_on_both_paths() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    let c = h2c_client();
    // Without a body, over the plain upstream socket.
    let req = Request::get(h.url("/headers"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(Full::default())
        .expect("request");
    let (status, body, _) = h2_exchange(&c, req).await;
    let body = body.expect("body");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(listed(&body, "cookie"), ["cookie: a=1; b=2; c=3"], "{body}");
    // A body without a length streams through hyper's client.
    let cookies = [("cookie", "a=1"), ("cookie", "b=2")];
    let mut s = h2_post(h.http, "/headers", &cookies, b"x", true).await;
    let body = String::from_utf8(h2_stream_one_data(&mut s).await).expect("utf-8");
    assert!(
        body.contains("transfer-encoding: chunked"),
        "not hyper's client: {body}"
    );
    assert_eq!(listed(&body, "cookie"), ["cookie: a=1; b=2"], "{body}");
}

#[tokio::test]
async fn an_h2_path_of_only_a_query_reaches_the_backend_as_an_origin_form_target() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    let c = h2c_client();
    // The h2 client sends `:path: ?a=1`; `GET ?a=1 HTTP/1.1` would get 400 from the backend.
    let (status, body, _) = h2_exchange(&c, h2_get(format!("http://{}?a=1", h.http))).await;
    assert_eq!((status, body), (StatusCode::OK, Ok("pod=a".into())));
}

#[tokio::test]
async fn an_h2_request_without_authority_or_host_gets_400() {
    let (up, accepted) = upstream_counted("a").await;
    let h = Harness::serving(&[], &[up]).await;
    let mut s = TcpStream::connect(h.http).await.expect("connect");
    let opening = h2_opening(
        &[(":method", "GET"), (":scheme", "http"), (":path", "/")],
        true,
    );
    s.write_all(&opening).await.expect("write");
    let got = String::from_utf8(h2_stream_one_data(&mut s).await).expect("utf-8");
    assert!(got.starts_with("400 Bad Request"), "{got}");
    assert!(got.contains(":authority"), "{got}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_upstream_transfer_coding_other_than_chunked_gets_502_on_both_h2_paths() {
    let (up, _) = scripted(|_, path| match path {
        "/gz-chunked" => (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n",
            true,
        ),
        "/gz" => (
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nxyz",
            true,
        ),
        _ => ("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
    })
    .await;
    let h = Harness::serving(&[], &[up]).await;
    let c = h2c_client();
    for path in ["/gz-chunked", "/gz"] {
        let (status, body, _) = h2_exchange(&c, h2_get(h.url(path))).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}: {body:?}");
        assert!(
            body.as_ref().is_ok_and(|b| b.contains("transfer coding")),
            "{body:?}"
        );
    }
    // A body without a length: hyper's client.
    let mut s = h2_post(h.http, "/gz-chunked", &[], b"x", true).await;
    let got = String::from_utf8(h2_stream_one_data(&mut s).await).expect("utf-8");
    assert!(got.starts_with("502 Bad Gateway"), "{got}");
    assert!(got.contains("transfer coding other than chunked"), "{got}");
    let (_, body, _) = h2_exchange(&c, h2_get(h.url("/"))).await;
    assert_eq!(body, Ok("ok".into()));
}

#[tokio::test]
async fn an_h2_request_forwarded_with_its_whole_body_loses_its_expect() {
    let h = Harness::serving(&[], &[upstream("a").await]).await;
    let c = h2c_client();
    let req = Request::delete(h.url("/headers"))
        .header("expect", "100-continue")
        .body(Full::default())
        .expect("request");
    let (status, body, _) = h2_exchange(&c, req).await;
    let body = body.expect("body");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(listed(&body, "expect").is_empty(), "{body}");
}

#[tokio::test]
async fn an_h2_client_gets_each_part_of_a_streamed_response_as_the_upstream_sends_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = listener.local_addr().expect("addr");
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).await.is_err() {
                return;
            }
            head.push(b[0]);
        }
        let first = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6\r\nevent1\r\n";
        s.write_all(first).await.expect("write");
        // An event stream between events: nothing more until the test has seen the first.
        let _ = wait.await;
        s.write_all(b"6\r\nevent2\r\n0\r\n\r\n")
            .await
            .expect("write");
        let _ = s.read(&mut [0u8; 1]).await;
    });
    let h = Harness::serving(&[], &[up]).await;
    let resp = h2c_client()
        .request(h2_get(h.url("/events")))
        .await
        .expect("response");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first event arrives while the upstream waits")
        .expect("a frame")
        .expect("data");
    assert_eq!(first.data_ref().map(|d| &d[..]), Some(&b"event1"[..]));
    go.send(()).expect("upstream waiting");
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(&rest[..], b"event2");
}
