//! The API server over real HTTPS, through kube-rs (the client the rest of weir uses),
//! against the embedded store and a real etcd: bad input, conflicts, nothing
//! half-written, allocation, subresources, deletion, list/watch, and etcd outages.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use http_body_util::BodyExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Service};
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};
use weir_apiserver::{Config, Server, ServiceCidr, kubeconfig};
use weir_store::{EmbeddedStore, EtcdProcess, EtcdStore, Store};

struct Running {
    url: String,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    client: kube::Client,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

async fn start_with(store: Arc<dyn Store>, cidr: &str) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(dir.path().to_path_buf(), store);
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.service_cidr = cidr.parse::<ServiceCidr>().expect("cidr");
    let server = Server::bind(config).await.expect("bind");
    let url = server.url();
    let path = dir.path().join("kubeconfig");
    kubeconfig::write(
        &path,
        &kubeconfig::Entry {
            name: "weir",
            user: "admin",
            server: &url,
            ca_pem: &server.pki().ca_pem,
            token: &server.pki().admin_token,
        },
    )
    .expect("kubeconfig");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
    });
    let client = client_from(&path, |_| {}).await;
    // The initial namespaces appear shortly after start.
    let ns: Api<Namespace> = Api::all(client.clone());
    for _ in 0..100 {
        if ns.get_opt("default").await.ok().flatten().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Running {
        url,
        dir,
        stop: Some(tx),
        task,
        client,
    }
}

async fn client_from(
    path: &std::path::Path,
    tweak: impl FnOnce(&mut kube::Config),
) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(path).expect("read kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    tweak(&mut config);
    kube::Client::try_from(config).expect("client")
}

async fn embedded() -> (Running, tempfile::TempDir) {
    let sdir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(sdir.path().join("store.redb")).expect("store");
    (start_with(Arc::new(store), "10.96.0.0/12").await, sdir)
}

async fn on_etcd() -> (Running, EtcdProcess) {
    let etcd = EtcdProcess::start().await.expect("etcd");
    let store = EtcdStore::connect(&[etcd.client_url()])
        .await
        .expect("connect");
    (start_with(Arc::new(store), "10.96.0.0/12").await, etcd)
}

/// A raw request: (status code, body as JSON).
async fn raw(
    c: &kube::Client,
    method: &str,
    path: &str,
    ctype: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", ctype)
        .body(kube::client::Body::from(body))
        .expect("request");
    let resp = c.send(req).await.expect("send");
    let code = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}})).expect("cm")
}

fn svc(name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("svc")
}

fn api_status(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.message),
        other => panic!("not an API error: {other}"),
    }
}

async fn bad_input_is_refused(r: &Running) {
    let c = &r.client;
    let path = "/api/v1/namespaces/default/configmaps";
    let (code, body) = raw(
        c,
        "POST",
        path,
        "application/json",
        b"{\"metadata\": {\"name\": \n".to_vec(),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("line 2")),
        "{body}"
    );
    let (code, body) = raw(
        c,
        "POST",
        path,
        "application/yaml",
        b"metadata:\n  name: [a\n".to_vec(),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("line")),
        "{body}"
    );

    let (code, body) = raw(
        c,
        "GET",
        "/api/v1/namespaces/default/widgets",
        "application/json",
        vec![],
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (404, Some("NotFound")));
    let (code, _) = raw(
        c,
        "GET",
        "/apis/example.com/v1/things",
        "application/json",
        vec![],
    )
    .await;
    assert_eq!(code, 404);

    let big = json!({"metadata": {"name": "big"}, "data": {"k": "x".repeat(3 * 1024 * 1024 + 1)}});
    let (code, body) = raw(
        c,
        "POST",
        path,
        "application/json",
        serde_json::to_vec(&big).expect("json"),
    )
    .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (413, Some("RequestEntityTooLarge"))
    );

    let wrong = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"},
        "spec": {"replicas": "three", "selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
    let (code, body) = raw(
        c,
        "POST",
        "/apis/apps/v1/namespaces/default/deployments",
        "application/json",
        serde_json::to_vec(&wrong).expect("json"),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.replicas")),
        "{body}"
    );

    for name in ["big", "w"] {
        let (code, _) = raw(
            c,
            "GET",
            &format!("{path}/{name}"),
            "application/json",
            vec![],
        )
        .await;
        assert_eq!(code, 404, "{name} must not be stored");
    }

    // Anonymous callers get a 401 Status; health probes stay open.
    let anonymous = client_from(&r.dir.path().join("kubeconfig"), |c| {
        c.auth_info.token = None
    })
    .await;
    let (code, body) = raw(
        &anonymous,
        "GET",
        "/api/v1/namespaces",
        "application/json",
        vec![],
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (401, Some("Unauthorized")));
    let (code, _) = raw(&anonymous, "GET", "/readyz", "application/json", vec![]).await;
    assert_eq!(code, 200);
}

async fn conflicts_and_atomicity(r: &Running) {
    let cms: Api<ConfigMap> = Api::namespaced(r.client.clone(), "default");
    let created = cms
        .create(&PostParams::default(), &cm("c1"))
        .await
        .expect("create");
    let (code, msg) = api_status(
        cms.create(&PostParams::default(), &cm("c1"))
            .await
            .expect_err("dup"),
    );
    assert_eq!(code, 409);
    assert_eq!(msg, "configmaps \"c1\" already exists");

    let mut first = created.clone();
    first.data = Some([("k".to_string(), "new".to_string())].into());
    cms.replace("c1", &PostParams::default(), &first)
        .await
        .expect("update");
    let (code, msg) = api_status(
        cms.replace("c1", &PostParams::default(), &created)
            .await
            .expect_err("stale"),
    );
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("the object has been modified"));
    assert_eq!(cms.get("c1").await.expect("get").data, first.data);

    // Missing namespace: 404, nothing stored.
    let missing: Api<ConfigMap> = Api::namespaced(r.client.clone(), "nope");
    let (code, msg) = api_status(
        missing
            .create(&PostParams::default(), &cm("x"))
            .await
            .expect_err("no ns"),
    );
    assert_eq!((code, msg.as_str()), (404, "namespaces \"nope\" not found"));

    // A Service whose second half fails (taken node port) keeps nothing it claimed.
    let svcs: Api<Service> = Api::namespaced(r.client.clone(), "default");
    svcs.create(
        &PostParams::default(),
        &svc(
            "np1",
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30111}]}),
        ),
    )
    .await
    .expect("np1");
    let clash = svc(
        "np2",
        json!({"type": "NodePort", "clusterIP": "10.96.0.77", "ports": [{"port": 80, "nodePort": 30111}]}),
    );
    let (code, msg) = api_status(
        svcs.create(&PostParams::default(), &clash)
            .await
            .expect_err("taken port"),
    );
    assert_eq!(code, 422);
    assert!(msg.contains("spec.ports[0].nodePort"), "{msg}");
    assert!(svcs.get_opt("np2").await.expect("get").is_none());
    let reuse = svc(
        "np3",
        json!({"clusterIP": "10.96.0.77", "ports": [{"port": 80}]}),
    );
    svcs.create(&PostParams::default(), &reuse)
        .await
        .expect("10.96.0.77 was released");
    let again = svc(
        "np4",
        json!({"clusterIP": "10.96.0.77", "ports": [{"port": 80}]}),
    );
    let (code, msg) = api_status(
        svcs.create(&PostParams::default(), &again)
            .await
            .expect_err("taken ip"),
    );
    assert_eq!(code, 422);
    assert!(
        msg.contains("spec.clusterIPs[0]") && msg.contains("already allocated"),
        "{msg}"
    );
    svcs.delete("np3", &DeleteParams::default())
        .await
        .expect("delete");
    svcs.create(&PostParams::default(), &again)
        .await
        .expect("released on delete");
}

async fn objects_behave_like_kubernetes(r: &Running) {
    let c = r.client.clone();
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    let mut g = cm("");
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let made = cms
        .create(&PostParams::default(), &g)
        .await
        .expect("generateName");
    let name = made.metadata.name.clone().expect("name");
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    assert!(made.metadata.uid.is_some() && made.metadata.creation_timestamp.is_some());

    let deploys: Api<Deployment> = Api::namespaced(c.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}))
        .expect("deploy");
    let d = deploys
        .create(&PostParams::default(), &d)
        .await
        .expect("create");
    assert_eq!(d.metadata.generation, Some(1));
    let labels = json!({"metadata": {"labels": {"x": "y"}}});
    let d = deploys
        .patch("web", &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .expect("label");
    assert_eq!(
        d.metadata.generation,
        Some(1),
        "metadata changes keep the generation"
    );
    let scale = deploys.get_scale("web").await.expect("scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(1));
    deploys
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .expect("scale up");
    let d = deploys.get("web").await.expect("get");
    assert_eq!(d.spec.and_then(|s| s.replicas), Some(4));
    assert_eq!(d.metadata.generation, Some(2));
    let status = json!({"status": {"replicas": 4, "readyReplicas": 2}});
    let d = deploys
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status");
    assert_eq!(d.status.and_then(|s| s.ready_replicas), Some(2));
    assert_eq!(d.metadata.generation, Some(2));
    // Go's JSON omits `replicas: 0`, so a Scale with an empty spec scales to zero.
    let mut zero = deploys.get_scale("web").await.expect("scale");
    zero.spec = Some(Default::default());
    deploys
        .replace_scale("web", &PostParams::default(), &zero)
        .await
        .expect("scale to zero");
    let d = deploys.get("web").await.expect("get");
    assert_eq!(d.spec.and_then(|s| s.replicas), Some(0));

    // Binding sets nodeName once.
    let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
    let pod: Pod = serde_json::from_value(
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
    )
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"}, "target": {"kind": "Node", "name": "n1"}});
    let path = "/api/v1/namespaces/default/pods/p/binding";
    let (code, _) = raw(
        &c,
        "POST",
        path,
        "application/json",
        serde_json::to_vec(&binding).expect("json"),
    )
    .await;
    assert_eq!(code, 201);
    let (code, body) = raw(
        &c,
        "POST",
        path,
        "application/json",
        serde_json::to_vec(&binding).expect("json"),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(
        pods.get("p")
            .await
            .expect("get")
            .spec
            .and_then(|s| s.node_name)
            .as_deref(),
        Some("n1")
    );
    // A bound pod is deleted gracefully: marked, left for its node.
    pods.delete("p", &DeleteParams::default())
        .await
        .expect("delete");
    let p = pods.get("p").await.expect("still there");
    assert!(p.metadata.deletion_timestamp.is_some());
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(30));
    // Its node keeps writing status while the containers stop; that must not end it.
    let stopping = json!({"status": {"phase": "Running", "message": "stopping"}});
    pods.patch_status("p", &PatchParams::default(), &Patch::Merge(&stopping))
        .await
        .expect("status during graceful termination");
    let p = pods.get("p").await.expect("a status write keeps it");
    assert_eq!(
        p.status.and_then(|s| s.message).as_deref(),
        Some("stopping")
    );
    pods.delete(
        "p",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("force");
    assert!(pods.get_opt("p").await.expect("get").is_none());

    // Finalizers hold an object until they are removed.
    let mut f = cm("fin");
    f.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &f)
        .await
        .expect("create");
    cms.delete("fin", &DeleteParams::default())
        .await
        .expect("delete");
    let held = cms.get("fin").await.expect("held");
    assert!(held.metadata.deletion_timestamp.is_some());
    let clear = json!({"metadata": {"finalizers": null}});
    cms.patch("fin", &PatchParams::default(), &Patch::Merge(&clear))
        .await
        .expect("clear");
    assert!(cms.get_opt("fin").await.expect("get").is_none());

    // Orphan and Foreground deletes leave the object to the garbage collector's finalizer.
    cms.create(&PostParams::default(), &cm("orphaned"))
        .await
        .expect("create");
    cms.delete("orphaned", &DeleteParams::orphan())
        .await
        .expect("delete");
    let o = cms.get("orphaned").await.expect("kept for the GC");
    assert!(o.metadata.deletion_timestamp.is_some());
    assert_eq!(o.metadata.finalizers, Some(vec!["orphan".to_string()]));

    // Namespace termination deletes the contents, then the namespace.
    let nss: Api<Namespace> = Api::all(c.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "doomed"}})).expect("ns");
    nss.create(&PostParams::default(), &ns).await.expect("ns");
    let inner: Api<ConfigMap> = Api::namespaced(c.clone(), "doomed");
    inner
        .create(&PostParams::default(), &cm("a"))
        .await
        .expect("cm");
    nss.delete("doomed", &DeleteParams::default())
        .await
        .expect("delete ns");
    let (code, _) = api_status(
        inner
            .create(&PostParams::default(), &cm("b"))
            .await
            .expect_err("terminating"),
    );
    assert!(code == 403 || code == 404, "{code}");
    for _ in 0..100 {
        if nss.get_opt("doomed").await.expect("get").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(nss.get_opt("doomed").await.expect("get").is_none());
    assert!(
        inner
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );
}

async fn lists_and_watches(r: &Running) {
    let c = r.client.clone();
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), "default");
    for i in 0..7 {
        let mut m = cm(&format!("page-{i}"));
        m.metadata.labels = Some(
            [(
                "parity".to_string(),
                (if i % 2 == 0 { "even" } else { "odd" }).to_string(),
            )]
            .into(),
        );
        cms.create(&PostParams::default(), &m)
            .await
            .expect("create");
    }
    let lp = ListParams::default().labels("parity").limit(3);
    let first = cms.list(&lp).await.expect("page 1");
    assert_eq!(first.items.len(), 3);
    let token = first.metadata.continue_.clone().expect("continue");
    let rest = cms
        .list(&lp.clone().continue_token(&token).limit(10))
        .await
        .expect("page 2");
    assert_eq!(rest.items.len(), 4);
    assert_eq!(
        first.metadata.resource_version,
        rest.metadata.resource_version
    );
    let odd = cms
        .list(&ListParams::default().labels("parity=odd"))
        .await
        .expect("odd");
    assert_eq!(odd.items.len(), 3);
    let by_name = cms
        .list(&ListParams::default().fields("metadata.name=page-4"))
        .await
        .expect("field");
    assert_eq!(by_name.items.len(), 1);

    // Raw watch from a list's resourceVersion sees exactly the later changes.
    let rv = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut events = cms
        .watch(&WatchParams::default().labels("parity=odd"), &rv)
        .await
        .expect("watch")
        .boxed();
    cms.delete("page-1", &DeleteParams::default())
        .await
        .expect("delete");
    let patch = json!({"metadata": {"labels": {"parity": "odd"}}});
    cms.patch("page-2", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("relabel");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("event in time")
        {
            Some(Ok(WatchEvent::Added(o))) => {
                seen.push(format!("ADDED {}", o.metadata.name.unwrap_or_default()))
            }
            Some(Ok(WatchEvent::Deleted(o))) => {
                seen.push(format!("DELETED {}", o.metadata.name.unwrap_or_default()))
            }
            Some(Ok(WatchEvent::Bookmark(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, vec!["DELETED page-1", "ADDED page-2"]);

    // kube-rs's watcher (list, then watch) sees creation, change and deletion.
    let stream = watcher(
        cms.clone(),
        watcher::Config::default().fields("metadata.name=watched"),
    );
    let mut stream = stream.boxed();
    let writer = {
        let cms = cms.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cms.create(&PostParams::default(), &cm("watched"))
                .await
                .expect("create");
            cms.delete("watched", &DeleteParams::default())
                .await
                .expect("delete");
        })
    };
    let mut applied = false;
    let mut deleted = false;
    while !(applied && deleted) {
        match tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .expect("in time")
        {
            Ok(Some(watcher::Event::Apply(o))) => {
                assert_eq!(o.metadata.name.as_deref(), Some("watched"));
                applied = true;
            }
            Ok(Some(watcher::Event::Delete(_))) => deleted = true,
            Ok(Some(_)) => {}
            other => panic!("watcher: {other:?}"),
        }
    }
    writer.await.expect("writer");

    // resourceVersion=0 lists and watches are served from the watch cache, which may lag
    // the store by a moment: poll until it has the changes above.
    let odd_path =
        "/api/v1/namespaces/default/configmaps?resourceVersion=0&labelSelector=parity%3Dodd";
    let mut cached_names = Vec::new();
    for _ in 0..50 {
        let (code, list) = raw(&c, "GET", odd_path, "application/json", vec![]).await;
        assert_eq!(code, 200, "{list}");
        assert_eq!(list["kind"], "ConfigMapList");
        cached_names = list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap_or("").to_string())
            .collect();
        if cached_names == ["page-2", "page-3", "page-5"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cached_names, ["page-2", "page-3", "page-5"]);
    let req = http::Request::get(format!(
        "{odd_path}&watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1"
    ))
    .body(kube::client::Body::from(Vec::new()))
    .expect("request");
    let resp = c.send(req).await.expect("cached watch");
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let lines: Vec<Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("a JSON watch event per line"))
        .collect();
    let kinds: Vec<String> = lines
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["type"].as_str().unwrap_or(""),
                e["object"]["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        kinds,
        ["ADDED page-2", "ADDED page-3", "ADDED page-5", "BOOKMARK "]
    );
    assert_eq!(lines[0]["object"]["kind"], "ConfigMap");
    assert_eq!(
        lines[3]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );

    // Table output, as kubectl asks for it.
    let req = http::Request::get("/api/v1/namespaces/default/configmaps?limit=2")
        .header(
            "accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
        .body(Vec::new())
        .expect("request");
    let table: Value = c.request(req).await.expect("table");
    assert_eq!(table["kind"], "Table");
    assert_eq!(table["columnDefinitions"][1]["name"], "Data");
    assert_eq!(table["rows"].as_array().map(Vec::len), Some(2));
    assert!(table["metadata"]["continue"].is_string());
}

async fn cluster_ips_are_unique_under_concurrency(store: Arc<dyn Store>) {
    // A /26 has 62 usable addresses; .1 (kubernetes) and .10 (DNS) are not handed out.
    let r = start_with(store, "10.100.0.0/26").await;
    let svcs: Api<Service> = Api::namespaced(r.client.clone(), "default");
    let creates = (0..40).map(|i| {
        let svcs = svcs.clone();
        async move {
            svcs.create(
                &PostParams::default(),
                &svc(
                    &format!("s{i}"),
                    json!({"type": "NodePort", "ports": [{"port": 80}]}),
                ),
            )
            .await
            .expect("create")
        }
    });
    let made = futures::future::join_all(creates).await;
    let mut ips: Vec<String> = made
        .iter()
        .filter_map(|s| s.spec.as_ref()?.cluster_ip.clone())
        .collect();
    let mut ports: Vec<i32> = made
        .iter()
        .filter_map(|s| s.spec.as_ref()?.ports.as_ref()?[0].node_port)
        .collect();
    ips.sort();
    ips.dedup();
    ports.sort();
    ports.dedup();
    assert_eq!((ips.len(), ports.len()), (40, 40));
    assert!(
        !ips.iter()
            .any(|ip| ip == "10.100.0.10" || ip == "10.100.0.1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_on_the_embedded_store() {
    let (r, _store_dir) = embedded().await;
    bad_input_is_refused(&r).await;
    conflicts_and_atomicity(&r).await;
    objects_behave_like_kubernetes(&r).await;
    lists_and_watches(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_on_etcd() {
    let (r, _etcd) = on_etcd().await;
    bad_input_is_refused(&r).await;
    conflicts_and_atomicity(&r).await;
    objects_behave_like_kubernetes(&r).await;
    lists_and_watches(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_is_unique_on_both_stores() {
    let sdir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(sdir.path().join("s.redb")).expect("store");
    cluster_ips_are_unique_under_concurrency(Arc::new(store)).await;
    let etcd = EtcdProcess::start().await.expect("etcd");
    let store = EtcdStore::connect(&[etcd.client_url()])
        .await
        .expect("connect");
    cluster_ips_are_unique_under_concurrency(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_is_503_then_recovers() {
    let (r, mut etcd) = on_etcd().await;
    // kube-rs retries 503s by default (honouring Retry-After); this test wants to see them.
    let client = client_from(&r.dir.path().join("kubeconfig"), |c| {
        c.default_retry = false
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("before"))
        .await
        .expect("create");
    let rv = cms
        .get("before")
        .await
        .expect("get")
        .metadata
        .resource_version
        .expect("rv");

    etcd.stop();
    let (code, _) = api_status(
        cms.create(&PostParams::default(), &cm("during"))
            .await
            .expect_err("etcd down"),
    );
    assert_eq!(code, 503);
    let (code, _) = raw(&client, "GET", "/readyz", "application/json", vec![]).await;
    assert_eq!(code, 503);
    let (code, _) = raw(&client, "GET", "/healthz", "application/json", vec![]).await;
    assert_eq!(code, 200, "the process keeps serving");

    etcd.start_again().await.expect("etcd back");
    let mut ok = false;
    for _ in 0..100 {
        if cms
            .create(&PostParams::default(), &cm("after"))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "writes work again once etcd is back");
    // A watcher resuming from before the outage misses nothing.
    let mut events = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("in time")
    {
        Some(Ok(WatchEvent::Added(o))) => assert_eq!(o.metadata.name.as_deref(), Some("after")),
        other => panic!("unexpected {other:?}"),
    }
    assert!(r.url.starts_with("https://127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_watch_gets_410_and_client_certs_authenticate() {
    let etcd = EtcdProcess::start().await.expect("etcd");
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&[etcd.client_url()])
            .await
            .expect("connect"),
    );
    let r = start_with(store.clone(), "10.96.0.0/12").await;
    let cms: Api<ConfigMap> = Api::namespaced(r.client.clone(), "default");
    let first = cms
        .create(&PostParams::default(), &cm("a"))
        .await
        .expect("create");
    // Two writes after `a`: a watch from `a` starts at the next revision, and compacting at
    // the current one must remove that revision too, or the watch would rightly succeed.
    for name in ["b", "c"] {
        cms.create(&PostParams::default(), &cm(name))
            .await
            .expect("create");
    }
    let old_rv = first.metadata.resource_version.expect("rv");
    store
        .compact(store.current_revision().await.expect("rev"))
        .await
        .expect("compact");
    let mut events = cms
        .watch(&WatchParams::default(), &old_rv)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("in time")
    {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => panic!("want a 410 ERROR event, got {other:?}"),
    }

    let pki = weir_apiserver::Pki::load_or_create(&r.dir.path().join("pki"), &["localhost".into()])
        .expect("pki");
    let (crt, key) = pki
        .issue_client_cert("jane", &["devs"])
        .expect("client cert");
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let by_cert = client_from(&r.dir.path().join("kubeconfig"), |c| {
        c.auth_info.token = None;
        c.auth_info.client_certificate_data = Some(b64(&crt));
        c.auth_info.client_key_data = Some(b64(&key).into());
    })
    .await;
    let (code, body) = raw(
        &by_cert,
        "GET",
        "/api/v1/namespaces/default/configmaps/a",
        "application/json",
        vec![],
    )
    .await;
    assert_eq!(code, 200, "{body}");
}

/// `kubectl apply -f -` of `manifest` against the running server.
async fn kubectl_apply(r: &Running, manifest: &str) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(r.dir.path().join("kubeconfig"))
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(manifest.as_bytes())
        .await
        .expect("manifest");
    drop(stdin);
    child.wait_with_output().await.expect("kubectl output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_changes_by_apply_and_oversized_objects() {
    let (r, _store_dir) = embedded().await;
    let svcs: Api<Service> = Api::namespaced(r.client.clone(), "default");
    let manifest = |ty: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: {ty}\n  selector:\n    app: web\n  ports:\n  - port: 80\n    targetPort: 8080\n"
        )
    };
    let out = kubectl_apply(&r, &manifest("NodePort")).await;
    assert!(out.status.success(), "{out:?}");
    let before = svcs.get("web").await.expect("get");
    let spec = before.spec.expect("spec");
    let node_port = spec.ports.expect("ports")[0].node_port.expect("allocated");
    // The allocated nodePort is not in the manifest: without the update preparation the
    // merged object keeps it and validation refuses it for a ClusterIP Service.
    let out = kubectl_apply(&r, &manifest("ClusterIP")).await;
    assert!(out.status.success(), "{out:?}");
    let after = svcs.get("web").await.expect("get").spec.expect("spec");
    assert_eq!(after.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(after.ports.expect("ports")[0].node_port, None);
    assert_eq!(after.external_traffic_policy, None);
    assert_eq!(after.cluster_ip, spec.cluster_ip);
    // The node port went back to the pool: another Service may claim it.
    let other = svc(
        "other",
        json!({"type": "NodePort", "ports": [{"port": 81, "nodePort": node_port}]}),
    );
    svcs.create(&PostParams::default(), &other)
        .await
        .expect("the freed nodePort is free");

    // Under the 3 MiB request limit, over what one stored value may hold.
    let value = "x".repeat(weir_store::MAX_VALUE_BYTES + 1024);
    assert!(value.len() < weir_apiserver::MAX_BODY);
    let pods: Api<Pod> = Api::namespaced(r.client.clone(), "default");
    let big: Pod = serde_json::from_value(json!({
        "metadata": {"name": "big"},
        "spec": {"containers": [{"name": "c", "image": "busybox",
            "env": [{"name": "BIG", "value": value}]}]},
    }))
    .expect("pod");
    let err = pods
        .create(&PostParams::default(), &big)
        .await
        .expect_err("too large to store");
    match err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (413, "RequestEntityTooLarge"));
            assert!(s.message.contains("storage limit"), "{}", s.message);
        }
        other => panic!("not an API error: {other}"),
    }
    assert!(pods.get_opt("big").await.expect("get").is_none());
}

/// A stand-in for a node agent's `containerLogs` endpoint on loopback: answers
/// `hello from <container>` (refusing `previous`), and with `follow` streams what the test
/// sends on `lines`.
struct FakeAgent {
    url: String,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    /// Dropped to end the followed answer.
    lines: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_agent() -> FakeAgent {
    use axum::extract::{OriginalUri, Path, State};
    use axum::response::IntoResponse;
    type Follow = Arc<tokio::sync::Mutex<Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>>>;
    type Seen = Arc<std::sync::Mutex<Vec<String>>>;
    async fn logs(
        State((seen, follow)): State<(Seen, Follow)>,
        Path((_ns, pod, container)): Path<(String, String, String)>,
        OriginalUri(uri): OriginalUri,
    ) -> axum::response::Response {
        seen.lock().expect("seen").push(uri.to_string());
        let query = uri.query().unwrap_or("");
        if query.contains("previous=true") {
            let msg =
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found");
            return (http::StatusCode::BAD_REQUEST, msg).into_response();
        }
        if query.contains("follow=true")
            && let Some(rx) = follow.lock().await.take()
        {
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
                .map(Ok::<_, std::convert::Infallible>);
            return axum::body::Body::from_stream(stream).into_response();
        }
        format!("hello from {container}\n").into_response()
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let seen: Seen = Default::default();
    let app = axum::Router::new()
        .route(
            "/containerLogs/{ns}/{pod}/{container}",
            axum::routing::get(logs),
        )
        .with_state((seen.clone(), Arc::new(tokio::sync::Mutex::new(Some(rx)))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    FakeAgent {
        url,
        seen,
        lines: Some(tx),
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_logs_stream_from_the_node_agent() {
    use futures::AsyncBufReadExt;
    let (r, _store_dir) = embedded().await;
    let mut agent = fake_agent().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let nodes: Api<Node> = Api::all(r.client.clone());
    for (name, endpoint) in [
        ("n1", Some(agent.url.as_str())),
        ("bare", None),
        ("dead", Some(closed.as_str())),
    ] {
        let annotations = match endpoint {
            Some(e) => json!({weir_apiserver::AGENT_ENDPOINT_ANNOTATION: e}),
            None => json!({}),
        };
        let node: Node =
            serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}}))
                .expect("node");
        nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("node");
    }
    let pods: Api<Pod> = Api::namespaced(r.client.clone(), "default");
    for (name, node, containers) in [
        ("one", Some("n1"), vec!["app"]),
        ("two", Some("n1"), vec!["a", "b"]),
        ("unbound", None, vec!["app"]),
        ("onbare", Some("bare"), vec!["app"]),
        ("ondead", Some("dead"), vec!["app"]),
    ] {
        let containers: Vec<Value> = containers
            .iter()
            .map(|c| json!({"name": c, "image": "busybox"}))
            .collect();
        let mut spec = json!({"containers": containers});
        if let Some(n) = node {
            spec["nodeName"] = json!(n);
        }
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("pod");
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("pod");
    }

    let tail = LogParams {
        tail_lines: Some(3),
        ..Default::default()
    };
    assert_eq!(
        pods.logs("one", &tail).await.expect("logs"),
        "hello from app\n"
    );
    assert_eq!(
        agent.seen.lock().expect("seen").last().map(String::as_str),
        Some("/containerLogs/default/one/app?tailLines=3")
    );
    let err = pods
        .logs("two", &Default::default())
        .await
        .expect_err("which");
    assert_eq!(
        api_status(err),
        (
            400,
            "a container name must be specified for pod two, choose one of: [a b]".to_string()
        )
    );
    let b = LogParams {
        container: Some("b".into()),
        ..Default::default()
    };
    assert_eq!(pods.logs("two", &b).await.expect("logs"), "hello from b\n");
    let previous = LogParams {
        previous: true,
        ..Default::default()
    };
    let err = pods.logs("one", &previous).await.expect_err("no previous");
    assert_eq!(
        api_status(err),
        (
            400,
            "previous terminated container \"app\" in pod \"one\" not found".to_string()
        )
    );
    let err = pods
        .logs("unbound", &Default::default())
        .await
        .expect_err("unbound");
    assert_eq!(
        api_status(err),
        (400, "pod unbound does not have a host assigned".to_string())
    );
    let (code, msg) = api_status(
        pods.logs("onbare", &Default::default())
            .await
            .expect_err("no endpoint"),
    );
    assert_eq!(code, 502);
    assert!(msg.contains("weir.dev/agent-endpoint"), "{msg}");
    let (code, msg) = api_status(
        pods.logs("ondead", &Default::default())
            .await
            .expect_err("unreachable"),
    );
    assert_eq!(code, 502);
    assert!(msg.contains("did not answer"), "{msg}");
    let (code, _) = api_status(
        pods.logs("nope", &Default::default())
            .await
            .expect_err("no pod"),
    );
    assert_eq!(code, 404);

    // Follow: each line arrives while the agent's answer is still open.
    let follow = LogParams {
        follow: true,
        ..Default::default()
    };
    let mut lines = pods
        .log_stream("one", &follow)
        .await
        .expect("follow")
        .lines();
    for line in ["first", "second"] {
        let tx = agent.lines.as_ref().expect("sender");
        tx.send(bytes::Bytes::from(format!("{line}\n")))
            .await
            .expect("send");
        let got = tokio::time::timeout(Duration::from_secs(5), lines.next())
            .await
            .expect("streamed, not buffered")
            .expect("a line")
            .expect("read");
        assert_eq!(got, line);
    }
    // The agent ends its answer (the container exited): so does the client's stream.
    agent.lines.take();
    let end = tokio::time::timeout(Duration::from_secs(5), lines.next())
        .await
        .expect("ended");
    assert!(end.is_none(), "{end:?}");
}

/// A real store that records every call and the key (or prefix) it names, so a test can
/// state which keys a request touches.
struct Recording {
    inner: Arc<dyn Store>,
    calls: std::sync::Mutex<Vec<String>>,
}

impl Recording {
    fn record(&self, call: &str, key: &str) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(format!("{call} {key}"));
        }
    }

    fn take(&self) -> Vec<String> {
        self.calls
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Store for Recording {
    async fn get(&self, key: &str) -> weir_store::Result<Option<weir_store::KeyValue>> {
        self.record("get", key);
        self.inner.get(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        opts: weir_store::ListOptions,
    ) -> weir_store::Result<weir_store::ListResult> {
        self.record("list", prefix);
        self.inner.list(prefix, opts).await
    }
    async fn create(&self, key: &str, value: Vec<u8>) -> weir_store::Result<weir_store::KeyValue> {
        self.record("create", key);
        self.inner.create(key, value).await
    }
    async fn create_all(
        &self,
        kvs: Vec<(String, Vec<u8>)>,
    ) -> weir_store::Result<Vec<weir_store::KeyValue>> {
        for (key, _) in &kvs {
            self.record("create", key);
        }
        self.inner.create_all(kvs).await
    }
    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: i64,
    ) -> weir_store::Result<weir_store::KeyValue> {
        self.record("update", key);
        self.inner.update(key, value, expected).await
    }
    async fn delete(
        &self,
        key: &str,
        expected: Option<i64>,
    ) -> weir_store::Result<(weir_store::KeyValue, i64)> {
        self.record("delete", key);
        self.inner.delete(key, expected).await
    }
    async fn watch(&self, prefix: &str, after: i64) -> weir_store::Result<weir_store::WatchStream> {
        self.record("watch", prefix);
        self.inner.watch(prefix, after).await
    }
    async fn current_revision(&self) -> weir_store::Result<i64> {
        self.inner.current_revision().await
    }
    async fn compact(&self, revision: i64) -> weir_store::Result<()> {
        self.record("compact", &revision.to_string());
        self.inner.compact(revision).await
    }
}

/// A write of one object reads and writes that object's key and nothing else, so its cost
/// does not grow with the number of objects stored (no list of its resource, no scan of
/// other keys): checked with many Services and EndpointSlices stored, on the real store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_touches_only_its_own_key() {
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    let sdir = tempfile::tempdir().expect("tempdir");
    let inner = EmbeddedStore::open(sdir.path().join("store.redb")).expect("store");
    let store = Arc::new(Recording {
        inner: Arc::new(inner),
        calls: Default::default(),
    });
    let r = start_with(store.clone(), "10.96.0.0/12").await;
    let svcs: Api<Service> = Api::namespaced(r.client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(r.client.clone(), "default");
    let slice = |i: usize, ip: &str| -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": format!("s{i}"), "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        }))
        .expect("slice")
    };
    futures::stream::iter(0..50)
        .map(|i| {
            let (svcs, slices) = (svcs.clone(), slices.clone());
            let s = svc(&format!("s{i}"), json!({"ports": [{"port": 80}]}));
            let eps = slice(i, "10.244.0.2");
            async move {
                svcs.create(&PostParams::default(), &s).await?;
                slices.create(&PostParams::default(), &eps).await
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<_>>()
        .await
        .expect("fill");
    // The server's start-up work ends with a list of the namespaces; wait for it, so only
    // the requests below are recorded.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen.iter().any(|c| c == "list /registry/core/namespaces/") {
        assert!(
            std::time::Instant::now() < deadline,
            "start-up never ended: {seen:?}"
        );
        seen.extend(store.take());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.take();

    let key = "/registry/discovery.k8s.io/endpointslices/default/s42";
    let patch = json!({"endpoints": [{"addresses": ["10.244.0.3"]}]});
    slices
        .patch("s42", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch slice");
    assert_eq!(
        store.take(),
        [format!("get {key}"), format!("update {key}")]
    );

    let mut current = slices.get("s42").await.expect("get slice");
    store.take();
    current.endpoints[0].addresses = vec!["10.244.0.4".into()];
    slices
        .replace("s42", &PostParams::default(), &current)
        .await
        .expect("replace slice");
    assert_eq!(
        store.take(),
        [format!("get {key}"), format!("update {key}")]
    );

    let key = "/registry/core/services/default/s7";
    let patch = json!({"metadata": {"labels": {"tier": "web"}}});
    svcs.patch("s7", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch service");
    assert_eq!(
        store.take(),
        [format!("get {key}"), format!("update {key}")]
    );

    let key = "/registry/discovery.k8s.io/endpointslices/default/s9";
    slices
        .delete("s9", &DeleteParams::default())
        .await
        .expect("delete slice");
    assert_eq!(
        store.take(),
        [format!("get {key}"), format!("delete {key}")]
    );
}

/// A status write never allocates: a LoadBalancer + Local Service stored without a
/// `healthCheckNodePort` (as by a server from before it was allocated) keeps none through a
/// load balancer controller's status write, and gets one on its next update of the object.
#[tokio::test]
async fn a_status_write_allocates_nothing() {
    let sdir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(sdir.path().join("store.redb")).expect("store"));
    let r = start_with(store.clone(), "10.96.0.0/12").await;
    let svcs: Api<Service> = Api::namespaced(r.client.clone(), "default");
    let spec =
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]});
    let created = svcs
        .create(&PostParams::default(), &svc("old", spec))
        .await
        .expect("create");
    let hcnp = |s: &Service| s.spec.as_ref().and_then(|s| s.health_check_node_port);
    assert!(hcnp(&created).is_some(), "{created:?}");

    // The object as an older server stored it: no health check port.
    let key = "/registry/core/services/default/old";
    let kv = store.get(key).await.expect("get").expect("stored");
    let mut old: Value = serde_json::from_slice(&kv.value).expect("json");
    old["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("healthCheckNodePort");
    store
        .update(
            key,
            serde_json::to_vec(&old).expect("encode"),
            kv.mod_revision,
        )
        .await
        .expect("rewrite");

    let mut status = svcs.get("old").await.expect("get");
    status.status = Some(
        serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}))
            .expect("status"),
    );
    let written = svcs
        .replace_status("old", &PostParams::default(), &status)
        .await
        .expect("status write");
    assert_eq!(hcnp(&written), None, "{written:?}");
    assert_eq!(hcnp(&svcs.get("old").await.expect("get")), None);

    let updated = svcs
        .patch(
            "old",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .expect("update");
    assert!(hcnp(&updated).is_some(), "{updated:?}");
}
