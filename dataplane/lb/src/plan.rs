//! Desired state vs what the maps hold → the smallest set of map writes, ordered so that a
//! concurrent lookup never reads a slot that is not there. Pure; the maps apply it (`maps.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddrV4;

use weir_lb_common::{
    Backend, BackendKey, FLAG_AFFINITY, ServiceKey, ServiceValue, ip_to_map, port_to_map,
};

use crate::maglev;
use crate::model::{Algorithm, Desired, Frontend};

/// A mirror of the service, backend and Maglev maps, read once from the pinned maps at start
/// and kept in step with every write, so a sync never reads the maps back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub backends: HashMap<u32, BTreeMap<u32, Backend>>,
    pub maglev: HashMap<u32, Vec<u32>>,
}

/// Map writes, applied in field order: new slots and tables first, then the services that
/// point at them, then the removal of slots and tables no service points at any more.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub put_backends: Vec<(BackendKey, Backend)>,
    pub put_maglev: Vec<(u32, Vec<u32>)>,
    pub put_services: Vec<(ServiceKey, ServiceValue)>,
    pub del_services: Vec<ServiceKey>,
    pub del_backends: Vec<BackendKey>,
    pub del_maglev: Vec<u32>,
    /// Ids of deleted frontends: their per-id state (counters, round-robin position) is zeroed
    /// on the way out, so an id handed out again starts clean without a write at creation.
    pub freed_ids: Vec<u32>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.writes() == 0
    }

    /// Number of map entries written or deleted.
    pub fn writes(&self) -> usize {
        self.put_backends.len()
            + self.put_maglev.len()
            + self.put_services.len()
            + self.del_services.len()
            + self.del_backends.len()
            + self.del_maglev.len()
    }
}

/// How Maglev tables are built; the same on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevConfig {
    pub table_size: u32,
    pub seed: u64,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        Self {
            table_size: maglev::DEFAULT_TABLE_SIZE,
            seed: maglev::DEFAULT_SEED,
        }
    }
}

pub fn service_key(fe: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: ip_to_map(fe.addr.ip().octets()),
        port: port_to_map(fe.addr.port()),
        proto: fe.proto,
        _pad: 0,
    }
}

pub fn backend_value(b: &SocketAddrV4) -> Backend {
    Backend {
        addr: ip_to_map(b.ip().octets()),
        port: port_to_map(b.port()),
        _pad: 0,
    }
}

/// The writes that turn `state` into `desired`. Existing frontends keep their service id
/// (so ids survive restarts) and backends keep their slot (so affinity entries stay valid).
pub fn plan(state: &MapState, desired: &Desired, mcfg: MaglevConfig) -> Plan {
    plan_scoped(state, desired, None, mcfg)
}

/// Like [`plan`], for part of the cluster: `desired` holds the frontends of some Services only,
/// and `removable` the frontends those Services had before; only those may be deleted. This
/// is what one EndpointSlice change costs: work in the size of the change, not of the cluster.
pub fn plan_scoped(
    state: &MapState,
    desired: &Desired,
    removable: Option<&[Frontend]>,
    mcfg: MaglevConfig,
) -> Plan {
    let mut p = Plan::default();
    // Built only when a new frontend needs an id.
    let mut used: Option<HashSet<u32>> = None;
    let mut next_id = 1u32;
    let mut wanted_keys = HashSet::with_capacity(desired.len());
    let empty = BTreeMap::new();
    for (fe, want) in desired {
        let key = service_key(fe);
        wanted_keys.insert(key);
        let (id, current) = match state.services.get(&key) {
            Some(v) => (v.id, state.backends.get(&v.id).unwrap_or(&empty)),
            None => {
                let used =
                    used.get_or_insert_with(|| state.services.values().map(|v| v.id).collect());
                while used.contains(&next_id) {
                    next_id += 1;
                }
                used.insert(next_id);
                (next_id, &empty)
            }
        };
        let n = want.backends.len().min(u16::MAX as usize);
        let wanted: BTreeSet<Backend> = want.backends[..n].iter().map(backend_value).collect();
        let mut slots: Vec<Option<Backend>> = vec![None; n];
        let mut placed = HashSet::new();
        for (s, slot) in slots.iter_mut().enumerate() {
            if let Some(b) = current.get(&(s as u32))
                && wanted.contains(b)
                && placed.insert(*b)
            {
                *slot = Some(*b);
            }
        }
        let mut rest = wanted.iter().filter(|b| !placed.contains(*b));
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            *slot = rest.next().copied();
        }
        let slots: Vec<Backend> = slots.into_iter().flatten().collect();
        for (s, b) in slots.iter().enumerate() {
            if current.get(&(s as u32)) != Some(b) {
                p.put_backends.push((
                    BackendKey {
                        service_id: id,
                        slot: s as u32,
                    },
                    *b,
                ));
            }
        }
        for &s in current.keys().filter(|&&s| s as usize >= slots.len()) {
            p.del_backends.push(BackendKey {
                service_id: id,
                slot: s,
            });
        }
        let maglev = want.algorithm == Algorithm::Maglev && !slots.is_empty();
        if maglev {
            let addrs: Vec<SocketAddrV4> = slots.iter().map(backend_addr).collect();
            let table = maglev::table(&addrs, mcfg.table_size, mcfg.seed);
            if state.maglev.get(&id) != Some(&table) {
                p.put_maglev.push((id, table));
            }
        } else if state.maglev.contains_key(&id) {
            p.del_maglev.push(id);
        }
        let value = ServiceValue {
            id,
            count: slots.len() as u16,
            algorithm: want.algorithm.to_map(),
            flags: if want.affinity_timeout_secs.is_some() {
                FLAG_AFFINITY
            } else {
                0
            },
            affinity_timeout_secs: want.affinity_timeout_secs.unwrap_or(0),
            maglev_size: if maglev { mcfg.table_size } else { 0 },
        };
        if state.services.get(&key) != Some(&value) {
            p.put_services.push((key, value));
        }
    }
    let gone: Vec<(&ServiceKey, &ServiceValue)> = match removable {
        None => state
            .services
            .iter()
            .filter(|(k, _)| !wanted_keys.contains(*k))
            .collect(),
        Some(fes) => fes
            .iter()
            .map(service_key)
            .filter(|k| !wanted_keys.contains(k))
            .filter_map(|k| state.services.get_key_value(&k))
            .collect(),
    };
    for (key, v) in gone {
        p.del_services.push(*key);
        p.freed_ids.push(v.id);
        for &slot in state
            .backends
            .get(&v.id)
            .into_iter()
            .flat_map(BTreeMap::keys)
        {
            p.del_backends.push(BackendKey {
                service_id: v.id,
                slot,
            });
        }
        if state.maglev.contains_key(&v.id) {
            p.del_maglev.push(v.id);
        }
    }
    p
}

pub fn backend_addr(b: &Backend) -> SocketAddrV4 {
    SocketAddrV4::new(
        weir_lb_common::ip_from_map(b.addr).into(),
        weir_lb_common::port_from_map(b.port),
    )
}

impl MapState {
    /// Records `plan` as written.
    pub fn apply(&mut self, plan: &Plan) {
        for (k, b) in &plan.put_backends {
            self.backends
                .entry(k.service_id)
                .or_default()
                .insert(k.slot, *b);
        }
        for (id, t) in &plan.put_maglev {
            self.maglev.insert(*id, t.clone());
        }
        for (k, v) in &plan.put_services {
            self.services.insert(*k, *v);
        }
        for k in &plan.del_services {
            self.services.remove(k);
        }
        for k in &plan.del_backends {
            if let Some(slots) = self.backends.get_mut(&k.service_id) {
                slots.remove(&k.slot);
                if slots.is_empty() {
                    self.backends.remove(&k.service_id);
                }
            }
        }
        for id in &plan.del_maglev {
            self.maglev.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DesiredFrontend, ServiceRef};
    use weir_lb_common::PROTO_TCP;

    fn fe(last: u8) -> Frontend {
        Frontend {
            addr: SocketAddrV4::new([10, 96, 0, last].into(), 80),
            proto: PROTO_TCP,
        }
    }

    fn want(backends: &[u8], algorithm: Algorithm) -> DesiredFrontend {
        DesiredFrontend {
            service: std::sync::Arc::new(ServiceRef {
                namespace: "default".into(),
                name: "web".into(),
                port: String::new(),
            }),
            backends: backends
                .iter()
                .map(|&i| SocketAddrV4::new([10, 244, 0, i].into(), 8080))
                .collect(),
            algorithm,
            affinity_timeout_secs: None,
        }
    }

    fn step(state: &mut MapState, desired: &Desired) -> Plan {
        let p = plan(state, desired, MaglevConfig::default());
        state.apply(&p);
        assert!(
            plan(state, desired, MaglevConfig::default()).is_empty(),
            "plan must converge"
        );
        p
    }

    #[test]
    fn only_changes_are_written_and_slots_stay_put() {
        let mut st = MapState::default();
        let mut d = Desired::new();
        for i in 1..=3 {
            d.insert(fe(i), want(&[1, 2, 3], Algorithm::Random));
        }
        let p = step(&mut st, &d);
        assert_eq!((p.put_services.len(), p.put_backends.len()), (3, 9));
        let mut ids: Vec<_> = p.put_services.iter().map(|(_, v)| v.id).collect();
        ids.sort();
        assert_eq!(ids, vec![1, 2, 3]);

        // Scale 3 → 1 on one frontend: its count shrinks and two slots go, nothing else.
        d.insert(fe(2), want(&[3], Algorithm::Random));
        let p = step(&mut st, &d);
        assert_eq!(p.put_services.len(), 1);
        assert_eq!(p.put_services[0].1.count, 1);
        assert_eq!(p.put_backends.len(), 1, "backend 3 moves into slot 0");
        assert_eq!(p.del_backends.len(), 2);

        // Removing backend 2 of [1,2,3]: backend 3 takes slot 1; slot 0 (backend 1) is untouched.
        d.insert(fe(1), want(&[1, 3], Algorithm::Random));
        let p = step(&mut st, &d);
        assert_eq!(
            p.put_backends,
            vec![(
                BackendKey {
                    service_id: 1,
                    slot: 1
                },
                backend_value(&SocketAddrV4::new([10, 244, 0, 3].into(), 8080))
            )]
        );
        assert_eq!(
            p.del_backends,
            vec![BackendKey {
                service_id: 1,
                slot: 2
            }]
        );

        // A deleted frontend frees its id, which the next new frontend reuses.
        d.remove(&fe(3));
        let p = step(&mut st, &d);
        assert_eq!(p.del_services.len(), 1);
        assert_eq!(p.del_backends.len(), 3);
        assert_eq!(p.freed_ids, vec![3]);
        d.insert(fe(9), want(&[], Algorithm::Random));
        let p = step(&mut st, &d);
        assert_eq!(p.put_services[0].1.id, 3);

        assert_eq!(
            p.put_services[0].1.count, 0,
            "no endpoints: count 0 makes BPF refuse"
        );

        // Scoped: only the named frontends may go; the rest of the state is not looked at.
        let mut part = Desired::new();
        part.insert(fe(1), want(&[1], Algorithm::Random));
        let p = plan_scoped(&st, &part, Some(&[fe(1), fe(9)]), MaglevConfig::default());
        assert_eq!(p.del_services, vec![service_key(&fe(9))]);
        assert_eq!(p.put_services.len(), 1);
        assert!(!p.del_services.contains(&service_key(&fe(2))));
    }

    #[test]
    fn maglev_tables_follow_the_backends() {
        let mut st = MapState::default();
        let mut d = Desired::new();
        d.insert(fe(1), want(&[1, 2, 3], Algorithm::Maglev));
        let p = step(&mut st, &d);
        assert_eq!(p.put_maglev.len(), 1);
        assert_eq!(p.put_services[0].1.maglev_size, maglev::DEFAULT_TABLE_SIZE);
        d.insert(fe(1), want(&[1, 2, 3], Algorithm::Random));
        let p = step(&mut st, &d);
        assert_eq!(p.del_maglev, vec![1]);
    }
}
