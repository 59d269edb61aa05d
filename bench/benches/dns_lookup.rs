//! Criterion bench of weir DNS's query path at 10,000 Services: parse + snapshot lookup +
//! response write for an A hit, an SRV hit, a PTR hit and an NXDOMAIN, and the cost of
//! applying and publishing one Service change to the zone.
//!
//! Run: `cargo bench -p weir-bench --bench dns_lookup`.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weir_dns::handler::{Handler, Transport};
use weir_dns::metrics::Metrics;
use weir_dns::wire::name_to_wire;
use weir_dns::zone::Zone;

fn service(i: usize) -> Service {
    let ip = format!("10.96.{}.{}", 1 + i / 250, 1 + i % 250);
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some(format!("ns-{}", i % 50)),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn query(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend(name_to_wire(name).expect("valid name"));
    q.extend(qtype.to_be_bytes());
    q.extend([0, 1]);
    q
}

fn bench(c: &mut Criterion) {
    let (mut zone, reader) = Zone::new("cluster.local", 5).expect("zone");
    for i in 0..10_000 {
        zone.apply_service(&service(i));
    }
    zone.publish();
    let soa = zone.names().soa_rdata(5).expect("soa");
    let handler = Handler::new(reader, &zone.names().zone_wire(), &soa, 5);
    let metrics = Metrics::new(1);
    let client: IpAddr = [127, 0, 0, 1].into();
    let mut out = Vec::with_capacity(65535);
    let cases = [
        ("a_hit", query("svc-4242.ns-42.svc.cluster.local", 1)),
        (
            "srv_hit",
            query("_http._tcp.svc-4242.ns-42.svc.cluster.local", 33),
        ),
        ("ptr_hit", query("243.17.96.10.in-addr.arpa", 12)),
        ("nxdomain", query("missing.ns-42.svc.cluster.local", 1)),
    ];
    let mut group = c.benchmark_group("dns_lookup");
    for (name, q) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| handler.handle(black_box(q), client, Transport::Udp, &mut out, &metrics, 0))
        });
    }
    group.finish();
    let mut n = 0;
    c.bench_function("dns_zone/change_one_service_of_10k", |b| {
        b.iter(|| {
            n += 1;
            let mut svc = service(4242);
            let ip = format!("10.97.{}.{}", n % 250, 1 + n % 200);
            let spec = svc.spec.as_mut().expect("spec");
            spec.cluster_ip = Some(ip.clone());
            spec.cluster_ips = Some(vec![ip]);
            zone.apply_service(&svc);
            zone.publish();
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
