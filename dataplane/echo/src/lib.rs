//! `weir echo`: the test and benchmark backend. It answers HTTP/1.1 (and h2c with prior
//! knowledge) with a one-line body naming the pod and the client address, echoes TCP
//! streams, and echoes UDP datagrams prefixed with the same line. It exists so that examples,
//! tests and benchmarks have a fast, honest backend that shows which pod answered whom.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// What to serve. Any listener left `None` is not started.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    pub http: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub udp: Option<SocketAddr>,
    /// The name put in every answer (the pod name under weir).
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind {proto} listener on {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("echo config has no listener: give at least one of http, tcp, udp")]
    NothingToServe,
}

/// The line every answer carries: `pod=<name> client=<addr>`.
pub fn identity_line(name: &str, client: SocketAddr) -> String {
    format!("pod={name} client={client}\n")
}

/// Bound listeners, ready to serve. Binding first lets callers learn the ports of `:0`
/// addresses before serving starts.
pub struct Echo {
    name: Arc<str>,
    http: Option<TcpListener>,
    tcp: Option<TcpListener>,
    udp: Option<UdpSocket>,
}

impl Echo {
    pub async fn bind(config: &EchoConfig) -> Result<Self, Error> {
        if config.http.is_none() && config.tcp.is_none() && config.udp.is_none() {
            return Err(Error::NothingToServe);
        }
        let bind_tcp = |proto, addr| async move {
            TcpListener::bind(addr).await.map_err(|source| Error::Bind {
                proto,
                addr,
                source,
            })
        };
        let http = match config.http {
            Some(addr) => Some(bind_tcp("http", addr).await?),
            None => None,
        };
        let tcp = match config.tcp {
            Some(addr) => Some(bind_tcp("tcp", addr).await?),
            None => None,
        };
        let udp = match config.udp {
            Some(addr) => Some(UdpSocket::bind(addr).await.map_err(|source| Error::Bind {
                proto: "udp",
                addr,
                source,
            })?),
            None => None,
        };
        Ok(Self {
            name: config.name.as_str().into(),
            http,
            tcp,
            udp,
        })
    }

    /// Local addresses of the bound (http, tcp, udp) listeners.
    pub fn local_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>, Option<SocketAddr>) {
        (
            self.http.as_ref().and_then(|l| l.local_addr().ok()),
            self.tcp.as_ref().and_then(|l| l.local_addr().ok()),
            self.udp.as_ref().and_then(|s| s.local_addr().ok()),
        )
    }

    /// Serve until `shutdown` is cancelled.
    pub async fn serve(self, shutdown: CancellationToken) {
        let (http, tcp, udp) = self.local_addrs();
        tracing::info!(name = %self.name, ?http, ?tcp, ?udp, "weir echo serving");
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(l) = self.http {
            tasks.spawn(serve_http(l, self.name.clone(), shutdown.clone()));
        }
        if let Some(l) = self.tcp {
            tasks.spawn(serve_tcp(l, shutdown.clone()));
        }
        if let Some(s) = self.udp {
            tasks.spawn(serve_udp(s, self.name.clone(), shutdown.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Bind and serve `config` until `shutdown` is cancelled.
pub async fn serve(config: EchoConfig, shutdown: CancellationToken) -> Result<(), Error> {
    Echo::bind(&config).await?.serve(shutdown).await;
    Ok(())
}

async fn serve_http(listener: TcpListener, name: Arc<str>, shutdown: CancellationToken) {
    loop {
        let (stream, client) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the others.
                    tracing::warn!(error = %e, "echo http accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let body = Bytes::from(identity_line(&name, client));
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(answer(&req, body)) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, %client, "echo http connection ended");
                    }
                }
            }
        });
    }
}

fn answer(req: &Request<Incoming>, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    // Tests can check which path reached the backend (ingress rewrites, prefixes).
    if let Ok(v) = hyper::header::HeaderValue::from_str(req.uri().path()) {
        resp.headers_mut().insert("x-echo-path", v);
    }
    resp
}

async fn serve_tcp(listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "echo tcp accept failed");
                    continue;
                }
            },
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = echo_stream(stream) => {}
            }
        });
    }
}

async fn echo_stream(mut stream: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn serve_udp(socket: UdpSocket, name: Arc<str>, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, client) = tokio::select! {
            _ = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "echo udp receive failed");
                    continue;
                }
            },
        };
        let mut reply = identity_line(&name, client).into_bytes();
        reply.extend_from_slice(&buf[..n]);
        if let Err(e) = socket.send_to(&reply, client).await {
            tracing::debug!(error = %e, %client, "echo udp send failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start(name: &str) -> (SocketAddr, SocketAddr, SocketAddr, CancellationToken) {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let echo = Echo::bind(&EchoConfig {
            http: Some(any),
            tcp: Some(any),
            udp: Some(any),
            name: name.into(),
        })
        .await
        .expect("bind");
        let (h, t, u) = echo.local_addrs();
        let stop = CancellationToken::new();
        tokio::spawn(echo.serve(stop.clone()));
        (h.expect("http"), t.expect("tcp"), u.expect("udp"), stop)
    }

    #[tokio::test]
    async fn http_answers_with_pod_and_client_over_keepalive() {
        let (http, _, _, stop) = start("pod-a").await;
        let mut s = TcpStream::connect(http).await.expect("connect");
        let me = s.local_addr().expect("local");
        for _ in 0..2 {
            s.write_all(b"GET /x/y HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .expect("write");
            let mut buf = vec![0u8; 1024];
            let n = s.read(&mut buf).await.expect("read");
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(text.contains("x-echo-path: /x/y"), "{text}");
            assert!(text.ends_with(&identity_line("pod-a", me)), "{text}");
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn tcp_echoes_bytes() {
        let (_, tcp, _, stop) = start("pod-b").await;
        let mut s = TcpStream::connect(tcp).await.expect("connect");
        s.write_all(b"hello weir").await.expect("write");
        let mut buf = [0u8; 10];
        s.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello weir");
        stop.cancel();
    }

    #[tokio::test]
    async fn udp_echoes_with_identity() {
        let (_, _, udp, stop) = start("pod-c").await;
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        s.send_to(b"ping", udp).await.expect("send");
        let mut buf = [0u8; 256];
        let (n, from) = s.recv_from(&mut buf).await.expect("recv");
        assert_eq!(from, udp);
        let expected = format!("{}ping", identity_line("pod-c", s.local_addr().expect("a")));
        assert_eq!(String::from_utf8_lossy(&buf[..n]), expected);
        stop.cancel();
    }

    #[tokio::test]
    async fn refuses_an_empty_config_and_reports_bind_errors() {
        let none = EchoConfig {
            http: None,
            tcp: None,
            udp: None,
            name: "x".into(),
        };
        assert!(matches!(
            Echo::bind(&none).await,
            Err(Error::NothingToServe)
        ));
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        let clash = EchoConfig {
            http: Some(addr),
            ..none
        };
        let err = Echo::bind(&clash).await.err().expect("must fail");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
