//! The pure part of the cluster zone: which DNS records Kubernetes objects stand for, following
//! the Kubernetes DNS-based service discovery specification (schema 1.1.0). Objects are first
//! reduced to compact views (what DNS needs of a Service, an EndpointSlice, a Pod), so the
//! snapshot does not keep whole API objects, and a view maps to a sorted, de-duplicated list
//! of records that the zone diffs against the previous list of the same object.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::wire::{
    NameError, TYPE_A, TYPE_AAAA, TYPE_CNAME, TYPE_PTR, TYPE_SOA, TYPE_SRV, TYPE_TXT, name_to_wire,
};

/// The schema version served at `dns-version.<zone>`.
pub const SCHEMA_VERSION: &str = "1.1.0";
/// The label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One resource record: owner (lower-cased wire name), type and RDATA (wire form, names in it
/// uncompressed so the bytes can be copied into any message).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rr {
    pub owner: Box<[u8]>,
    pub rtype: u16,
    pub rdata: Box<[u8]>,
}

/// `namespace/name` of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        ObjKey {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// What DNS needs of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceView {
    /// A Service with cluster IPs (ClusterIP, NodePort, LoadBalancer).
    ClusterIp {
        ips: Vec<IpAddr>,
        ports: Vec<Port>,
    },
    /// `clusterIP: None`: records come from the endpoints.
    Headless {
        publish_not_ready: bool,
    },
    ExternalName(String),
    /// A Service DNS has nothing to say about yet (no cluster IP allocated).
    Empty,
}

/// A named port (`_<name>._<proto>`); unnamed ports get no SRV record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    pub name: String,
    /// Lower case: `tcp`, `udp`, `sctp`.
    pub protocol: String,
    pub port: u16,
}

impl ServiceView {
    pub fn of(svc: &Service) -> ServiceView {
        let Some(spec) = &svc.spec else {
            return ServiceView::Empty;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return match &spec.external_name {
                Some(target) => ServiceView::ExternalName(target.clone()),
                None => ServiceView::Empty,
            };
        }
        if spec.cluster_ip.as_deref() == Some("None") {
            return ServiceView::Headless {
                publish_not_ready: spec.publish_not_ready_addresses == Some(true),
            };
        }
        let mut ips: Vec<IpAddr> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|s| s.parse().ok()).collect(),
            _ => spec
                .cluster_ip
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
        };
        ips.dedup();
        if ips.is_empty() {
            return ServiceView::Empty;
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| named_port(p.name.as_deref(), p.protocol.as_deref(), Some(p.port)))
            .collect();
        ServiceView::ClusterIp { ips, ports }
    }
}

fn named_port(name: Option<&str>, protocol: Option<&str>, port: Option<i32>) -> Option<Port> {
    let name = name.filter(|n| !n.is_empty())?;
    Some(Port {
        name: name.to_string(),
        protocol: protocol.unwrap_or("TCP").to_ascii_lowercase(),
        port: u16::try_from(port?).ok()?,
    })
}

/// What DNS needs of an EndpointSlice: its Service, ports and endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    /// The Service this slice belongs to (from the `kubernetes.io/service-name` label).
    pub service: Option<ObjKey>,
    pub ports: Vec<Port>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointView {
    pub ips: Vec<IpAddr>,
    pub hostname: Option<String>,
    pub ready: bool,
}

impl SliceView {
    pub fn of(slice: &EndpointSlice) -> SliceView {
        let key = ObjKey::of(&slice.metadata);
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|svc| ObjKey {
                namespace: key.namespace.clone(),
                name: svc.clone(),
            });
        // FQDN slices name hosts, not addresses: DNS has nothing to publish for them.
        let ip_slice = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
        let endpoints = slice
            .endpoints
            .iter()
            .filter(|_| ip_slice)
            .map(|e| EndpointView {
                ips: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                hostname: e.hostname.clone().filter(|h| !h.is_empty()),
                // The API says a nil `ready` is to be read as ready.
                ready: e.conditions.as_ref().and_then(|c| c.ready) != Some(false),
            })
            .collect();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| named_port(p.name.as_deref(), p.protocol.as_deref(), p.port))
            .collect();
        SliceView {
            service,
            ports,
            endpoints,
        }
    }
}

/// The pod IPs that get `a-b-c-d.<ns>.pod.<zone>` records: those of pods that have not
/// finished.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let mut ips: Vec<IpAddr> = match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().filter_map(|p| p.ip.parse().ok()).collect(),
        _ => status
            .pod_ip
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
    };
    ips.dedup();
    ips
}

/// Builds records for one zone.
#[derive(Clone, Debug)]
pub struct Names {
    /// The zone, lower case, without a trailing dot (`cluster.local`).
    pub zone: String,
}

impl Names {
    pub fn new(zone: &str) -> Result<Names, NameError> {
        let zone = zone.trim_end_matches('.').to_ascii_lowercase();
        name_to_wire(&zone)?;
        Ok(Names { zone })
    }

    pub fn zone_wire(&self) -> Vec<u8> {
        // Validated in `new`.
        name_to_wire(&self.zone).unwrap_or_else(|_| vec![0])
    }

    fn service_name(&self, ns: &str, svc: &str) -> String {
        format!("{svc}.{ns}.svc.{}", self.zone)
    }

    /// The records that exist for the zone itself: the SOA at the apex and `dns-version`.
    pub fn static_records(&self, ttl: u32) -> Result<Vec<Rr>, NameError> {
        let mut out = Vec::new();
        push(&mut out, &self.zone, TYPE_SOA, self.soa_rdata(ttl)?)?;
        let mut txt = vec![SCHEMA_VERSION.len() as u8];
        txt.extend_from_slice(SCHEMA_VERSION.as_bytes());
        push(
            &mut out,
            &format!("dns-version.{}", self.zone),
            TYPE_TXT,
            txt,
        )?;
        Ok(out)
    }

    /// RDATA of the zone's SOA, with the values CoreDNS uses; the minimum (negative-caching
    /// TTL, RFC 2308) is the record TTL so NXDOMAIN is cached no longer than answers are.
    pub fn soa_rdata(&self, ttl: u32) -> Result<Vec<u8>, NameError> {
        let mut rdata = name_to_wire(&format!("ns.dns.{}", self.zone))?;
        rdata.extend(name_to_wire(&format!("hostmaster.{}", self.zone))?);
        let serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        for v in [serial, 7200, 1800, 86400, ttl] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        Ok(rdata)
    }

    /// The records of one Service, given the views of its EndpointSlices.
    pub fn service_records<'a>(
        &self,
        key: &ObjKey,
        svc: &ServiceView,
        slices: impl IntoIterator<Item = &'a SliceView>,
    ) -> Result<Vec<Rr>, NameError> {
        let name = self.service_name(&key.namespace, &key.name);
        let mut out = Vec::new();
        match svc {
            ServiceView::Empty => {}
            ServiceView::ExternalName(target) => {
                push(&mut out, &name, TYPE_CNAME, name_to_wire(target)?)?;
            }
            ServiceView::ClusterIp { ips, ports } => {
                let target = name_to_wire(&name)?;
                for ip in ips {
                    push(&mut out, &name, addr_type(ip), addr_rdata(ip))?;
                    push(&mut out, &reverse_name(ip), TYPE_PTR, target.clone())?;
                }
                for p in ports {
                    let owner = format!("_{}._{}.{name}", p.name, p.protocol);
                    push(&mut out, &owner, TYPE_SRV, srv_rdata(p.port, &target))?;
                }
            }
            ServiceView::Headless { publish_not_ready } => {
                for slice in slices {
                    for ep in &slice.endpoints {
                        if !(ep.ready || *publish_not_ready) {
                            continue;
                        }
                        for ip in &ep.ips {
                            // Endpoints without a hostname are named by their dashed address,
                            // as CoreDNS does, so that SRV targets always resolve.
                            let host = ep.hostname.clone().unwrap_or_else(|| dashed(ip));
                            let host_name = format!("{host}.{name}");
                            let host_wire = name_to_wire(&host_name)?;
                            push(&mut out, &name, addr_type(ip), addr_rdata(ip))?;
                            push(&mut out, &host_name, addr_type(ip), addr_rdata(ip))?;
                            push(&mut out, &reverse_name(ip), TYPE_PTR, host_wire.clone())?;
                            for p in &slice.ports {
                                let owner = format!("_{}._{}.{name}", p.name, p.protocol);
                                push(&mut out, &owner, TYPE_SRV, srv_rdata(p.port, &host_wire))?;
                            }
                        }
                    }
                }
            }
        }
        Ok(sorted(out))
    }

    /// The records of one Pod: `a-b-c-d.<ns>.pod.<zone>` per pod IP.
    pub fn pod_records(&self, namespace: &str, ips: &[IpAddr]) -> Result<Vec<Rr>, NameError> {
        let mut out = Vec::new();
        for ip in ips {
            let owner = format!("{}.{namespace}.pod.{}", dashed(ip), self.zone);
            push(&mut out, &owner, addr_type(ip), addr_rdata(ip))?;
        }
        Ok(sorted(out))
    }
}

fn sorted(out: Vec<Rr>) -> Vec<Rr> {
    out.into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn push(out: &mut Vec<Rr>, owner: &str, rtype: u16, rdata: Vec<u8>) -> Result<(), NameError> {
    out.push(Rr {
        owner: name_to_wire(owner)?.into(),
        rtype,
        rdata: rdata.into(),
    });
    Ok(())
}

fn addr_type(ip: &IpAddr) -> u16 {
    if ip.is_ipv4() { TYPE_A } else { TYPE_AAAA }
}

fn addr_rdata(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn srv_rdata(port: u16, target: &[u8]) -> Vec<u8> {
    let mut rdata = vec![0, 0, 0, 100];
    rdata.extend_from_slice(&port.to_be_bytes());
    rdata.extend_from_slice(target);
    rdata
}

/// `10-244-1-2` for 10.244.1.2; `fd00--1` for fd00::1 (as CoreDNS writes pod names).
pub fn dashed(ip: &IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// The PTR owner of an address: `d.c.b.a.in-addr.arpa` or the nibble form under `ip6.arpa`.
pub fn reverse_name(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0x0f, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
