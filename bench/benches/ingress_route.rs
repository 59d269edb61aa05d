//! Route matching in weir's ingress table: the per-request lookup (host, then the sorted
//! path rules) on a table of 1000 Ingresses × 4 paths, plus wildcard hosts, and a table
//! rebuild from the same snapshot (what every watched change costs).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use weir_ingress::fixtures::{backend, ingress, service, slice};
use weir_ingress::table::{Builder, Snapshot};

fn snapshot(n: usize) -> Snapshot {
    let mut s = Snapshot::default();
    s.services
        .push(Arc::new(service("ns", "web", &[("http", 80, None)])));
    s.slices.push(Arc::new(slice(
        "ns",
        "web-1",
        "web",
        ("http", 8080),
        &[("10.244.0.1", true), ("10.244.0.2", true)],
    )));
    for i in 0..n {
        let host = format!("app{i}.example.com");
        let wild = format!("*.tenant{i}.example.com");
        s.ingresses.push(Arc::new(ingress(
            "ns",
            &format!("app-{i}"),
            vec![
                (&host, "/", "Prefix", backend("web", 80)),
                (&host, "/api", "Prefix", backend("web", 80)),
                (&host, "/api/v1/users", "Prefix", backend("web", 80)),
                (&host, "/healthz", "Exact", backend("web", 80)),
                (&wild, "/", "Prefix", backend("web", 80)),
            ],
        )));
    }
    s
}

fn bench(c: &mut Criterion) {
    let snap = snapshot(1000);
    let table = Builder::default().build(&snap);
    let mut g = c.benchmark_group("ingress_route");
    g.bench_function("exact_host_longest_prefix", |b| {
        b.iter(|| {
            black_box(table.route(
                black_box("app500.example.com"),
                black_box("/api/v1/users/42"),
            ))
        })
    });
    g.bench_function("exact_host_exact_path", |b| {
        b.iter(|| black_box(table.route(black_box("app500.example.com"), black_box("/healthz"))))
    });
    g.bench_function("wildcard_host", |b| {
        b.iter(|| black_box(table.route(black_box("a.tenant500.example.com"), black_box("/x"))))
    });
    g.bench_function("uppercase_host_with_port", |b| {
        b.iter(|| black_box(table.route(black_box("APP500.example.com:8080"), black_box("/api"))))
    });
    g.bench_function("no_match_404", |b| {
        b.iter(|| black_box(table.route(black_box("nothing.example.org"), black_box("/"))))
    });
    g.sample_size(20);
    let mut builder = Builder::default();
    g.bench_function("rebuild_1000_ingresses", |b| {
        b.iter(|| black_box(builder.build(&snap)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
