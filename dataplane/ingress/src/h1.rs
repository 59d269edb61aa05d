//! The HTTP/1.1 fast path, on plain connections and on TLS ones that did not negotiate
//! h2: requests are parsed with httparse
//! and forwarded over plain pooled upstream sockets, their heads rewritten as bytes, with
//! no per-request task, channel or header map. Pingora serves HTTP/1.1 the same way.
//!
//! It takes the common case only — HTTP/1.1, a `Host`, origin-form target, a method other
//! than CONNECT, no body or a small `Content-Length` body already received, and a route to
//! an HTTP/1.1 backend without a redirect or a header-matched canary. Anything else,
//! including every malformed or oversized head, hands the connection with the bytes read
//! so far to hyper ([`Served::Hyper`]), which serves the rest of it exactly as it serves
//! TLS and h2c connections: upgrades, chunked request bodies, `Expect`, 400 and 431
//! answers.
//!
//! Responses are passed through with their own framing (`Content-Length`, chunked, or
//! until close). Their hop-by-hop headers are removed; `Transfer-Encoding` stays, as the
//! chunked bytes are forwarded unchanged, and a `Content-Length` beside it goes. An
//! undated response gets a `Date`, as hyper gives one.
//!
//! The upstream half — `exchange` and the response-head parser, which writes through a
//! `ResponseHead` — also forwards h2 requests that hyper parsed ([`crate::raw`]).

use std::io::{self, IoSlice, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures::FutureExt;
use http::{Method, Version};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::fmt::rfc2822::DateTimePrinter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::balance::InFlight;
use crate::error::{ErrorKind, ProxyError};
use crate::pool::{Pooled, Upstream, UpstreamError};
use crate::proxy::{
    Access, Attempts, ConnInfo, HOP_BY_HOP, Outcome, Proxy, is_idempotent, timed_out,
};
use crate::table::Target;

/// Request headers the fast path parses; a request with more goes to hyper.
const MAX_REQUEST_HEADERS: usize = 64;
/// Response headers accepted from an upstream (hyper's default limit).
pub(crate) const MAX_RESPONSE_HEADERS: usize = 100;
/// Largest upstream response head.
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Largest request body the fast path forwards itself (it must have arrived with the head).
pub(crate) const MAX_FAST_BODY: usize = 16 * 1024;
/// Bytes read from an upstream socket at a time.
pub(crate) const READ_SIZE: usize = 16 * 1024;
/// Bytes read from a client at a time: request heads are small, and this buffer lives as
/// long as the keep-alive connection.
const CLIENT_READ_SIZE: usize = 4 * 1024;

/// How a connection left the fast path.
pub enum Served<I> {
    /// Finished: the client closed, timed out or asked to close, or shutdown began.
    Closed,
    /// hyper must serve the rest of the connection, starting with these bytes.
    Hyper(I, BytesMut),
}

/// Limits of the fast path, from the server's configuration.
pub struct Limits {
    pub header_read_timeout: Duration,
    /// How long a client connection may sit idle between requests.
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
}

/// What a parsed request asks for, once routed.
enum Plan {
    /// Forward `send` (the rewritten head and the body) to the target.
    Forward {
        target: Arc<Target>,
        method: Method,
        send: usize,
        bodiless: bool,
    },
    /// Answer with this error; without a body if the request is a HEAD.
    Fail {
        error: ProxyError,
        head_request: bool,
    },
}

/// A request parsed from the head of the read buffer.
struct Parsed {
    /// Bytes of the buffer the request takes (head and body).
    len: usize,
    plan: Plan,
    /// The client asked to close after this request.
    close: bool,
    access: Option<OwnedAccess>,
}

/// The access-log fields, copied out of the read buffer.
struct OwnedAccess {
    method: String,
    host: String,
    path: String,
}

/// Serve HTTP/1.1 requests on `down` until it closes or needs hyper.
pub async fn serve<I: AsyncRead + AsyncWrite + Unpin>(
    mut down: I,
    proxy: &Proxy,
    conn: &ConnInfo,
    limits: &Limits,
    shutdown: &CancellationToken,
) -> Served<I> {
    let mut buf = BytesMut::with_capacity(CLIENT_READ_SIZE);
    let mut send = Vec::with_capacity(1024);
    let mut head = Vec::new();
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let timer = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(timer);
    loop {
        // An idle connection may wait `keepalive_timeout` for its next request (nginx's
        // keepalive_timeout); once a request has begun, its head must be complete within
        // `header_read_timeout` (slow clients).
        let mut armed: Option<bool> = None;
        let parsed = loop {
            if !buf.is_empty() {
                send.clear();
                match parse_request(&buf, limits.max_header_bytes, proxy, conn, &mut send) {
                    Ok(Some(p)) => break p,
                    Ok(None) if buf.len() < limits.max_header_bytes => {}
                    // Malformed, oversized or uncommon: hyper answers or serves it.
                    Ok(None) | Err(Hyper) => return Served::Hyper(down, buf),
                }
            }
            buf.reserve(CLIENT_READ_SIZE);
            // One poll first: the timer is armed only if the read has to wait. A read
            // through `poll_read` that leaves the socket drained forgets its readiness, so
            // waiting for the next request costs no extra system call.
            match down.read_buf(&mut buf).now_or_never() {
                Some(Ok(0) | Err(_)) => return Served::Closed,
                Some(Ok(_)) => continue,
                None => {}
            }
            let idle = buf.is_empty();
            if armed != Some(idle) && armed != Some(false) {
                let wait = if idle {
                    limits.keepalive_timeout
                } else {
                    limits.header_read_timeout
                };
                timer.as_mut().reset(tokio::time::Instant::now() + wait);
                armed = Some(idle);
            }
            tokio::select! {
                biased;
                r = down.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return Served::Closed,
                    Ok(_) => {}
                },
                _ = &mut timer => {
                    tracing::debug!(client = %conn.peer, "request head not received in time; closing");
                    return Served::Closed;
                }
                _ = &mut cancelled, if buf.is_empty() => return Served::Closed,
            }
        };
        let start = Instant::now();
        let close = parsed.close || shutdown.is_cancelled();
        let mut out = Outcome::default();
        let (status, target, keep, headed) = match parsed.plan {
            Plan::Fail {
                error,
                head_request,
            } => {
                let status = error.kind.status();
                let body = proxy.failure(&error, conn);
                let headed = Instant::now();
                let wrote = write_local(&mut down, status, &body, close, head_request).await;
                (status.as_u16(), None, wrote.is_ok(), headed)
            }
            Plan::Forward {
                target,
                method,
                send: n,
                bodiless,
            } => {
                let req = Request {
                    method: &method,
                    send: &send[..n],
                    bodiless,
                    close,
                    shutdown,
                };
                let r = forward(proxy, conn, &mut down, &target, req, &mut head, &mut out).await;
                (r.status, Some(target), r.keep, r.headed)
            }
        };
        buf.advance(parsed.len);
        let access = parsed.access.as_ref().map(|a| Access {
            method: &a.method,
            host: &a.host,
            path: &a.path,
            version: Version::HTTP_11,
        });
        proxy.finish(
            conn,
            access,
            target.as_deref(),
            &out,
            status,
            headed.saturating_duration_since(start),
        );
        if close || !keep {
            let _ = down.shutdown().await;
            return Served::Closed;
        }
    }
}

/// The request is not for the fast path; hyper takes the connection.
struct Hyper;

/// Parse one request at the start of `buf`; `Ok(None)` if its head is incomplete. For a
/// request to forward, `send` receives the upstream request head and body. A head over
/// `max_head` bytes is hyper's to refuse (431).
fn parse_request(
    buf: &[u8],
    max_head: usize,
    proxy: &Proxy,
    conn: &ConnInfo,
    send: &mut Vec<u8>,
) -> Result<Option<Parsed>, Hyper> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Hyper),
    };
    // A head that grew past the limit in one read is complete before the read loop sees it.
    if head_len > max_head {
        return Err(Hyper);
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(Hyper);
    };
    if !target.starts_with('/') {
        return Err(Hyper);
    }
    let mut host = None;
    let mut body_len = None;
    let mut close = false;
    let mut named = Tokens::default();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                return Err(Hyper);
            }
            host = Some(std::str::from_utf8(h.value).map_err(|_| Hyper)?);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if body_len.is_some() {
                return Err(Hyper);
            }
            body_len = Some(content_length(h.value).ok_or(Hyper)?);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    return Err(Hyper);
                } else if !t.is_empty()
                    // The body is forwarded as received: without its Content-Length the
                    // endpoint would read it as the next request. Host is end-to-end.
                    && !t.eq_ignore_ascii_case(b"content-length")
                    && !t.eq_ignore_ascii_case(b"host")
                {
                    named.push(t)?;
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Err(Hyper);
        }
    }
    let host = host.ok_or(Hyper)?;
    let body_len = usize::try_from(body_len.unwrap_or(0)).map_err(|_| Hyper)?;
    if body_len > MAX_FAST_BODY.min(proxy.cfg.max_body_bytes as usize) {
        return Err(Hyper);
    }
    let len = head_len + body_len;
    if buf.len() < len {
        // The body is still on its way; hyper streams it.
        return Err(Hyper);
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let access = proxy.cfg.access_log.then(|| OwnedAccess {
        method: method.to_owned(),
        host: host.to_owned(),
        path: path.to_owned(),
    });
    let routed = proxy.table.load().route(host, path).cloned();
    let Some(routed) = routed else {
        let e = ProxyError::new(
            ErrorKind::NoRoute,
            format!("no Ingress rule matches host {host:?} path {path:?}"),
        );
        return Ok(Some(Parsed {
            len,
            plan: Plan::Fail {
                error: e,
                head_request: method == Method::HEAD,
            },
            close,
            access,
        }));
    };
    if (routed.ssl_redirect && !conn.tls)
        || routed.backend.h2
        || routed
            .canary
            .as_ref()
            .is_some_and(|c| c.header.is_some() || c.backend.h2)
    {
        return Err(Hyper);
    }
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| Hyper)?;
    // A 2xx to CONNECT turns the upstream connection into a tunnel whatever its framing
    // headers say (RFC 9112 §6.3): it must never go back to the pool.
    if method == Method::CONNECT {
        return Err(Hyper);
    }

    send.extend_from_slice(method.as_str().as_bytes());
    send.push(b' ');
    send.extend_from_slice(target.as_bytes());
    send.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        // Names with an underscore are dropped, as by the hyper path's `drop_underscored`.
        if is_hop_by_hop(name)
            || is_forwarding(name)
            || named.contains(name)
            || name.contains(&b'_')
        {
            continue;
        }
        put_header(send, name, h.value);
    }
    // An edge proxy does not trust what clients claim about earlier hops, as
    // ingress-nginx by default: these headers are replaced, not appended to.
    put_header(send, b"x-forwarded-for", conn.xff().as_bytes());
    put_header(
        send,
        b"x-forwarded-proto",
        if conn.tls { b"https" } else { b"http" },
    );
    if host.contains(['"', '\\']) {
        put_header(send, b"forwarded", conn.forwarded().as_bytes());
    } else {
        put_header(send, b"x-forwarded-host", host.as_bytes());
        match conn.forwarded_for(host) {
            Some(f) => put_header(send, b"forwarded", f.as_bytes()),
            None => put_header(send, b"forwarded", conn.forwarded().as_bytes()),
        }
    }
    send.extend_from_slice(b"\r\n");
    send.extend_from_slice(&buf[head_len..len]);
    Ok(Some(Parsed {
        len,
        plan: Plan::Forward {
            target: routed,
            method,
            send: send.len(),
            bodiless: body_len == 0,
        },
        close,
        access,
    }))
}

/// Header names a `Connection` header lists, to be removed with it.
#[derive(Default)]
struct Tokens<'a> {
    names: [&'a [u8]; 8],
    n: usize,
}

impl<'a> Tokens<'a> {
    fn push(&mut self, t: &'a [u8]) -> Result<(), Hyper> {
        let slot = self.names.get_mut(self.n).ok_or(Hyper)?;
        *slot = t;
        self.n += 1;
        Ok(())
    }

    fn contains(&self, name: &[u8]) -> bool {
        self.names[..self.n]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(name))
    }
}

fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.as_bytes().eq_ignore_ascii_case(name))
}

/// The headers the proxy sets itself.
fn is_forwarding(name: &[u8]) -> bool {
    [
        &b"x-forwarded-for"[..],
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
    ]
    .iter()
    .any(|h| h.eq_ignore_ascii_case(name))
}

/// A `Content-Length` value: digits only (no sign, no list), as RFC 9110 §8.6 requires.
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

pub(crate) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a forwarded request ended.
struct Forwarded {
    /// The status the client got (or was getting when the exchange broke).
    status: u16,
    /// The downstream connection can take another request.
    keep: bool,
    /// When the response head went to the client: request durations end there, as the
    /// hyper path's do.
    headed: Instant,
}

/// A request ready to go upstream.
struct Request<'a> {
    method: &'a Method,
    /// The rewritten head and the body.
    send: &'a [u8],
    bodiless: bool,
    /// The client connection ends after this request.
    close: bool,
    /// Once cancelled, the client connection ends after this request too.
    shutdown: &'a CancellationToken,
}

/// Forward `req` to an endpoint of `target`, retrying idempotent requests without a body
/// on another endpoint after a failure, and stream the response to `down`.
async fn forward<I: AsyncWrite + Unpin>(
    proxy: &Proxy,
    conn: &ConnInfo,
    down: &mut I,
    target: &Target,
    req: Request<'_>,
    head: &mut Vec<u8>,
    out: &mut Outcome,
) -> Forwarded {
    let Request {
        method,
        send,
        bodiless,
        close,
        shutdown,
    } = req;
    // Header-matched canaries went to hyper; a weighted one needs no headers.
    let (route, backend) = target.choose(&http::HeaderMap::new());
    out.canary = Some(!std::ptr::eq(route, &target.route));
    let idempotent = is_idempotent(method);
    let retryable = idempotent && bodiless;
    let timeout = target.read_timeout.unwrap_or(proxy.cfg.read_timeout);
    let mut attempts = Attempts::new(backend, retryable, proxy.cfg.retries);
    let error = loop {
        let attempt = match attempts.next(out) {
            Ok(a) => a,
            Err(e) => break e,
        };
        let endpoint = attempt.endpoint;
        let inflight = InFlight::new(endpoint.clone());
        let exchanged = tokio::time::timeout(
            timeout,
            exchange(
                proxy,
                endpoint.addr,
                send,
                idempotent,
                method == Method::HEAD,
                head,
            ),
        )
        .await;
        let e = match exchanged {
            Ok(Ok((up, resp))) => {
                endpoint.succeeded();
                // Shutdown may have begun while the endpoint worked; the client is told to
                // close, as hyper tells it, rather than finding the connection gone.
                let close = close || shutdown.is_cancelled() || resp.body == Framing::Close;
                end_head(head, close);
                return respond(down, up, resp, close, head, inflight).await;
            }
            Ok(Err(e)) => e,
            Err(_) => break timed_out(endpoint, timeout),
        };
        if let Err(e) = attempts.failed(attempt, e.is_connect(), Box::new(e), &proxy.cfg.eject) {
            break e;
        }
    };
    let status = error.kind.status();
    let body = proxy.failure(&error, conn);
    let close = close || shutdown.is_cancelled();
    let headed = Instant::now();
    let wrote = write_local(down, status, &body, close, *method == Method::HEAD).await;
    Forwarded {
        status: status.as_u16(),
        keep: wrote.is_ok() && !close,
        headed,
    }
}

/// Why one exchange with an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error(transparent)]
    Connect(#[from] UpstreamError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the endpoint closed the connection without a response")]
    Closed,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
}

impl ExchangeError {
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, ExchangeError::Connect(_))
    }
}

/// The parts of an upstream response head the proxy acts on.
pub(crate) struct RespHead {
    /// Bytes of the upstream buffer the head takes.
    pub(crate) len: usize,
    pub(crate) status: u16,
    pub(crate) body: Framing,
    /// The endpoint will not take another request on this connection.
    pub(crate) close: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the endpoint closes.
    Close,
}

/// Send `send` to `addr` and read the response head. A pooled connection that the endpoint
/// closed before answering is replaced by a new one for idempotent requests, as Go's and
/// nginx's clients do: the endpoint never processed the request.
pub(crate) async fn exchange(
    proxy: &Proxy,
    addr: std::net::SocketAddr,
    send: &[u8],
    idempotent: bool,
    head_request: bool,
    head: &mut impl ResponseHead,
) -> Result<(Pooled<Upstream>, RespHead), ExchangeError> {
    loop {
        let (mut up, reused) = match proxy.raw.checkout(addr) {
            Some(c) => (c, true),
            None => (proxy.raw.connect(addr).await?, false),
        };
        let u = &mut up.conn;
        let sent = u.stream.write_all(send).await;
        let parsed = match sent {
            Ok(()) => read_head(u, head_request, head).await,
            Err(e) => Err(ExchangeError::Io(e)),
        };
        match parsed {
            Ok(h) => return Ok((up, h)),
            Err(ExchangeError::Closed | ExchangeError::Io(_))
                if reused && idempotent && up.conn.buf.is_empty() =>
            {
                tracing::debug!(endpoint = %addr, "pooled connection closed by the endpoint; reconnecting");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Read a response head (skipping 1xx interim responses) into the connection's buffer, and
/// the client's version of it into `out`.
pub(crate) async fn read_head(
    u: &mut Upstream,
    head_request: bool,
    out: &mut impl ResponseHead,
) -> Result<RespHead, ExchangeError> {
    loop {
        if !u.buf.is_empty() {
            match parse_response(&u.buf, head_request, out)? {
                Some(h) if (100..200).contains(&h.status) => {
                    if h.status == 101 {
                        return Err(ExchangeError::Invalid("101 without an upgrade request"));
                    }
                    u.buf.advance(h.len);
                    continue;
                }
                Some(h) => return Ok(h),
                None if u.buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(ExchangeError::Invalid("response head too large"));
                }
                None => {}
            }
        }
        u.buf.reserve(READ_SIZE);
        if u.stream.read_buf(&mut u.buf).await? == 0 {
            return Err(ExchangeError::Closed);
        }
    }
}

/// Where [`parse_response`] writes the client's version of an upstream response head: as
/// HTTP/1.1 bytes for the fast path's clients, or as an [`http::Response`] for hyper's.
pub(crate) trait ResponseHead {
    /// The status line; a later call (after a 1xx) starts the head over.
    fn status(&mut self, status: u16, reason: &str) -> Result<(), ExchangeError>;
    /// An end-to-end header, or `Transfer-Encoding`, which frames the bytes as received.
    fn header(&mut self, name: &[u8], value: &[u8]) -> Result<(), ExchangeError>;
    /// The upstream sent no `Date`.
    fn undated(&mut self);
}

impl ResponseHead for Vec<u8> {
    fn status(&mut self, status: u16, reason: &str) -> Result<(), ExchangeError> {
        self.clear();
        // Writing into a Vec cannot fail.
        let _ = write!(self, "HTTP/1.1 {status} {reason}\r\n");
        Ok(())
    }

    fn header(&mut self, name: &[u8], value: &[u8]) -> Result<(), ExchangeError> {
        put_header(self, name, value);
        Ok(())
    }

    fn undated(&mut self) {
        put_header(self, b"date", http_date().as_bytes());
    }
}

/// An h2 response: its frames carry the body, so `Transfer-Encoding` goes (and a coding
/// other than `chunked`, which nothing would undo, fails the exchange); hyper's h2 server
/// dates undated responses itself.
impl ResponseHead for http::Response<()> {
    fn status(&mut self, status: u16, _reason: &str) -> Result<(), ExchangeError> {
        *self.status_mut() = http::StatusCode::from_u16(status)
            .map_err(|_| ExchangeError::Invalid("malformed status line"))?;
        self.headers_mut().clear();
        Ok(())
    }

    fn header(&mut self, name: &[u8], value: &[u8]) -> Result<(), ExchangeError> {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only `chunked` is decoded; h2 has no transfer codings to carry another.
            return if only_chunked(value) {
                Ok(())
            } else {
                Err(ExchangeError::Invalid("transfer coding other than chunked"))
            };
        }
        let name = http::HeaderName::from_bytes(name)
            .map_err(|_| ExchangeError::Invalid("malformed header name"))?;
        let value = http::HeaderValue::from_bytes(value)
            .map_err(|_| ExchangeError::Invalid("malformed header value"))?;
        self.headers_mut().append(name, value);
        Ok(())
    }

    fn undated(&mut self) {}
}

/// Whether a `Transfer-Encoding` value is `chunked` alone, the one coding the proxy
/// decodes for clients it re-frames the body for.
pub(crate) fn only_chunked(value: &[u8]) -> bool {
    value.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// Parse the response head at the start of `buf` (`Ok(None)` if incomplete) and write the
/// client's version of it into `out`: the upstream's without its hop-by-hop headers, dated
/// if it was not. [`end_head`] completes an HTTP/1.1 one.
fn parse_response(
    buf: &[u8],
    head_request: bool,
    out: &mut impl ResponseHead,
) -> Result<Option<RespHead>, ExchangeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ExchangeError::Invalid("too many headers"));
        }
        Err(_) => return Err(ExchangeError::Invalid("malformed head")),
    };
    let (Some(status @ 100..), Some(version)) = (resp.code, resp.version) else {
        return Err(ExchangeError::Invalid("malformed status line"));
    };
    let mut length = None;
    let mut chunked = None;
    let mut close = version == 0;
    let mut named = Tokens::default();
    let mut dated = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        dated |= name.eq_ignore_ascii_case(b"date");
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = content_length(h.value).ok_or(ExchangeError::Invalid("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ExchangeError::Invalid("conflicting content-length"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // The last coding decides: chunked framing, or the body runs until close.
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if version == 0 && t.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
                // Never drop the framing headers, whatever `Connection` names.
                if !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"content-length")
                    && !t.eq_ignore_ascii_case(b"transfer-encoding")
                    && named.push(t).is_err()
                {
                    return Err(ExchangeError::Invalid("too many connection options"));
                }
            }
        }
    }
    let body = if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(0)) => Framing::Empty,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    // Both framings at once is a smuggling vector: trust chunked, never reuse.
    if chunked.is_some() && length.is_some() {
        close = true;
    }
    if body == Framing::Close {
        close = true;
    }
    out.status(status, resp.reason.unwrap_or(""))?;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let framing = name.eq_ignore_ascii_case(b"transfer-encoding");
        // Transfer-Encoding overrides a Content-Length, which an intermediary removes
        // (RFC 9112 §6.3) so that no client downstream frames the body by it.
        let overridden = chunked.is_some() && name.eq_ignore_ascii_case(b"content-length");
        if (is_hop_by_hop(name) && !framing) || overridden || named.contains(name) {
            continue;
        }
        out.header(name, h.value)?;
    }
    if !dated {
        out.undated();
    }
    Ok(Some(RespHead {
        len,
        status,
        body,
        close,
    }))
}

/// Complete a head [`parse_response`] wrote: `connection: close` when the client
/// connection ends after this response, and the blank line.
fn end_head(out: &mut Vec<u8>, close: bool) {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The current time as a `Date` value. A response is dated where it originates or, when
/// it arrives undated, where it is forwarded (RFC 9110 §6.6.1), as hyper dates them.
fn http_date() -> String {
    DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&Timestamp::now())
        .unwrap_or_default()
}

/// Send `head` (the rewritten response head) and stream the body that follows the upstream
/// head at the start of `up`'s buffer to `down`; the connection goes back to the pool if
/// the response ended cleanly. `close` ends the client connection afterwards.
async fn respond<I: AsyncWrite + Unpin>(
    down: &mut I,
    mut up: Pooled<Upstream>,
    resp: RespHead,
    close: bool,
    head: &[u8],
    _inflight: InFlight,
) -> Forwarded {
    let status = resp.status;
    let headed = Instant::now();
    let u = &mut up.conn;
    let broken = |keep| Forwarded {
        status,
        keep,
        headed,
    };
    u.buf.advance(resp.len);
    let mut body = Body::new(resp.body);
    let mut first = Some(head);
    loop {
        let n = match body.take(&u.buf) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "upstream response body");
                return broken(false);
            }
        };
        let wrote = match first.take() {
            Some(h) => write_two(down, h, &u.buf[..n]).await,
            None => down.write_all(&u.buf[..n]).await,
        };
        if let Err(e) = wrote {
            tracing::debug!(error = %e, "client went away mid-response");
            return broken(false);
        }
        u.buf.advance(n);
        if body.done() {
            break;
        }
        // What the upstream sent so far reaches the client before waiting for more of it
        // (an event stream may pause for minutes); TLS holds written records until flushed.
        if let Err(e) = down.flush().await {
            tracing::debug!(error = %e, "client went away mid-response");
            return broken(false);
        }
        u.buf.reserve(READ_SIZE);
        match u.stream.read_buf(&mut u.buf).await {
            Ok(0) if body.framing == Framing::Close => break,
            Ok(0) => {
                tracing::warn!("upstream closed mid-response");
                return broken(false);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "upstream response body");
                return broken(false);
            }
        }
    }
    // TLS holds written records until flushed; a plain socket's flush does nothing.
    if let Err(e) = down.flush().await {
        tracing::debug!(error = %e, "client went away mid-response");
        return broken(false);
    }
    // Bytes past the response would be a reply to nothing: the connection is not reused.
    if !resp.close && u.buf.is_empty() {
        up.release();
    }
    Forwarded {
        status,
        keep: !close,
        headed,
    }
}

/// A response body's progress.
pub(crate) struct Body {
    pub(crate) framing: Framing,
    left: u64,
    pub(crate) chunks: Chunked,
}

impl Body {
    pub(crate) fn new(framing: Framing) -> Self {
        Body {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunks: Chunked::default(),
        }
    }

    /// How many bytes of `data` belong to the body.
    pub(crate) fn take(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        match self.framing {
            Framing::Empty => Ok(0),
            Framing::Close => Ok(data.len()),
            Framing::Length(_) => {
                let n = data
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= n as u64;
                Ok(n)
            }
            Framing::Chunked => Ok(self.chunks.feed(data)?.unwrap_or(data.len())),
        }
    }

    /// Body bytes still to come of a `Content-Length` body.
    pub(crate) fn left(&self) -> u64 {
        self.left
    }

    pub(crate) fn done(&self) -> bool {
        match self.framing {
            Framing::Empty => true,
            Framing::Close => false,
            Framing::Length(_) => self.left == 0,
            Framing::Chunked => self.chunks.state == ChunkState::Done,
        }
    }
}

/// Where a chunked body's framing is (RFC 9112 §7.1), to know where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
}

impl Chunked {
    /// Follow `data`; `Some(n)` when the body ends after its first `n` bytes.
    fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, &'static str> {
        let mut i = 0;
        while i < data.len() {
            if self.state == ChunkState::Data {
                i += self.data(data.len() - i);
                continue;
            }
            self.step(data[i])?;
            i += 1;
            if self.state == ChunkState::Done {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// For a decoder: how many framing bytes start `data`, and how many bytes of chunk data
    /// follow them. It stops at the trailer section, which the caller parses whole
    /// ([`Chunked::trailers_read`]).
    pub(crate) fn payload(&mut self, data: &[u8]) -> Result<(usize, usize), &'static str> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() && !matches!(self.state, Data | TrailerStart | Done) {
            self.step(data[i])?;
            i += 1;
        }
        let n = if self.state == Data {
            self.data(data.len() - i)
        } else {
            0
        };
        Ok((i, n))
    }

    /// Whether the last chunk has been read and the trailer section is next.
    pub(crate) fn at_trailers(&self) -> bool {
        self.state == ChunkState::TrailerStart
    }

    /// The trailer section (and with it the body) has been read.
    pub(crate) fn trailers_read(&mut self) {
        self.state = ChunkState::Done;
    }

    /// Take up to `avail` bytes of the current chunk's data; how many it took.
    fn data(&mut self, avail: usize) -> usize {
        let n = avail.min(usize::try_from(self.size).unwrap_or(usize::MAX));
        self.size -= n as u64;
        if self.size == 0 {
            self.state = ChunkState::DataCr;
        }
        n
    }

    /// Follow one framing byte (anything but chunk data).
    fn step(&mut self, b: u8) -> Result<(), &'static str> {
        use ChunkState::*;
        self.state = match (self.state, b) {
            (Size, b) if b.is_ascii_hexdigit() => {
                if self.digits == 15 {
                    return Err("chunk size too large");
                }
                self.digits += 1;
                // A hex digit always converts.
                self.size = self.size * 16 + u64::from((b as char).to_digit(16).unwrap_or(0));
                Size
            }
            (Size, b';' | b' ' | b'\t') if self.digits > 0 => Ext,
            (Size, b'\r') if self.digits > 0 => SizeLf,
            (Ext, b'\r') => SizeLf,
            (Ext, b'\n') => return Err("bare LF in chunk extension"),
            (Ext, _) => Ext,
            (SizeLf, b'\n') if self.size == 0 => TrailerStart,
            (SizeLf, b'\n') => Data,
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => {
                self.digits = 0;
                Size
            }
            (TrailerStart, b'\r') => FinalLf,
            (TrailerStart | Trailer, b'\n') => return Err("bare LF in trailer"),
            (Trailer, b'\r') => TrailerLf,
            (TrailerStart | Trailer, _) => Trailer,
            (TrailerLf, b'\n') => TrailerStart,
            (FinalLf, b'\n') => Done,
            _ => return Err("malformed chunked framing"),
        };
        Ok(())
    }
}

/// Write `a` then `b` with as few system calls as the socket allows (one, normally).
async fn write_two<I: AsyncWrite + Unpin>(s: &mut I, a: &[u8], b: &[u8]) -> io::Result<()> {
    if b.is_empty() {
        return s.write_all(a).await;
    }
    let n = s
        .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
        .await?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    if n < a.len() {
        s.write_all(&a[n..]).await?;
        s.write_all(b).await
    } else {
        s.write_all(&b[n - a.len()..]).await
    }
}

/// An answer from the proxy itself. An answer to HEAD has the body's length and no body:
/// a client reads none, and would take one for the next response.
async fn write_local<I: AsyncWrite + Unpin>(
    down: &mut I,
    status: http::StatusCode,
    body: &str,
    close: bool,
    head_request: bool,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\ndate: {}\r\n{}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        http_date(),
        if close { "connection: close\r\n" } else { "" },
    );
    let body = if head_request { "" } else { body };
    write_two(down, head.as_bytes(), body.as_bytes()).await?;
    down.flush().await
}

/// A connection handed to hyper: the bytes the fast path read come first.
pub struct Rewind<I> {
    prefix: BytesMut,
    io: I,
}

impl<I> Rewind<I> {
    pub fn new(io: I, prefix: BytesMut) -> Self {
        Rewind { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::BufWriter;
    use tokio::net::TcpListener;

    use super::*;
    use crate::balance::Endpoint;
    use crate::pool::{Pool, PoolConfig};

    fn ends_at(data: &[u8]) -> Result<Option<usize>, &'static str> {
        Chunked::default().feed(data)
    }

    #[test]
    fn chunked_end_is_found_in_one_piece_and_byte_by_byte() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(ends_at(body), Ok(Some(end)));
        let mut c = Chunked::default();
        for (i, b) in body.iter().enumerate() {
            match c.feed(std::slice::from_ref(b)) {
                Ok(Some(1)) => {
                    assert_eq!(i + 1, end);
                    return;
                }
                Ok(None) => {}
                other => panic!("byte {i}: {other:?}"),
            }
        }
        panic!("end not found");
    }

    #[test]
    fn chunk_data_may_contain_anything() {
        // Data bytes that look like framing are data.
        assert_eq!(ends_at(b"3\r\n0\r\n\r\n0\r\n\r\n"), Ok(Some(13)));
        assert_eq!(ends_at(b"0\r\n\r\n"), Ok(Some(5)));
    }

    #[test]
    fn malformed_chunked_framing_is_an_error() {
        assert!(ends_at(b"zz\r\n").is_err());
        assert!(ends_at(b"\r\n").is_err());
        assert!(ends_at(b"3\r\nabcX").is_err());
        assert!(ends_at(b"1000000000000000\r\n").is_err());
        assert!(ends_at(b"0\r\nbad\ntrailer").is_err());
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |head: &str, head_request| {
            parse_response(head.as_bytes(), head_request, &mut Vec::new())
                .expect("valid")
                .map(|h| (h.body, h.close))
        };
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
            Some((Framing::Length(5), false))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true),
            Some((Framing::Empty, false)),
            "HEAD"
        );
        assert_eq!(
            framing(
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
                false
            ),
            Some((Framing::Empty, false))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                false
            ),
            Some((Framing::Chunked, false))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                false
            ),
            Some((Framing::Chunked, true)),
            "both framings: chunked wins, never reused"
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\n\r\n", false),
            Some((Framing::Close, true))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false),
            Some((Framing::Length(1), true))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n",
                false
            ),
            Some((Framing::Length(1), true))
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\ncontent-le", false), None);
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                false,
                &mut Vec::new()
            )
            .is_err()
        );
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false,
                &mut Vec::new()
            )
            .is_err()
        );
    }

    #[test]
    fn a_status_code_below_100_is_invalid() {
        // httparse takes any three digits; a client would get "HTTP/1.1 0 X".
        for head in ["HTTP/1.1 000 X\r\n\r\n", "HTTP/1.1 099 X\r\n\r\n"] {
            assert!(
                parse_response(head.as_bytes(), false, &mut Vec::new()).is_err(),
                "{head}"
            );
        }
    }

    #[test]
    fn response_head_drops_hop_by_hop_but_keeps_framing() {
        let mut out = Vec::new();
        let response_head = |up: &[u8], close, out: &mut Vec<u8>| {
            parse_response(up, false, out)
                .and_then(|h| h.ok_or(ExchangeError::Closed))
                .map(|_| end_head(out, close))
        };
        let up = b"HTTP/1.1 200 Fine\r\nconnection: keep-alive, x-private, transfer-encoding\r\nx-private: 1\r\nkeep-alive: timeout=5\r\ntransfer-encoding: chunked\r\nx-app: 2\r\nDate: d\r\n\r\n";
        response_head(up, false, &mut out).expect("head");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 Fine\r\ntransfer-encoding: chunked\r\nx-app: 2\r\nDate: d\r\n\r\n"
        );
        response_head(b"HTTP/1.0 404 \r\ndate: d\r\n\r\n", true, &mut out).expect("head");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 404 \r\ndate: d\r\nconnection: close\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_streamed_body_is_flushed_before_waiting_for_more_of_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pool = Pool::<Upstream>::new(PoolConfig::default());
        let (up, accepted) = tokio::join!(pool.connect(addr), listener.accept());
        let (mut up, (mut endpoint, _)) = (up.expect("connect"), accepted.expect("accept"));
        endpoint
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .expect("write");
        let resp = read_head(&mut up.conn, false, &mut Vec::new())
            .await
            .expect("head");
        // A TLS stream, like a BufWriter, holds what was written until it is flushed.
        let (mut client, proxy_side) = tokio::io::duplex(64 * 1024);
        let inflight = InFlight::new(Arc::new(Endpoint::new(addr)));
        let task = tokio::spawn(async move {
            let mut down = BufWriter::new(proxy_side);
            respond(&mut down, up, resp, false, b"HEAD\r\n\r\n", inflight)
                .await
                .keep
        });
        // The upstream is silent now, as an event stream between events: what it sent so
        // far must reach the client.
        let mut got = Vec::new();
        let first = tokio::time::timeout(Duration::from_secs(10), async {
            while !got.ends_with(b"hello\r\n") {
                let mut buf = [0u8; 1024];
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(
            first.is_ok() && got.ends_with(b"hello\r\n"),
            "got only {:?}",
            String::from_utf8_lossy(&got)
        );
        endpoint.write_all(b"0\r\n\r\n").await.expect("write");
        assert!(
            task.await.expect("respond"),
            "the client connection stays open"
        );
    }
}
