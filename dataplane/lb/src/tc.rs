//! The tc half of the load balancer: loads `tc_ingress` / `tc_egress` (NodePort and
//! externalIP traffic from outside the node, see `ebpf/lb-ebpf/src/tc.rs`) and attaches them
//! with TCX (bpf_link based tc, kernel >= 6.6) to the node's external interfaces ("devices").
//!
//! TCX rather than clsact: a TCX attachment is a bpf_link, so it is pinned under
//! `<bpf root>/links` like the socket hooks' links, survives the agent, and goes away with
//! [`crate::unpin_all`]; there is no qdisc or filter handle to track.
//!
//! Restarts: for each device the new link is attached first and the previous run's pinned link
//! removed after, and pins of devices no longer configured are removed, so a device never keeps
//! two copies. The programs share the pinned maps, so the connection-tracking map of the
//! previous run keeps serving its flows.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use aya::Ebpf;
use aya::maps::HashMap;
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::{SchedClassifier, TcAttachType, tc::TcAttachOptions};

use weir_lb_common::ip_to_map;

use crate::Error;
use crate::maps::load_object;

/// The tc programs, by program (function) name, and where each is attached.
pub const PROGRAMS: [(&str, TcAttachType); 2] = [
    ("tc_ingress", TcAttachType::Ingress),
    ("tc_egress", TcAttachType::Egress),
];

const PIN_PREFIX: &str = "tcx-";
const SNAT_ADDRS: &str = "WEIR_SNAT_ADDRS";

/// The loaded tc programs, sharing the maps pinned under a bpf root.
pub struct TcPrograms {
    ebpf: Ebpf,
}

impl TcPrograms {
    /// Loads the tc programs against the maps pinned under `bpf_root` (created if this is the
    /// first load), without attaching them anywhere.
    pub fn load(bpf_root: &Path) -> Result<Self, Error> {
        let (mut ebpf, _) = load_object(bpf_root)?;
        for (name, _) in PROGRAMS {
            program(&mut ebpf, name)?
                .load()
                .map_err(|e| Error::Bpf(format!("load {name}: {e:?}")))?;
        }
        Ok(Self { ebpf })
    }

    /// The program's fd, e.g. for `BPF_PROG_TEST_RUN` ([`crate::testrun`]).
    pub fn fd(&self, name: &str) -> Result<BorrowedFd<'_>, Error> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or_else(|| Error::Bpf(format!("program {name} missing from the object")))?
            .try_into()
            .map_err(|e| Error::Bpf(format!("program {name}: {e}")))?;
        Ok(prog
            .fd()
            .map_err(|e| Error::Bpf(format!("program {name}: {e}")))?
            .as_fd())
    }

    /// Attaches both programs to every device in `devices` (interface names in the calling
    /// thread's network namespace), pins the links under `<bpf_root>/links/tcx-<dir>-<device>`,
    /// records the devices' addresses for source NAT, and detaches weir's tc links from
    /// devices that are no longer listed.
    pub fn attach(&mut self, bpf_root: &Path, devices: &[String]) -> Result<(), Error> {
        let links_dir = bpf_root.join("links");
        let mut keep = BTreeSet::new();
        for dev in devices {
            for (name, kind) in PROGRAMS {
                let pin = links_dir.join(pin_name(kind, dev));
                keep.insert(pin.clone());
                let old = PinnedLink::from_pin(&pin).ok();
                let prog = program(&mut self.ebpf, name)?;
                let id = prog
                    .attach_with_options(dev, kind, TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .map_err(|e| Error::Bpf(format!("attach {name} to {dev} (TCX): {e:?}")))?;
                let link: FdLink = prog
                    .take_link(id)
                    .map_err(|e| Error::Bpf(format!("take link {name}: {e}")))?
                    .try_into()
                    .map_err(|e| Error::Bpf(format!("link {name} on {dev}: {e}")))?;
                // The old program may run for an instant before this: a packet it already
                // translated is no frontend and no reply to the new one, so it passes.
                if let Some(old) = old {
                    drop(
                        old.unpin().map_err(|e| {
                            Error::io(format!("unpin old link {}", pin.display()), e)
                        })?,
                    );
                }
                link.pin(&pin)
                    .map_err(|e| Error::Bpf(format!("pin link {}: {e}", pin.display())))?;
            }
        }
        self.set_snat_addrs(devices)?;
        let entries = std::fs::read_dir(&links_dir)
            .map_err(|e| Error::io(format!("read {}", links_dir.display()), e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let ours = entry.file_name().to_string_lossy().starts_with(PIN_PREFIX);
            if ours && !keep.contains(&path) {
                let link = PinnedLink::from_pin(&path)
                    .map_err(|e| Error::Bpf(format!("open {}: {e}", path.display())))?;
                drop(
                    link.unpin()
                        .map_err(|e| Error::io(format!("unpin {}", path.display()), e))?,
                );
            }
        }
        Ok(())
    }
}

impl TcPrograms {
    /// Records each device's IPv4 address (the first one) under its interface index in
    /// `WEIR_SNAT_ADDRS`, the source address of flows masqueraded on their way out of that
    /// device, and forgets devices no longer listed. A device without an IPv4 address gets
    /// no entry: flows to other nodes leave it untranslated.
    fn set_snat_addrs(&mut self, devices: &[String]) -> Result<(), Error> {
        let addrs = interface_addrs()?;
        let mut want = std::collections::BTreeMap::new();
        for dev in devices {
            let Some((_, ip)) = addrs.iter().find(|(d, _)| d == dev) else {
                continue;
            };
            let name = std::ffi::CString::new(dev.as_str()).map_err(|_| Error::Config {
                field: "devices",
                reason: format!("{dev:?} contains a NUL byte"),
            })?;
            // SAFETY: a valid C string for the duration of the call.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(Error::io(
                    format!("interface index of {dev}"),
                    std::io::Error::last_os_error(),
                ));
            }
            want.insert(ifindex, ip_to_map(ip.octets()));
        }
        let map = self
            .ebpf
            .map_mut(SNAT_ADDRS)
            .ok_or_else(|| Error::Bpf(format!("map {SNAT_ADDRS} missing from the object")))?;
        let mut map: HashMap<_, u32, u32> =
            HashMap::try_from(map).map_err(|e| Error::Bpf(format!("map {SNAT_ADDRS}: {e}")))?;
        let stale: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains_key(k))
            .collect();
        for k in stale {
            map.remove(&k)
                .map_err(|e| Error::Bpf(format!("{SNAT_ADDRS}: remove {k}: {e}")))?;
        }
        for (k, v) in want {
            map.insert(k, v, 0)
                .map_err(|e| Error::Bpf(format!("{SNAT_ADDRS}: set {k}: {e}")))?;
        }
        Ok(())
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, Error> {
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Bpf(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e| Error::Bpf(format!("program {name}: {e}")))
}

fn pin_name(kind: TcAttachType, dev: &str) -> String {
    let dir = if kind == TcAttachType::Ingress {
        "ingress"
    } else {
        "egress"
    };
    format!("{PIN_PREFIX}{dir}-{dev}")
}

/// IPv4 addresses of the interfaces in this network namespace, as (interface, address).
pub fn interface_addrs() -> Result<Vec<(String, Ipv4Addr)>, Error> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(Error::io(
            "getifaddrs".into(),
            std::io::Error::last_os_error(),
        ));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned; its pointers are valid until freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: as above; sa_family says which sockaddr it is.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        out.push((name, Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Interfaces of the default routes in a `/proc/net/route` table.
fn default_route_devices(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000"))
                .then(|| f[0].to_string())
        })
        .collect()
}

/// Whether `dev` can be an external device: not loopback, not weir's or another bridge, not a
/// bridge port, not a veth (pods' ends live on those).
fn external_candidate(dev: &str) -> bool {
    let sys = Path::new("/sys/class/net").join(dev);
    dev != "lo"
        && !dev.starts_with("weir")
        && !dev.starts_with("veth")
        && !sys.join("bridge").exists()
        && !sys.join("brport").exists()
}

/// The devices to attach to, as Cilium picks them: the interfaces holding a node IP and those
/// of the default route, minus loopback, bridges, bridge ports and veths.
pub fn detect_devices(node_ips: &[Ipv4Addr]) -> Result<Vec<String>, Error> {
    let routes = std::fs::read_to_string("/proc/net/route")
        .map_err(|e| Error::io("read /proc/net/route".into(), e))?;
    let mut devs: BTreeSet<String> = default_route_devices(&routes).into_iter().collect();
    for (dev, ip) in interface_addrs()? {
        if node_ips.contains(&ip) {
            devs.insert(dev);
        }
    }
    Ok(devs.into_iter().filter(|d| external_candidate(d)).collect())
}

/// The node IPs when none were given: the IPv4 addresses of the devices.
pub fn detect_node_ips(devices: &[String]) -> Result<Vec<Ipv4Addr>, Error> {
    Ok(interface_addrs()?
        .into_iter()
        .filter(|(dev, _)| devices.contains(dev))
        .map(|(_, ip)| ip)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_are_read_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     weir0\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        assert_eq!(default_route_devices(table), vec!["eth0".to_string()]);
        assert!(default_route_devices("garbage").is_empty());
    }

    #[test]
    fn loopback_bridges_and_veths_are_never_devices() {
        for dev in ["lo", "weir0", "veth1234"] {
            assert!(!external_candidate(dev), "{dev}");
        }
    }

    #[test]
    fn loopback_has_an_address() {
        let addrs = interface_addrs().expect("getifaddrs");
        assert!(addrs.contains(&("lo".to_string(), Ipv4Addr::LOCALHOST)));
    }
}
