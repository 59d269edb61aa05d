//! The proxy's one error type, modelled on Pingora's: what went wrong (kind), on which side of
//! the proxy (upstream, downstream, internal), and whether another endpoint may be tried.
//! Responses, metrics and the access log all read these fields rather than parsing messages.

use std::fmt;

use http::StatusCode;

/// Which side of the proxy caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The backend endpoint: refused, reset, timed out or spoke bad HTTP.
    Upstream,
    /// The client: bad request, oversized body, or it went away.
    Downstream,
    /// The proxy itself: no route or no endpoints configured.
    Internal,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Upstream => "upstream",
            Side::Downstream => "downstream",
            Side::Internal => "internal",
        }
    }
}

/// What went wrong; each kind maps to exactly one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No Ingress rule and no default backend match the host and path (404).
    NoRoute,
    /// The matched Service has no ready endpoint (503).
    NoEndpoints,
    /// TCP connect to the endpoint failed or timed out (502).
    ConnectFailed,
    /// The endpoint did not answer within the route's read timeout (504).
    UpstreamTimeout,
    /// The endpoint reset the connection or sent an invalid response (502).
    UpstreamFailed,
    /// The request body is larger than the configured limit (413).
    BodyTooLarge,
    /// The request cannot be forwarded as sent (400).
    BadRequest,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::NoEndpoints => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ConnectFailed | ErrorKind::UpstreamFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        }
    }

    pub fn side(self) -> Side {
        match self {
            ErrorKind::NoRoute | ErrorKind::NoEndpoints => Side::Internal,
            ErrorKind::ConnectFailed | ErrorKind::UpstreamTimeout | ErrorKind::UpstreamFailed => {
                Side::Upstream
            }
            ErrorKind::BodyTooLarge | ErrorKind::BadRequest => Side::Downstream,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no route",
            ErrorKind::NoEndpoints => "no ready endpoints",
            ErrorKind::ConnectFailed => "connect failed",
            ErrorKind::UpstreamTimeout => "upstream timed out",
            ErrorKind::UpstreamFailed => "upstream failed",
            ErrorKind::BodyTooLarge => "request body too large",
            ErrorKind::BadRequest => "bad request",
        }
    }
}

/// A failed proxied request.
#[derive(Debug, thiserror::Error)]
pub struct ProxyError {
    pub kind: ErrorKind,
    /// Whether the request may be sent to another endpoint: only when nothing reached the
    /// upstream application that could have had an effect.
    pub retryable: bool,
    /// What the proxy was doing, e.g. the host and path or the endpoint address.
    pub context: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProxyError {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        ProxyError {
            kind,
            retryable: false,
            context: context.into(),
            source: None,
        }
    }

    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    pub fn side(&self) -> Side {
        self.kind.side()
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.kind.as_str(),
            self.side().as_str(),
            self.context
        )?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}
