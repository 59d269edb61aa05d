//! Fuzz the query path: any bytes from any client must be answered or dropped without a
//! panic, and every answer must be a DNS message hickory-proto can parse, with the query's
//! ID. The zone holds a ClusterIP, a headless and an ExternalName Service and a pod, so hits,
//! misses, truncation and autopath are all reachable.
#![no_main]

use std::net::IpAddr;
use std::sync::LazyLock;

use hickory_proto::op::Message;
use k8s_openapi::api::core::v1::{Pod, PodStatus, Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use libfuzzer_sys::fuzz_target;
use weir_dns::handler::{Action, Handler, Transport};
use weir_dns::metrics::Metrics;
use weir_dns::zone::Zone;

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

fn service(ns: &str, name: &str, spec: ServiceSpec) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(spec),
        ..Default::default()
    }
}

static HANDLER: LazyLock<(Handler, Metrics, Zone)> = LazyLock::new(|| {
    let (mut zone, reader) = Zone::new("cluster.local", 5).expect("zone");
    zone.apply_service(&service(
        "default",
        "hello",
        ServiceSpec {
            cluster_ip: Some("10.96.0.20".into()),
            ..Default::default()
        },
    ));
    zone.apply_service(&service(
        "default",
        "db",
        ServiceSpec {
            cluster_ip: Some("None".into()),
            ..Default::default()
        },
    ));
    zone.apply_service(&service(
        "default",
        "ext",
        ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some("example.com".into()),
            ..Default::default()
        },
    ));
    zone.apply_pod(&Pod {
        metadata: meta("default", "client"),
        status: Some(PodStatus {
            pod_ip: Some("127.0.0.1".into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    zone.publish();
    let soa = zone.names().soa_rdata(5).expect("soa");
    let handler = Handler::new(reader, &zone.names().zone_wire(), &soa, 5);
    (handler, Metrics::new(1), zone)
});

fuzz_target!(|data: &[u8]| {
    let (handler, metrics, _) = &*HANDLER;
    let client: IpAddr = [127, 0, 0, 1].into();
    let mut out = Vec::new();
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Action::Reply(_) = handler.handle(data, client, transport, &mut out, metrics, 0) {
            let msg = Message::from_vec(&out).expect("every answer parses");
            assert_eq!(msg.metadata.id, u16::from_be_bytes([data[0], data[1]]));
            if transport == Transport::Udp {
                assert!(out.len() <= 1232, "UDP answer over the EDNS limit");
            }
        }
    }
});
