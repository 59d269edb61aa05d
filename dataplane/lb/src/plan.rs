//! Desired state vs what the maps hold → the smallest set of map writes, ordered so that a
//! concurrent lookup never reads a slot that is not there. Pure; the maps apply it (`maps.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddrV4;

use weir_lb_common::{
    Backend, BackendKey, FLAG_AFFINITY, FLAG_TWO_SCOPES, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    ServiceKey, ServiceValue, ip_to_map, port_to_map,
};

use crate::maglev;
use crate::model::{Algorithm, Desired, DesiredFrontend, Frontend};

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

/// The key of a frontend's `SCOPE_EXTERNAL` entry: the one every frontend has.
pub fn service_key(fe: &Frontend) -> ServiceKey {
    scoped_key(fe, SCOPE_EXTERNAL)
}

/// The keys of every entry `fe` may have: its `SCOPE_EXTERNAL` one, and the `SCOPE_INTERNAL`
/// one of an `externalTrafficPolicy: Local` external frontend.
pub fn service_keys(fe: &Frontend) -> [ServiceKey; 2] {
    [
        scoped_key(fe, SCOPE_EXTERNAL),
        scoped_key(fe, SCOPE_INTERNAL),
    ]
}

fn scoped_key(fe: &Frontend, scope: u8) -> ServiceKey {
    ServiceKey {
        addr: ip_to_map(fe.addr.ip().octets()),
        port: port_to_map(fe.addr.port()),
        proto: fe.proto,
        scope,
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
    let mut planner = Planner {
        state,
        mcfg,
        p: Plan::default(),
        used: None,
        next_id: 1,
        empty: BTreeMap::new(),
    };
    let mut wanted_keys = HashSet::with_capacity(desired.len());
    for (fe, want) in desired {
        let mut flags = if want.affinity_timeout_secs.is_some() {
            FLAG_AFFINITY
        } else {
            0
        };
        if let Some(internal) = &want.internal_backends {
            // Written before the external entry that points the socket hooks at it.
            let key = scoped_key(fe, SCOPE_INTERNAL);
            wanted_keys.insert(key);
            planner.entry(key, internal, want, flags);
            flags |= FLAG_TWO_SCOPES;
        }
        let key = service_key(fe);
        wanted_keys.insert(key);
        planner.entry(key, &want.backends, want, flags);
    }
    let mut p = planner.p;
    let gone: Vec<(&ServiceKey, &ServiceValue)> = match removable {
        None => state
            .services
            .iter()
            .filter(|(k, _)| !wanted_keys.contains(*k))
            .collect(),
        Some(fes) => fes
            .iter()
            .flat_map(service_keys)
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

/// Plans map entries one at a time, handing out ids of new ones.
struct Planner<'a> {
    state: &'a MapState,
    mcfg: MaglevConfig,
    p: Plan,
    /// Ids in use, built only when a new entry needs an id.
    used: Option<HashSet<u32>>,
    next_id: u32,
    empty: BTreeMap<u32, Backend>,
}

impl Planner<'_> {
    /// The writes that give entry `key` the `backends` and settings of `want`, and `flags`.
    fn entry(
        &mut self,
        key: ServiceKey,
        backends: &[SocketAddrV4],
        want: &DesiredFrontend,
        flags: u8,
    ) {
        let state = self.state;
        let p = &mut self.p;
        let (id, current) = match state.services.get(&key) {
            Some(v) => (v.id, state.backends.get(&v.id).unwrap_or(&self.empty)),
            None => {
                let used = self
                    .used
                    .get_or_insert_with(|| state.services.values().map(|v| v.id).collect());
                while used.contains(&self.next_id) {
                    self.next_id += 1;
                }
                used.insert(self.next_id);
                (self.next_id, &self.empty)
            }
        };
        let n = backends.len().min(u16::MAX as usize);
        let wanted: BTreeSet<Backend> = backends[..n].iter().map(backend_value).collect();
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
            let table = maglev::table(&addrs, self.mcfg.table_size, self.mcfg.seed);
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
            flags,
            affinity_timeout_secs: want.affinity_timeout_secs.unwrap_or(0),
            maglev_size: if maglev { self.mcfg.table_size } else { 0 },
        };
        if state.services.get(&key) != Some(&value) {
            p.put_services.push((key, value));
        }
    }
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
            internal_backends: None,
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

    #[test]
    fn external_traffic_policy_flips_add_and_remove_only_the_internal_entries() {
        use crate::model::{ModelConfig, desired};
        use k8s_openapi::api::core::v1::Service;
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let svc = |policy: &str| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "lb", "namespace": "default"},
                "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalIPs": ["203.0.113.1"],
                         "externalTrafficPolicy": policy,
                         "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
            }))
            .expect("Service")
        };
        let eps: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "lb-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "lb"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.244.0.2"], "nodeName": "a"},
                          {"addresses": ["10.244.1.2"], "nodeName": "b"}]
        }))
        .expect("EndpointSlice");
        let cfg = ModelConfig {
            node_name: Some("b".into()),
            node_ips: vec![[192, 168, 1, 5].into()],
            ..Default::default()
        };
        let want = |policy: &str| desired(&[svc(policy)], std::slice::from_ref(&eps), &cfg).0;
        let at = |ip: [u8; 4], port: u16| Frontend {
            addr: SocketAddrV4::new(ip.into(), port),
            proto: PROTO_TCP,
        };
        // In the order of the desired state (by address).
        let externals = [at([192, 168, 1, 5], 30080), at([203, 0, 113, 1], 80)];
        let internal_keys: Vec<ServiceKey> = externals.iter().map(|f| service_keys(f)[1]).collect();

        // Cluster: one entry per frontend, both endpoints everywhere.
        let mut st = MapState::default();
        let p = step(&mut st, &want("Cluster"));
        assert_eq!((p.put_services.len(), p.put_backends.len()), (3, 6));
        assert!(st.services.values().all(|v| v.flags == 0 && v.count == 2));

        // Local: the two external frontends gain an internal entry with both endpoints, and
        // their own entry keeps this node's endpoint only; the ClusterIP is not touched.
        let p = step(&mut st, &want("Local"));
        let puts: Vec<ServiceKey> = p.put_services.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            puts,
            vec![
                internal_keys[0],
                service_key(&externals[0]),
                internal_keys[1],
                service_key(&externals[1])
            ],
            "each internal entry is written before the external entry that points at it"
        );
        assert!(p.del_services.is_empty());
        assert_eq!(
            p.put_backends.len(),
            4 + 2,
            "two slots per new entry, slot 0 of each narrowed one"
        );
        assert_eq!(p.del_backends.len(), 2, "slot 1 of each narrowed entry");
        for f in &externals {
            let ext = st.services[&service_key(f)];
            let int = st.services[&service_keys(f)[1]];
            assert_eq!((ext.count, ext.flags), (1, FLAG_TWO_SCOPES));
            assert_eq!((int.count, int.flags), (2, 0));
            assert_eq!(
                backend_addr(&st.backends[&ext.id][&0]),
                SocketAddrV4::new([10, 244, 1, 2].into(), 8080)
            );
        }
        let internal_ids: Vec<u32> = internal_keys.iter().map(|k| st.services[k].id).collect();

        // Back to Cluster: exactly the internal entries (and their slots) go.
        let p = step(&mut st, &want("Cluster"));
        let mut dels = p.del_services.clone();
        dels.sort();
        let mut want_dels = internal_keys.clone();
        want_dels.sort();
        assert_eq!(dels, want_dels);
        let mut freed = p.freed_ids.clone();
        freed.sort();
        assert_eq!(freed, internal_ids);
        assert_eq!(p.put_services.len(), 2, "the external entries widen again");
        assert_eq!(st.services.len(), 3);

        // A scoped sync that deletes the Local Service deletes its internal entries too.
        step(&mut st, &want("Local"));
        let fronts: Vec<Frontend> = want("Local").into_keys().collect();
        let p = plan_scoped(&st, &Desired::new(), Some(&fronts), MaglevConfig::default());
        assert_eq!(p.del_services.len(), 5);
        st.apply(&p);
        assert!(st.services.is_empty() && st.backends.is_empty());
    }
}
