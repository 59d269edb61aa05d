//! Sockets and the asynchronous path. UDP is served by one OS thread per worker on its own
//! SO_REUSEPORT socket, each running the synchronous [`Handler`] in a tight loop; TCP by
//! tokio tasks (length-prefixed, RFC 7766). Queries that need upstream work are handed to
//! tokio tasks, with a per-client cap so one client cannot occupy the forwarder.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::CNAME};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::forward::{Answer, Forwarder};
use crate::handler::{Action, Forward, ForwardKind, Handler, Transport};
use crate::metrics::Metrics;
use crate::wire::{self, Rcode};

/// Limits that keep one client or a flood from starving the rest.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Forwarded queries one client may have outstanding; more are dropped (the client's
    /// resolver retries).
    pub forwards_per_client: usize,
    /// Concurrent TCP connections.
    pub tcp_connections: usize,
    /// A TCP connection idle this long is closed.
    pub tcp_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            forwards_per_client: 64,
            tcp_connections: 1024,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// Everything the sockets share.
pub struct Server {
    pub handler: Handler,
    pub forwarder: Arc<Forwarder>,
    pub metrics: Arc<Metrics>,
    /// The node's search domains, tried by autopath after the cluster ones.
    pub search: Vec<String>,
    pub limits: Limits,
    forwards: Mutex<HashMap<IpAddr, usize>>,
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Bound sockets, ready to serve.
pub struct Bound {
    udp: Vec<Arc<UdpSocket>>,
    tcp: std::net::TcpListener,
    addr: SocketAddr,
}

impl Bound {
    /// The address bound (the port is the real one when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Server {
    pub fn new(
        handler: Handler,
        forwarder: Arc<Forwarder>,
        metrics: Arc<Metrics>,
        search: Vec<String>,
        limits: Limits,
    ) -> Server {
        Server {
            handler,
            forwarder,
            metrics,
            search,
            limits,
            forwards: Mutex::new(HashMap::new()),
        }
    }

    /// Bind `workers` UDP sockets and one TCP listener on `addr` (same port for both).
    /// With port 0 the kernel picks a port free for UDP, which a TCP socket may hold; then
    /// another port is picked, a few times at most.
    pub fn bind(addr: SocketAddr, workers: usize) -> Result<Bound, ServeError> {
        let mut tries = 0;
        loop {
            match bind_once(addr, workers) {
                Err(e)
                    if addr.port() == 0
                        && e.kind() == std::io::ErrorKind::AddrInUse
                        && tries < 16 =>
                {
                    tries += 1;
                }
                r => return r.map_err(|source| ServeError::Bind { addr, source }),
            }
        }
    }

    /// Serve until `shutdown` is cancelled.
    pub async fn serve(self: Arc<Self>, bound: Bound, shutdown: CancellationToken) {
        let rt = tokio::runtime::Handle::current();
        let mut threads = Vec::new();
        for (i, sock) in bound.udp.into_iter().enumerate() {
            let (server, shutdown, rt) = (self.clone(), shutdown.clone(), rt.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || server.udp_loop(i, sock, rt, shutdown));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, "cannot start a DNS UDP worker"),
            }
        }
        match TcpListener::from_std(bound.tcp) {
            Ok(listener) => self.clone().tcp_accept(listener, shutdown.clone()).await,
            Err(e) => {
                tracing::error!(error = %e, "cannot serve DNS over TCP");
                shutdown.cancelled().await;
            }
        }
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }

    fn udp_loop(
        self: Arc<Self>,
        worker: usize,
        sock: Arc<UdpSocket>,
        rt: tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) {
        let mut batch = crate::udp::Batch::default();
        while !shutdown.is_cancelled() {
            let n = match batch.recv(&sock) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "DNS UDP receive failed");
                    continue;
                }
            };
            if n == 0 {
                continue;
            }
            batch.process(|msg, peer, out| {
                let action =
                    self.handler
                        .handle(msg, peer.ip(), Transport::Udp, out, &self.metrics, worker);
                match action {
                    Action::Reply(_) => true,
                    Action::Drop => false,
                    Action::Forward(fwd) => {
                        self.spawn_forward(&rt, &sock, msg, peer, fwd, worker);
                        false
                    }
                }
            });
            batch.send(&sock);
        }
    }

    fn spawn_forward(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        sock: &Arc<UdpSocket>,
        msg: &[u8],
        peer: SocketAddr,
        fwd: Forward,
        worker: usize,
    ) {
        let Some(permit) = self.admit(peer.ip()) else {
            self.metrics.dropped(worker);
            return;
        };
        let (server, sock, msg) = (self.clone(), sock.clone(), msg.to_vec());
        rt.spawn(async move {
            let _permit = permit;
            if let Some(resp) = server.answer_async(&msg, fwd, Transport::Udp).await {
                let _ = sock.send_to(&resp, peer);
            }
        });
    }

    fn admit(self: &Arc<Self>, client: IpAddr) -> Option<ForwardPermit> {
        let mut map = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(client).or_default();
        if *n >= self.limits.forwards_per_client {
            return None;
        }
        *n += 1;
        Some(ForwardPermit {
            server: self.clone(),
            client,
        })
    }

    async fn tcp_accept(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.limits.tcp_connections));
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS TCP accept failed");
                    continue;
                }
            };
            // Over the connection limit the connection is closed at once: the client
            // sees a reset instead of a server that stops accepting.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let (server, shutdown) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                let _slot = slot;
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = server.tcp_conn(stream, peer) => {}
                }
            });
        }
    }

    async fn tcp_conn(&self, mut stream: TcpStream, peer: SocketAddr) {
        let mut out = Vec::with_capacity(u16::MAX as usize);
        let mut msg = Vec::new();
        loop {
            let len = match tokio::time::timeout(self.limits.tcp_idle, stream.read_u16()).await {
                Ok(Ok(len)) => len as usize,
                _ => return,
            };
            msg.resize(len, 0);
            let read = tokio::time::timeout(self.limits.tcp_idle, stream.read_exact(&mut msg));
            if !matches!(read.await, Ok(Ok(_))) {
                return;
            }
            let resp = match self.handler.handle(
                &msg,
                peer.ip(),
                Transport::Tcp,
                &mut out,
                &self.metrics,
                0,
            ) {
                Action::Reply(_) => out.clone(),
                Action::Drop => return,
                Action::Forward(fwd) => match self.answer_async(&msg, fwd, Transport::Tcp).await {
                    Some(r) => r,
                    None => return,
                },
            };
            let mut framed = Vec::with_capacity(resp.len() + 2);
            framed.extend_from_slice(&(resp.len() as u16).to_be_bytes());
            framed.extend_from_slice(&resp);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }

    /// Answer a query that needs upstream work (forwarding, or autopath's walk of the
    /// search path), as a full response message.
    pub async fn answer_async(
        &self,
        msg: &[u8],
        fwd: Forward,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        // The synchronous parser accepted this message, so hickory will too; if it does
        // not, dropping is the safe answer.
        let req = Message::from_vec(msg).ok()?;
        let query = req.queries.first()?.clone();
        let qtype = query.query_type();
        let answer = match &fwd.kind {
            ForwardKind::Autopath(base) => self.autopath(query.name(), base, qtype).await,
            ForwardKind::ChaseCname => self.chase_cname(query.name(), qtype).await,
            ForwardKind::Upstream => Some(self.forwarder.resolve(query.name(), qtype).await),
        };
        let answer = answer?;
        let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.checking_disabled = req.metadata.checking_disabled;
        resp.metadata.recursion_available = true;
        resp.metadata.response_code = answer.rcode;
        resp.add_query(query);
        resp.add_answers(answer.answers.iter().cloned());
        resp.add_authorities(answer.authorities.iter().cloned());
        if req.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(wire::EDNS_UDP_MAX);
            resp.set_edns(edns);
        }
        let mut bytes = resp.to_vec().ok()?;
        let limit = match (transport, &req.edns) {
            (Transport::Tcp, _) => u16::MAX as usize,
            (Transport::Udp, None) => wire::CLASSIC_UDP_MAX,
            (Transport::Udp, Some(e)) => {
                (e.max_payload().min(wire::EDNS_UDP_MAX) as usize).max(wire::CLASSIC_UDP_MAX)
            }
        };
        if bytes.len() > limit {
            bytes = resp.truncate().to_vec().ok()?;
        }
        self.metrics
            .query(0, u16::from(qtype), rcode_of(answer.rcode));
        Some(bytes)
    }

    /// Walk the rest of a pod's search path (`svc.<zone>`, `<zone>`, the node's search
    /// domains, then the bare name) and answer with a CNAME from the asked name to the first
    /// name that has records of the type, plus those records. If none has, the answer is
    /// the NXDOMAIN the asked name would have got.
    async fn autopath(&self, asked: &Name, base: &str, qtype: RecordType) -> Option<Arc<Answer>> {
        let zone = wire::wire_to_name(self.handler.zone_wire());
        let mut candidates = vec![format!("{base}svc.{zone}"), format!("{base}{zone}")];
        for domain in &self.search {
            candidates.push(format!("{base}{}.", domain.trim_end_matches('.')));
        }
        candidates.push(base.to_string());
        for candidate in candidates {
            let Ok(name) = Name::from_ascii(&candidate) else {
                continue;
            };
            let answer = self.resolve_any(&name, qtype).await?;
            if answer.rcode == ResponseCode::NoError && !answer.answers.is_empty() {
                let mut answers = vec![Record::from_rdata(
                    asked.clone(),
                    answer.answers.iter().map(|r| r.ttl).min().unwrap_or(0),
                    RData::CNAME(CNAME(name)),
                )];
                answers.extend(answer.answers.iter().cloned());
                return Some(Arc::new(Answer {
                    rcode: ResponseCode::NoError,
                    answers,
                    authorities: Vec::new(),
                }));
            }
        }
        self.resolve_local(asked, qtype)
    }

    /// The zone's CNAME for `asked` followed by the answer for its target (one step: a
    /// target that is itself an ExternalName is left to the client).
    async fn chase_cname(&self, asked: &Name, qtype: RecordType) -> Option<Arc<Answer>> {
        let local = self.resolve_local(asked, qtype)?;
        let target = local.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(c) => Some(c.0.clone()),
            _ => None,
        })?;
        let tail = self.resolve_any(&target, qtype).await?;
        let mut answers = local.answers.clone();
        answers.extend(tail.answers.iter().cloned());
        Some(Arc::new(Answer {
            rcode: tail.rcode,
            answers,
            authorities: tail.authorities.clone(),
        }))
    }

    /// A name in the cluster zone from the snapshot, anything else through the forwarder.
    async fn resolve_any(&self, name: &Name, qtype: RecordType) -> Option<Arc<Answer>> {
        let zone = Name::from_ascii(wire::wire_to_name(self.handler.zone_wire())).ok()?;
        if zone.zone_of(name) {
            self.resolve_local(name, qtype)
        } else {
            Some(self.forwarder.resolve(name, qtype).await)
        }
    }

    /// Answer from the cluster zone only (no autopath, no forwarding), through the same
    /// synchronous path the sockets use.
    fn resolve_local(&self, name: &Name, qtype: RecordType) -> Option<Arc<Answer>> {
        let mut q = Message::new(0, MessageType::Query, OpCode::Query);
        q.add_query(hickory_proto::op::Query::query(name.clone(), qtype));
        let bytes = q.to_vec().ok()?;
        let mut out = Vec::new();
        self.handler.answer_local(&bytes, &mut out).then_some(())?;
        let resp = Message::from_vec(&out).ok()?;
        Some(Arc::new(Answer {
            rcode: resp.metadata.response_code,
            answers: resp.answers,
            authorities: resp.authorities,
        }))
    }
}

/// One outstanding forwarded query of a client; released on drop.
struct ForwardPermit {
    server: Arc<Server>,
    client: IpAddr,
}

impl Drop for ForwardPermit {
    fn drop(&mut self) {
        let mut map = self
            .server
            .forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

fn rcode_of(rcode: ResponseCode) -> Rcode {
    match rcode {
        ResponseCode::NoError => Rcode::NoError,
        ResponseCode::FormErr => Rcode::FormErr,
        ResponseCode::NXDomain => Rcode::NxDomain,
        ResponseCode::NotImp => Rcode::NotImp,
        ResponseCode::Refused => Rcode::Refused,
        _ => Rcode::ServFail,
    }
}

/// One attempt of [`Server::bind`].
fn bind_once(addr: SocketAddr, workers: usize) -> std::io::Result<Bound> {
    let first = udp_socket(addr)?;
    let addr = first.local_addr()?;
    let mut udp = vec![Arc::new(first)];
    for _ in 1..workers.max(1) {
        udp.push(Arc::new(udp_socket(addr)?));
    }
    let tcp = tcp_listener(addr)?;
    Ok(Bound { udp, tcp, addr })
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_port(true)?;
    // Bursts (benchmarks, a node's pods starting at once) should queue, not drop.
    let _ = sock.set_recv_buffer_size(4 << 20);
    sock.bind(&addr.into())?;
    // The worker wakes up this often to notice shutdown.
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(sock.into())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

#[cfg(test)]
mod tests;
