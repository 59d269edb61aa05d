//! h2 requests that hyper parsed, forwarded over the fast path's plain upstream sockets
//! ([`crate::pool::Upstream`]) instead of through hyper's HTTP/1.1 client: no task or
//! channel per upstream connection, and the head, serialized once, serves every retry.
//! The response head is parsed by the fast path's parser (`h1::exchange`) into an
//! [`http::Response`], and [`RawBody`] decodes the body from its HTTP/1.1 framing
//! (length, chunked with trailers, or until close) into h2 DATA frames.
//!
//! [`crate::proxy`] sends h2 requests to HTTP/1.1 backends this way when they have no body,
//! or a small one with a `Content-Length` that arrived with the request (as the HTTP/1.1
//! fast path takes them); other bodies, and CONNECT, stay with hyper's client.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures::FutureExt;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Response};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::balance::InFlight;
use crate::h1::{self, Framing, MAX_RESPONSE_HEAD, MAX_RESPONSE_HEADERS, READ_SIZE, RespHead};
use crate::pool::{Pooled, Upstream};
use crate::proxy::strip_hop_by_hop;

/// Largest request body sent this way, as on the HTTP/1.1 fast path; it must have arrived
/// whole with the request.
pub(crate) const MAX_BODY: usize = h1::MAX_FAST_BODY;

/// Take the frames of `body` that have already arrived into `out`, without waiting;
/// whether they are all of it.
pub(crate) fn received(
    body: &mut Incoming,
    out: &mut VecDeque<Result<Frame<Bytes>, hyper::Error>>,
) -> bool {
    loop {
        match body.frame().now_or_never() {
            Some(Some(frame)) => {
                let failed = frame.is_err();
                out.push_back(frame);
                if failed {
                    return false;
                }
            }
            Some(None) => return true,
            None => return false,
        }
    }
}

/// Bytes of data in `frames`.
pub(crate) fn data_len(frames: &VecDeque<Result<Frame<Bytes>, hyper::Error>>) -> usize {
    frames
        .iter()
        .filter_map(|f| f.as_ref().ok()?.data_ref())
        .map(Bytes::len)
        .sum()
}

/// The HTTP/1.1 request for `path` with `headers` (already rewritten for the upstream)
/// and the data of `body`, a whole body of the length its `Content-Length` gives; `None`
/// if `body` holds anything but data. Without a body there is no framing header to add,
/// as hyper's client adds none.
pub(crate) fn request(
    method: &Method,
    path: &PathAndQuery,
    headers: &HeaderMap,
    body: &VecDeque<Result<Frame<Bytes>, hyper::Error>>,
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(1024);
    // `Display` puts the `/` of the origin form (RFC 9112 §3.2.1) before a `:path` that
    // lacks one (`?a=1`), as hyper's client does.
    let _ = write!(out, "{method} {path} HTTP/1.1\r\n");
    for (name, value) in headers {
        h1::put_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    for frame in body {
        out.extend_from_slice(frame.as_ref().ok()?.data_ref()?);
    }
    Some(out)
}

/// Why an upstream response body broke off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream response body: {0}")]
    Framing(&'static str),
    #[error("upstream closed the connection mid-response")]
    Closed,
    #[error("upstream response body: {0}")]
    Io(#[from] io::Error),
}

/// An upstream response body read straight from its pooled socket. It holds the
/// endpoint's outstanding count until dropped, and gives the connection back to the pool
/// then if the body was read to its end and the endpoint keeps the connection open;
/// otherwise the connection is closed, as HTTP/1.1 cannot abandon a response half-read.
pub struct RawBody {
    /// `None` once the connection broke or the body ran until close.
    up: Option<Pooled<Upstream>>,
    body: h1::Body,
    /// The endpoint closes the connection after this response.
    close: bool,
    _inflight: InFlight,
}

impl RawBody {
    /// The response whose head [`h1::exchange`] parsed into `head` and `resp`.
    pub(crate) fn response(
        mut up: Pooled<Upstream>,
        resp: RespHead,
        head: Response<()>,
        inflight: InFlight,
    ) -> Response<RawBody> {
        up.conn.buf.advance(resp.len);
        head.map(|()| RawBody {
            up: Some(up),
            body: h1::Body::new(resp.body),
            close: resp.close,
            _inflight: inflight,
        })
    }

    /// Decode what the buffer holds: a frame, `Ok(None)` if more bytes are needed.
    fn decode(&mut self) -> Result<Option<Frame<Bytes>>, BodyError> {
        let Some(up) = self.up.as_mut() else {
            return Ok(None);
        };
        let buf = &mut up.conn.buf;
        while !buf.is_empty() && !self.body.done() {
            let (skip, n) = match self.body.framing {
                Framing::Chunked if self.body.chunks.at_trailers() => {
                    return trailers(buf, &mut self.body.chunks);
                }
                Framing::Chunked => self.body.chunks.payload(buf).map_err(BodyError::Framing)?,
                _ => (0, self.body.take(buf).map_err(BodyError::Framing)?),
            };
            buf.advance(skip);
            if n > 0 {
                return Ok(Some(Frame::data(buf.split_to(n).freeze())));
            }
        }
        Ok(None)
    }
}

/// Parse the trailer section at the start of `buf` once it is whole; an empty one ends
/// the body without a frame.
fn trailers(
    buf: &mut bytes::BytesMut,
    chunks: &mut h1::Chunked,
) -> Result<Option<Frame<Bytes>>, BodyError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let (len, map) = match httparse::parse_headers(buf, &mut headers) {
        // httparse takes bare LF line endings, which the fast path's chunk parser refuses:
        // both paths must agree where a response ends on a connection that is reused.
        Ok(httparse::Status::Complete((len, _)))
            if (0..len).any(|i| buf[i] == b'\n' && (i == 0 || buf[i - 1] != b'\r')) =>
        {
            return Err(BodyError::Framing("bare LF in trailer"));
        }
        Ok(httparse::Status::Complete((len, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields.iter() {
                let name = HeaderName::from_bytes(f.name.as_bytes());
                let value = HeaderValue::from_bytes(f.value);
                let (Ok(name), Ok(value)) = (name, value) else {
                    return Err(BodyError::Framing("malformed trailer field"));
                };
                map.append(name, value);
            }
            (len, map)
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        _ => return Err(BodyError::Framing("malformed trailer section")),
    };
    buf.advance(len);
    chunks.trailers_read();
    let mut map = map;
    strip_hop_by_hop(&mut map);
    Ok((!map.is_empty()).then(|| Frame::trailers(map)))
}

impl http_body::Body for RawBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            match this.decode() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if this.body.done() {
                return Poll::Ready(None);
            }
            let Some(up) = this.up.as_mut() else {
                return Poll::Ready(None);
            };
            let u = &mut up.conn;
            u.buf.reserve(READ_SIZE);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut u.stream),
                cx,
                &mut u.buf
            ));
            match read {
                Ok(0) => {
                    this.up = None;
                    if this.body.framing == Framing::Close {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(BodyError::Closed)));
                }
                Ok(_) => {}
                Err(e) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.up.is_none() || self.body.done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.body.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(_) => SizeHint::with_exact(self.body.left()),
            Framing::Chunked | Framing::Close => SizeHint::default(),
        }
    }
}

impl Drop for RawBody {
    fn drop(&mut self) {
        // Bytes past the response would be a reply to nothing: the connection is not reused.
        if let Some(up) = self.up.take()
            && self.body.done()
            && !self.close
            && up.conn.buf.is_empty()
        {
            up.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::balance::Endpoint;
    use crate::pool::{Pool, PoolConfig};

    #[test]
    fn a_request_head_is_the_method_origin_form_target_and_every_header_value() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("a.example"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let path = PathAndQuery::from_static("/p?q=1");
        let out = request(&Method::DELETE, &path, &headers, &VecDeque::new()).expect("request");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "DELETE /p?q=1 HTTP/1.1\r\nhost: a.example\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        let query_only = PathAndQuery::from_static("?a=1");
        let out = request(
            &Method::GET,
            &query_only,
            &HeaderMap::new(),
            &VecDeque::new(),
        );
        assert_eq!(
            String::from_utf8_lossy(&out.expect("request")),
            "GET /?a=1 HTTP/1.1\r\n\r\n"
        );
        let body = VecDeque::from([
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"c"))),
        ]);
        let out = request(&Method::PUT, &path, &HeaderMap::new(), &body).expect("request");
        assert_eq!(
            String::from_utf8_lossy(&out),
            "PUT /p?q=1 HTTP/1.1\r\n\r\nabc"
        );
        let trailers = VecDeque::from([Ok(Frame::trailers(HeaderMap::new()))]);
        assert!(request(&Method::PUT, &path, &HeaderMap::new(), &trailers).is_none());
    }

    /// `bytes` written by an endpoint one byte at a time, read back through a [`RawBody`]:
    /// its data, its trailers, and the pool's idle count once the body is dropped.
    async fn through(bytes: &'static [u8]) -> (Result<(Bytes, Option<HeaderMap>), String>, usize) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let pool = Pool::<Upstream>::new(PoolConfig::default());
        let (up, accepted) = tokio::join!(pool.connect(addr), listener.accept());
        let (mut up, (mut endpoint, _)) = (up.expect("connect"), accepted.expect("accept"));
        let writer = tokio::spawn(async move {
            for b in bytes {
                endpoint
                    .write_all(std::slice::from_ref(b))
                    .await
                    .expect("write");
                endpoint.flush().await.expect("flush");
                tokio::task::yield_now().await;
            }
            // Held open: the body must end by its framing, not by the close.
            endpoint
        });
        let mut head = Response::new(());
        let resp = h1::read_head(&mut up.conn, false, &mut head)
            .await
            .expect("head");
        let inflight = InFlight::new(Arc::new(Endpoint::new(addr)));
        let body = RawBody::response(up, resp, head, inflight).into_body();
        let got = body
            .collect()
            .await
            .map(|c| (c.trailers().cloned(), c.to_bytes()))
            .map(|(t, b)| (b, t))
            .map_err(|e| e.to_string());
        drop(writer.await);
        (got, pool.idle_count())
    }

    #[tokio::test]
    async fn a_chunked_body_is_decoded_with_its_trailers_and_its_connection_pooled() {
        let (got, idle) = through(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext\r\nhello\r\n1\r\n!\r\n0\r\nx-sum: 7\r\nconnection: x\r\n\r\n",
        )
        .await;
        let (data, trailers) = got.expect("body");
        assert_eq!(&data[..], b"hello!");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["x-sum"], "7");
        assert!(!trailers.contains_key("connection"), "{trailers:?}");
        assert_eq!(idle, 1);
    }

    #[tokio::test]
    async fn a_length_body_ends_at_its_length_and_malformed_chunks_are_an_error() {
        let (got, idle) = through(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc").await;
        assert_eq!(got.expect("body"), (Bytes::from_static(b"abc"), None));
        assert_eq!(idle, 1);
        let (got, idle) =
            through(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel\r\nlo\r\n")
                .await;
        assert!(got.is_err(), "{got:?}");
        assert_eq!(idle, 0, "a broken body's connection is closed");
    }

    #[tokio::test]
    async fn a_trailer_section_with_bare_lf_line_endings_is_an_error_as_on_the_fast_path() {
        let (got, idle) = through(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-a: 1\n\n",
        )
        .await;
        assert!(got.is_err(), "{got:?}");
        assert_eq!(idle, 0, "the connection is not reused");
    }
}
