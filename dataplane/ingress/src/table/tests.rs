use std::sync::Arc;

use http::HeaderMap;
use k8s_openapi::api::networking::v1::{IngressClass, IngressClassSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use super::*;
use crate::fixtures::*;

fn snap(ingresses: Vec<Ingress>) -> Snapshot {
    Snapshot {
        ingresses: ingresses.into_iter().map(Arc::new).collect(),
        services: vec![
            Arc::new(service("ns", "web", &[("http", 80, None)])),
            Arc::new(service(
                "ns",
                "api",
                &[
                    ("http", 8080, None),
                    ("grpc", 9090, Some("kubernetes.io/h2c")),
                ],
            )),
        ],
        slices: vec![
            Arc::new(slice(
                "ns",
                "web-1",
                "web",
                ("http", 8000),
                &[("10.244.0.1", true), ("10.244.0.2", false)],
            )),
            Arc::new(slice(
                "ns",
                "api-1",
                "api",
                ("http", 8001),
                &[("10.244.0.3", true)],
            )),
            Arc::new(slice(
                "ns",
                "api-2",
                "api",
                ("grpc", 9001),
                &[("10.244.0.3", true)],
            )),
        ],
        ..Default::default()
    }
}

fn route<'t>(t: &'t Table, host: &str, path: &str) -> Option<&'t str> {
    t.route(host, path).map(|t| &*t.route)
}

#[test]
fn exact_and_wildcard_hosts_wildcard_is_one_label() {
    let t = Builder::default().build(&snap(vec![ingress(
        "ns",
        "i",
        vec![
            ("a.example.com", "/", "Prefix", backend("web", 80)),
            ("*.example.com", "/", "Prefix", backend("api", 8080)),
        ],
    )]));
    assert_eq!(
        route(&t, "a.example.com", "/x"),
        Some("ns/i:a.example.com/")
    );
    assert_eq!(
        route(&t, "A.Example.COM:8080", "/x"),
        Some("ns/i:a.example.com/"),
        "case and port ignored"
    );
    assert_eq!(route(&t, "b.example.com", "/"), Some("ns/i:*.example.com/"));
    assert_eq!(
        route(&t, "x.b.example.com", "/"),
        None,
        "wildcard matches exactly one label"
    );
    assert_eq!(route(&t, "example.com", "/"), None);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
}

#[test]
fn prefix_is_element_wise() {
    let t = Builder::default().build(&snap(vec![ingress(
        "ns",
        "i",
        vec![
            ("h", "/foo", "Prefix", backend("web", 80)),
            ("h", "/bar/", "ImplementationSpecific", backend("web", 80)),
        ],
    )]));
    for (path, hit) in [
        ("/foo", true),
        ("/foo/", true),
        ("/foo/bar", true),
        ("/foobar", false),
        ("/bar", true),
        ("/bar/x", true),
        ("/barx", false),
        ("/", false),
    ] {
        assert_eq!(t.route("h", path).is_some(), hit, "{path}");
    }
}

#[test]
fn longest_match_wins_and_exact_beats_prefix_on_a_tie() {
    let t = Builder::default().build(&snap(vec![ingress(
        "ns",
        "i",
        vec![
            ("h", "/", "Prefix", backend("web", 80)),
            ("h", "/api", "Prefix", backend("api", 8080)),
            ("h", "/api", "Exact", backend("web", 80)),
            ("h", "/api/v1", "Prefix", backend("api", 8080)),
        ],
    )]));
    let backend_of = |p: &str| {
        t.route("h", p)
            .map(|t| (t.route.to_string(), t.backend.name.to_string()))
    };
    assert_eq!(
        backend_of("/api").map(|b| b.1),
        Some("ns/web:80".into()),
        "Exact wins the tie"
    );
    assert_eq!(
        backend_of("/api/x").map(|b| b.1),
        Some("ns/api:8080".into())
    );
    assert_eq!(
        backend_of("/api/v1/users").map(|b| b.0),
        Some("ns/i:h/api/v1".into())
    );
    assert_eq!(backend_of("/other").map(|b| b.0), Some("ns/i:h/".into()));
}

#[test]
fn exact_path_does_not_match_below_it() {
    let t = Builder::default().build(&snap(vec![ingress(
        "ns",
        "i",
        vec![("h", "/x", "Exact", backend("web", 80))],
    )]));
    assert!(t.route("h", "/x").is_some());
    assert!(t.route("h", "/x/").is_none());
    assert!(t.route("h", "/x/y").is_none());
}

#[test]
fn default_backend_and_no_match() {
    let mut with_default = ingress("ns", "d", vec![]);
    if let Some(s) = with_default.spec.as_mut() {
        s.default_backend = Some(backend("web", 80));
    }
    let t = Builder::default().build(&snap(vec![ingress(
        "ns",
        "i",
        vec![("h", "/a", "Exact", backend("api", 8080))],
    )]));
    assert!(
        t.route("other", "/a").is_none(),
        "404 without a default backend"
    );
    let t = Builder::default().build(&snap(vec![
        with_default,
        ingress("ns", "i", vec![("h", "/a", "Exact", backend("api", 8080))]),
    ]));
    assert_eq!(route(&t, "other", "/a"), Some("ns/d:default"));
    assert_eq!(route(&t, "h", "/b"), Some("ns/d:default"));
}

#[test]
fn service_port_by_name_or_number_reaches_ready_endpoints_only() {
    let t = Builder::default().build(&snap(vec![ingress(
        "ns",
        "i",
        vec![
            ("h", "/web", "Prefix", backend_named("web", "http")),
            ("h", "/grpc", "Prefix", backend("api", 9090)),
        ],
    )]));
    let web = &t
        .route("h", "/web")
        .map(|t| t.backend.clone())
        .expect("route");
    let addrs: Vec<String> = web.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(addrs, ["10.244.0.1:8000"], "not-ready endpoint left out");
    assert!(!web.h2);
    let grpc = t
        .route("h", "/grpc")
        .map(|t| t.backend.clone())
        .expect("route");
    assert_eq!(grpc.endpoints[0].addr.to_string(), "10.244.0.3:9001");
    assert!(
        grpc.h2,
        "appProtocol kubernetes.io/h2c selects HTTP/2 upstream"
    );
}

#[test]
fn missing_service_port_is_a_problem_and_yields_no_endpoints() {
    let t = Builder::default().build(&snap(vec![ingress(
        "ns",
        "i",
        vec![("h", "/", "Prefix", backend("web", 81))],
    )]));
    let target = t.route("h", "/").expect("route still installed");
    assert!(target.backend.endpoints.is_empty());
    assert!(
        t.problems
            .iter()
            .any(|p| p.contains("ns/web has no port 81")),
        "{:?}",
        t.problems
    );
}

#[test]
fn class_filtering() {
    let mut other = ingress(
        "ns",
        "other",
        vec![("h", "/", "Prefix", backend("web", 80))],
    );
    if let Some(s) = other.spec.as_mut() {
        s.ingress_class_name = Some("nginx".into());
    }
    let mut unclassed = ingress(
        "ns",
        "unclassed",
        vec![("u", "/", "Prefix", backend("web", 80))],
    );
    if let Some(s) = unclassed.spec.as_mut() {
        s.ingress_class_name = None;
    }
    let t = Builder::default().build(&snap(vec![other.clone(), unclassed.clone()]));
    assert!(t.route("h", "/").is_none(), "class nginx is not ours");
    assert!(t.route("u", "/").is_none(), "no class and no default class");

    let mut s = snap(vec![other, unclassed]);
    let mut meta = ObjectMeta {
        name: Some("nginx".into()),
        ..Default::default()
    };
    annotate(
        &mut meta,
        &[("ingressclass.kubernetes.io/is-default-class", "true")],
    );
    s.classes.push(Arc::new(IngressClass {
        metadata: meta,
        spec: Some(IngressClassSpec {
            controller: Some("weir.io/ingress-controller".into()),
            parameters: None,
        }),
    }));
    let t = Builder::default().build(&s);
    assert!(
        t.route("h", "/").is_some(),
        "class nginx whose controller is weir"
    );
    assert!(t.route("u", "/").is_some(), "default class is ours");
}

#[test]
fn oldest_ingress_wins_a_conflict() {
    let mut newer = ingress(
        "ns",
        "a-newer",
        vec![("h", "/", "Prefix", backend("api", 8080))],
    );
    newer.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(2000).expect("ts"),
    ));
    let mut older = ingress(
        "ns",
        "b-older",
        vec![("h", "/", "Prefix", backend("web", 80))],
    );
    older.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(1000).expect("ts"),
    ));
    let t = Builder::default().build(&snap(vec![newer, older]));
    assert_eq!(route(&t, "h", "/"), Some("ns/b-older:h/"));
    assert!(t.problems.iter().any(|p| p.contains("a-newer")));
}

#[test]
fn canary_by_header_and_weight() {
    let main = ingress("ns", "main", vec![("h", "/", "Prefix", backend("web", 80))]);
    let mut canary = ingress(
        "ns",
        "canary",
        vec![("h", "/", "Prefix", backend("api", 8080))],
    );
    annotate(
        &mut canary.metadata,
        &[
            ("ingress.weir.io/canary", "true"),
            ("ingress.weir.io/canary-by-header", "x-canary"),
        ],
    );
    let t = Builder::default().build(&snap(vec![main.clone(), canary.clone()]));
    let target = t.route("h", "/").expect("route");
    let mut h = HeaderMap::new();
    assert_eq!(
        &*target.choose(&h).1.name,
        "ns/web:80",
        "weight 0, no header: main"
    );
    h.insert("x-canary", "always".parse().expect("hv"));
    assert_eq!(&*target.choose(&h).1.name, "ns/api:8080");
    h.insert("x-canary", "never".parse().expect("hv"));
    assert_eq!(&*target.choose(&h).1.name, "ns/web:80");

    annotate(
        &mut canary.metadata,
        &[("ingress.weir.io/canary-weight", "100")],
    );
    let t = Builder::default().build(&snap(vec![main, canary]));
    let target = t.route("h", "/").expect("route");
    assert_eq!(
        &**target.choose(&HeaderMap::new()).0,
        "ns/canary:h/",
        "weight 100: canary"
    );
}

#[test]
fn canary_without_main_is_reported() {
    let mut canary = ingress(
        "ns",
        "canary",
        vec![("h", "/x", "Prefix", backend("api", 8080))],
    );
    annotate(&mut canary.metadata, &[("ingress.weir.io/canary", "true")]);
    let t = Builder::default().build(&snap(vec![canary]));
    assert!(
        t.route("h", "/x").is_none(),
        "a canary alone routes nothing"
    );
    assert!(t.problems.iter().any(|p| p.contains("no main Ingress")));
}

#[test]
fn tls_hosts_get_certificates_and_ssl_redirect() {
    let ing = with_tls(
        ingress(
            "ns",
            "i",
            vec![
                ("a.example.com", "/", "Prefix", backend("web", 80)),
                ("plain", "/", "Prefix", backend("web", 80)),
            ],
        ),
        &["a.example.com", "*.wild.example.com"],
        "cert",
    );
    let mut s = snap(vec![ing]);
    s.secrets.push(Arc::new(
        tls_secret("ns", "cert", &["a.example.com", "*.wild.example.com"]).expect("rcgen"),
    ));
    let t = Builder::default().build(&s);
    assert!(t.cert("a.example.com").is_some());
    assert!(t.cert("x.wild.example.com").is_some());
    assert!(t.cert("unknown.example.com").is_none());
    assert!(t.route("a.example.com", "/").expect("route").ssl_redirect);
    assert!(!t.route("plain", "/").expect("route").ssl_redirect);
}

#[test]
fn missing_or_broken_tls_secret_is_a_problem_and_routes_stay() {
    let ing = with_tls(
        ingress("ns", "i", vec![("a", "/", "Prefix", backend("web", 80))]),
        &["a"],
        "nope",
    );
    let t = Builder::default().build(&snap(vec![ing]));
    assert!(t.cert("a").is_none());
    assert!(t.route("a", "/").is_some());
    assert!(
        t.problems
            .iter()
            .any(|p| p.contains("ns/nope") && p.contains("not found")),
        "{:?}",
        t.problems
    );
}

#[test]
fn bad_path_is_skipped_with_a_problem() {
    let t = Builder::default().build(&snap(vec![ingress(
        "ns",
        "i",
        vec![
            ("h", "nope", "Prefix", backend("web", 80)),
            ("h", "/ok", "Regex", backend("web", 80)),
            ("h", "/", "Prefix", backend("web", 80)),
        ],
    )]));
    assert_eq!(t.routes, 1);
    assert_eq!(t.problems.len(), 2, "{:?}", t.problems);
}

#[test]
fn endpoint_state_survives_a_rebuild() {
    let mut b = Builder::default();
    let s = snap(vec![ingress(
        "ns",
        "i",
        vec![("h", "/", "Prefix", backend("web", 80))],
    )]);
    let t1 = b.build(&s);
    let e1 = t1.route("h", "/").expect("route").backend.endpoints[0].clone();
    let t2 = b.build(&s);
    let e2 = t2.route("h", "/").expect("route").backend.endpoints[0].clone();
    assert!(Arc::ptr_eq(&e1, &e2), "same endpoint object reused");
}

/// Everything a table answers, in a form two tables built separately can be compared by:
/// for each probe, the route, backend, endpoint addresses, protocol and canary; then the
/// problems.
fn answers(t: &Table) -> Vec<String> {
    let addrs = |b: &Backend| {
        format!(
            "{} {:?} h2={}",
            b.name,
            b.endpoints.iter().map(|e| e.addr).collect::<Vec<_>>(),
            b.h2
        )
    };
    let mut out = Vec::new();
    for host in ["a.example.com", "x.wild.example.com", "other"] {
        for path in ["/", "/api", "/api/v1", "/grpc", "/web/x"] {
            out.push(match t.route(host, path) {
                None => format!("{host}{path}: none"),
                Some(tg) => format!(
                    "{host}{path}: {} -> {}; canary {:?}",
                    tg.route,
                    addrs(&tg.backend),
                    tg.canary
                        .as_ref()
                        .map(|c| format!("{} -> {}", c.route, addrs(&c.backend)))
                ),
            });
        }
    }
    let mut problems = t.problems.clone();
    problems.sort();
    out.extend(problems);
    out
}

/// Random EndpointSlices for `web` and `api`: ports and names that match or not, ready and
/// unready addresses, now and then a bad address.
fn random_slices(rng: &mut impl rand::Rng) -> Vec<Arc<EndpointSlice>> {
    let mut out = Vec::new();
    for (svc, ports) in [
        ("web", &["http"][..]),
        ("api", &["http", "grpc", "other"][..]),
    ] {
        for i in 0..rng.random_range(0..3) {
            let port = ports[rng.random_range(0..ports.len())];
            let mut eps: Vec<(String, bool)> = (0..rng.random_range(0..4))
                .map(|_| {
                    (
                        format!("10.244.0.{}", rng.random_range(1..5)),
                        rng.random_bool(0.8),
                    )
                })
                .collect();
            if rng.random_bool(0.1) {
                eps.push(("not-an-ip".into(), true));
            }
            let eps: Vec<(&str, bool)> = eps.iter().map(|(a, r)| (a.as_str(), *r)).collect();
            let number = 8000 + rng.random_range(0..2);
            out.push(Arc::new(slice(
                "ns",
                &format!("{svc}-{i}"),
                svc,
                (port, number),
                &eps,
            )));
        }
    }
    out
}

fn random_ingresses(rng: &mut impl rand::Rng) -> Vec<Arc<Ingress>> {
    let mut main = ingress(
        "ns",
        "main",
        vec![
            ("a.example.com", "/", "Prefix", backend("web", 80)),
            ("a.example.com", "/api", "Prefix", backend("api", 8080)),
            (
                "a.example.com",
                "/grpc",
                "Exact",
                backend_named("api", "grpc"),
            ),
            ("*.wild.example.com", "/", "Prefix", backend("api", 8080)),
            ("", "/web", "Prefix", backend("web", 80)),
            ("", "/gone", "Prefix", backend("gone", 80)),
        ],
    );
    if rng.random_bool(0.5) {
        annotate(
            &mut main.metadata,
            &[("ingress.weir.io/load-balance", "round_robin")],
        );
    }
    if let Some(s) = main.spec.as_mut() {
        s.default_backend = Some(backend("web", 80));
    }
    let mut out = vec![Arc::new(main)];
    if rng.random_bool(0.5) {
        let mut canary = ingress(
            "ns",
            "canary",
            vec![("a.example.com", "/api", "Prefix", backend("web", 80))],
        );
        annotate(
            &mut canary.metadata,
            &[
                ("ingress.weir.io/canary", "true"),
                ("ingress.weir.io/canary-weight", "30"),
            ],
        );
        out.push(Arc::new(canary));
    }
    out
}

#[test]
fn endpoint_only_updates_equal_a_full_rebuild_over_random_changes() {
    use rand::{Rng, SeedableRng};
    for seed in 0..20u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut s = snap(Vec::new());
        s.ingresses = random_ingresses(&mut rng);
        s.slices = random_slices(&mut rng);
        let mut incremental = Builder::default();
        let mut table = incremental.build(&s);
        for step in 0..40 {
            let slices_only = rng.random_bool(0.8);
            if slices_only {
                s.slices = random_slices(&mut rng);
                table = incremental.update_endpoints(&table, &s);
            } else {
                s.ingresses = random_ingresses(&mut rng);
                s.slices = random_slices(&mut rng);
                table = incremental.build(&s);
            }
            let full = Builder::default().build(&s);
            assert_eq!(
                answers(&table),
                answers(&full),
                "seed {seed} step {step} (slices only: {slices_only})"
            );
        }
    }
}

#[test]
fn endpoint_update_keeps_untouched_targets_and_endpoint_state() {
    let ing = ingress(
        "ns",
        "i",
        vec![
            ("h", "/web", "Prefix", backend("web", 80)),
            ("h", "/api", "Prefix", backend("api", 8080)),
        ],
    );
    let mut s = snap(vec![ing]);
    let mut b = Builder::default();
    let before = b.build(&s);
    // web gains an endpoint; api's slices are untouched.
    s.slices[0] = Arc::new(slice(
        "ns",
        "web-1",
        "web",
        ("http", 8000),
        &[("10.244.0.1", true), ("10.244.0.2", true)],
    ));
    let after = b.update_endpoints(&before, &s);
    let (api0, api1) = (before.route("h", "/api"), after.route("h", "/api"));
    assert!(
        api0.zip(api1).is_some_and(|(a, b)| Arc::ptr_eq(a, b)),
        "the api target is kept as it was"
    );
    let (web0, web1) = (
        before.route("h", "/web").expect("web route"),
        after.route("h", "/web").expect("web route"),
    );
    assert_eq!(web1.backend.endpoints.len(), 2);
    assert!(
        Arc::ptr_eq(&web0.backend.endpoints[0], &web1.backend.endpoints[0]),
        "the endpoint that stayed keeps its load and health state"
    );
}
