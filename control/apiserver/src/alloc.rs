//! ClusterIP, NodePort and healthCheckNodePort allocation for Services.
//!
//! Every allocated IP or port is one store key (`/registry/weir/serviceips/<ip>`,
//! `/registry/weir/nodeports/<port>`) created with a store `create`, which is a
//! compare-and-swap on both backends: two concurrent creates can never both own a value,
//! allocations persist with the store, and deleting the key releases the value.
//!
//! A new Service ([`Allocator::create`]) picks its values first and writes them with the
//! object in one [`Store::create_all`], so a create costs one store round trip; only a
//! crowded range falls back to claiming values one at a time.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::Arc;

use rand::Rng;
use serde_json::{Value, json};
use weir_api::admission::needs_health_check_node_port;
use weir_api::{ApiError, Cause, Resource};
use weir_store::{Error as StoreError, Store};

use crate::meta;
use crate::rest::{object_error, store_error};

const IP_PREFIX: &str = "/registry/weir/serviceips/";
const PORT_PREFIX: &str = "/registry/weir/nodeports/";

/// An IPv4 service CIDR such as `10.96.0.0/12`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCidr {
    base: u32,
    prefix: u8,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid service CIDR {0:?}: want an IPv4 network such as 10.96.0.0/12 with a prefix of 8..=28"
)]
pub struct CidrError(String);

impl FromStr for ServiceCidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let err = || CidrError(s.to_string());
        let (ip, prefix) = s.split_once('/').ok_or_else(err)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        if !(8..=28).contains(&prefix) {
            return Err(err());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            base: u32::from(ip) & mask,
            prefix,
        })
    }
}

impl fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl Default for ServiceCidr {
    fn default() -> Self {
        Self {
            base: u32::from(Ipv4Addr::new(10, 96, 0, 0)),
            prefix: 12,
        }
    }
}

impl ServiceCidr {
    fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }

    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base + n)
    }

    /// Whether `ip` is a usable address of the range (not the network or broadcast one).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip > self.base && ip < self.base + self.size() - 1
    }

    /// `.1`: the `kubernetes` Service.
    pub fn apiserver_ip(&self) -> Ipv4Addr {
        self.nth(1)
    }

    /// `.10`: kept for the cluster DNS Service, never handed out automatically.
    pub fn dns_ip(&self) -> Ipv4Addr {
        self.nth(10)
    }
}

/// The values a Service holds; what to release when it goes away or a write fails.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Held {
    pub ips: Vec<Ipv4Addr>,
    pub ports: Vec<u16>,
}

impl Held {
    pub fn of(svc: &Value) -> Self {
        let spec = &svc["spec"];
        let ips = spec["clusterIPs"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()?.parse().ok()).collect())
            .or_else(|| {
                spec["clusterIP"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .map(|ip| vec![ip])
            })
            .unwrap_or_default();
        // The health check node port comes from the node port range and is held alike.
        let ports = spec["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| &p["nodePort"])
            .chain([&spec["healthCheckNodePort"]])
            .filter_map(Value::as_u64)
            .filter_map(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .collect();
        Self { ips, ports }
    }

    /// What `self` holds that `other` does not.
    pub fn minus(&self, other: &Held) -> Held {
        Held {
            ips: self
                .ips
                .iter()
                .filter(|ip| !other.ips.contains(ip))
                .copied()
                .collect(),
            ports: self
                .ports
                .iter()
                .filter(|p| !other.ports.contains(p))
                .copied()
                .collect(),
        }
    }
}

/// A value to claim in the same write as the object.
struct Pending {
    key: String,
    value: Vec<u8>,
    /// The error if someone holds it: `None` for a value picked at random (pick another).
    taken: Option<ApiError>,
}

/// Claim values at once (`Now`), or collect them for one write with the object (`Defer`).
enum Mode<'a> {
    Now,
    Defer(&'a mut Vec<Pending>),
}

/// Random picks written with the object before falling back to claims one at a time.
const CREATE_TRIES: usize = 8;

pub struct Allocator {
    store: Arc<dyn Store>,
    pub cidr: ServiceCidr,
    pub node_ports: RangeInclusive<u16>,
}

/// The value of an allocation key: who holds it.
fn owner_value(owner: &str) -> Vec<u8> {
    json!({ "owner": owner }).to_string().into_bytes()
}

fn needs_node_ports(svc: &Value) -> bool {
    matches!(
        svc["spec"]["type"].as_str(),
        Some("NodePort") | Some("LoadBalancer")
    )
}

impl Allocator {
    pub fn new(store: Arc<dyn Store>, cidr: ServiceCidr, node_ports: RangeInclusive<u16>) -> Self {
        Self {
            store,
            cidr,
            node_ports,
        }
    }

    /// Claim `key`: true if we got it, false if someone holds it.
    async fn claim(&self, key: String, owner: &str) -> Result<bool, ApiError> {
        match self.store.create(&key, owner_value(owner)).await {
            Ok(_) => Ok(true),
            Err(StoreError::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(store_error(e)),
        }
    }

    /// Claim `key` now, or add it to the write of the object; `taken` is the error when
    /// someone holds it.
    async fn take(
        &self,
        mode: &mut Mode<'_>,
        key: String,
        owner: &str,
        taken: impl FnOnce() -> ApiError,
    ) -> Result<(), ApiError> {
        match mode {
            Mode::Now => match self.claim(key, owner).await? {
                true => Ok(()),
                false => Err(taken()),
            },
            Mode::Defer(pending) => {
                pending.push(Pending {
                    key,
                    value: owner_value(owner),
                    taken: Some(taken()),
                });
                Ok(())
            }
        }
    }

    /// A free cluster IP claimed now, or a random candidate for the write of the object.
    async fn pick_ip(&self, mode: &mut Mode<'_>, owner: &str) -> Result<Ipv4Addr, ApiError> {
        let Mode::Defer(pending) = mode else {
            return self.allocate_ip(owner).await;
        };
        let dns = self.cidr.dns_ip();
        let ip = loop {
            let ip = self
                .cidr
                .nth(rand::rng().random_range(2..self.cidr.size() - 1));
            if ip != dns {
                break ip;
            }
        };
        pending.push(Pending {
            key: format!("{IP_PREFIX}{ip}"),
            value: owner_value(owner),
            taken: None,
        });
        Ok(ip)
    }

    /// A free node port other than `avoid` (ports the Service uses otherwise) claimed now,
    /// or a random candidate for the write of the object.
    async fn pick_port(
        &self,
        mode: &mut Mode<'_>,
        owner: &str,
        avoid: &[u16],
    ) -> Result<u16, ApiError> {
        let Mode::Defer(pending) = mode else {
            return self.allocate_port(owner, avoid).await;
        };
        let port = (0..CREATE_TRIES)
            .map(|_| rand::rng().random_range(self.node_ports.clone()))
            .chain(self.node_ports.clone())
            .find(|p| !avoid.contains(p))
            .ok_or_else(|| self.ports_full())?;
        pending.push(Pending {
            key: format!("{PORT_PREFIX}{port}"),
            value: owner_value(owner),
            taken: None,
        });
        Ok(port)
    }

    /// Store the new Service `svc` at `key` with its cluster IP and node ports, claimed in
    /// the same atomic write; returns the stored object with its `resourceVersion`.
    pub async fn create(&self, res: &Resource, svc: Value, key: &str) -> Result<Value, ApiError> {
        let name = meta::name(&svc).to_string();
        for _ in 0..CREATE_TRIES {
            let mut obj = svc.clone();
            let mut pending = Vec::new();
            self.assign_inner(
                res,
                &mut obj,
                None,
                &mut Held::default(),
                &mut Mode::Defer(&mut pending),
            )
            .await?;
            let mut kvs = vec![(key.to_string(), meta::to_stored(&obj))];
            kvs.extend(pending.iter().map(|p| (p.key.clone(), p.value.clone())));
            match self.store.create_all(kvs).await {
                Ok(kvs) => {
                    let rv = kvs.first().map_or(0, |kv| kv.mod_revision);
                    meta::set_rv(&mut obj, rv);
                    return Ok(obj);
                }
                Err(StoreError::AlreadyExists { key: held }) if held != key => {
                    match pending.into_iter().find(|p| p.key == held) {
                        Some(Pending { taken: Some(e), .. }) => return Err(e),
                        // A random pick someone holds: pick again.
                        _ => continue,
                    }
                }
                Err(e) => return Err(object_error(res, &name, e)),
            }
        }
        // A crowded range: claim values one by one (scanning it if need be), then write.
        let mut obj = svc;
        let claimed = self.assign(res, &mut obj, None).await?;
        match self.store.create(key, meta::to_stored(&obj)).await {
            Ok(kv) => {
                meta::set_rv(&mut obj, kv.mod_revision);
                Ok(obj)
            }
            Err(e) => {
                self.release(&claimed).await;
                Err(object_error(res, &name, e))
            }
        }
    }

    /// Release everything in `held`. Failures are logged: a leaked value only shrinks
    /// the range, while failing the request that freed it would help nobody.
    pub async fn release(&self, held: &Held) {
        for ip in &held.ips {
            if let Err(e) = self.store.delete(&format!("{IP_PREFIX}{ip}"), None).await {
                tracing::warn!(%ip, error = %e, "could not release cluster IP");
            }
        }
        for port in &held.ports {
            if let Err(e) = self
                .store
                .delete(&format!("{PORT_PREFIX}{port}"), None)
                .await
            {
                tracing::warn!(port, error = %e, "could not release node port");
            }
        }
    }

    async fn allocate_ip(&self, owner: &str) -> Result<Ipv4Addr, ApiError> {
        let size = self.cidr.size();
        let dns = self.cidr.dns_ip();
        // Random probing: a fresh random start per try spreads concurrent creates apart.
        for _ in 0..64 {
            let n = rand::rng().random_range(2..size - 1);
            let ip = self.cidr.nth(n);
            if ip != dns && self.claim(format!("{IP_PREFIX}{ip}"), owner).await? {
                return Ok(ip);
            }
        }
        for n in 2..size - 1 {
            let ip = self.cidr.nth(n);
            if ip != dns && self.claim(format!("{IP_PREFIX}{ip}"), owner).await? {
                return Ok(ip);
            }
        }
        Err(ApiError::internal(&format!(
            "failed to allocate a serviceIP: range {} is full",
            self.cidr
        )))
    }

    async fn allocate_port(&self, owner: &str, avoid: &[u16]) -> Result<u16, ApiError> {
        let (lo, hi) = (*self.node_ports.start(), *self.node_ports.end());
        let random = (0..64).map(|_| rand::rng().random_range(lo..=hi));
        for port in random.chain(lo..=hi).filter(|p| !avoid.contains(p)) {
            if self.claim(format!("{PORT_PREFIX}{port}"), owner).await? {
                return Ok(port);
            }
        }
        Err(self.ports_full())
    }

    fn ports_full(&self) -> ApiError {
        ApiError::internal(&format!(
            "failed to allocate a nodePort: range {}-{} is full",
            self.node_ports.start(),
            self.node_ports.end()
        ))
    }

    /// Fill in and claim the cluster IP and node ports of `svc`, keeping what `old` (the
    /// stored version, on update) already holds. On success returns what was newly
    /// claimed (release it if the write fails); on failure nothing stays claimed.
    pub async fn assign(
        &self,
        res: &Resource,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<Held, ApiError> {
        let mut claimed = Held::default();
        match self
            .assign_inner(res, svc, old, &mut claimed, &mut Mode::Now)
            .await
        {
            Ok(()) => Ok(claimed),
            Err(e) => {
                self.release(&claimed).await;
                Err(e)
            }
        }
    }

    async fn assign_inner(
        &self,
        res: &Resource,
        svc: &mut Value,
        old: Option<&Value>,
        claimed: &mut Held,
        mode: &mut Mode<'_>,
    ) -> Result<(), ApiError> {
        let name = meta::name(svc).to_string();
        let owner = format!(
            "{}/{}",
            meta::meta_str(svc, "namespace").unwrap_or(""),
            name
        );
        let invalid = |field: &str, value: Value, detail: &str| {
            ApiError::invalid(res, &name, vec![Cause::invalid(field, &value, detail)])
        };
        if !svc["spec"].is_object() {
            svc["spec"] = json!({});
        }
        let external_name = svc["spec"]["type"].as_str() == Some("ExternalName");

        // Cluster IP: immutable once set, so an update inherits the stored one.
        let old_ip = old
            .and_then(|o| o["spec"]["clusterIP"].as_str())
            .filter(|s| !s.is_empty());
        let asked = svc["spec"]["clusterIP"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or_else(|| {
                svc["spec"]["clusterIPs"][0]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            });
        if let (Some(old_ip), Some(asked)) = (old_ip, asked.as_deref())
            && old_ip != asked
        {
            return Err(invalid(
                "spec.clusterIPs[0]",
                json!(asked),
                "may not change once set",
            ));
        }
        let ip = match (old_ip, asked) {
            _ if external_name => None,
            (Some(old_ip), _) => Some(old_ip.to_string()),
            (None, Some(asked)) if asked == "None" => Some(asked),
            (None, Some(asked)) => {
                let ip: Ipv4Addr = asked.parse().map_err(|_| {
                    invalid(
                        "spec.clusterIPs[0]",
                        json!(asked),
                        "must be a valid IPv4 address",
                    )
                })?;
                if !self.cidr.contains(ip) {
                    return Err(invalid(
                        "spec.clusterIPs[0]",
                        json!(asked),
                        &format!(
                            "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. The range of valid IPs is {}",
                            self.cidr
                        ),
                    ));
                }
                self.take(mode, format!("{IP_PREFIX}{ip}"), &owner, || {
                    invalid(
                        "spec.clusterIPs[0]",
                        json!(asked),
                        &format!("failed to allocate IP {ip}: provided IP is already allocated"),
                    )
                })
                .await?;
                claimed.ips.push(ip);
                Some(asked)
            }
            (None, None) => {
                let ip = self.pick_ip(mode, &owner).await?;
                claimed.ips.push(ip);
                Some(ip.to_string())
            }
        };
        let spec = &mut svc["spec"];
        match ip {
            Some(ip) => {
                spec["clusterIP"] = json!(ip);
                spec["clusterIPs"] = json!([ip]);
                spec["ipFamilies"] = json!(["IPv4"]);
                spec["ipFamilyPolicy"] = json!("SingleStack");
            }
            None => {
                if let Some(m) = spec.as_object_mut() {
                    m.remove("clusterIP");
                    m.remove("clusterIPs");
                }
            }
        }

        // Node ports.
        let want_ports = needs_node_ports(svc);
        let old_ports: Vec<Value> = old
            .filter(|o| needs_node_ports(o))
            .and_then(|o| o["spec"]["ports"].as_array().cloned())
            .unwrap_or_default();
        // What the stored object holds may be reused as a node port, except a health check
        // node port the Service keeps (it cannot be both).
        let kept_health_port = old
            .filter(|o| needs_health_check_node_port(o) && needs_health_check_node_port(svc))
            .and_then(|o| o["spec"]["healthCheckNodePort"].as_u64());
        let old_held: Vec<u16> = old
            .map(|o| Held::of(o).ports)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| Some(u64::from(*p)) != kept_health_port)
            .collect();
        // kube's shouldAllocateNodePorts: a LoadBalancer with allocateLoadBalancerNodePorts:
        // false gets no node port picked (given and kept ones stay).
        let pick_node_ports = svc["spec"]["allocateLoadBalancerNodePorts"] != json!(false);
        // A health check node port the client asks for is no node port candidate.
        let asked_health_port: Vec<u16> = svc["spec"]["healthCheckNodePort"]
            .as_u64()
            .filter(|_| needs_health_check_node_port(svc))
            .and_then(|n| u16::try_from(n).ok())
            .into_iter()
            .collect();
        let Some(ports) = svc["spec"]["ports"].as_array_mut() else {
            return Ok(());
        };
        for (i, port) in ports.iter_mut().enumerate() {
            if !want_ports {
                if let Some(m) = port.as_object_mut() {
                    m.remove("nodePort");
                }
                continue;
            }
            let field = format!("spec.ports[{i}].nodePort");
            match port["nodePort"].as_u64() {
                Some(n) => {
                    let Ok(n) = u16::try_from(n) else {
                        return Err(invalid(
                            &field,
                            json!(n),
                            "must be between 1 and 65535, inclusive",
                        ));
                    };
                    if old_held.contains(&n) || claimed.ports.contains(&n) {
                        continue;
                    }
                    if !self.node_ports.contains(&n) {
                        return Err(invalid(
                            &field,
                            json!(n),
                            &format!(
                                "provided port is not in the valid range. The range of valid ports is {}-{}",
                                self.node_ports.start(),
                                self.node_ports.end()
                            ),
                        ));
                    }
                    self.take(mode, format!("{PORT_PREFIX}{n}"), &owner, || {
                        invalid(&field, json!(n), "provided port is already allocated")
                    })
                    .await?;
                    claimed.ports.push(n);
                }
                None => {
                    // A port the stored object had keeps its node port (matched by name
                    // and port), as clients that send the manifest again omit it.
                    let kept = old_ports.iter().find_map(|o| {
                        (o["name"] == port["name"] && o["port"] == port["port"])
                            .then(|| o["nodePort"].as_u64())
                            .flatten()
                            .and_then(|n| u16::try_from(n).ok())
                    });
                    let n = match kept {
                        Some(n) if !claimed.ports.contains(&n) => n,
                        _ if !pick_node_ports => continue,
                        _ => {
                            let n = self.pick_port(mode, &owner, &asked_health_port).await?;
                            claimed.ports.push(n);
                            n
                        }
                    };
                    port["nodePort"] = json!(n);
                }
            }
        }
        self.assign_health_check_port(svc, old, claimed, mode, &owner, invalid)
            .await
    }

    /// `spec.healthCheckNodePort` of a LoadBalancer + Local Service, as kube's
    /// `allocHealthCheckNodePort`/`updateHealthCheckNodePort`: a given value is claimed, an
    /// unset one picked (or, on update, kept: admission refuses a change while the Service
    /// stays LoadBalancer + Local). A Service that stops needing it has it cleared by admission
    /// (`prepare_update`), so [`Held::minus`] releases it.
    async fn assign_health_check_port(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
        claimed: &mut Held,
        mode: &mut Mode<'_>,
        owner: &str,
        invalid: impl Fn(&str, Value, &str) -> ApiError,
    ) -> Result<(), ApiError> {
        const FIELD: &str = "spec.healthCheckNodePort";
        if !needs_health_check_node_port(svc) {
            // Admission refused any other value than 0, which Kubernetes omits.
            if let Some(spec) = svc["spec"].as_object_mut() {
                spec.remove("healthCheckNodePort");
            }
            return Ok(());
        }
        let old_port = old
            .filter(|o| needs_health_check_node_port(o))
            .and_then(|o| o["spec"]["healthCheckNodePort"].as_u64())
            .filter(|n| *n != 0);
        let asked = svc["spec"]["healthCheckNodePort"]
            .as_u64()
            .filter(|n| *n != 0);
        // One of this Service's own node ports is as taken as anyone else's.
        let own_ports: Vec<u16> = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["nodePort"].as_u64())
            .filter_map(|p| u16::try_from(p).ok())
            .collect();
        let n = match (old_port, asked) {
            // Clients that send the manifest again omit the value the server picked; admission
            // refused another one (it is immutable).
            (Some(o), _) => o,
            (None, Some(a)) => {
                let Ok(n) = u16::try_from(a) else {
                    return Err(invalid(
                        FIELD,
                        json!(a),
                        "must be between 1 and 65535, inclusive",
                    ));
                };
                let taken = || invalid(FIELD, json!(n), "provided port is already allocated");
                if own_ports.contains(&n) {
                    return Err(taken());
                }
                let held_before = old.is_some_and(|o| Held::of(o).ports.contains(&n));
                if !held_before {
                    if !self.node_ports.contains(&n) {
                        return Err(invalid(
                            FIELD,
                            json!(n),
                            &format!(
                                "provided port is not in the valid range. The range of valid ports is {}-{}",
                                self.node_ports.start(),
                                self.node_ports.end()
                            ),
                        ));
                    }
                    self.take(mode, format!("{PORT_PREFIX}{n}"), owner, taken)
                        .await?;
                    claimed.ports.push(n);
                }
                u64::from(n)
            }
            (None, None) => {
                let n = self.pick_port(mode, owner, &own_ports).await?;
                claimed.ports.push(n);
                u64::from(n)
            }
        };
        svc["spec"]["healthCheckNodePort"] = json!(n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_reserves() {
        let c: ServiceCidr = "10.96.0.0/12".parse().expect("cidr");
        assert_eq!(c, ServiceCidr::default());
        assert_eq!(c.to_string(), "10.96.0.0/12");
        assert_eq!(c.apiserver_ip(), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(c.dns_ip(), Ipv4Addr::new(10, 96, 0, 10));
        assert!(c.contains(Ipv4Addr::new(10, 111, 255, 254)));
        assert!(!c.contains(Ipv4Addr::new(10, 111, 255, 255)));
        assert!(!c.contains(Ipv4Addr::new(10, 96, 0, 0)));
        assert!(!c.contains(Ipv4Addr::new(10, 112, 0, 1)));
        let odd: ServiceCidr = "192.168.7.9/24".parse().expect("cidr");
        assert_eq!(odd.to_string(), "192.168.7.0/24");
        assert!("10.96.0.0".parse::<ServiceCidr>().is_err());
        assert!("10.96.0.0/31".parse::<ServiceCidr>().is_err());
        assert!("fd00::/108".parse::<ServiceCidr>().is_err());
    }

    #[test]
    fn held_values_are_read_from_the_service() {
        let svc = json!({"spec": {"clusterIPs": ["10.96.0.7"], "ports": [
            {"port": 80, "nodePort": 30001}, {"port": 81}
        ]}});
        let held = Held::of(&svc);
        assert_eq!(held.ips, vec![Ipv4Addr::new(10, 96, 0, 7)]);
        assert_eq!(held.ports, vec![30001]);
        assert_eq!(held.minus(&held), Held::default());
        let headless = json!({"spec": {"clusterIP": "None"}});
        assert_eq!(Held::of(&headless), Held::default());
        let local = json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 30999, "ports": [{"port": 80, "nodePort": 30001}]}});
        assert_eq!(Held::of(&local).ports, vec![30001, 30999]);
    }

    struct Fixture {
        alloc: Allocator,
        store: Arc<dyn Store>,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        fixture_with(30000..=32767)
    }

    fn fixture_with(node_ports: RangeInclusive<u16>) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(
            weir_store::EmbeddedStore::open(dir.path().join("db")).expect("embedded store"),
        );
        Fixture {
            alloc: Allocator::new(store.clone(), ServiceCidr::default(), node_ports),
            store,
            _dir: dir,
        }
    }

    fn svc_res() -> &'static Resource {
        weir_api::registry::find_by_name("svc").expect("svc")
    }

    fn lb_local(name: &str, health_port: Option<u16>) -> Value {
        let mut svc = json!({"metadata": {"name": name, "namespace": "d"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "protocol": "TCP"}]}});
        if let Some(p) = health_port {
            svc["spec"]["healthCheckNodePort"] = json!(p);
        }
        svc
    }

    impl Fixture {
        async fn create(&self, svc: Value) -> Result<Value, ApiError> {
            let key = format!("/registry/services/specs/d/{}", meta::name(&svc));
            self.alloc.create(svc_res(), svc, &key).await
        }

        async fn held(&self, port: u64) -> bool {
            let key = format!("{PORT_PREFIX}{port}");
            self.store.get(&key).await.expect("get").is_some()
        }
    }

    /// The allocated `spec.healthCheckNodePort` of `svc`.
    fn health_port(svc: &Value) -> u64 {
        svc["spec"]["healthCheckNodePort"]
            .as_u64()
            .expect("allocated")
    }

    /// The one cause of an Invalid error, as `field: message`.
    fn cause(e: ApiError) -> String {
        assert_eq!(e.code, 422, "{e:?}");
        let causes = e.details.map(|d| d.causes).unwrap_or_default();
        assert_eq!(causes.len(), 1, "{causes:?}");
        causes[0].line()
    }

    #[tokio::test]
    async fn load_balancer_local_gets_a_health_check_node_port() {
        let f = fixture();
        let svc = f.create(lb_local("auto", None)).await.expect("create");
        let hc = health_port(&svc);
        let node_port = svc["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .expect("node port");
        assert!((30000..=32767).contains(&hc), "{hc}");
        assert_ne!(hc, node_port);
        assert!(f.held(hc).await && f.held(node_port).await);

        // Cluster policy and NodePort Services get none.
        let mut cluster = lb_local("cluster", None);
        cluster["spec"]["externalTrafficPolicy"] = json!("Cluster");
        let cluster = f.create(cluster).await.expect("create");
        assert!(cluster["spec"].get("healthCheckNodePort").is_none());
        assert_eq!(Held::of(&cluster).ports.len(), 1);
    }

    #[tokio::test]
    async fn a_requested_health_check_node_port_is_claimed_once() {
        let f = fixture();
        let svc = f.create(lb_local("a", Some(31000))).await.expect("create");
        assert_eq!(svc["spec"]["healthCheckNodePort"], 31000);
        assert!(f.held(31000).await);

        let taken = f
            .create(lb_local("b", Some(31000)))
            .await
            .expect_err("taken");
        assert_eq!(
            cause(taken),
            "spec.healthCheckNodePort: Invalid value: 31000: provided port is already allocated"
        );
        // A node port (of another Service or of this one) is as taken.
        let node_port = svc["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .expect("node port");
        let taken = f
            .create(lb_local("c", Some(node_port as u16)))
            .await
            .expect_err("taken");
        assert!(cause(taken).starts_with("spec.healthCheckNodePort: Invalid value"));
        let mut own = lb_local("d", Some(31001));
        own["spec"]["ports"][0]["nodePort"] = json!(31001);
        let own = f.create(own).await.expect_err("own node port");
        assert_eq!(
            cause(own),
            "spec.healthCheckNodePort: Invalid value: 31001: provided port is already allocated"
        );
        let outside = f
            .create(lb_local("e", Some(8080)))
            .await
            .expect_err("range");
        assert_eq!(
            cause(outside),
            "spec.healthCheckNodePort: Invalid value: 8080: provided port is not in the valid range. The range of valid ports is 30000-32767"
        );
        // Nothing half-written: the failed creates left no claim behind.
        assert!(!f.held(31001).await);
    }

    #[tokio::test]
    async fn updates_keep_and_release_the_health_check_node_port() {
        let f = fixture();
        let old = f.create(lb_local("web", None)).await.expect("create");
        let hc = health_port(&old);

        // The manifest sent again, without the server's values, keeps them.
        let mut again = lb_local("web", None);
        let claimed = f
            .alloc
            .assign(svc_res(), &mut again, Some(&old))
            .await
            .expect("update");
        assert_eq!(claimed, Held::default());
        assert_eq!(again["spec"]["healthCheckNodePort"], hc);

        // Leaving Local: admission clears the field, the update frees the port.
        let mut cluster = old.clone();
        cluster["spec"]["externalTrafficPolicy"] = json!("Cluster");
        weir_api::admission::prepare_update(svc_res(), &mut cluster, &old);
        f.alloc
            .assign(svc_res(), &mut cluster, Some(&old))
            .await
            .expect("to Cluster");
        assert!(cluster["spec"].get("healthCheckNodePort").is_none());
        let freed = Held::of(&old).minus(&Held::of(&cluster));
        assert_eq!(freed.ports, vec![hc as u16]);
        f.alloc.release(&freed).await;
        assert!(!f.held(hc).await);

        // Back to Local: a new one is claimed.
        let mut local = cluster.clone();
        local["spec"]["externalTrafficPolicy"] = json!("Local");
        let claimed = f
            .alloc
            .assign(svc_res(), &mut local, Some(&cluster))
            .await
            .expect("to Local");
        let hc = health_port(&local);
        assert_eq!(claimed.ports, vec![hc as u16]);
        assert!(f.held(hc).await);
        // Deleting the Service releases it with its node port.
        f.alloc.release(&Held::of(&local)).await;
        assert!(!f.held(hc).await);
    }

    #[tokio::test]
    async fn an_update_cannot_make_the_health_check_node_port_a_node_port_too() {
        let f = fixture();
        let old = f.create(lb_local("web", None)).await.expect("create");
        let hc = old["spec"]["healthCheckNodePort"].clone();
        let mut both = old.clone();
        both["spec"]["ports"][0]["nodePort"] = hc.clone();
        let e = f
            .alloc
            .assign(svc_res(), &mut both, Some(&old))
            .await
            .expect_err("one port, two uses");
        assert_eq!(
            cause(e),
            format!(
                "spec.ports[0].nodePort: Invalid value: {hc}: provided port is already allocated"
            )
        );
        // Leaving Local hands the port over: it may become a node port in the same update.
        let node_port = old["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .expect("node port");
        let mut cluster = both.clone();
        cluster["spec"]["externalTrafficPolicy"] = json!("Cluster");
        cluster["spec"]["healthCheckNodePort"] = hc.clone();
        weir_api::admission::prepare_update(svc_res(), &mut cluster, &old);
        let claimed = f
            .alloc
            .assign(svc_res(), &mut cluster, Some(&old))
            .await
            .expect("to Cluster");
        assert_eq!(claimed, Held::default());
        assert_eq!(cluster["spec"]["ports"][0]["nodePort"], hc);
        assert!(cluster["spec"].get("healthCheckNodePort").is_none());
        assert_eq!(
            Held::of(&old).minus(&Held::of(&cluster)).ports,
            vec![node_port as u16]
        );
    }

    #[tokio::test]
    async fn a_restarted_allocator_knows_the_health_check_node_ports_in_use() {
        let f = fixture();
        let svc = f.create(lb_local("web", None)).await.expect("create");
        let hc = health_port(&svc);
        // A new allocator over the same store, as after an API server restart.
        let again = Allocator::new(f.store.clone(), ServiceCidr::default(), 30000..=32767);
        let mut other = lb_local("other", None);
        other["spec"]["ports"][0]["nodePort"] = json!(hc);
        let e = again
            .create(svc_res(), other, "/registry/services/specs/d/other")
            .await
            .expect_err("held");
        assert_eq!(
            cause(e),
            format!(
                "spec.ports[0].nodePort: Invalid value: {hc}: provided port is already allocated"
            )
        );
    }

    #[tokio::test]
    async fn a_crowded_range_still_gives_each_port_its_own_value() {
        // Three ports to find in a range of three: random picks collide often, and every
        // create must still end with three distinct, claimed values.
        for _ in 0..10 {
            let f = fixture_with(30000..=30002);
            let mut svc = lb_local("web", None);
            svc["spec"]["ports"] = json!([{"name": "a", "port": 80, "protocol": "TCP"},
                                          {"name": "b", "port": 81, "protocol": "TCP"}]);
            let svc = f.create(svc).await.expect("create");
            let mut ports = Held::of(&svc).ports;
            ports.sort_unstable();
            assert_eq!(ports, [30000, 30001, 30002], "{svc}");
            for p in ports {
                assert!(f.held(p.into()).await, "{p}");
            }
        }
    }

    #[tokio::test]
    async fn a_requested_health_check_node_port_is_not_also_picked_as_a_node_port() {
        // Half the random picks for the node port would be the asked-for port.
        for _ in 0..10 {
            let f = fixture_with(30000..=30001);
            let svc = f
                .create(lb_local("web", Some(30001)))
                .await
                .expect("create");
            assert_eq!(svc["spec"]["ports"][0]["nodePort"], 30000);
            assert_eq!(svc["spec"]["healthCheckNodePort"], 30001);
        }
    }

    #[tokio::test]
    async fn allocate_load_balancer_node_ports_false_picks_no_node_port() {
        let f = fixture();
        let mut svc = lb_local("web", None);
        svc["spec"]["allocateLoadBalancerNodePorts"] = json!(false);
        svc["spec"]["ports"] = json!([{"name": "a", "port": 80, "protocol": "TCP"},
                                      {"name": "b", "port": 81, "protocol": "TCP", "nodePort": 31001}]);
        let svc = f.create(svc).await.expect("create");
        // No node port picked; a given one is still claimed, and the health check port
        // does not depend on node ports (kube's allocHealthCheckNodePort).
        assert!(svc["spec"]["ports"][0].get("nodePort").is_none(), "{svc}");
        assert_eq!(svc["spec"]["ports"][1]["nodePort"], 31001);
        let hc = health_port(&svc);
        assert!(f.held(31001).await && f.held(hc).await);
        assert_eq!(Held::of(&svc).ports.len(), 2);
    }
}
