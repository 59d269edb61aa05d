use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, PodIP, PodStatus, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;
use crate::wire::wire_to_name;

pub(crate) fn service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, i32)]) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ServicePort {
                        name: (!n.is_empty()).then(|| n.to_string()),
                        port: *p,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `endpoints`: (address, hostname, ready).
pub(crate) fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    endpoints: &[(&str, Option<&str>, Option<bool>)],
    ports: &[(&str, i32)],
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: endpoints
            .iter()
            .map(|(ip, host, ready)| Endpoint {
                addresses: vec![ip.to_string()],
                hostname: host.map(str::to_string),
                conditions: Some(EndpointConditions {
                    ready: *ready,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(
            ports
                .iter()
                .map(|(n, p)| EndpointPort {
                    name: Some(n.to_string()),
                    port: Some(*p),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

pub(crate) fn pod(ns: &str, name: &str, ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        },
        status: Some(PodStatus {
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            phase: Some("Running".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn show(rrs: &[Rr]) -> Vec<String> {
    rrs.iter()
        .map(|r| {
            let data = match r.rtype {
                TYPE_A | TYPE_AAAA => {
                    let ip: IpAddr = if r.rdata.len() == 4 {
                        <[u8; 4]>::try_from(&r.rdata[..]).unwrap().into()
                    } else {
                        <[u8; 16]>::try_from(&r.rdata[..]).unwrap().into()
                    };
                    ip.to_string()
                }
                TYPE_SRV => format!(
                    "{} {}",
                    u16::from_be_bytes([r.rdata[4], r.rdata[5]]),
                    wire_to_name(&r.rdata[6..])
                ),
                _ => wire_to_name(&r.rdata),
            };
            format!("{} {} {}", wire_to_name(&r.owner), r.rtype, data)
        })
        .collect()
}

fn key(ns: &str, name: &str) -> ObjKey {
    ObjKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

#[test]
fn cluster_ip_service_gets_a_srv_and_ptr() {
    let names = Names::new("cluster.local").unwrap();
    let svc = service("default", "hello", "10.96.0.20", &[("http", 80), ("", 81)]);
    let rrs = names
        .service_records(&key("default", "hello"), &ServiceView::of(&svc), [])
        .unwrap();
    let mut got = show(&rrs);
    got.sort();
    assert_eq!(
        got,
        [
            "20.0.96.10.in-addr.arpa. 12 hello.default.svc.cluster.local.",
            "_http._tcp.hello.default.svc.cluster.local. 33 80 hello.default.svc.cluster.local.",
            "hello.default.svc.cluster.local. 1 10.96.0.20",
        ]
    );
}

#[test]
fn dual_stack_service_gets_aaaa_and_ip6_ptr() {
    let names = Names::new("cluster.local").unwrap();
    let mut svc = service("ns", "v6", "10.96.0.21", &[]);
    svc.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.0.21".into(), "fd00::15".into()]);
    let rrs = names
        .service_records(&key("ns", "v6"), &ServiceView::of(&svc), [])
        .unwrap();
    let got = show(&rrs);
    assert!(got.contains(&"v6.ns.svc.cluster.local. 28 fd00::15".to_string()));
    let ptr = "5.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa. 12 v6.ns.svc.cluster.local.";
    assert!(got.contains(&ptr.to_string()), "{got:?}");
}

#[test]
fn headless_service_names_ready_endpoints() {
    let names = Names::new("cluster.local").unwrap();
    let mut svc = service("db", "pg", "None", &[]);
    let view = ServiceView::of(&svc);
    assert_eq!(
        view,
        ServiceView::Headless {
            publish_not_ready: false
        }
    );
    let s = SliceView::of(&slice(
        "db",
        "pg-abc",
        "pg",
        &[
            ("10.244.0.5", Some("pg-0"), Some(true)),
            ("10.244.0.6", None, None),
            ("10.244.0.7", Some("pg-2"), Some(false)),
        ],
        &[("sql", 5432)],
    ));
    assert_eq!(s.service, Some(key("db", "pg")));
    let rrs = names
        .service_records(&key("db", "pg"), &view, [&s])
        .unwrap();
    let mut got = show(&rrs);
    got.sort();
    assert_eq!(
        got,
        [
            "10-244-0-6.pg.db.svc.cluster.local. 1 10.244.0.6",
            "5.0.244.10.in-addr.arpa. 12 pg-0.pg.db.svc.cluster.local.",
            "6.0.244.10.in-addr.arpa. 12 10-244-0-6.pg.db.svc.cluster.local.",
            "_sql._tcp.pg.db.svc.cluster.local. 33 5432 10-244-0-6.pg.db.svc.cluster.local.",
            "_sql._tcp.pg.db.svc.cluster.local. 33 5432 pg-0.pg.db.svc.cluster.local.",
            "pg-0.pg.db.svc.cluster.local. 1 10.244.0.5",
            "pg.db.svc.cluster.local. 1 10.244.0.5",
            "pg.db.svc.cluster.local. 1 10.244.0.6",
        ]
    );
    // publishNotReadyAddresses brings the not-ready endpoint in.
    svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
    let rrs = names
        .service_records(&key("db", "pg"), &ServiceView::of(&svc), [&s])
        .unwrap();
    assert!(show(&rrs).contains(&"pg-2.pg.db.svc.cluster.local. 1 10.244.0.7".to_string()));
}

#[test]
fn external_name_is_a_cname_and_bad_targets_are_errors() {
    let names = Names::new("cluster.local").unwrap();
    let mut svc = service("default", "ext", "", &[]);
    let spec = svc.spec.as_mut().unwrap();
    spec.type_ = Some("ExternalName".into());
    spec.external_name = Some("example.com".into());
    let rrs = names
        .service_records(&key("default", "ext"), &ServiceView::of(&svc), [])
        .unwrap();
    assert_eq!(
        show(&rrs),
        ["ext.default.svc.cluster.local. 5 example.com."]
    );
    svc.spec.as_mut().unwrap().external_name = Some("bad..name".into());
    let err = names
        .service_records(&key("default", "ext"), &ServiceView::of(&svc), [])
        .unwrap_err();
    assert!(err.to_string().contains("bad..name"));
}

#[test]
fn service_without_cluster_ip_yet_has_no_records() {
    let svc = service("default", "new", "", &[]);
    assert_eq!(ServiceView::of(&svc), ServiceView::Empty);
}

#[test]
fn pods_get_dashed_names_until_they_finish() {
    let names = Names::new("cluster.local").unwrap();
    let mut p = pod("default", "web", "10.244.1.2");
    let ips = pod_ips(&p);
    let rrs = names.pod_records("default", &ips).unwrap();
    assert_eq!(
        show(&rrs),
        ["10-244-1-2.default.pod.cluster.local. 1 10.244.1.2"]
    );
    p.status.as_mut().unwrap().phase = Some("Succeeded".into());
    assert!(pod_ips(&p).is_empty());
}

#[test]
fn zone_records_include_soa_and_schema_version() {
    let names = Names::new("Cluster.Local.").unwrap();
    assert_eq!(names.zone, "cluster.local");
    let got = show(&names.static_records(5).unwrap());
    assert!(
        got.contains(&"dns-version.cluster.local. 16 1.1.0.".to_string()),
        "{got:?}"
    );
    assert!(got.iter().any(|r| r.starts_with("cluster.local. 6 ")));
}
