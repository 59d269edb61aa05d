use std::io::Write;

use http_body_util::BodyExt;

use super::*;

#[test]
fn tail_offsets_count_lines_from_the_end() {
    let data = b"a\nb\nc\n";
    assert_eq!(&data[tail_offset(data, 2)..], b"b\nc\n");
    assert_eq!(&data[tail_offset(data, 9)..], data);
    assert_eq!(tail_offset(data, 0), data.len());
    assert_eq!(&b"a\nb"[tail_offset(b"a\nb", 1)..], b"b");
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "agent")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let code = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn serves_current_previous_tail_and_follow() {
    let state = tempfile::tempdir().unwrap();
    let pod = state.path().join("pods").join("uid-1");
    std::fs::create_dir_all(pod.join("app")).unwrap();
    let meta = PodMeta {
        namespace: "ns".into(),
        name: "web".into(),
        uid: "uid-1".into(),
    };
    std::fs::write(pod.join("pod.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
    std::fs::write(pod.join("app/0.log"), "first run\n").unwrap();
    std::fs::write(pod.join("app/0.exit"), "exit 1\n").unwrap();
    std::fs::write(pod.join("app/1.log"), "one\ntwo\nthree\n").unwrap();
    std::fs::write(pod.join("app/1.exit"), "").unwrap();

    let server = LogServer::bind("127.0.0.1:0".parse().unwrap(), state.path())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(shutdown.clone()));

    assert_eq!(
        get(addr, "/containerLogs/ns/web/app").await,
        (200, "one\ntwo\nthree\n".into())
    );
    assert_eq!(
        get(addr, "/containerLogs/ns/web/app?tailLines=1").await.1,
        "three\n"
    );
    assert_eq!(
        get(addr, "/containerLogs/ns/web/app?previous=true").await.1,
        "first run\n"
    );
    assert_eq!(
        get(addr, "/containerLogs/ns/web/app?limitBytes=3").await.1,
        "one"
    );
    let (code, msg) = get(addr, "/containerLogs/ns/other/app").await;
    assert_eq!(
        (code, msg.as_str()),
        (404, "pod ns/other is not running on this node")
    );
    assert_eq!(get(addr, "/containerLogs/ns/web/nope").await.0, 400);

    // Follow: output written later arrives; the stream ends when the run's exit is recorded.
    // Each step waits for the stream to show the previous one, so the test never depends
    // on when the server opens the file relative to the writes.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/containerLogs/ns/web/app?follow=true&tailLines=1")
        .header("host", "agent")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    let mut read_until = async |want: &str| {
        while !seen.ends_with(want) {
            let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
                .await
                .unwrap_or_else(|_| panic!("{want:?} never arrived; got {seen:?}"));
            match frame {
                Some(frame) => {
                    if let Ok(data) = frame.unwrap().into_data() {
                        seen.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                None => return false,
            }
        }
        true
    };
    assert!(read_until("three\n").await, "the last line first");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(pod.join("app/1.log"))
        .unwrap();
    f.write_all(b"four\n").unwrap();
    assert!(read_until("three\nfour\n").await, "the new line follows");
    std::fs::write(pod.join("app/1.exit"), "exit 0\n").unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .expect("the stream ends once the exit is recorded");
    assert!(end.is_none(), "nothing after the exit: {end:?}");
    shutdown.cancel();
}
