//! The routing table: a pure function from snapshots of Ingress, IngressClass, Service,
//! EndpointSlice and Secret objects to an immutable, precomputed lookup structure. The proxy
//! reads it through an `ArcSwap`, so a rebuilt table replaces the old one atomically while
//! in-flight requests keep the `Arc`s they already hold.
//!
//! Matching follows the Ingress specification: exact hosts, wildcard hosts (`*.example.com`
//! matches exactly one label), then rules without a host; within a host, paths are sorted
//! once at build time so that the longest match wins and Exact beats Prefix on a tie, with
//! Prefix compared element-wise on `/`. Requests matching no rule go to the oldest Ingress's
//! `defaultBackend`, or get a 404.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use k8s_openapi::api::core::v1::{Secret, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{
    Ingress, IngressBackend, IngressClass, IngressServiceBackend,
};
use kube::ResourceExt;
use rustls::sign::CertifiedKey;

use crate::annotations::Annotations;
use crate::balance::{Backend, Balance, Endpoint, Origin};
use crate::tls;

/// Annotation marking the cluster's default IngressClass.
const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The pre-IngressClass way of choosing a controller, still common in manifests.
const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// How problems found in EndpointSlices start.
const SLICE_PROBLEM: &str = "endpointslice ";

/// Everything the table is built from: the current contents of the watch caches.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub ingresses: Vec<Arc<Ingress>>,
    pub classes: Vec<Arc<IngressClass>>,
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub secrets: Vec<Arc<Secret>>,
}

/// How a path rule compares with the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Exact,
    /// Element-wise prefix; `ImplementationSpecific` is treated as this.
    Prefix,
}

/// The canary side of a traffic split.
#[derive(Debug)]
pub struct Canary {
    pub route: Arc<str>,
    pub backend: Arc<Backend>,
    pub weight: u32,
    pub weight_total: u32,
    pub header: Option<HeaderName>,
    pub header_value: Option<HeaderValue>,
}

/// What a matched rule forwards to, and how.
#[derive(Debug)]
pub struct Target {
    /// `namespace/ingress:host/path`, the `route` label of metrics and the access log.
    pub route: Arc<str>,
    pub backend: Arc<Backend>,
    pub canary: Option<Canary>,
    pub ssl_redirect: bool,
    pub read_timeout: Option<Duration>,
}

impl Target {
    /// The route label and backend for a request, applying the canary rules in
    /// ingress-nginx's order: header first, then weight.
    pub fn choose(&self, headers: &HeaderMap) -> (&Arc<str>, &Arc<Backend>) {
        let main = (&self.route, &self.backend);
        let Some(c) = &self.canary else { return main };
        let canary = (&c.route, &c.backend);
        if let Some(value) = c.header.as_ref().and_then(|h| headers.get(h)) {
            match &c.header_value {
                Some(want) if value == want => return canary,
                Some(_) => {}
                None if value == "always" => return canary,
                None if value == "never" => return main,
                None => {}
            }
        }
        if c.weight > 0 && rand::random_range(0..c.weight_total) < c.weight {
            return canary;
        }
        main
    }
}

#[derive(Debug, Clone)]
struct Route {
    path: Box<str>,
    kind: PathKind,
    target: Arc<Target>,
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        match self.kind {
            PathKind::Exact => path == &*self.path,
            // `self.path` has no trailing slash ("" for "/"), so `/foo` matches `/foo` and
            // `/foo/...` but not `/foobar`.
            PathKind::Prefix => {
                path.starts_with(&*self.path)
                    && matches!(path.as_bytes().get(self.path.len()), None | Some(b'/'))
            }
        }
    }
}

/// The rules of one host, longest path first, Exact before Prefix on a tie.
#[derive(Debug, Default, Clone)]
struct HostRoutes {
    routes: Vec<Route>,
}

impl HostRoutes {
    fn find(&self, path: &str) -> Option<&Arc<Target>> {
        self.routes
            .iter()
            .find(|r| r.matches(path))
            .map(|r| &r.target)
    }

    fn sort(&mut self) {
        self.routes.sort_by(|a, b| {
            b.path
                .len()
                .cmp(&a.path.len())
                .then((a.kind == PathKind::Prefix).cmp(&(b.kind == PathKind::Prefix)))
        });
    }
}

/// The immutable routing table.
#[derive(Debug, Default, Clone)]
pub struct Table {
    exact: HashMap<Box<str>, HostRoutes>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<Box<str>, HostRoutes>,
    any_host: HostRoutes,
    default_backend: Option<Arc<Target>>,
    certs_exact: HashMap<Box<str>, Arc<CertifiedKey>>,
    certs_wildcard: HashMap<Box<str>, Arc<CertifiedKey>>,
    default_cert: Option<Arc<CertifiedKey>>,
    /// Objects or fields that were skipped while building, each naming its object.
    pub problems: Vec<String>,
    /// How many rules were installed, for logs.
    pub routes: usize,
}

/// `host` without port or trailing dot, lowercased only if needed.
pub fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = match host.rfind(':') {
        // Keep bracketed IPv6 literals whole.
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

impl Table {
    /// The target for `host` (as sent, port allowed) and `path` (without query).
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<Target>> {
        let host = normalize_host(host);
        let by_host = self.exact.get(&*host).and_then(|h| h.find(path));
        by_host
            .or_else(|| {
                let (_, parent) = host.split_once('.')?;
                self.wildcard.get(parent)?.find(path)
            })
            .or_else(|| self.any_host.find(path))
            .or(self.default_backend.as_ref())
    }

    /// The certificate for an SNI name, exact before wildcard.
    pub fn cert(&self, sni: &str) -> Option<&Arc<CertifiedKey>> {
        let sni = normalize_host(sni);
        self.certs_exact.get(&*sni).or_else(|| {
            let (_, parent) = sni.split_once('.')?;
            self.certs_wildcard.get(parent)
        })
    }

    pub fn default_cert(&self) -> Option<&Arc<CertifiedKey>> {
        self.default_cert.as_ref()
    }
}

/// Which Ingresses are ours.
#[derive(Debug, Clone)]
pub struct ClassFilter {
    /// IngressClass name served even if no IngressClass object exists (default `weir`).
    pub class: String,
    /// `spec.controller` of the IngressClasses served (default `weir.io/ingress-controller`).
    pub controller: String,
}

impl Default for ClassFilter {
    fn default() -> Self {
        ClassFilter {
            class: "weir".into(),
            controller: "weir.io/ingress-controller".into(),
        }
    }
}

/// Builds tables, keeping state that must survive a rebuild: endpoint load and health, and
/// parsed certificates (keyed by Secret and resourceVersion, so only changed ones reparse).
#[derive(Debug, Default)]
pub struct Builder {
    pub filter: ClassFilter,
    /// `namespace/name` of the Secret served when no SNI matches.
    pub default_cert_secret: Option<String>,
    endpoints: HashMap<SocketAddr, Arc<Endpoint>>,
    certs: HashMap<String, (Option<String>, Arc<CertifiedKey>)>,
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

struct Ctx<'a> {
    services: HashMap<(&'a str, &'a str), &'a Service>,
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    secrets: HashMap<(&'a str, &'a str), &'a Secret>,
    backends: HashMap<(String, String, Balance), Arc<Backend>>,
    endpoints: HashMap<SocketAddr, Arc<Endpoint>>,
    problems: Vec<String>,
}

impl<'a> Ctx<'a> {
    /// Indexes of the snapshot's Services, EndpointSlices (by Service) and Secrets.
    fn new(snap: &'a Snapshot) -> Self {
        let mut ctx = Ctx {
            services: HashMap::new(),
            slices: HashMap::new(),
            secrets: HashMap::new(),
            backends: HashMap::new(),
            endpoints: HashMap::new(),
            problems: Vec::new(),
        };
        for s in &snap.services {
            if let (Some(ns), Some(name)) =
                (s.metadata.namespace.as_deref(), s.metadata.name.as_deref())
            {
                ctx.services.insert((ns, name), s);
            }
        }
        for s in &snap.slices {
            let svc = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            if let (Some(ns), Some(svc)) = (s.metadata.namespace.as_deref(), svc) {
                ctx.slices.entry((ns, svc.as_str())).or_default().push(s);
            }
        }
        for s in &snap.secrets {
            if let (Some(ns), Some(name)) =
                (s.metadata.namespace.as_deref(), s.metadata.name.as_deref())
            {
                ctx.secrets.insert((ns, name), s);
            }
        }
        ctx
    }
}

impl Builder {
    pub fn new(filter: ClassFilter, default_cert_secret: Option<String>) -> Self {
        Builder {
            filter,
            default_cert_secret,
            ..Default::default()
        }
    }

    /// Whether this controller serves `ing`, by class name, IngressClass controller, the
    /// default-class annotation, or the legacy `kubernetes.io/ingress.class` annotation.
    pub fn is_ours(&self, ing: &Ingress, classes: &[Arc<IngressClass>]) -> bool {
        let ours = |c: &IngressClass| {
            c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(&self.filter.controller)
        };
        let name = ing
            .spec
            .as_ref()
            .and_then(|s| s.ingress_class_name.as_deref());
        let name = name.or_else(|| {
            ing.annotations()
                .get(LEGACY_CLASS_ANNOTATION)
                .map(String::as_str)
        });
        match name {
            Some(name) => {
                name == self.filter.class || classes.iter().any(|c| c.name_any() == name && ours(c))
            }
            None => classes.iter().any(|c| {
                ours(c)
                    && c.annotations()
                        .get(DEFAULT_CLASS_ANNOTATION)
                        .map(String::as_str)
                        == Some("true")
            }),
        }
    }

    /// The table for `snap` when only EndpointSlices changed since `prev` was built from
    /// the same builder: each backend's endpoints are recomputed from its Service port,
    /// unchanged backends and the targets using them are kept as they are, and everything
    /// else (hosts, paths, certificates) is `prev`'s. Equal to [`Builder::build`] of `snap`.
    pub fn update_endpoints(&mut self, prev: &Table, snap: &Snapshot) -> Table {
        let mut ctx = Ctx::new(snap);
        let mut backends: HashMap<*const Backend, Arc<Backend>> = HashMap::new();
        let mut targets: HashMap<*const Target, Arc<Target>> = HashMap::new();
        let mut backend = |b: &Arc<Backend>, ctx: &mut Ctx<'_>| -> Arc<Backend> {
            if let Some(n) = backends.get(&Arc::as_ptr(b)) {
                return n.clone();
            }
            let next = match &b.origin {
                Some(o) => {
                    let (eps, h2) = self.endpoints_of(ctx, &o.namespace, &o.service, &o.port);
                    let same = h2 == b.h2
                        && eps.len() == b.endpoints.len()
                        && eps.iter().zip(&b.endpoints).all(|(a, b)| Arc::ptr_eq(a, b));
                    if same {
                        b.clone()
                    } else {
                        Arc::new(Backend::new(
                            b.name.clone(),
                            eps,
                            h2,
                            b.balance,
                            b.origin.clone(),
                        ))
                    }
                }
                None => b.clone(),
            };
            backends.insert(Arc::as_ptr(b), next.clone());
            next
        };
        let mut target = |t: &Arc<Target>, ctx: &mut Ctx<'_>| -> Arc<Target> {
            if let Some(n) = targets.get(&Arc::as_ptr(t)) {
                return n.clone();
            }
            let main = backend(&t.backend, ctx);
            let canary = t.canary.as_ref().map(|c| (c, backend(&c.backend, ctx)));
            let unchanged = Arc::ptr_eq(&main, &t.backend)
                && canary
                    .as_ref()
                    .is_none_or(|(c, b)| Arc::ptr_eq(&c.backend, b));
            let next = if unchanged {
                t.clone()
            } else {
                Arc::new(Target {
                    route: t.route.clone(),
                    backend: main,
                    canary: canary.map(|(c, backend)| Canary {
                        route: c.route.clone(),
                        backend,
                        weight: c.weight,
                        weight_total: c.weight_total,
                        header: c.header.clone(),
                        header_value: c.header_value.clone(),
                    }),
                    ssl_redirect: t.ssl_redirect,
                    read_timeout: t.read_timeout,
                })
            };
            targets.insert(Arc::as_ptr(t), next.clone());
            next
        };
        let mut table = prev.clone();
        for h in table
            .exact
            .values_mut()
            .chain(table.wildcard.values_mut())
            .chain(std::iter::once(&mut table.any_host))
        {
            for r in &mut h.routes {
                r.target = target(&r.target, &mut ctx);
            }
        }
        table.default_backend = table.default_backend.map(|t| target(&t, &mut ctx));
        // Slice problems are the only ones an EndpointSlice change can alter.
        table.problems.retain(|p| !p.starts_with(SLICE_PROBLEM));
        table.problems.extend(ctx.problems);
        self.endpoints = ctx.endpoints;
        table
    }

    /// Build the table for `snap`.
    pub fn build(&mut self, snap: &Snapshot) -> Table {
        let mut ctx = Ctx::new(snap);

        // Oldest first, so that on conflicting rules the oldest Ingress wins, as in ingress-nginx.
        let mut ingresses: Vec<&Ingress> = snap
            .ingresses
            .iter()
            .map(|i| &**i)
            .filter(|i| self.is_ours(i, &snap.classes))
            .collect();
        ingresses.sort_by(|a, b| {
            let created = |i: &Ingress| i.metadata.creation_timestamp.clone();
            created(a)
                .cmp(&created(b))
                .then(a.namespace().cmp(&b.namespace()))
                .then(a.name_any().cmp(&b.name_any()))
        });

        let mut table = Table::default();
        let mut certs_used = HashSet::new();
        let mut canaries = Vec::new();
        for ing in ingresses {
            let ns = ing.namespace().unwrap_or_else(|| "default".into());
            let name = ing.name_any();
            let mut anno_problems = Vec::new();
            let anno = Annotations::parse(ing.metadata.annotations.as_ref(), &mut anno_problems);
            ctx.problems.extend(
                anno_problems
                    .into_iter()
                    .map(|p| format!("ingress {ns}/{name}: {p}")),
            );
            let Some(spec) = &ing.spec else { continue };
            if anno.canary {
                canaries.push((ing, ns, name, anno));
                continue;
            }
            let tls_hosts: HashSet<&str> = spec
                .tls
                .iter()
                .flatten()
                .flat_map(|t| t.hosts.iter().flatten())
                .map(String::as_str)
                .collect();
            for t in spec.tls.iter().flatten() {
                self.install_certs(&mut table, &mut ctx, &mut certs_used, &ns, &name, t);
            }
            if let Some(b) = &spec.default_backend
                && table.default_backend.is_none()
            {
                let route: Arc<str> = format!("{ns}/{name}:default").into();
                if let Some(backend) = self.backend(&mut ctx, &ns, &name, b, anno.balance) {
                    table.default_backend = Some(Arc::new(Target {
                        route,
                        backend,
                        canary: None,
                        ssl_redirect: anno.force_ssl_redirect,
                        read_timeout: anno.read_timeout,
                    }));
                }
            }
            for rule in spec.rules.iter().flatten() {
                let host = rule.host.as_deref().unwrap_or("");
                let ssl_redirect = anno.force_ssl_redirect
                    || (tls_hosts.contains(host) && anno.ssl_redirect.unwrap_or(true));
                for p in rule.http.iter().flat_map(|h| &h.paths) {
                    let Some((path, kind)) = path_rule(p.path.as_deref(), &p.path_type) else {
                        ctx.problems.push(format!(
                            "ingress {ns}/{name}: host {host:?} path {:?} skipped: pathType {:?} needs a path starting with /",
                            p.path, p.path_type
                        ));
                        continue;
                    };
                    let Some(backend) =
                        self.backend(&mut ctx, &ns, &name, &p.backend, anno.balance)
                    else {
                        continue;
                    };
                    let target = Arc::new(Target {
                        route: format!("{ns}/{name}:{host}{}", p.path.as_deref().unwrap_or("/"))
                            .into(),
                        backend,
                        canary: None,
                        ssl_redirect,
                        read_timeout: anno.read_timeout,
                    });
                    let routes = host_routes(&mut table, host);
                    if routes
                        .routes
                        .iter()
                        .any(|r| r.path == path && r.kind == kind)
                    {
                        ctx.problems.push(format!(
                            "ingress {ns}/{name}: host {host:?} path {path:?} already defined by an older Ingress"
                        ));
                        continue;
                    }
                    routes.routes.push(Route { path, kind, target });
                    table.routes += 1;
                }
            }
        }
        for (ing, ns, name, anno) in canaries {
            self.attach_canary(&mut table, &mut ctx, ing, &ns, &name, &anno);
        }
        for h in table.exact.values_mut().chain(table.wildcard.values_mut()) {
            h.sort();
        }
        table.any_host.sort();

        if let Some(secret) = self.default_cert_secret.clone() {
            let (ns, name) = secret.split_once('/').unwrap_or(("default", &secret));
            match self.cert(&mut ctx, &mut certs_used, ns, name) {
                Ok(c) => table.default_cert = Some(c),
                Err(e) => ctx
                    .problems
                    .push(format!("default certificate secret {secret}: {e}")),
            }
        }
        self.certs.retain(|k, _| certs_used.contains(k));
        self.endpoints = ctx.endpoints;
        table.problems = ctx.problems;
        table
    }

    fn install_certs(
        &mut self,
        table: &mut Table,
        ctx: &mut Ctx<'_>,
        used: &mut HashSet<String>,
        ns: &str,
        name: &str,
        t: &k8s_openapi::api::networking::v1::IngressTLS,
    ) {
        let Some(secret) = t.secret_name.as_deref() else {
            return;
        };
        let cert = match self.cert(ctx, used, ns, secret) {
            Ok(c) => c,
            Err(e) => {
                ctx.problems.push(format!(
                    "ingress {ns}/{name}: tls secret {ns}/{secret}: {e}"
                ));
                return;
            }
        };
        for host in t.hosts.iter().flatten() {
            let host = host.to_ascii_lowercase();
            let map = match host.strip_prefix("*.") {
                Some(suffix) => table.certs_wildcard.entry(suffix.into()),
                None => table.certs_exact.entry(host.into()),
            };
            map.or_insert_with(|| cert.clone());
        }
    }

    fn cert(
        &mut self,
        ctx: &mut Ctx<'_>,
        used: &mut HashSet<String>,
        ns: &str,
        name: &str,
    ) -> Result<Arc<CertifiedKey>, String> {
        let secret = ctx
            .secrets
            .get(&(ns, name))
            .ok_or_else(|| "not found".to_string())?;
        let k = key(ns, name);
        let version = secret.metadata.resource_version.clone();
        if let Some((v, c)) = self.certs.get(&k)
            && *v == version
            && version.is_some()
        {
            used.insert(k);
            return Ok(c.clone());
        }
        let c = tls::certified_key(secret).map_err(|e| e.to_string())?;
        self.certs.insert(k.clone(), (version, c.clone()));
        used.insert(k);
        Ok(c)
    }

    fn attach_canary(
        &mut self,
        table: &mut Table,
        ctx: &mut Ctx<'_>,
        ing: &Ingress,
        ns: &str,
        name: &str,
        anno: &Annotations,
    ) {
        for rule in ing.spec.iter().flat_map(|s| s.rules.iter().flatten()) {
            let host = rule.host.as_deref().unwrap_or("");
            for p in rule.http.iter().flat_map(|h| &h.paths) {
                let Some((path, kind)) = path_rule(p.path.as_deref(), &p.path_type) else {
                    continue;
                };
                let Some(backend) = self.backend(ctx, ns, name, &p.backend, anno.balance) else {
                    continue;
                };
                let main = host_routes(table, host)
                    .routes
                    .iter_mut()
                    .find(|r| r.path == path && r.kind == kind);
                let Some(main) = main else {
                    ctx.problems.push(format!(
                        "canary ingress {ns}/{name}: no main Ingress has host {host:?} path {path:?}"
                    ));
                    continue;
                };
                let t = &main.target;
                main.target = Arc::new(Target {
                    route: t.route.clone(),
                    backend: t.backend.clone(),
                    ssl_redirect: t.ssl_redirect,
                    read_timeout: t.read_timeout,
                    canary: Some(Canary {
                        route: format!("{ns}/{name}:{host}{}", p.path.as_deref().unwrap_or("/"))
                            .into(),
                        backend,
                        weight: anno.canary_weight,
                        weight_total: anno.canary_weight_total,
                        header: anno.canary_header.clone(),
                        header_value: anno.canary_header_value.clone(),
                    }),
                });
            }
        }
    }

    /// The backend for an Ingress backend reference; `None` (with a problem) if it cannot
    /// be one. A Service without ready endpoints still yields a backend, which answers 503.
    fn backend(
        &mut self,
        ctx: &mut Ctx<'_>,
        ns: &str,
        ingress: &str,
        b: &IngressBackend,
        balance: Balance,
    ) -> Option<Arc<Backend>> {
        let Some(IngressServiceBackend { name: svc, port }) = &b.service else {
            ctx.problems.push(format!(
                "ingress {ns}/{ingress}: only service backends are supported"
            ));
            return None;
        };
        let port_key = match port.as_ref().map(|p| (&p.name, p.number)) {
            Some((Some(n), _)) => n.clone(),
            Some((None, Some(n))) => n.to_string(),
            _ => {
                ctx.problems.push(format!(
                    "ingress {ns}/{ingress}: backend service {svc} has no port name or number"
                ));
                return None;
            }
        };
        let k = (key(ns, svc), port_key.clone(), balance);
        if let Some(b) = ctx.backends.get(&k) {
            return Some(b.clone());
        }
        let label: Arc<str> = format!("{ns}/{svc}:{port_key}").into();
        let service_port = ctx.services.get(&(ns, svc.as_str())).and_then(|s| {
            s.spec
                .as_ref()?
                .ports
                .as_ref()?
                .iter()
                .find(|sp| match port.as_ref() {
                    Some(p) if p.name.is_some() => sp.name == p.name,
                    Some(p) => Some(sp.port) == p.number,
                    None => false,
                })
        });
        let (endpoints, h2, origin) = match service_port {
            Some(sp) => {
                let (eps, h2) = self.endpoints_of(ctx, ns, svc, sp);
                let origin = Origin {
                    namespace: ns.to_string(),
                    service: svc.clone(),
                    port: sp.clone(),
                };
                (eps, h2, Some(origin))
            }
            None => {
                ctx.problems.push(format!(
                    "ingress {ns}/{ingress}: service {ns}/{svc} has no port {port_key}"
                ));
                (Vec::new(), false, None)
            }
        };
        let backend = Arc::new(Backend::new(label, endpoints, h2, balance, origin));
        ctx.backends.insert(k, backend.clone());
        Some(backend)
    }

    fn endpoints_of(
        &mut self,
        ctx: &mut Ctx<'_>,
        ns: &str,
        svc: &str,
        sp: &ServicePort,
    ) -> (Vec<Arc<Endpoint>>, bool) {
        let mut h2 = is_h2(sp.app_protocol.as_deref());
        let mut out: Vec<Arc<Endpoint>> = Vec::new();
        for slice in ctx.slices.get(&(ns, svc)).into_iter().flatten() {
            if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
                continue;
            }
            // EndpointSlice ports are matched to the Service port by name ("" if unnamed).
            let Some(port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or(""))
            else {
                continue;
            };
            let Some(number) = port.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            h2 |= is_h2(port.app_protocol.as_deref());
            for ep in &slice.endpoints {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for a in &ep.addresses {
                    let Ok(ip) = a.parse::<IpAddr>() else {
                        ctx.problems.push(format!(
                            "{SLICE_PROBLEM}{ns}/{}: bad address {a:?}",
                            slice.name_any()
                        ));
                        continue;
                    };
                    let addr = SocketAddr::new(ip, number);
                    if out.iter().any(|e| e.addr == addr) {
                        continue;
                    }
                    let e = ctx
                        .endpoints
                        .entry(addr)
                        .or_insert_with(|| {
                            self.endpoints
                                .get(&addr)
                                .cloned()
                                .unwrap_or_else(|| Arc::new(Endpoint::new(addr)))
                        })
                        .clone();
                    out.push(e);
                }
            }
        }
        out.sort_by_key(|e| e.addr);
        (out, h2)
    }
}

fn is_h2(app_protocol: Option<&str>) -> bool {
    matches!(
        app_protocol,
        Some("kubernetes.io/h2c" | "h2c" | "grpc" | "http2")
    )
}

fn host_routes<'t>(table: &'t mut Table, host: &str) -> &'t mut HostRoutes {
    let host = host.to_ascii_lowercase();
    if host.is_empty() {
        &mut table.any_host
    } else if let Some(suffix) = host.strip_prefix("*.") {
        table.wildcard.entry(suffix.into()).or_default()
    } else {
        table.exact.entry(host.into()).or_default()
    }
}

/// The stored form of a path rule: Prefix paths lose their trailing slash so that `/foo/`
/// and `/foo` both match `/foo`, `/foo/` and `/foo/bar`.
fn path_rule(path: Option<&str>, path_type: &str) -> Option<(Box<str>, PathKind)> {
    let path = path.unwrap_or("/");
    if !path.starts_with('/') {
        return None;
    }
    match path_type {
        "Exact" => Some((path.into(), PathKind::Exact)),
        "Prefix" | "ImplementationSpecific" => {
            Some((path.trim_end_matches('/').into(), PathKind::Prefix))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
