//! The BPF maps of the load balancer (socket hooks and tc path). All are pinned by name, so a restarted agent
//! reuses them (and the connections they describe) instead of starting empty.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use weir_lb_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, Counters, CtKey, CtValue, LRU_ENTRIES,
    MAX_BACKEND_SLOTS, MAX_DEVICES, MAX_MAGLEV_SERVICES, MAX_SERVICES, MaglevTable, RevNatKey,
    RevNatValue, ServiceKey, ServiceValue,
};

#[map(name = "WEIR_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "WEIR_BACKENDS")]
pub static BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(MAX_BACKEND_SLOTS, 0);

// Tables are 64 KiB each and only Maglev services have one: allocate on insert.
#[map(name = "WEIR_MAGLEV")]
pub static MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::pinned(MAX_MAGLEV_SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "WEIR_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(LRU_ENTRIES, 0);

#[map(name = "WEIR_REVNAT")]
pub static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(LRU_ENTRIES, 0);

/// Connection tracking of the tc path: both directions of every flow it balanced. Pinned,
/// and never flushed by a restart, so established flows keep their backend.
#[map(name = "WEIR_CT")]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(LRU_ENTRIES, 0);

/// The source address of source NAT per interface index: the address of each device the tc
/// programs are attached to, as MASQUERADE would pick it. Written by the loader on attach.
#[map(name = "WEIR_SNAT_ADDRS")]
pub static SNAT_ADDRS: HashMap<u32, u32> = HashMap::pinned(MAX_DEVICES, 0);

/// Round-robin position per service id, advanced with an atomic compare-and-swap.
#[map(name = "WEIR_RR")]
pub static RR: Array<u32> = Array::pinned(MAX_SERVICES, 0);

#[map(name = "WEIR_COUNTERS")]
pub static COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SERVICES, 0);
