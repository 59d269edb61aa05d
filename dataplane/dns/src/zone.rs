//! The cluster zone: the writer side keeps what each watched object contributed and applies
//! only the difference when an object changes; the reader side is an immutable snapshot (a
//! persistent hash map keyed by lower-cased wire name, swapped atomically) that the query
//! path reads without locks. Publishing after a change costs O(changed names): the map
//! shares all untouched structure with the previous snapshot.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::records::{Names, ObjKey, Rr, ServiceView, SliceView, pod_ips};
use crate::wire::{CLASS_IN, NameError};

type Hasher = foldhash::fast::RandomState;
type Map<K, V> = imbl::GenericHashMap<K, V, Hasher, imbl::shared_ptr::DefaultSharedPtr>;

/// The records of one name, grouped by type and pre-encoded for the answer section. An entry
/// without records is an empty non-terminal: it exists (NODATA) because names below it do.
#[derive(Debug, Default)]
pub struct Entry {
    rrsets: Box<[RrSet]>,
}

#[derive(Debug)]
struct RrSet {
    rtype: u16,
    count: u16,
    /// Each record as `C0 0C` (pointer to the question name), type, class, TTL, RDLENGTH, RDATA.
    wire: Box<[u8]>,
}

impl Entry {
    /// The pre-encoded records of type `rtype` (all records for ANY) and their count.
    pub fn records(&self, rtype: u16) -> Option<(&[u8], u16)> {
        self.rrsets
            .iter()
            .find(|s| s.rtype == rtype)
            .map(|s| (&*s.wire, s.count))
    }

    /// A CNAME at this name answers every type (RFC 1034 §3.6.2).
    pub fn cname(&self) -> Option<(&[u8], u16)> {
        self.records(crate::wire::TYPE_CNAME)
    }

    pub fn is_empty(&self) -> bool {
        self.rrsets.is_empty()
    }

    /// Types present at this name, for tests and ANY.
    pub fn types(&self) -> impl Iterator<Item = u16> + '_ {
        self.rrsets.iter().map(|s| s.rtype)
    }

    fn build(rrs: &[(u16, Box<[u8]>)], ttl: u32) -> Entry {
        let mut by_type: Vec<&(u16, Box<[u8]>)> = rrs.iter().collect();
        by_type.sort();
        by_type.dedup();
        let mut rrsets: Vec<RrSet> = Vec::new();
        for (rtype, rdata) in by_type {
            if rrsets.last().is_none_or(|s| s.rtype != *rtype) {
                rrsets.push(RrSet {
                    rtype: *rtype,
                    count: 0,
                    wire: Box::default(),
                });
            }
            if let Some(set) = rrsets.last_mut() {
                let mut wire = std::mem::take(&mut set.wire).into_vec();
                wire.extend_from_slice(&[0xC0, 0x0C]);
                wire.extend_from_slice(&rr_tail(*rtype, ttl, rdata));
                set.wire = wire.into();
                set.count += 1;
            }
        }
        Entry {
            rrsets: rrsets.into(),
        }
    }
}

/// A record after its owner name: type, class IN, TTL, RDLENGTH, RDATA.
pub fn rr_tail(rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + rdata.len());
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    out.extend_from_slice(rdata);
    out
}

/// What the query path reads: the names of the zone and the namespace of each pod IP.
#[derive(Clone)]
pub struct Snapshot {
    names: Map<Box<[u8]>, Arc<Entry>>,
    pod_namespaces: Map<IpAddr, Arc<str>>,
}

impl Snapshot {
    /// The entry of a lower-cased wire name.
    pub fn lookup(&self, name: &[u8]) -> Option<&Entry> {
        self.names.get(name).map(|e| &**e)
    }

    /// The namespace of the pod that owns `ip`, for autopath.
    pub fn pod_namespace(&self, ip: &IpAddr) -> Option<&str> {
        self.pod_namespaces.get(ip).map(|ns| &**ns)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The reader handle: cheap to clone, lock-free to read.
#[derive(Clone)]
pub struct ZoneReader(Arc<ArcSwap<Snapshot>>);

impl ZoneReader {
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.0.load()
    }
}

#[derive(Default)]
struct NameState {
    rrs: Vec<(u16, Box<[u8]>)>,
    /// Names strictly below this one (within the zone) that have records.
    descendants: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Source {
    Zone,
    Service(ObjKey),
    Pod(ObjKey),
}

/// The writer side of the zone. Owned by the one task that applies watch events.
pub struct Zone {
    names_cfg: Names,
    zone_wire: Box<[u8]>,
    ttl: u32,
    shared: Arc<ArcSwap<Snapshot>>,
    published: Snapshot,
    names: HashMap<Box<[u8]>, NameState>,
    sources: HashMap<Source, Vec<Rr>>,
    services: HashMap<ObjKey, ServiceView>,
    slices: HashMap<ObjKey, SliceView>,
    slices_of: HashMap<ObjKey, BTreeSet<ObjKey>>,
    pods: HashMap<ObjKey, Vec<IpAddr>>,
    dirty: HashSet<Box<[u8]>>,
}

impl Zone {
    /// A zone holding only its SOA and `dns-version`, already published.
    pub fn new(zone: &str, ttl: u32) -> Result<(Zone, ZoneReader), NameError> {
        let names_cfg = Names::new(zone)?;
        let published = Snapshot {
            names: Map::default(),
            pod_namespaces: Map::default(),
        };
        let shared = Arc::new(ArcSwap::from_pointee(published.clone()));
        let mut z = Zone {
            zone_wire: names_cfg.zone_wire().into(),
            names_cfg,
            ttl,
            shared: shared.clone(),
            published,
            names: HashMap::new(),
            sources: HashMap::new(),
            services: HashMap::new(),
            slices: HashMap::new(),
            slices_of: HashMap::new(),
            pods: HashMap::new(),
            dirty: HashSet::new(),
        };
        let statics = z.names_cfg.static_records(ttl)?;
        z.set_source(Source::Zone, statics);
        z.publish();
        Ok((z, ZoneReader(shared)))
    }

    pub fn names(&self) -> &Names {
        &self.names_cfg
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    pub fn apply_service(&mut self, svc: &Service) {
        let key = ObjKey::of(&svc.metadata);
        self.services.insert(key.clone(), ServiceView::of(svc));
        self.refresh_service(&key);
    }

    pub fn delete_service(&mut self, key: &ObjKey) {
        self.services.remove(key);
        self.refresh_service(key);
    }

    pub fn apply_slice(&mut self, slice: &EndpointSlice) {
        let key = ObjKey::of(&slice.metadata);
        let view = SliceView::of(slice);
        let new_svc = view.service.clone();
        if let Some(old) = self.slices.insert(key.clone(), view)
            && old.service != new_svc
        {
            self.unlink_slice(&key, old.service.as_ref());
        }
        if let Some(svc) = new_svc {
            self.slices_of.entry(svc.clone()).or_default().insert(key);
            self.refresh_service(&svc);
        }
    }

    pub fn delete_slice(&mut self, key: &ObjKey) {
        if let Some(old) = self.slices.remove(key) {
            self.unlink_slice(key, old.service.as_ref());
        }
    }

    fn unlink_slice(&mut self, key: &ObjKey, svc: Option<&ObjKey>) {
        let Some(svc) = svc else { return };
        if let Some(set) = self.slices_of.get_mut(svc) {
            set.remove(key);
            if set.is_empty() {
                self.slices_of.remove(svc);
            }
        }
        self.refresh_service(svc);
    }

    pub fn apply_pod(&mut self, pod: &Pod) {
        let key = ObjKey::of(&pod.metadata);
        let ips = pod_ips(pod);
        self.set_pod(key, ips);
    }

    pub fn delete_pod(&mut self, key: &ObjKey) {
        self.set_pod(key.clone(), Vec::new());
    }

    fn set_pod(&mut self, key: ObjKey, ips: Vec<IpAddr>) {
        let old = if ips.is_empty() {
            self.pods.remove(&key)
        } else {
            self.pods.insert(key.clone(), ips.clone())
        };
        for ip in old.iter().flatten() {
            if self.published.pod_namespace(ip) == Some(key.namespace.as_str()) {
                self.published.pod_namespaces.remove(ip);
            }
        }
        let ns: Arc<str> = key.namespace.as_str().into();
        for ip in &ips {
            self.published.pod_namespaces.insert(*ip, ns.clone());
        }
        let rrs = self
            .names_cfg
            .pod_records(&key.namespace, &ips)
            .unwrap_or_else(|e| {
                tracing::warn!(pod = ?key, error = %e, "pod gets no DNS records");
                Vec::new()
            });
        self.set_source(Source::Pod(key), rrs);
    }

    /// Keys of the objects of one kind the zone holds, for resynchronising after a relist.
    pub fn service_keys(&self) -> Vec<ObjKey> {
        self.services.keys().cloned().collect()
    }

    pub fn slice_keys(&self) -> Vec<ObjKey> {
        self.slices.keys().cloned().collect()
    }

    pub fn pod_keys(&self) -> Vec<ObjKey> {
        self.pods.keys().cloned().collect()
    }

    fn refresh_service(&mut self, key: &ObjKey) {
        let rrs = match self.services.get(key) {
            None => Vec::new(),
            Some(view) => {
                let slices = self
                    .slices_of
                    .get(key)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| self.slices.get(k));
                self.names_cfg
                    .service_records(key, view, slices)
                    .unwrap_or_else(|e| {
                        tracing::warn!(service = ?key, error = %e, "service gets no DNS records");
                        Vec::new()
                    })
            }
        };
        self.set_source(Source::Service(key.clone()), rrs);
    }

    /// Replace what `source` contributes with `new` (sorted, de-duplicated), touching only the
    /// names whose records differ.
    fn set_source(&mut self, source: Source, new: Vec<Rr>) {
        let old = if new.is_empty() {
            self.sources.remove(&source).unwrap_or_default()
        } else {
            self.sources.insert(source, new.clone()).unwrap_or_default()
        };
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            match (old.get(i), new.get(j)) {
                (Some(o), Some(n)) if o == n => {
                    i += 1;
                    j += 1;
                }
                (Some(o), Some(n)) if o > n => {
                    self.add_rr(n);
                    j += 1;
                }
                (Some(o), _) => {
                    self.remove_rr(o);
                    i += 1;
                }
                (None, Some(n)) => {
                    self.add_rr(n);
                    j += 1;
                }
                (None, None) => break,
            }
        }
    }

    fn add_rr(&mut self, rr: &Rr) {
        let state = self.names.entry(rr.owner.clone()).or_default();
        let was_empty = state.rrs.is_empty();
        state.rrs.push((rr.rtype, rr.rdata.clone()));
        self.dirty.insert(rr.owner.clone());
        if was_empty {
            self.adjust_ancestors(&rr.owner, true);
        }
    }

    fn remove_rr(&mut self, rr: &Rr) {
        let Some(state) = self.names.get_mut(&rr.owner) else {
            return;
        };
        if let Some(pos) = state
            .rrs
            .iter()
            .position(|(t, d)| *t == rr.rtype && *d == rr.rdata)
        {
            state.rrs.swap_remove(pos);
        }
        self.dirty.insert(rr.owner.clone());
        if state.rrs.is_empty() {
            self.adjust_ancestors(&rr.owner, false);
        }
    }

    /// Count (or uncount) a name with records in each ancestor down to the zone apex, so
    /// empty non-terminals answer NODATA rather than NXDOMAIN.
    fn adjust_ancestors(&mut self, owner: &[u8], add: bool) {
        if !owner.ends_with(&self.zone_wire) {
            return; // reverse names live outside the zone; no empty non-terminals there
        }
        let mut at = 0;
        while owner.len() - at > self.zone_wire.len() {
            at += owner[at] as usize + 1;
            let parent: Box<[u8]> = owner[at..].into();
            let state = self.names.entry(parent.clone()).or_default();
            if add {
                state.descendants += 1;
            } else {
                state.descendants = state.descendants.saturating_sub(1);
            }
            self.dirty.insert(parent);
        }
    }

    /// Make every change since the last publish visible to readers at once.
    pub fn publish(&mut self) {
        for name in std::mem::take(&mut self.dirty) {
            let keep = self
                .names
                .get(&name)
                .filter(|s| !s.rrs.is_empty() || s.descendants > 0);
            match keep {
                Some(state) => {
                    let entry = Arc::new(Entry::build(&state.rrs, self.ttl));
                    self.published.names.insert(name, entry);
                }
                None => {
                    self.names.remove(&name);
                    self.published.names.remove(&name);
                }
            }
        }
        self.shared.store(Arc::new(self.published.clone()));
    }
}

#[cfg(test)]
mod tests;
