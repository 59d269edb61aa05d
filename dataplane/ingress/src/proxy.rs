//! Forwarding one request: route lookup in the current table, canary choice, endpoint pick,
//! header rewriting (hop-by-hop stripped, `X-Forwarded-*` and `Forwarded` set), streaming
//! the bodies both ways, retries of idempotent requests on another endpoint, HTTP Upgrade
//! (WebSocket) tunnels, and one metrics update and access-log line per request.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::balance::{Backend, EjectPolicy, Endpoint, InFlight, now_ms};
use crate::error::{ErrorKind, ProxyError};
use crate::metrics::{Metrics, SeriesCache};
use crate::pool::{Conn, Pool, PoolConfig, Upstream};
use crate::raw::RawBody;
use crate::table::{Table, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Tunables of the forwarding path.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: u64,
    pub connect_timeout: Duration,
    /// Time allowed for an upstream's response headers unless the route sets its own.
    pub read_timeout: Duration,
    /// Further endpoints tried after a failure, for idempotent requests without a body.
    pub retries: usize,
    pub eject: EjectPolicy,
    /// The port HTTPS is served on, for `ssl-redirect` locations.
    pub https_port: u16,
    pub access_log: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_body_bytes: 1 << 20,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            retries: 2,
            eject: EjectPolicy::default(),
            https_port: 443,
            access_log: true,
        }
    }
}

/// What the proxy knows about a downstream connection; built once per connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    xff: HeaderValue,
    forwarded: String,
    /// The `Forwarded` value for the host of the connection's last request: a keep-alive
    /// connection's requests nearly always name one host, so it is built once, not per
    /// request.
    forwarded_host: Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let ip = peer.ip().to_canonical();
        let xff =
            HeaderValue::try_from(ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        let proto = if tls { "https" } else { "http" };
        let forwarded = match ip {
            std::net::IpAddr::V4(v4) => format!("for={v4};proto={proto}"),
            std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={proto}"),
        };
        ConnInfo {
            peer,
            tls,
            xff,
            forwarded,
            forwarded_host: Mutex::new(None),
        }
    }

    /// `Forwarded` naming `host` (a value without quotes or backslashes).
    pub(crate) fn forwarded_for(&self, host: &str) -> Option<HeaderValue> {
        let mut last = self.forwarded_host.lock().ok();
        if let Some(Some((h, f))) = last.as_deref()
            && h.as_bytes() == host.as_bytes()
        {
            return Some(f.clone());
        }
        let f = HeaderValue::try_from(format!("{};host=\"{host}\"", self.forwarded)).ok()?;
        if let Some(last) = last.as_mut() {
            **last = Some((HeaderValue::try_from(host).ok()?, f.clone()));
        }
        Some(f)
    }

    /// The `X-Forwarded-For` value: the client's address.
    pub(crate) fn xff(&self) -> &HeaderValue {
        &self.xff
    }

    /// `Forwarded` without a host.
    pub(crate) fn forwarded(&self) -> &str {
        &self.forwarded
    }
}

/// The body sent upstream: the client's, streamed under the size limit, or none. Frames
/// the proxy took from the client before it chose hyper's client ([`crate::raw`] looks at
/// what has arrived) go first.
#[derive(Debug)]
pub enum ReqBody {
    Stream {
        received: VecDeque<Result<Frame<Bytes>, hyper::Error>>,
        rest: Limited<Incoming>,
    },
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Stream { received, rest } => match received.pop_front() {
                Some(frame) => Poll::Ready(Some(frame.map_err(Into::into))),
                None => Pin::new(rest).poll_frame(cx),
            },
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Stream { received, rest } => received.is_empty() && rest.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Stream { received, rest } => {
                let taken = crate::raw::data_len(received) as u64;
                let mut hint = rest.size_hint();
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + taken);
                }
                hint.set_lower(hint.lower() + taken);
                hint
            }
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The body sent downstream: the upstream's, streamed (through hyper's client or straight
/// from a plain upstream socket); or a short message from the proxy itself.
pub enum RespBody {
    Upstream(UpstreamBody),
    Raw(RawBody),
    Local(Option<Bytes>),
}

/// An upstream response body, holding the endpoint's outstanding count and (HTTP/1.1) its
/// pooled connection until it is dropped: the connection goes back to the pool if the
/// body was read to the end, and is closed otherwise.
pub struct UpstreamBody {
    body: Incoming,
    _inflight: InFlight,
    conn: Option<Conn>,
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.body.is_end_stream()
        {
            conn.release();
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Upstream(u) => Pin::new(&mut u.body).poll_frame(cx).map_err(Into::into),
            RespBody::Raw(r) => Pin::new(r).poll_frame(cx).map_err(Into::into),
            RespBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Upstream(u) => u.body.is_end_stream(),
            RespBody::Raw(r) => r.is_end_stream(),
            RespBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Upstream(u) => u.body.size_hint(),
            RespBody::Raw(r) => r.size_hint(),
            RespBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A failed upstream exchange: whether it failed to connect (the endpoint never saw the
/// request), and why.
struct ExchangeError {
    connect: bool,
    source: BoxError,
}

/// Per-request facts gathered for the metrics and the access log. The route and upstream
/// labels are borrowed from the matched target rather than cloned: each clone is a
/// reference-count update on a cache line that both workers write.
#[derive(Default)]
pub(crate) struct Outcome {
    /// Whether the canary side was chosen; `None` until a backend is chosen.
    pub(crate) canary: Option<bool>,
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) attempts: u32,
}

impl Outcome {
    /// The route and upstream labels of the chosen side of `target`.
    pub(crate) fn labels<'t>(
        &self,
        target: Option<&'t Target>,
    ) -> (Option<&'t Arc<str>>, Option<&'t Arc<str>>) {
        match (target, self.canary) {
            (Some(t), Some(false)) => (Some(&t.route), Some(&t.backend.name)),
            (Some(t), Some(true)) => match &t.canary {
                Some(c) => (Some(&c.route), Some(&c.backend.name)),
                None => (None, None),
            },
            _ => (None, None),
        }
    }
}

/// The endpoints one request may try: picking them, the retry budget, and the error that
/// answers the request when no try is left.
pub(crate) struct Attempts<'b> {
    backend: &'b Backend,
    retryable: bool,
    retries: usize,
    tried: Vec<SocketAddr>,
    last_error: Option<ProxyError>,
}

/// One try at one endpoint.
pub(crate) struct Attempt<'b> {
    pub(crate) endpoint: &'b Arc<Endpoint>,
    /// Another endpoint will be tried if this one fails.
    pub(crate) may_retry: bool,
    now: u64,
}

impl<'b> Attempts<'b> {
    pub(crate) fn new(backend: &'b Backend, retryable: bool, retries: usize) -> Self {
        Attempts {
            backend,
            retryable,
            retries,
            tried: Vec::new(),
            last_error: None,
        }
    }

    /// The next endpoint to try, or the error to answer with.
    pub(crate) fn next(&mut self, out: &mut Outcome) -> Result<Attempt<'b>, ProxyError> {
        let now = now_ms();
        let Some(endpoint) = self.backend.pick(&self.tried, now) else {
            return Err(self.last_error.take().unwrap_or_else(|| {
                ProxyError::new(
                    ErrorKind::NoEndpoints,
                    format!("service {} has no ready endpoints", self.backend.name),
                )
            }));
        };
        out.endpoint = Some(endpoint.addr);
        out.attempts += 1;
        let may_retry = self.retryable
            && self.tried.len() < self.retries
            && self.backend.endpoints.len() > self.tried.len() + 1;
        Ok(Attempt {
            endpoint,
            may_retry,
            now,
        })
    }

    /// Count a failed try (a connect failure towards ejecting the endpoint); the error is
    /// the answer when no other endpoint will be tried.
    pub(crate) fn failed(
        &mut self,
        attempt: Attempt<'b>,
        connect: bool,
        source: BoxError,
        eject: &EjectPolicy,
    ) -> Result<(), ProxyError> {
        let Attempt {
            endpoint,
            may_retry,
            now,
        } = attempt;
        let kind = if connect {
            if endpoint.connect_failed(eject, now) {
                tracing::warn!(endpoint = %endpoint.addr, upstream = %self.backend.name, "endpoint ejected after consecutive connect failures");
            }
            ErrorKind::ConnectFailed
        } else {
            ErrorKind::UpstreamFailed
        };
        let err = ProxyError::new(
            kind,
            format!("endpoint {} of {}", endpoint.addr, self.backend.name),
        )
        .with_source(source)
        .retryable(self.retryable);
        if !may_retry {
            return Err(err);
        }
        tracing::debug!(error = %err, "retrying on another endpoint");
        self.tried.push(endpoint.addr);
        self.last_error = Some(err);
        Ok(())
    }
}

/// The answer when an endpoint sent no response head within `timeout`.
pub(crate) fn timed_out(endpoint: &Endpoint, timeout: Duration) -> ProxyError {
    ProxyError::new(
        ErrorKind::UpstreamTimeout,
        format!(
            "endpoint {} sent no response within {timeout:?}",
            endpoint.addr
        ),
    )
}

/// What the access log says of a request.
pub(crate) struct Access<'a> {
    pub(crate) method: &'a str,
    pub(crate) host: &'a str,
    pub(crate) path: &'a str,
    pub(crate) version: Version,
}

/// The forwarding half of the ingress: one per worker thread, shared by its connections.
pub struct Proxy {
    pub(crate) table: Arc<ArcSwap<Table>>,
    /// HTTP/1.1 upstream connections of this worker for requests served through hyper.
    h1: Pool<SendRequest<ReqBody>>,
    /// Plain upstream sockets of this worker for the HTTP/1.1 fast path.
    pub(crate) raw: Pool<Upstream>,
    /// HTTP/2 upstreams multiplex, so hyper-util's shared pool (one connection per
    /// endpoint) serves them.
    h2: Client<HttpConnector, ReqBody>,
    pub(crate) cfg: ProxyConfig,
    pub(crate) metrics: Arc<Metrics>,
    series: SeriesCache,
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

impl Proxy {
    pub fn new(table: Arc<ArcSwap<Table>>, cfg: ProxyConfig, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(16)
            // The proxy sets Host itself: the client's, not the endpoint address.
            .set_host(false);
        let pool_cfg = PoolConfig {
            connect_timeout: cfg.connect_timeout,
            ..PoolConfig::default()
        };
        let h1 = Pool::new(pool_cfg.clone());
        let raw = Pool::new(pool_cfg);
        let h2 = builder.http2_only(true).build(connector);
        Proxy {
            table,
            h1,
            raw,
            h2,
            cfg,
            metrics,
            series: SeriesCache::default(),
        }
    }

    /// Close this worker's idle upstream connections that expired or were closed, every
    /// `every`, until `shutdown`.
    pub async fn sweep_idle(
        &self,
        every: Duration,
        shutdown: &tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    self.h1.sweep();
                    self.raw.sweep();
                }
            }
        }
    }

    /// Answer one downstream request; never fails (errors become responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Result<Response<RespBody>, Infallible> {
        let start = Instant::now();
        let log = self.cfg.access_log.then(|| {
            (
                req.method().clone(),
                req.uri().clone(),
                host_of(&req),
                req.version(),
            )
        });
        let mut out = Outcome::default();
        let host = host_of(&req);
        // The guard is dropped at once: holding one across the exchange would pin a
        // table that a swap has replaced.
        let target = {
            let host_str = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
            self.table.load().route(host_str, req.uri().path()).cloned()
        };
        let result = match &target {
            // RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host is answered 400,
            // as nginx does, not routed by a guess.
            _ if req.version() == Version::HTTP_11
                && req.uri().authority().is_none()
                && req.headers().get_all(header::HOST).iter().count() != 1 =>
            {
                Err(ProxyError::new(
                    ErrorKind::BadRequest,
                    "an HTTP/1.1 request needs exactly one Host header",
                ))
            }
            // RFC 9113 §8.3.1: an HTTP/1.1 hop takes its Host from `:authority` or `host`;
            // nginx answers an h2 request with neither 400 too.
            _ if req.version() == Version::HTTP_2 && host.is_none() => Err(ProxyError::new(
                ErrorKind::BadRequest,
                "an HTTP/2 request needs an :authority or a Host header",
            )),
            Some(t) => self.forward(req, host, t, &conn, &mut out).await,
            None => Err(ProxyError::new(
                ErrorKind::NoRoute,
                format!(
                    "no Ingress rule matches host {:?} path {:?}",
                    host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(""),
                    req.uri().path()
                ),
            )),
        };
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => local(e.kind.status(), self.failure(&e, &conn)),
        };
        let access = log.as_ref().map(|(method, uri, host, version)| Access {
            method: method.as_str(),
            host: host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(""),
            path: uri.path(),
            version: *version,
        });
        self.finish(
            &conn,
            access,
            target.as_deref(),
            &out,
            resp.status().as_u16(),
            start.elapsed(),
        );
        Ok(resp)
    }

    /// Count a failed request and say why, as the body of its error response.
    pub(crate) fn failure(&self, e: &ProxyError, conn: &ConnInfo) -> String {
        self.metrics.error(e);
        if e.kind != ErrorKind::NoRoute {
            tracing::warn!(error = %e, client = %conn.peer, "request failed");
        }
        format!(
            "{} {}: {e}\n",
            e.kind.status().as_u16(),
            e.kind.status().canonical_reason().unwrap_or("")
        )
    }

    /// The metrics update and access-log line of one answered request.
    pub(crate) fn finish(
        &self,
        conn: &ConnInfo,
        access: Option<Access<'_>>,
        target: Option<&Target>,
        out: &Outcome,
        status: u16,
        elapsed: Duration,
    ) {
        let (route, upstream) = out.labels(target);
        self.metrics
            .request(&self.series, route, upstream, status, elapsed);
        if let Some(a) = access {
            tracing::info!(
                target: "weir_ingress::access",
                client = %conn.peer,
                tls = conn.tls,
                method = a.method,
                host = a.host,
                path = a.path,
                version = ?a.version,
                status,
                route = route.map_or("", |r| &**r),
                upstream = upstream.map_or("", |u| &**u),
                endpoint = %out.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                attempts = out.attempts,
                duration_us = elapsed.as_micros() as u64,
            );
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        host: Option<HeaderValue>,
        target: &Target,
        conn: &ConnInfo,
        out: &mut Outcome,
    ) -> Result<Response<RespBody>, ProxyError> {
        if target.ssl_redirect && !conn.tls {
            let host_str = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
            return Ok(self.redirect(host_str, req.uri()));
        }
        let (route, backend) = target.choose(req.headers());
        out.canary = Some(!std::ptr::eq(route, &target.route));

        if let Some(len) = content_length(req.headers())
            && len > self.cfg.max_body_bytes
        {
            return Err(ProxyError::new(
                ErrorKind::BodyTooLarge,
                format!(
                    "content-length {len} exceeds the limit of {} bytes",
                    self.cfg.max_body_bytes
                ),
            ));
        }
        let upgrade = is_upgrade(&req);
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, mut body) = req.into_parts();
        let method = parts.method;
        let mut headers = parts.headers;
        let wants_trailers = backend.h2 && te_has_trailers(&headers);
        let upgrade_value = if upgrade {
            headers.get(header::UPGRADE).cloned()
        } else {
            None
        };
        strip_hop_by_hop(&mut headers);
        drop_underscored(&mut headers);
        if parts.version == Version::HTTP_2 && !backend.h2 {
            join_cookies(&mut headers);
        }
        if let Some(u) = upgrade_value {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, u);
        }
        if wants_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        self.set_forwarded(&mut headers, conn, host.as_ref());
        if let Some(h) = host {
            headers.insert(header::HOST, h);
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let version = if backend.h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let empty = body.is_end_stream();
        // An h2 request to an HTTP/1.1 backend goes over a plain upstream socket, its head
        // (and small body) serialized once for every attempt, if its body, when it has one,
        // has a length and has arrived whole.
        let mut received = VecDeque::new();
        let whole = !backend.h2
            && parts.version == Version::HTTP_2
            && method != Method::CONNECT
            && (empty
                || content_length(&headers).is_some_and(|n| n <= crate::raw::MAX_BODY as u64)
                    && crate::raw::received(&mut body, &mut received));
        if whole {
            // The body goes with the head anyway. A backend that answered without reading
            // it, yet kept the connection, would take it for the next request on a pooled
            // socket; nginx's proxy drops `Expect` too.
            headers.remove(header::EXPECT);
        }
        let raw_head = whole
            .then(|| crate::raw::request(&method, &path, &headers, &received))
            .flatten();
        let mut body = Some(if empty {
            ReqBody::Empty
        } else {
            let taken = crate::raw::data_len(&received);
            let limit = (self.cfg.max_body_bytes as usize).saturating_sub(taken);
            ReqBody::Stream {
                received,
                rest: Limited::new(body, limit),
            }
        });
        let retryable = empty && !upgrade && is_idempotent(&method);
        let timeout = target.read_timeout.unwrap_or(self.cfg.read_timeout);
        let mut attempts = Attempts::new(backend, retryable, self.cfg.retries);
        loop {
            let attempt = attempts.next(out)?;
            let (endpoint, may_retry) = (attempt.endpoint, attempt.may_retry);
            if let Some(send) = &raw_head {
                let mut head = Response::new(());
                let exchanged = crate::h1::exchange(
                    self,
                    endpoint.addr,
                    send,
                    is_idempotent(&method),
                    method == Method::HEAD,
                    &mut head,
                );
                let inflight = InFlight::new(endpoint.clone());
                match tokio::time::timeout(timeout, exchanged).await {
                    Ok(Ok((up, resp))) => {
                        endpoint.succeeded();
                        let resp = RawBody::response(up, resp, head, inflight);
                        return Ok(resp.map(RespBody::Raw));
                    }
                    Ok(Err(e)) => {
                        attempts.failed(attempt, e.is_connect(), Box::new(e), &self.cfg.eject)?;
                        continue;
                    }
                    Err(_) => return Err(timed_out(endpoint, timeout)),
                }
            }
            // HTTP/1.1 connections take the origin form as is; hyper-util's client wants
            // the endpoint in the URI to find its connection.
            let uri = if backend.h2 {
                Uri::builder()
                    .scheme(Scheme::HTTP)
                    .authority(endpoint.authority.clone())
                    .path_and_query(path.clone())
                    .build()
                    .map_err(|e| {
                        ProxyError::new(ErrorKind::BadRequest, "request target").with_source(e)
                    })?
            } else {
                Uri::from(path.clone())
            };
            let mut up = Request::new(body.take().unwrap_or(ReqBody::Empty));
            *up.method_mut() = method.clone();
            *up.uri_mut() = uri;
            *up.version_mut() = version;
            *up.headers_mut() = if may_retry {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };

            let inflight = InFlight::new(endpoint.clone());
            let e = match tokio::time::timeout(timeout, self.exchange(backend, endpoint, up)).await
            {
                Ok(Ok((mut resp, conn))) => {
                    endpoint.succeeded();
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && let Some(down) = on_upgrade
                    {
                        let up = hyper::upgrade::on(&mut resp);
                        tokio::spawn(tunnel(down, up, inflight));
                        return Ok(resp.map(|_| RespBody::Local(None)));
                    }
                    // hyper decodes only `chunked` and the header goes with the hop-by-hop
                    // ones, so any other coding would reach the client unmarked, as nginx
                    // refuses to pass it.
                    if !backend.h2
                        && !resp
                            .headers()
                            .get_all(header::TRANSFER_ENCODING)
                            .iter()
                            .all(|v| crate::h1::only_chunked(v.as_bytes()))
                    {
                        return Err(ProxyError::new(
                            ErrorKind::UpstreamFailed,
                            format!(
                                "{} sent a transfer coding other than chunked",
                                endpoint.addr
                            ),
                        ));
                    }
                    // Transfer-Encoding overrides a Content-Length (RFC 9112 §6.3); hyper
                    // re-frames the decoded body, and a length left behind would cut it.
                    if resp.headers().contains_key(header::TRANSFER_ENCODING) {
                        resp.headers_mut().remove(header::CONTENT_LENGTH);
                    }
                    strip_hop_by_hop(resp.headers_mut());
                    return Ok(resp.map(|body| {
                        RespBody::Upstream(UpstreamBody {
                            body,
                            _inflight: inflight,
                            conn,
                        })
                    }));
                }
                Ok(Err(e)) => e,
                Err(_) => return Err(timed_out(endpoint, timeout)),
            };
            if chain_has::<LengthLimitError>(&*e.source) {
                return Err(ProxyError::new(
                    ErrorKind::BodyTooLarge,
                    format!(
                        "request body exceeds the limit of {} bytes",
                        self.cfg.max_body_bytes
                    ),
                ));
            }
            attempts.failed(attempt, e.connect, e.source, &self.cfg.eject)?;
        }
    }

    /// One request to one endpoint: on this worker's HTTP/1.1 pool, or over HTTP/2.
    async fn exchange(
        &self,
        backend: &Backend,
        endpoint: &Endpoint,
        req: Request<ReqBody>,
    ) -> Result<(Response<Incoming>, Option<Conn>), ExchangeError> {
        if backend.h2 {
            return self
                .h2
                .request(req)
                .await
                .map(|r| (r, None))
                .map_err(|e| ExchangeError {
                    connect: e.is_connect(),
                    source: Box::new(e),
                });
        }
        self.h1
            .send(endpoint.addr, req)
            .await
            .map(|(r, c)| (r, Some(c)))
            .map_err(|e| ExchangeError {
                connect: e.is_connect(),
                source: Box::new(e),
            })
    }

    fn set_forwarded(&self, headers: &mut HeaderMap, conn: &ConnInfo, host: Option<&HeaderValue>) {
        // An edge proxy does not trust what clients claim about earlier hops, as
        // ingress-nginx by default: these headers are replaced, not appended to.
        headers.insert(X_FORWARDED_FOR.clone(), conn.xff.clone());
        let proto = if conn.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
        let host = host.and_then(|h| {
            h.to_str()
                .ok()
                .filter(|s| !s.contains(['"', '\\']))
                .map(|s| (h, s))
        });
        let forwarded = match host {
            Some((h, s)) => {
                headers.insert(X_FORWARDED_HOST.clone(), h.clone());
                conn.forwarded_for(s)
            }
            None => HeaderValue::try_from(conn.forwarded.as_str()).ok(),
        };
        if let Some(f) = forwarded {
            headers.insert(FORWARDED.clone(), f);
        }
    }

    fn redirect(&self, host: &str, uri: &Uri) -> Response<RespBody> {
        let host = crate::table::normalize_host(host);
        let port = if self.cfg.https_port == 443 {
            String::new()
        } else {
            format!(":{}", self.cfg.https_port)
        };
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{host}{port}{pq}");
        let mut resp = local(
            StatusCode::PERMANENT_REDIRECT,
            format!("308 Permanent Redirect: {location}\n"),
        );
        if let Ok(l) = HeaderValue::try_from(location) {
            resp.headers_mut().insert(header::LOCATION, l);
        }
        resp
    }
}

/// Copy bytes both ways between the upgraded client and upstream connections until either
/// side closes; the endpoint counts the tunnel as outstanding while it lives.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    _inflight: InFlight,
) {
    match tokio::try_join!(down, up) {
        Ok((down, up)) => {
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                tracing::debug!(error = %e, "upgraded connection closed with an error");
            }
        }
        Err(e) => tracing::warn!(error = %e, "HTTP upgrade failed"),
    }
}

/// A response generated by the proxy itself.
pub fn local(status: StatusCode, body: String) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::Local(Some(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The request's host: the URI authority (HTTP/2 `:authority`, absolute-form) or `Host`.
fn host_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    match req.uri().authority() {
        Some(a) => HeaderValue::try_from(a.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    }
}

/// Join an h2 request's `cookie` crumbs into the one field an HTTP/1.1 hop must carry
/// (RFC 9113 §8.2.3, RFC 6265 §5.4), in the order they came.
fn join_cookies(headers: &mut HeaderMap) {
    let crumbs = headers.get_all(header::COOKIE);
    if crumbs.iter().nth(1).is_none() {
        return;
    }
    let joined = crumbs
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    // Valid values joined by "; " are a valid value.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && header_has_token(req.headers(), &header::CONNECTION, "upgrade")
}

fn te_has_trailers(headers: &HeaderMap) -> bool {
    header_has_token(headers, &header::TE, "trailers")
}

fn header_has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1): the fixed set and any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(conn) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::try_from(t.trim()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

/// Remove request headers whose names contain an underscore, as ingress-nginx does by
/// default (nginx's `underscores_in_headers off`): a backend behind a CGI-style gateway
/// would read `X_User` and `X-User` as the same variable, so one could stand in for the
/// other.
pub(crate) fn drop_underscored(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for n in named {
        headers.remove(n);
    }
}

/// RFC 9110 §7.6.1's hop-by-hop headers, and the non-standard ones proxies also drop.
pub(crate) const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

fn chain_has<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<T>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped_including_connection_named_ones() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "basic x"),
            ("accept", "*/*"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn forwarded_prefix_quotes_ipv6() {
        let c = ConnInfo::new("[2001:db8::1]:5000".parse().expect("addr"), true);
        assert_eq!(c.forwarded, "for=\"[2001:db8::1]\";proto=https");
        let c = ConnInfo::new("[::ffff:10.0.0.1]:5000".parse().expect("addr"), false);
        assert_eq!(
            c.forwarded, "for=10.0.0.1;proto=http",
            "v4-mapped shown as v4"
        );
        assert_eq!(c.xff, "10.0.0.1");
    }

    #[test]
    fn forwarded_follows_the_host_of_each_request() {
        let c = ConnInfo::new("10.0.0.1:5000".parse().expect("addr"), false);
        let a = HeaderValue::from_static("a.example");
        let b = HeaderValue::from_static("b.example");
        for (h, want) in [
            (&a, "for=10.0.0.1;proto=http;host=\"a.example\""),
            (&a, "for=10.0.0.1;proto=http;host=\"a.example\""),
            (&b, "for=10.0.0.1;proto=http;host=\"b.example\""),
            (&a, "for=10.0.0.1;proto=http;host=\"a.example\""),
        ] {
            let got = c.forwarded_for(h.to_str().expect("ascii"));
            assert_eq!(got.as_ref().and_then(|v| v.to_str().ok()), Some(want));
        }
    }

    #[test]
    fn upgrade_needs_both_headers_on_http11() {
        let req = Request::builder()
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .expect("request");
        assert!(is_upgrade(&req));
        let req = Request::builder()
            .header("upgrade", "websocket")
            .body(())
            .expect("request");
        assert!(!is_upgrade(&req));
    }
}
