//! Probes against real servers inside a test network namespace.

use std::convert::Infallible;
use std::path::Path;

use bytes::Bytes;
use k8s_openapi::api::core::v1::{ExecAction, HTTPGetAction, TCPSocketAction};

use super::*;
use crate::testutil::NetnsGuard;

/// An HTTPS server (self-signed) inside `netns` on 127.0.0.1: `/ok` is 200, the rest 500.
fn https_server(netns: &Path) -> u16 {
    let listener =
        crate::network::in_netns(netns, || std::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["my-service.default.svc".into()]).unwrap();
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![key.cert.der().clone()], der)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let code = if req.uri().path() == "/ok" { 200 } else { 500 };
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(code)
                                .body(Empty::<Bytes>::new())
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    port
}

fn target(netns: &NetnsGuard) -> Target {
    Target {
        netns: Path::new("/run/netns").join(&netns.name),
        pod_ip: Ipv4Addr::LOCALHOST,
        shim_pid: i32::try_from(std::process::id()).unwrap(),
    }
}

/// An httpGet probe on the container's port named `web`.
fn http(scheme: &str, path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            scheme: Some(scheme.into()),
            port: IntOrString::String("web".into()),
            path: Some(path.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container(port: u16) -> Container {
    Container {
        name: "app".into(),
        ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
            name: Some("web".into()),
            container_port: i32::from(port),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

#[tokio::test]
async fn https_probes_skip_verification_and_judge_by_status() {
    let netns = NetnsGuard::new("wpr");
    let port = https_server(&Path::new("/run/netns").join(&netns.name));
    let c = container(port);
    check(&http("HTTPS", "/ok"), &c, &target(&netns))
        .await
        .unwrap();
    let err = check(&http("HTTPS", "/bad"), &c, &target(&netns))
        .await
        .unwrap_err();
    assert_eq!(err, "HTTP probe failed with statuscode: 500");
    // Plain HTTP against a TLS port fails, and says what it tried.
    let err = check(&http("HTTP", "/ok"), &c, &target(&netns))
        .await
        .unwrap_err();
    assert!(
        err.starts_with(&format!("Get \"http://127.0.0.1:{port}/ok\"")),
        "{err}"
    );
}

#[tokio::test]
async fn tcp_and_exec_probes() {
    let netns = NetnsGuard::new("wpr");
    let port = https_server(&Path::new("/run/netns").join(&netns.name));
    let tcp = |port: u16| Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(i32::from(port)),
            host: None,
        }),
        ..Default::default()
    };
    check(&tcp(port), &container(port), &target(&netns))
        .await
        .unwrap();
    // The node's namespace has no listener on that port: the probe really runs in the pod's.
    let err = check(&tcp(1), &container(port), &target(&netns))
        .await
        .unwrap_err();
    assert!(err.starts_with("dial tcp 127.0.0.1:1:"), "{err}");
    let exec = |argv: &[&str]| Probe {
        exec: Some(ExecAction {
            command: Some(argv.iter().map(|s| s.to_string()).collect()),
        }),
        ..Default::default()
    };
    check(&exec(&["true"]), &container(port), &target(&netns))
        .await
        .unwrap();
    let err = check(
        &exec(&["sh", "-c", "echo sick; exit 3"]),
        &container(port),
        &target(&netns),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err,
        "command [\"sh\", \"-c\", \"echo sick; exit 3\"] exited with 3: sick"
    );
    let unnamed = Probe {
        http_get: Some(HTTPGetAction {
            port: IntOrString::String("nope".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = check(&unnamed, &container(port), &target(&netns))
        .await
        .unwrap_err();
    assert_eq!(err, "port \"nope\" is not a named port of container app");
}
