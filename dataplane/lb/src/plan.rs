//! Desired state vs what the maps hold → the smallest set of map writes, ordered so that a
//! concurrent lookup never reads a slot that is not there. Pure; the maps apply it (`maps.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddrV4;

use weir_lb_common::{
    Backend, BackendKey, FLAG_AFFINITY, FLAG_TWO_SCOPES, MAX_BACKEND_SLOTS, MAX_MAGLEV_SERVICES,
    MAX_SERVICES, SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceKey, ServiceValue, ip_to_map, port_to_map,
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
    /// Entries left out: no service id was free. Ids index the per-id arrays (`RR`,
    /// `COUNTERS`: `MAX_SERVICES` entries, id 0 unused), and an entry whose id the plan frees
    /// is still read until the plan's deletions land, so room made by this plan serves the
    /// next one. A frontend whose internal entry is left out keeps one entry for everyone.
    pub no_id: Vec<ServiceKey>,
    /// Maglev entries that pick at random instead: `MAGLEV` had no room for their table
    /// (`MAX_MAGLEV_SERVICES`, counting the tables this plan deletes, which go last).
    pub no_maglev: Vec<ServiceKey>,
    /// Entries given only some of their backends (maybe none: they refuse): `BACKENDS` had no
    /// more free slots (`MAX_BACKEND_SLOTS`, counting the slots this plan deletes).
    pub no_slot: Vec<ServiceKey>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.writes() == 0
    }

    /// Whether part of the desired state had no room in the maps (see [`Plan::no_id`]).
    pub fn short_of_room(&self) -> bool {
        !self.no_id.is_empty() || !self.no_maglev.is_empty() || !self.no_slot.is_empty()
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
        tables: state.maglev.len(),
        free_slots: None,
    };
    let mut wanted_keys = HashSet::with_capacity(desired.len());
    for (fe, want) in desired {
        let mut flags = if want.affinity_timeout_secs.is_some() {
            FLAG_AFFINITY
        } else {
            0
        };
        let key = service_key(fe);
        wanted_keys.insert(key);
        let Some(id) = planner.id(key) else {
            continue;
        };
        if let Some(internal) = &want.internal_backends {
            let internal_key = scoped_key(fe, SCOPE_INTERNAL);
            if let Some(internal_id) = planner.id(internal_key) {
                wanted_keys.insert(internal_key);
                // Written before the external entry that points the socket hooks at it.
                planner.entry(internal_key, internal_id, internal, want, flags);
                flags |= FLAG_TWO_SCOPES;
            }
        }
        planner.entry(key, id, &want.backends, want, flags);
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
    /// Maglev tables in the map once this plan's new ones are in and before any goes.
    tables: usize,
    /// Free `BACKENDS` slots left by the new slots planned so far, counted when first needed.
    free_slots: Option<usize>,
}

static NO_SLOTS: BTreeMap<u32, Backend> = BTreeMap::new();

impl Planner<'_> {
    /// The id of entry `key`: its own, or the lowest one free, if any (see [`Plan::no_id`]).
    fn id(&mut self, key: ServiceKey) -> Option<u32> {
        if let Some(v) = self.state.services.get(&key) {
            return Some(v.id);
        }
        let state = self.state;
        let used = self
            .used
            .get_or_insert_with(|| state.services.values().map(|v| v.id).collect());
        while used.contains(&self.next_id) {
            self.next_id += 1;
        }
        if self.next_id >= MAX_SERVICES {
            self.p.no_id.push(key);
            return None;
        }
        used.insert(self.next_id);
        Some(self.next_id)
    }

    /// Takes one free `BACKENDS` slot, if there is one.
    fn take_slot(&mut self) -> bool {
        let state = self.state;
        let free = self.free_slots.get_or_insert_with(|| {
            let used: usize = state.backends.values().map(BTreeMap::len).sum();
            (MAX_BACKEND_SLOTS as usize).saturating_sub(used)
        });
        let taken = *free > 0;
        *free = free.saturating_sub(1);
        taken
    }

    /// The writes that give entry `key` (with `id`) the `backends` and settings of `want`, and
    /// `flags`.
    fn entry(
        &mut self,
        key: ServiceKey,
        id: u32,
        backends: &[SocketAddrV4],
        want: &DesiredFrontend,
        flags: u8,
    ) {
        let state = self.state;
        // By id, not by entry: slots a failed write left under a new entry's id are reused.
        let current = state.backends.get(&id).unwrap_or(&NO_SLOTS);
        let all = backends.len().min(u16::MAX as usize);
        let wanted: BTreeSet<Backend> = backends[..all].iter().map(backend_value).collect();
        // Slots `0..n`; those not written yet need room in BACKENDS.
        let mut n = 0;
        while n < all && (current.contains_key(&(n as u32)) || self.take_slot()) {
            n += 1;
        }
        let p = &mut self.p;
        if n < all {
            p.no_slot.push(key);
        }
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
        let mut algorithm = want.algorithm;
        let mut maglev = algorithm == Algorithm::Maglev && !slots.is_empty();
        if maglev && !state.maglev.contains_key(&id) {
            if self.tables < MAX_MAGLEV_SERVICES as usize {
                self.tables += 1;
            } else {
                p.no_maglev.push(key);
                (maglev, algorithm) = (false, Algorithm::Random);
            }
        }
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
            algorithm: algorithm.to_map(),
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

/// The frontend address of a `SERVICES` key.
pub fn frontend_addr(k: &ServiceKey) -> SocketAddrV4 {
    SocketAddrV4::new(
        weir_lb_common::ip_from_map(k.addr).into(),
        weir_lb_common::port_from_map(k.port),
    )
}

/// "TCP" or "UDP", as Service ports name them.
pub fn proto_name(proto: u8) -> &'static str {
    if proto == weir_lb_common::PROTO_UDP {
        "UDP"
    } else {
        "TCP"
    }
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

    /// `MapState` with every service id but the `free` highest ones taken.
    fn all_ids_but(free: u32) -> MapState {
        let mut st = MapState::default();
        for id in 1..MAX_SERVICES - free {
            let key = ServiceKey {
                addr: id,
                port: 80,
                proto: PROTO_TCP,
                scope: SCOPE_EXTERNAL,
            };
            let value = ServiceValue {
                id,
                count: 0,
                algorithm: 0,
                flags: 0,
                affinity_timeout_secs: 0,
                maglev_size: 0,
            };
            st.services.insert(key, value);
        }
        st
    }

    #[test]
    fn a_two_scope_frontend_short_of_ids_keeps_one_entry_for_everyone() {
        let mut local = want(&[1], Algorithm::Random);
        local.internal_backends = Some(want(&[1, 2], Algorithm::Random).backends);
        let one = Desired::from([(fe(1), local)]);
        let plan = |free| plan_scoped(&all_ids_but(free), &one, Some(&[]), MaglevConfig::default());

        let p = plan(2);
        assert_eq!(p.put_services.len(), 2);
        assert!(p.put_services.iter().all(|(_, v)| v.id < MAX_SERVICES));
        assert!(!p.short_of_room());

        // One id: the external entry gets it, with no flag sending the socket hooks to an
        // internal entry that is not there.
        let p = plan(1);
        let ext = service_key(&fe(1));
        assert_eq!(p.put_services.len(), 1);
        assert_eq!(p.put_services[0].0, ext);
        assert_eq!(
            (
                p.put_services[0].1.id,
                p.put_services[0].1.flags,
                p.put_services[0].1.count
            ),
            (MAX_SERVICES - 1, 0, 1)
        );
        assert_eq!(p.no_id, vec![service_keys(&fe(1))[1]]);

        // None: nothing of the frontend is written, so no internal entry is left alone.
        let p = plan(0);
        assert!(p.is_empty());
        assert_eq!(p.no_id, vec![ext]);
    }

    #[test]
    fn an_entry_grows_by_the_free_slots_only() {
        let mut st = MapState::default();
        let d = Desired::from([(fe(1), want(&[1], Algorithm::Random))]);
        step(&mut st, &d);
        // Another id's slots fill BACKENDS but one.
        let filler = backend_value(&SocketAddrV4::new([10, 244, 9, 9].into(), 80));
        st.backends
            .insert(7, (0..MAX_BACKEND_SLOTS - 2).map(|s| (s, filler)).collect());

        let d = Desired::from([(fe(1), want(&[1, 2, 3], Algorithm::Random))]);
        let p = plan(&st, &d, MaglevConfig::default());
        assert_eq!(p.put_backends.len(), 1);
        assert_eq!(p.put_services[0].1.count, 2, "slot 0 kept, slot 1 new");
        assert_eq!(p.no_slot, vec![service_key(&fe(1))]);
        st.apply(&p);

        st.backends.remove(&7);
        let p = plan(&st, &d, MaglevConfig::default());
        assert!(!p.short_of_room());
        assert_eq!(p.put_services[0].1.count, 3);
    }

    #[test]
    fn maglev_entries_past_the_table_budget_pick_at_random_until_tables_are_freed() {
        let mcfg = MaglevConfig {
            table_size: 7,
            seed: 1,
        };
        let mut d: Desired = (0..MAX_MAGLEV_SERVICES)
            .map(|i| {
                let f = Frontend {
                    addr: SocketAddrV4::new(i.into(), 80),
                    proto: PROTO_TCP,
                };
                (f, want(&[1, 2], Algorithm::Maglev))
            })
            .collect();
        let mut st = MapState::default();
        let p = plan(&st, &d, mcfg);
        assert_eq!(p.put_maglev.len(), MAX_MAGLEV_SERVICES as usize);
        st.apply(&p);

        // One Maglev frontend goes, one comes: the table going is still in the map while the
        // new one would be written, so the newcomer picks at random for now.
        let first = *d.keys().next().expect("frontends");
        d.remove(&first);
        d.insert(fe(1), want(&[1, 2], Algorithm::Maglev));
        let p = plan(&st, &d, mcfg);
        assert!(p.put_maglev.is_empty());
        assert_eq!(p.del_maglev.len(), 1);
        assert_eq!(p.no_maglev, vec![service_key(&fe(1))]);
        let newcomer = p.put_services[0];
        assert_eq!(newcomer.0, service_key(&fe(1)));
        assert_eq!(
            (newcomer.1.algorithm, newcomer.1.maglev_size),
            (Algorithm::Random.to_map(), 0)
        );
        st.apply(&p);

        // The retry has the freed room.
        let p = plan(&st, &d, mcfg);
        assert!(!p.short_of_room());
        assert_eq!(p.put_maglev.len(), 1);
        assert_eq!(p.put_services[0].1.algorithm, Algorithm::Maglev.to_map());
        st.apply(&p);
        assert!(plan(&st, &d, mcfg).is_empty());
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
