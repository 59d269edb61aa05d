//! The resource registry: which kinds weir serves, under which group, version and URL name.
//! Everything that routes, stores or describes a resource starts from [`Resource`].

use k8s_openapi::Resource as K8sResource;
use k8s_openapi::api::{apps, coordination, core, discovery, networking};

/// One servable resource (a kind under a group/version).
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    /// API group; empty for the core (legacy) group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The URL path segment, e.g. `pods`.
    pub plural: &'static str,
    /// Lower-case kind, e.g. `pod`.
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Subresources served below `<plural>/<name>/`, e.g. `status`.
    pub subresources: &'static [&'static str],
    /// `kubectl get all` includes resources in the `all` category.
    pub categories: &'static [&'static str],
}

impl Resource {
    /// `v1` or `apps/v1`: the value of `apiVersion` in objects of this resource.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The kind of the list object, e.g. `PodList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The store key prefix of all objects of this resource:
    /// `/registry/<group>/<plural>/` (`core` for the empty group, as in etcd3 layouts that
    /// use one scheme for every group).
    pub fn key_prefix(&self) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{group}/{}/", self.plural)
    }

    /// The store key of one object. `namespace` is ignored for cluster-scoped resources.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{ns}/{name}", self.key_prefix()),
            _ => format!("{}{name}", self.key_prefix()),
        }
    }

    /// The key prefix of all objects in one namespace (or of all objects when `None`).
    pub fn namespace_prefix(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{ns}/", self.key_prefix()),
            _ => self.key_prefix(),
        }
    }

    pub fn has_subresource(&self, sub: &str) -> bool {
        self.subresources.contains(&sub)
    }
}

macro_rules! resource {
    ($ty:ty, $singular:expr, $namespaced:expr, $short:expr, $subs:expr, $cats:expr) => {
        Resource {
            group: <$ty as K8sResource>::GROUP,
            version: <$ty as K8sResource>::VERSION,
            kind: <$ty as K8sResource>::KIND,
            plural: <$ty as K8sResource>::URL_PATH_SEGMENT,
            singular: $singular,
            namespaced: $namespaced,
            short_names: $short,
            subresources: $subs,
            categories: $cats,
        }
    };
}

static RESOURCES: &[Resource] = &[
    resource!(
        core::v1::Namespace,
        "namespace",
        false,
        &["ns"],
        &["status", "finalize"],
        &[]
    ),
    resource!(core::v1::Node, "node", false, &["no"], &["status"], &[]),
    resource!(
        core::v1::Pod,
        "pod",
        true,
        &["po"],
        &["status", "binding", "log"],
        &["all"]
    ),
    resource!(
        core::v1::Service,
        "service",
        true,
        &["svc"],
        &["status"],
        &["all"]
    ),
    resource!(core::v1::Secret, "secret", true, &[], &[], &[]),
    resource!(core::v1::ConfigMap, "configmap", true, &["cm"], &[], &[]),
    resource!(core::v1::Event, "event", true, &["ev"], &[], &[]),
    resource!(
        apps::v1::Deployment,
        "deployment",
        true,
        &["deploy"],
        &["status", "scale"],
        &["all"]
    ),
    resource!(
        apps::v1::ReplicaSet,
        "replicaset",
        true,
        &["rs"],
        &["status", "scale"],
        &["all"]
    ),
    resource!(
        discovery::v1::EndpointSlice,
        "endpointslice",
        true,
        &[],
        &[],
        &[]
    ),
    resource!(
        networking::v1::Ingress,
        "ingress",
        true,
        &["ing"],
        &["status"],
        &[]
    ),
    resource!(
        networking::v1::IngressClass,
        "ingressclass",
        false,
        &[],
        &[],
        &[]
    ),
    resource!(coordination::v1::Lease, "lease", true, &[], &[], &[]),
];

/// Every resource weir serves.
pub fn all() -> &'static [Resource] {
    RESOURCES
}

/// The resource at `/api{s}/<group>/<version>/.../<plural>`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource whose objects carry `apiVersion: <api_version>` and `kind: <kind>`.
pub fn find_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.kind == kind)
}

/// The resource a user means by `name`: a plural, singular, short name or kind, any case,
/// optionally qualified by group (`deployments.apps`). Used by command-line clients.
pub fn find_by_name(name: &str) -> Option<&'static Resource> {
    let name = name.to_ascii_lowercase();
    let (name, group) = match name.split_once('.') {
        Some((n, g)) => (n.to_string(), Some(g.to_string())),
        None => (name, None),
    };
    RESOURCES.iter().find(|r| {
        group.as_deref().is_none_or(|g| r.group == g)
            && (r.plural == name
                || r.singular == name
                || r.kind.eq_ignore_ascii_case(&name)
                || r.short_names.contains(&name.as_str()))
    })
}

/// The distinct API groups (excluding the core group) with their versions, in order.
pub fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == r.group) {
            Some((_, versions)) if !versions.contains(&r.version) => versions.push(r.version),
            Some(_) => {}
            None => out.push((r.group, vec![r.version])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_by_path_kind_and_name() {
        let pods = find("", "v1", "pods").expect("pods");
        assert_eq!(pods.kind, "Pod");
        assert_eq!(pods.api_version(), "v1");
        assert_eq!(
            find_kind("apps/v1", "Deployment").map(|r| r.plural),
            Some("deployments")
        );
        assert_eq!(find_by_name("deploy").map(|r| r.kind), Some("Deployment"));
        assert_eq!(find_by_name("Services").map(|r| r.kind), Some("Service"));
        assert_eq!(find_by_name("svc").map(|r| r.kind), Some("Service"));
        assert_eq!(
            find_by_name("ingresses.networking.k8s.io").map(|r| r.kind),
            Some("Ingress")
        );
        assert!(find("apps", "v1", "pods").is_none());
    }

    #[test]
    fn keys_follow_the_registry_layout() {
        let pods = find("", "v1", "pods").expect("pods");
        assert_eq!(
            pods.key(Some("default"), "a"),
            "/registry/core/pods/default/a"
        );
        let nodes = find("", "v1", "nodes").expect("nodes");
        assert_eq!(nodes.key(Some("ignored"), "n1"), "/registry/core/nodes/n1");
        let slices = find_kind("discovery.k8s.io/v1", "EndpointSlice").expect("slices");
        assert_eq!(
            slices.namespace_prefix(Some("kube-system")),
            "/registry/discovery.k8s.io/endpointslices/kube-system/"
        );
    }

    #[test]
    fn groups_are_listed_once() {
        let groups = groups();
        assert!(groups.contains(&("apps", vec!["v1"])));
        assert_eq!(groups.iter().filter(|(g, _)| *g == "apps").count(), 1);
    }
}
