//! The agent's HTTP endpoint for container logs, shaped like the kubelet's
//! (`GET /containerLogs/{namespace}/{pod}/{container}?follow&tailLines&previous&limitBytes`)
//! so the API server can proxy `pods/log` to it. Follow mode streams until the container
//! run ends. The endpoint has no authentication of its own: bind it to an address only the
//! API server reaches.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::sync::CancellationToken;

use crate::pod::{PodMeta, run_files};

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogParams {
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub previous: bool,
    pub tail_lines: Option<u64>,
    pub limit_bytes: Option<u64>,
}

struct Ctx {
    pods_dir: PathBuf,
}

fn error(code: StatusCode, message: String) -> Response {
    (code, message).into_response()
}

/// The pod directory of `namespace/name`, if the pod lives on this node.
fn find_pod(pods_dir: &Path, namespace: &str, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(pods_dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|dir| PodMeta::load(dir).is_some_and(|m| m.namespace == namespace && m.name == name))
}

/// Run numbers with a log file, ascending.
fn runs(pod_dir: &Path, container: &str) -> Vec<u32> {
    let mut runs: Vec<u32> = std::fs::read_dir(pod_dir.join(container))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    runs.sort_unstable();
    runs
}

/// Byte offset where the last `n` lines of `data` start.
fn tail_offset(data: &[u8], n: u64) -> usize {
    if n == 0 {
        return data.len();
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

async fn container_logs(
    State(ctx): State<Arc<Ctx>>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    Query(params): Query<LogParams>,
) -> Response {
    let Some(dir) = find_pod(&ctx.pods_dir, &namespace, &pod) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{pod} is not running on this node"),
        );
    };
    let runs = runs(&dir, &container);
    let Some(&current) = runs.last() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "container \"{container}\" in pod \"{pod}\" is waiting to start or is not valid for this pod"
            ),
        );
    };
    let run = if params.previous {
        match runs.iter().rev().nth(1) {
            Some(&n) => n,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "previous terminated container \"{container}\" in pod \"{pod}\" not found"
                    ),
                );
            }
        }
    } else {
        current
    };
    let (log, exit) = run_files(&dir, &container, run);
    let mut file = match tokio::fs::File::open(&log).await {
        Ok(f) => f,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", log.display()),
            );
        }
    };
    let mut start = 0u64;
    if let Some(n) = params.tail_lines {
        let mut data = Vec::new();
        if let Err(e) = file.read_to_end(&mut data).await {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", log.display()),
            );
        }
        start = tail_offset(&data, n) as u64;
    }
    if let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}: {e}", log.display()),
        );
    }
    let follow = params.follow && !params.previous;
    let limit = params.limit_bytes.unwrap_or(u64::MAX);
    let state = (file, exit, dir, limit, follow);
    let stream = futures::stream::unfold(Some(state), |state| async move {
        let (mut file, exit, dir, limit, follow) = state?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if limit == 0 {
                return None;
            }
            let want = usize::try_from(limit.min(buf.len() as u64)).unwrap_or(buf.len());
            match file.read(&mut buf[..want]).await {
                Ok(0) => {
                    // The run has ended (its exit is recorded) or the pod is gone: no more
                    // output will come. Read once more to catch what it wrote last.
                    let ended =
                        !dir.exists() || std::fs::metadata(&exit).is_ok_and(|m| m.len() > 0);
                    if !follow {
                        return None;
                    }
                    if ended {
                        let n = file.read(&mut buf[..want]).await.unwrap_or(0);
                        if n == 0 {
                            return None;
                        }
                        buf.truncate(n);
                        return Some((Ok(Bytes::from(buf)), None));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(n) => {
                    buf.truncate(n);
                    let state = (file, exit, dir, limit - n as u64, follow);
                    return Some((Ok::<_, std::io::Error>(Bytes::from(buf)), Some(state)));
                }
                Err(e) => return Some((Err(e), None)),
            }
        }
    });
    Response::builder()
        .header("content-type", "text/plain")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The log endpoint, bound and ready to serve.
pub struct LogServer {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl LogServer {
    pub async fn bind(addr: SocketAddr, state_dir: &Path) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let ctx = Arc::new(Ctx {
            pods_dir: state_dir.join("pods"),
        });
        let router = Router::new()
            .route(
                "/containerLogs/{namespace}/{pod}/{container}",
                get(container_logs),
            )
            .route("/healthz", get(|| async { "ok" }))
            .with_state(ctx);
        Ok(Self { listener, router })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }
}

#[cfg(test)]
mod tests;
