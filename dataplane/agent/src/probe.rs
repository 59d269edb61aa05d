//! Startup, readiness and liveness probes of one running container: httpGet and tcpSocket
//! connect from inside the pod's network namespace (the agent process may run outside the
//! namespace that holds the pod network, as in tests, and a probe must see what the pod's
//! own processes see); exec runs in the container's namespaces through util-linux
//! `nsenter`. HTTPS probes skip certificate verification, as the kubelet's do. Period,
//! timeout, initial delay and success/failure thresholds follow the Kubernetes defaults.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Where a container's probes run.
#[derive(Debug, Clone)]
pub struct Target {
    pub netns: PathBuf,
    pub pod_ip: Ipv4Addr,
    /// The container's shim: it lives in the container's network, mount and UTS namespaces.
    pub shim_pid: i32,
}

/// What the probes of a container tell its pod worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The startup probe succeeded (or there is none): the container counts as started.
    Started,
    /// Readiness changed.
    Ready(bool),
    /// The startup or liveness probe reached its failure threshold: restart the container.
    Failed { message: String },
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(u64::try_from(v.unwrap_or(default).max(0)).unwrap_or(0))
}

struct Settings {
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success: u32,
    failure: u32,
}

impl Settings {
    fn of(p: &Probe) -> Self {
        let count = |v: Option<i32>, d: u32| {
            v.and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v > 0)
                .unwrap_or(d)
        };
        Self {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            success: count(p.success_threshold, 1),
            failure: count(p.failure_threshold, 3),
        }
    }
}

fn port(value: &IntOrString, container: &Container) -> Result<u16, String> {
    match value {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| {
                    format!(
                        "port {name:?} is not a named port of container {}",
                        container.name
                    )
                })
        }
    }
}

/// Runs a probe once: `Ok` on success, `Err(message)` with the reason it failed.
pub async fn check(probe: &Probe, container: &Container, target: &Target) -> Result<(), String> {
    let timeout = Settings::of(probe).timeout;
    let attempt = async {
        if let Some(http) = &probe.http_get {
            let https = http
                .scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
            let host: IpAddr = match http.host.as_deref() {
                Some(h) if !h.is_empty() => {
                    h.parse().map_err(|_| format!("invalid probe host {h:?}"))?
                }
                _ => IpAddr::V4(target.pod_ip),
            };
            let port = port(&http.port, container)?;
            let path = http.path.as_deref().unwrap_or("/");
            let url = format!(
                "{}://{host}:{port}{path}",
                if https { "https" } else { "http" }
            );
            let stream =
                crate::network::connect_in(&target.netns, SocketAddr::new(host, port), timeout)
                    .await
                    .map_err(|e| format!("Get \"{url}\": dial tcp {host}:{port}: {e}"))?;
            let mut sender = if https {
                let name = rustls::pki_types::ServerName::IpAddress(host.into());
                let tls = tokio_rustls::TlsConnector::from(insecure_tls())
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("Get \"{url}\": tls: {e}"))?;
                handshake(tls).await
            } else {
                handshake(stream).await
            }
            .map_err(|e| format!("Get \"{url}\": {e}"))?;
            let mut req = hyper::Request::get(path)
                .header(hyper::header::HOST, format!("{host}:{port}"))
                .header(hyper::header::USER_AGENT, "kube-probe/1.33");
            for h in http.http_headers.iter().flatten() {
                req = req.header(h.name.as_str(), h.value.as_str());
            }
            let req = req
                .body(Empty::<bytes::Bytes>::new())
                .map_err(|e| format!("Get \"{url}\": {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("Get \"{url}\": {e}"))?;
            let code = resp.status().as_u16();
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            let host: IpAddr = match tcp.host.as_deref() {
                Some(h) if !h.is_empty() => {
                    h.parse().map_err(|_| format!("invalid probe host {h:?}"))?
                }
                _ => IpAddr::V4(target.pod_ip),
            };
            let port = port(&tcp.port, container)?;
            crate::network::connect_in(&target.netns, SocketAddr::new(host, port), timeout)
                .await
                .map(drop)
                .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
        } else if let Some(exec) = &probe.exec {
            let argv = exec.command.clone().unwrap_or_default();
            if argv.is_empty() {
                return Err("exec probe has no command".into());
            }
            let out = tokio::process::Command::new("nsenter")
                .arg("--target")
                .arg(target.shim_pid.to_string())
                .args(["--net", "--mount", "--uts", "--"])
                .args(&argv)
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| format!("exec {argv:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                let output =
                    String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
                Err(format!(
                    "command {argv:?} exited with {}: {}",
                    out.status.code().unwrap_or(-1),
                    output.trim()
                ))
            }
        } else {
            Err("probe has no handler (httpGet, tcpSocket or exec)".into())
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("probe timed out after {}s", timeout.as_secs())),
    }
}

/// An HTTP/1.1 connection over `io`, driven in the background.
async fn handshake<T>(
    io: T,
) -> hyper::Result<hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// TLS for HTTPS probes. Like the kubelet's, they do not verify the server's certificate
/// (pods serve certificates for their service names, not for the pod IP the probe dials);
/// handshake signatures are still checked.
fn insecure_tls() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(rustls::ALL_VERSIONS)
                .map(|b| {
                    b.dangerous()
                        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                        .with_no_client_auth()
                });
            // Only fails for a provider without the protocol versions ring always has.
            Arc::new(config.unwrap_or_else(|_| {
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            }))
        })
        .clone()
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Counts consecutive results against a probe's thresholds.
struct Counter {
    settings: Settings,
    successes: u32,
    failures: u32,
}

impl Counter {
    fn new(p: &Probe) -> Self {
        Self {
            settings: Settings::of(p),
            successes: 0,
            failures: 0,
        }
    }

    /// `Some(true)` when the success threshold is reached, `Some(false)` at the failure one.
    fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes += 1;
            (self.successes >= self.settings.success).then_some(true)
        } else {
            self.successes = 0;
            self.failures += 1;
            (self.failures >= self.settings.failure).then_some(false)
        }
    }

    fn interval(&self) -> tokio::time::Interval {
        let mut interval = tokio::time::interval_at(
            tokio::time::Instant::now() + self.settings.initial_delay,
            self.settings.period,
        );
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    }
}

/// Runs all probes of a container until it fails one fatally (or the task is aborted when
/// the container ends), reporting through `report`.
pub async fn supervise(container: Container, target: Target, report: impl Fn(Event) + Send + Sync) {
    if let Some(p) = &container.startup_probe {
        let mut counter = Counter::new(p);
        let mut interval = counter.interval();
        loop {
            interval.tick().await;
            let result = check(p, &container, &target).await;
            let failure = result.as_ref().err().cloned();
            match counter.record(result.is_ok()) {
                Some(true) => break,
                Some(false) => {
                    let message = failure.unwrap_or_default();
                    return report(Event::Failed {
                        message: format!("Startup probe failed: {message}"),
                    });
                }
                None => {}
            }
        }
    }
    report(Event::Started);
    let readiness = async {
        let Some(p) = &container.readiness_probe else {
            report(Event::Ready(true));
            return futures::future::pending().await;
        };
        let mut counter = Counter::new(p);
        let mut interval = counter.interval();
        let mut ready = false;
        loop {
            interval.tick().await;
            let ok = check(p, &container, &target).await.is_ok();
            if let Some(now) = counter.record(ok)
                && now != ready
            {
                ready = now;
                report(Event::Ready(ready));
            }
        }
    };
    let liveness = async {
        let Some(p) = &container.liveness_probe else {
            return futures::future::pending().await;
        };
        let mut counter = Counter::new(p);
        let mut interval = counter.interval();
        loop {
            interval.tick().await;
            let result = check(p, &container, &target).await;
            if let (Some(false), Err(message)) = (counter.record(result.is_ok()), result) {
                return report(Event::Failed {
                    message: format!("Liveness probe failed: {message}"),
                });
            }
        }
    };
    tokio::select! {
        () = readiness => {}
        () = liveness => {}
    }
}

#[cfg(test)]
mod tests;
