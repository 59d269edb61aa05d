//! The loader and the owner of the BPF maps: loads the socket-LB programs, pins maps and links
//! under a bpffs root, attaches to a cgroup v2 subtree, and applies [`Plan`]s to the maps.
//! (The tc programs, which share these maps, are loaded and attached by `tc.rs`.)
//!
//! Restart model: maps are pinned by name, so a new agent reuses the previous one's maps and
//! every connection they describe. Links are pinned too; on start the new programs are attached
//! first and the older run's links unpinned after, so there is never a moment without a hook.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader, util::nr_cpus};
use weir_lb_common::{
    Backend, BackendKey, Counters, FLAG_TWO_SCOPES, MAGLEV_MAX, MaglevTable, SCOPE_INTERNAL,
    ServiceKey, ServiceValue,
};

use crate::Error;
use crate::plan::{MapState, Plan};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir-lb"));

/// The socket hooks, by program (function) name.
pub const PROGRAMS: [&str; 4] = ["connect4", "sendmsg4", "recvmsg4", "getpeername4"];

/// The default bpffs root of weir's pinned maps and links.
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/weir";

/// The typed maps of the socket load balancer.
pub struct LbMaps {
    /// Second handles on the pinned service and backend maps, for batched writes.
    services_raw: MapData,
    backends_raw: MapData,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    rr: Array<MapData, u32>,
    counters: PerCpuArray<MapData, Counters>,
}

/// Loads the programs, attaches them to `cgroup` (a cgroup v2 directory of weir's own, never
/// the root) and returns the maps. `bpf_root` holds `maps/` and `links/`.
pub fn load_and_attach(bpf_root: &Path, cgroup: &Path) -> Result<LbMaps, Error> {
    let links_dir = bpf_root.join("links");
    let cg = File::open(cgroup)
        .map_err(|e| Error::io(format!("open cgroup {}", cgroup.display()), e))?;
    let (mut ebpf, maps_dir) = load_object(bpf_root)?;
    for name in PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| Error::Bpf(format!("program {name} missing from the object")))?
            .try_into()
            .map_err(|e| Error::Bpf(format!("program {name}: {e}")))?;
        prog.load()
            .map_err(|e| Error::Bpf(format!("load {name}: {e:?}")))?;
        let pin = links_dir.join(name);
        let old = PinnedLink::from_pin(&pin).ok();
        let id = prog
            // bpf_link attachments coexist by design; the kernel wants no mode flags for them.
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|e| Error::Bpf(format!("attach {name} to {}: {e:?}", cgroup.display())))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| Error::Bpf(format!("take link {name}: {e}")))?
            .try_into()
            .map_err(|e| Error::Bpf(format!("link {name}: {e}")))?;
        // Old link out only after the new one is in: both running for an instant is harmless
        // (the second sees a backend address, which is no Service).
        if let Some(old) = old {
            drop(
                old.unpin()
                    .map_err(|e| Error::io(format!("unpin old link {}", pin.display()), e))?,
            );
        }
        link.pin(&pin)
            .map_err(|e| Error::Bpf(format!("pin link {}: {e}", pin.display())))?;
    }
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| Error::Bpf(format!("map {name} missing from the object")))
    };
    LbMaps::from_maps(
        &maps_dir,
        take("WEIR_SERVICES")?,
        take("WEIR_BACKENDS")?,
        take("WEIR_MAGLEV")?,
        take("WEIR_RR")?,
        take("WEIR_COUNTERS")?,
    )
}

/// Loads weir's BPF object with its maps pinned under `bpf_root/maps` (reused when already
/// pinned); returns the object and that directory. Programs are not loaded yet.
pub(crate) fn load_object(bpf_root: &Path) -> Result<(Ebpf, PathBuf), Error> {
    let maps_dir = prepare_bpf_root(bpf_root)?;
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(&maps_dir)
        .load(OBJECT)
        .map_err(|e| {
            Error::Bpf(format!(
                "load BPF object (maps pinned in {}): {e}",
                maps_dir.display()
            ))
        })?;
    Ok((ebpf, maps_dir))
}

/// Makes sure `bpf_root` is on a bpffs and has its `maps/` and `links/`; returns `maps/`.
fn prepare_bpf_root(bpf_root: &Path) -> Result<PathBuf, Error> {
    ensure_bpffs(bpf_root)?;
    let maps_dir = bpf_root.join("maps");
    for d in [maps_dir.clone(), bpf_root.join("links")] {
        std::fs::create_dir_all(&d).map_err(|e| Error::io(format!("create {}", d.display()), e))?;
    }
    Ok(maps_dir)
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Makes sure `bpf_root` will be on a bpffs: mounts one at /sys/fs/bpf if nothing is mounted
/// there yet (as Cilium does), and refuses any other location that is not bpffs.
fn ensure_bpffs(bpf_root: &Path) -> Result<(), Error> {
    let existing = bpf_root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_magic(existing)? == BPF_FS_MAGIC {
        return Ok(());
    }
    if existing != Path::new(BPFFS_MOUNT) {
        return Err(Error::Config {
            field: "--bpf-root",
            reason: format!("{} is not on a bpffs", bpf_root.display()),
        });
    }
    // SAFETY: constant NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::io(
            format!("mount bpffs at {BPFFS_MOUNT}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn fs_magic(path: &Path) -> Result<i64, Error> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Config {
        field: "--bpf-root",
        reason: "contains a NUL byte".into(),
    })?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(
            format!("statfs {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_type as i64)
}

/// Detaches weir's programs from every cgroup and device (their links are pinned there) and
/// removes its pinned maps: the counterpart of [`load_and_attach`] and
/// [`crate::tc::TcPrograms::attach`] for uninstalling (and for tests).
pub fn unpin_all(bpf_root: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(bpf_root) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("remove {}", bpf_root.display()), e))
        }
        _ => Ok(()),
    }
}

impl LbMaps {
    /// Opens the maps a running agent pinned under `bpf_root`, e.g. for `weir lb list`.
    pub fn open_pinned(bpf_root: &Path) -> Result<Self, Error> {
        let open = |name: &str| -> Result<Map, Error> {
            let path: PathBuf = bpf_root.join("maps").join(name);
            let data = MapData::from_pin(&path)
                .map_err(|e| Error::Bpf(format!("open {}: {e}", path.display())))?;
            Map::from_map_data(data).map_err(|e| Error::Bpf(format!("map {}: {e}", path.display())))
        };
        Self::from_maps(
            &bpf_root.join("maps"),
            open("WEIR_SERVICES")?,
            open("WEIR_BACKENDS")?,
            open("WEIR_MAGLEV")?,
            open("WEIR_RR")?,
            open("WEIR_COUNTERS")?,
        )
    }

    fn from_maps(
        maps_dir: &Path,
        services: Map,
        backends: Map,
        maglev: Map,
        rr: Map,
        counters: Map,
    ) -> Result<Self, Error> {
        let e = |what: &str, err: aya::maps::MapError| {
            Error::Bpf(format!("map {what} has the wrong type: {err}"))
        };
        let raw = |name: &str| {
            let path = maps_dir.join(name);
            MapData::from_pin(&path)
                .map_err(|e| Error::Bpf(format!("open {}: {e}", path.display())))
        };
        Ok(Self {
            services_raw: raw("WEIR_SERVICES")?,
            backends_raw: raw("WEIR_BACKENDS")?,
            services: services.try_into().map_err(|x| e("WEIR_SERVICES", x))?,
            backends: backends.try_into().map_err(|x| e("WEIR_BACKENDS", x))?,
            maglev: maglev.try_into().map_err(|x| e("WEIR_MAGLEV", x))?,
            rr: rr.try_into().map_err(|x| e("WEIR_RR", x))?,
            counters: counters.try_into().map_err(|x| e("WEIR_COUNTERS", x))?,
        })
    }

    /// What the maps hold now: the starting point of a restarted agent's reconcile.
    pub fn read_state(&self) -> Result<MapState, Error> {
        let mut st = MapState::default();
        for kv in self.services.iter() {
            let (k, v) = kv.map_err(|e| Error::Bpf(format!("read WEIR_SERVICES: {e}")))?;
            st.services.insert(k, v);
        }
        for kv in self.backends.iter() {
            let (k, v) = kv.map_err(|e| Error::Bpf(format!("read WEIR_BACKENDS: {e}")))?;
            st.backends
                .entry(k.service_id)
                .or_default()
                .insert(k.slot, v);
        }
        let sizes: std::collections::HashMap<u32, u32> = st
            .services
            .values()
            .map(|v| (v.id, v.maglev_size))
            .collect();
        for kv in self.maglev.iter() {
            let (id, t) = kv.map_err(|e| Error::Bpf(format!("read WEIR_MAGLEV: {e}")))?;
            let n = sizes.get(&id).copied().unwrap_or(0).min(MAGLEV_MAX as u32) as usize;
            st.maglev.insert(id, t.slots[..n].to_vec());
        }
        Ok(st)
    }

    /// Writes `plan` in its safe order; stops at the first failure (the caller re-reads state).
    pub fn apply(&mut self, plan: &Plan) -> Result<(), Error> {
        let w =
            |what: &'static str| move |e: aya::maps::MapError| Error::Bpf(format!("{what}: {e}"));
        crate::batch::update(&self.backends_raw, "WEIR_BACKENDS", &plan.put_backends)?;
        if !plan.put_maglev.is_empty() {
            let mut table = Box::new(MaglevTable {
                slots: [0; MAGLEV_MAX],
            });
            for (id, t) in &plan.put_maglev {
                table.slots[..t.len()].copy_from_slice(t);
                self.maglev
                    .insert(id, table.as_ref(), 0)
                    .map_err(w("update WEIR_MAGLEV"))?;
            }
        }
        crate::batch::update(&self.services_raw, "WEIR_SERVICES", &plan.put_services)?;
        for k in &plan.del_services {
            self.services
                .remove(k)
                .map_err(w("delete from WEIR_SERVICES"))?;
        }
        for k in &plan.del_backends {
            self.backends
                .remove(k)
                .map_err(w("delete from WEIR_BACKENDS"))?;
        }
        for id in &plan.del_maglev {
            self.maglev
                .remove(id)
                .map_err(w("delete from WEIR_MAGLEV"))?;
        }
        for id in &plan.freed_ids {
            self.reset_id(*id)?;
        }
        Ok(())
    }

    fn reset_id(&mut self, id: u32) -> Result<(), Error> {
        let zero = PerCpuValues::try_from(vec![
            Counters::default();
            nr_cpus().map_err(|(_, e)| Error::io(
                "count CPUs".into(),
                e
            ))?
        ])
        .map_err(|e| Error::Bpf(format!("per-CPU counters: {e}")))?;
        self.counters
            .set(id, zero, 0)
            .map_err(|e| Error::Bpf(format!("reset WEIR_COUNTERS[{id}]: {e}")))?;
        self.rr
            .set(id, 0, 0)
            .map_err(|e| Error::Bpf(format!("reset WEIR_RR[{id}]: {e}")))
    }

    /// Counters of service `id`, summed over CPUs.
    pub fn counters(&self, id: u32) -> Result<Counters, Error> {
        let per_cpu = self
            .counters
            .get(&id, 0)
            .map_err(|e| Error::Bpf(format!("read WEIR_COUNTERS[{id}]: {e}")))?;
        Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            connections: a.connections + c.connections,
            packets: a.packets + c.packets,
            refused: a.refused + c.refused,
        }))
    }

    /// The rows of `weir lb list`, read from the maps alone, sorted by frontend (a frontend's
    /// external entry before its internal one).
    pub fn list(&self) -> Result<Vec<crate::ListRow>, Error> {
        let st = self.read_state()?;
        let mut rows = BTreeMap::new();
        for (k, v) in &st.services {
            let frontend = crate::plan::frontend_addr(k);
            let backends = st
                .backends
                .get(&v.id)
                .map(|s| s.values().map(crate::plan::backend_addr).collect())
                .unwrap_or_default();
            let scope = if k.scope == SCOPE_INTERNAL {
                crate::Scope::Internal
            } else if v.flags & FLAG_TWO_SCOPES != 0 {
                crate::Scope::External
            } else {
                crate::Scope::All
            };
            let row = crate::ListRow {
                frontend,
                proto: crate::plan::proto_name(k.proto),
                scope,
                id: v.id,
                algorithm: crate::Algorithm::from_map(v.algorithm),
                affinity_timeout_secs: (v.flags & weir_lb_common::FLAG_AFFINITY != 0)
                    .then_some(v.affinity_timeout_secs),
                backends,
                counters: self.counters(v.id)?,
            };
            rows.insert((frontend, k.proto, k.scope), row);
        }
        Ok(rows.into_values().collect())
    }
}
