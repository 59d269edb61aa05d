//! Cost of weir's Service → map diffing (no BPF, no root): deriving the desired state of a
//! whole cluster, planning from empty maps, and planning one EndpointSlice change, at 1,000 and
//! 10,000 Services × 2 backends.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use weir_lb::plan::{plan, plan_scoped};
use weir_lb::{MaglevConfig, MapState, ModelConfig, model};

fn cluster(n: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut svcs = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        let ip = format!("10.96.{}.{}", 1 + i / 256, i % 256);
        svcs.push(
            serde_json::from_value(json!({
                "metadata": {"name": format!("svc-{i}"), "namespace": "default"},
                "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}
            }))
            .expect("valid Service"),
        );
        slices.push(
            serde_json::from_value(json!({
                "metadata": {"name": format!("svc-{i}-x"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.244.0.11"]}, {"addresses": ["10.244.0.12"]}]
            }))
            .expect("valid EndpointSlice"),
        );
    }
    (svcs, slices)
}

fn bench(c: &mut Criterion) {
    let cfg = ModelConfig::default();
    let mcfg = MaglevConfig::default();
    let mut g = c.benchmark_group("lb_diff");
    for n in [1_000usize, 10_000] {
        let (svcs, mut slices) = cluster(n);
        g.bench_with_input(BenchmarkId::new("desired_all", n), &n, |b, _| {
            b.iter(|| model::desired(black_box(&svcs), black_box(&slices), &cfg))
        });
        let (want, _) = model::desired(&svcs, &slices, &cfg);
        g.bench_with_input(BenchmarkId::new("plan_from_empty", n), &n, |b, _| {
            b.iter(|| plan(black_box(&MapState::default()), black_box(&want), mcfg))
        });
        let mut state = MapState::default();
        state.apply(&plan(&state, &want, mcfg));
        g.bench_with_input(BenchmarkId::new("plan_full_no_change", n), &n, |b, _| {
            b.iter(|| plan(black_box(&state), black_box(&want), mcfg))
        });
        slices[n - 1].endpoints[1].addresses = vec!["10.244.0.13".into()];
        let fronts: Vec<_> = model::desired(&svcs[n - 1..], &slices[n - 1..], &cfg)
            .0
            .into_keys()
            .collect();
        g.bench_with_input(
            BenchmarkId::new("one_slice_change_scoped", n),
            &n,
            |b, _| {
                b.iter(|| {
                    let (part, _) = model::desired(&svcs[n - 1..], &slices[n - 1..], &cfg);
                    plan_scoped(black_box(&state), &part, Some(&fronts), mcfg)
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
