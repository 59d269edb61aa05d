//! The service map at capacity, on real maps pinned in a bpffs directory of the test's own and
//! programs attached to a cgroup of its own (no process joins it, no traffic: no namespace
//! is needed). Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use anyhow::Result;
use weir_lb::model::{DesiredFrontend, Frontend, ServiceRef};
use weir_lb::netlab::{TestBpfRoot, TestCgroup};
use weir_lb::plan::service_key;
use weir_lb::{Algorithm, Desired, MaglevConfig, Syncer, load_and_attach};
use weir_lb_common::{MAX_BACKEND_SLOTS, MAX_SERVICES, PROTO_TCP};

fn fe(i: u32) -> Frontend {
    Frontend {
        addr: SocketAddrV4::new(Ipv4Addr::from(0x0a60_0000 + i), 80),
        proto: PROTO_TCP,
    }
}

#[test]
fn a_full_service_map_still_takes_deletions_and_ids_stay_inside_the_per_id_arrays() -> Result<()> {
    let bpf = TestBpfRoot::new();
    let cg = TestCgroup::new()?;
    let mut syncer = Syncer::new(load_and_attach(&bpf.0, &cg.path)?, MaglevConfig::default())?;
    let want = DesiredFrontend {
        service: Arc::new(ServiceRef {
            namespace: "default".into(),
            name: "many".into(),
            port: String::new(),
        }),
        backends: Arc::from([SocketAddrV4::new([10, 244, 0, 2].into(), 8080)]),
        internal_backends: None,
        algorithm: Algorithm::RoundRobin,
        affinity_timeout_secs: None,
    };
    // Ids index RR and COUNTERS (MAX_SERVICES entries) and start at 1.
    let room = MAX_SERVICES - 1;
    let mut d: Desired = (0..room).map(|i| (fe(i), want.clone())).collect();
    syncer.sync(&d)?;

    // Full: one Service goes, two come. The deletion must land although the two cannot both
    // be written, and no entry may get an id past the arrays (a round-robin Service there
    // would refuse every connection: it has no position).
    d.remove(&fe(0));
    d.insert(fe(room), want.clone());
    d.insert(fe(room + 1), want.clone());
    let err = syncer.sync(&d).expect_err("no room for every frontend");
    let maps = syncer.maps().read_state()?;
    assert!(
        !maps.services.contains_key(&service_key(&fe(0))),
        "the deleted frontend is still in the map ({err})"
    );
    assert!(maps.services.values().all(|v| v.id < MAX_SERVICES));
    assert!(
        err.to_string().contains("WEIR_SERVICES"),
        "the error names the full map: {err}"
    );
    assert_eq!(syncer.state(), &maps, "the mirror is the maps");

    // The retry (the watch layer's next full sync) gives the freed id to a waiting frontend;
    // the other still has no room, and says so again.
    assert!(syncer.sync(&d).is_err());
    let maps = syncer.maps().read_state()?;
    assert_eq!(maps.services.len(), room as usize);
    assert!(maps.services.contains_key(&service_key(&fe(room))));
    assert!(!maps.services.contains_key(&service_key(&fe(room + 1))));
    assert!(maps.services.values().all(|v| v.id < MAX_SERVICES));
    Ok(())
}

#[test]
fn a_full_backend_map_still_takes_deletions() -> Result<()> {
    let bpf = TestBpfRoot::new();
    let cg = TestCgroup::new()?;
    let mut syncer = Syncer::new(load_and_attach(&bpf.0, &cg.path)?, MaglevConfig::default())?;
    let want = |n: u32| DesiredFrontend {
        service: Arc::new(ServiceRef {
            namespace: "default".into(),
            name: "wide".into(),
            port: String::new(),
        }),
        backends: (0..n)
            .map(|i| SocketAddrV4::new(Ipv4Addr::from(0x0af4_0000 + i), 8080))
            .collect(),
        internal_backends: None,
        algorithm: Algorithm::Random,
        affinity_timeout_secs: None,
    };
    // Every slot taken.
    let per = 256;
    let frontends = MAX_BACKEND_SLOTS / per;
    let mut d: Desired = (0..frontends).map(|i| (fe(i), want(per))).collect();
    syncer.sync(&d)?;

    // One frontend goes, one with two endpoints comes: the deletion lands although the
    // newcomer's slots cannot be written before it; the newcomer serves what fits (nothing
    // yet: it refuses rather than letting connects through unrewritten) and says so.
    d.remove(&fe(0));
    d.insert(fe(frontends), want(2));
    let err = syncer.sync(&d).expect_err("no slot for the newcomer");
    let maps = syncer.maps().read_state()?;
    assert!(
        !maps.services.contains_key(&service_key(&fe(0))),
        "the deleted frontend is still in the map ({err})"
    );
    assert!(
        err.to_string().contains("WEIR_BACKENDS"),
        "the error names the full map: {err}"
    );
    assert_eq!(syncer.state(), &maps, "the mirror is the maps");

    // The retry has the freed slots.
    assert_eq!(syncer.sync(&d)?, 3, "two slots and the count");
    let maps = syncer.maps().read_state()?;
    assert_eq!(maps.services[&service_key(&fe(frontends))].count, 2);
    Ok(())
}
