use crate::records::ObjKey;
use crate::records::tests::{pod, service, slice};
use crate::wire::{TYPE_A, TYPE_PTR, TYPE_SRV, name_to_wire};

use super::*;

fn lookup(r: &ZoneReader, name: &str) -> Option<Vec<u16>> {
    let snap = r.load();
    snap.lookup(&name_to_wire(name).unwrap())
        .map(|e| e.types().collect())
}

fn count(r: &ZoneReader, name: &str, rtype: u16) -> u16 {
    let snap = r.load();
    snap.lookup(&name_to_wire(name).unwrap())
        .and_then(|e| e.records(rtype))
        .map_or(0, |(_, n)| n)
}

fn key(ns: &str, name: &str) -> ObjKey {
    ObjKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

#[test]
fn services_appear_change_and_disappear_with_their_ancestors() {
    let (mut zone, r) = Zone::new("cluster.local", 5).unwrap();
    assert_eq!(
        lookup(&r, "cluster.local"),
        Some(vec![crate::wire::TYPE_SOA])
    );
    assert_eq!(lookup(&r, "hello.default.svc.cluster.local"), None);

    zone.apply_service(&service("default", "hello", "10.96.0.20", &[("http", 80)]));
    // Not visible before publish: readers see whole batches only.
    assert_eq!(lookup(&r, "hello.default.svc.cluster.local"), None);
    let before = r.load();
    zone.publish();
    assert_eq!(
        lookup(&r, "hello.default.svc.cluster.local"),
        Some(vec![TYPE_A])
    );
    assert_eq!(
        count(&r, "_http._tcp.hello.default.svc.cluster.local", TYPE_SRV),
        1
    );
    assert_eq!(count(&r, "20.0.96.10.in-addr.arpa", TYPE_PTR), 1);
    // Empty non-terminals exist (NODATA, not NXDOMAIN).
    assert_eq!(lookup(&r, "default.svc.cluster.local"), Some(vec![]));
    assert_eq!(lookup(&r, "svc.cluster.local"), Some(vec![]));
    assert_eq!(
        lookup(&r, "_tcp.hello.default.svc.cluster.local"),
        Some(vec![])
    );
    // An older snapshot is unaffected by later publishes.
    assert!(
        before
            .lookup(&name_to_wire("hello.default.svc.cluster.local").unwrap())
            .is_none()
    );

    // A changed ClusterIP replaces the A and PTR records, nothing else.
    zone.apply_service(&service("default", "hello", "10.96.0.21", &[("http", 80)]));
    zone.publish();
    assert_eq!(count(&r, "20.0.96.10.in-addr.arpa", TYPE_PTR), 0);
    assert_eq!(count(&r, "21.0.96.10.in-addr.arpa", TYPE_PTR), 1);
    assert_eq!(count(&r, "hello.default.svc.cluster.local", TYPE_A), 1);

    zone.delete_service(&key("default", "hello"));
    zone.publish();
    assert_eq!(lookup(&r, "hello.default.svc.cluster.local"), None);
    assert_eq!(lookup(&r, "default.svc.cluster.local"), None);
    assert_eq!(lookup(&r, "svc.cluster.local"), None);
    assert_eq!(lookup(&r, "21.0.96.10.in-addr.arpa"), None);
    assert_eq!(
        lookup(&r, "cluster.local"),
        Some(vec![crate::wire::TYPE_SOA])
    );
}

#[test]
fn names_shared_by_two_services_survive_one_delete() {
    let (mut zone, r) = Zone::new("cluster.local", 5).unwrap();
    zone.apply_service(&service("a", "one", "10.96.0.1", &[]));
    zone.apply_service(&service("a", "two", "10.96.0.2", &[]));
    zone.publish();
    zone.delete_service(&key("a", "one"));
    zone.publish();
    assert_eq!(lookup(&r, "a.svc.cluster.local"), Some(vec![]));
    assert_eq!(lookup(&r, "two.a.svc.cluster.local"), Some(vec![TYPE_A]));
}

#[test]
fn headless_records_follow_their_slices_in_any_order() {
    let (mut zone, r) = Zone::new("cluster.local", 5).unwrap();
    // The slice may arrive before its Service.
    zone.apply_slice(&slice(
        "db",
        "pg-1",
        "pg",
        &[("10.244.0.5", Some("pg-0"), None)],
        &[],
    ));
    zone.publish();
    assert_eq!(lookup(&r, "pg.db.svc.cluster.local"), None);
    zone.apply_service(&service("db", "pg", "None", &[]));
    zone.publish();
    assert_eq!(count(&r, "pg.db.svc.cluster.local", TYPE_A), 1);
    zone.apply_slice(&slice(
        "db",
        "pg-2",
        "pg",
        &[("10.244.0.6", Some("pg-1"), None)],
        &[],
    ));
    zone.publish();
    assert_eq!(count(&r, "pg.db.svc.cluster.local", TYPE_A), 2);
    assert_eq!(count(&r, "pg-1.pg.db.svc.cluster.local", TYPE_A), 1);
    // An endpoint turning not-ready leaves the answer.
    zone.apply_slice(&slice(
        "db",
        "pg-2",
        "pg",
        &[("10.244.0.6", Some("pg-1"), Some(false))],
        &[],
    ));
    zone.publish();
    assert_eq!(count(&r, "pg.db.svc.cluster.local", TYPE_A), 1);
    assert_eq!(lookup(&r, "pg-1.pg.db.svc.cluster.local"), None);
    zone.delete_slice(&key("db", "pg-1"));
    zone.publish();
    assert_eq!(count(&r, "pg.db.svc.cluster.local", TYPE_A), 0);
    // The Service still exists (an empty non-terminal now, with no endpoints).
    assert_eq!(lookup(&r, "db.svc.cluster.local"), None);
}

#[test]
fn pods_map_ips_to_namespaces_and_get_records() {
    let (mut zone, r) = Zone::new("cluster.local", 5).unwrap();
    zone.apply_pod(&pod("team", "web", "10.244.1.2"));
    zone.publish();
    let ip: IpAddr = "10.244.1.2".parse().unwrap();
    assert_eq!(r.load().pod_namespace(&ip), Some("team"));
    assert_eq!(count(&r, "10-244-1-2.team.pod.cluster.local", TYPE_A), 1);
    zone.delete_pod(&key("team", "web"));
    zone.publish();
    assert_eq!(r.load().pod_namespace(&ip), None);
    assert_eq!(lookup(&r, "10-244-1-2.team.pod.cluster.local"), None);
}

#[test]
fn a_service_with_a_bad_external_name_gets_no_records_and_the_rest_stays() {
    let (mut zone, r) = Zone::new("cluster.local", 5).unwrap();
    zone.apply_service(&service("a", "ok", "10.96.0.1", &[]));
    let mut bad = service("a", "bad", "", &[]);
    let spec = bad.spec.as_mut().unwrap();
    spec.type_ = Some("ExternalName".into());
    spec.external_name = Some(format!("{}.com", "x".repeat(70)));
    zone.apply_service(&bad);
    zone.publish();
    assert_eq!(lookup(&r, "bad.a.svc.cluster.local"), None);
    assert_eq!(lookup(&r, "ok.a.svc.cluster.local"), Some(vec![TYPE_A]));
}
