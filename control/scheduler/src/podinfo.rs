//! The scheduling view of a pod: its requests, node constraints, tolerations, inter-pod
//! terms and owner, parsed once from the API object so that filters and scores never touch
//! strings that need parsing in the per-node loop.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, NodeSelectorTerm, Pod, PodAffinityTerm, PodSpec, PreferredSchedulingTerm,
    Toleration, WeightedPodAffinityTerm,
};
use kube::core::{Selector, SelectorExt};
use thiserror::Error;

use crate::quantity::{self, QuantityError};

/// Requests the scheduler accounts for: CPU in millicores and memory in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
}

impl Resources {
    pub fn add(&mut self, other: Resources) {
        self.milli_cpu += other.milli_cpu;
        self.memory += other.memory;
    }

    pub fn sub(&mut self, other: Resources) {
        self.milli_cpu -= other.milli_cpu;
        self.memory -= other.memory;
    }
}

/// What kube-scheduler assumes a container without requests uses, for scoring only, so that
/// request-less pods still spread instead of piling onto one node.
const DEFAULT_MILLI_CPU: i64 = 100;
const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum PodInfoError {
    #[error("{field}: {source}")]
    Quantity {
        field: String,
        source: QuantityError,
    },
    #[error("{field}: {reason}")]
    Selector { field: String, reason: String },
    #[error("pod has no metadata.uid")]
    NoUid,
}

/// Which namespaces an inter-pod term looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    All,
    Only(Vec<String>),
}

impl Namespaces {
    pub fn contains(&self, ns: &str) -> bool {
        match self {
            Namespaces::All => true,
            Namespaces::Only(list) => list.iter().any(|n| n == ns),
        }
    }
}

/// A pod (anti-)affinity term, parsed.
#[derive(Clone, Debug)]
pub struct AffinityTerm {
    pub selector: Selector,
    /// The selector's `matchLabels`, kept to look candidates up in the label index.
    pub match_labels: Vec<(String, String)>,
    pub namespaces: Namespaces,
    pub topology_key: String,
}

impl AffinityTerm {
    /// Whether a pod in `namespace` with `labels` is matched by this term.
    pub fn matches(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespaces.contains(namespace) && self.selector.matches(labels)
    }
}

#[derive(Clone, Debug)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Requests used for fit.
    pub requests: Resources,
    /// Requests with kube-scheduler's defaults for containers that request nothing; used
    /// for scoring.
    pub nonzero_requests: Resources,
    pub node_name: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    /// `requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms`: ORed terms.
    pub required_node_terms: Option<Vec<NodeSelectorTerm>>,
    pub preferred_node_terms: Vec<PreferredSchedulingTerm>,
    pub tolerations: Vec<Toleration>,
    pub affinity: Vec<AffinityTerm>,
    pub anti_affinity: Vec<AffinityTerm>,
    pub preferred_affinity: Vec<(i64, AffinityTerm)>,
    pub preferred_anti_affinity: Vec<(i64, AffinityTerm)>,
    /// UID of the controlling owner (ReplicaSet, ...), for spreading.
    pub owner: Option<String>,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Result<Self, PodInfoError> {
        let meta = &pod.metadata;
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let default_spec = PodSpec::default();
        let spec = pod.spec.as_ref().unwrap_or(&default_spec);
        let (requests, nonzero_requests) = pod_requests(spec)?;
        let affinity = spec.affinity.as_ref();
        let node_aff = affinity.and_then(|a| a.node_affinity.as_ref());
        let pod_aff = affinity.and_then(|a| a.pod_affinity.as_ref());
        let anti = affinity.and_then(|a| a.pod_anti_affinity.as_ref());
        let terms = |list: Option<&Vec<PodAffinityTerm>>, field: &str| {
            list.into_iter()
                .flatten()
                .enumerate()
                .map(|(i, t)| parse_term(t, &namespace, &format!("{field}[{i}]")))
                .collect::<Result<Vec<_>, _>>()
        };
        let weighted = |list: Option<&Vec<WeightedPodAffinityTerm>>, field: &str| {
            list.into_iter()
                .flatten()
                .enumerate()
                .map(|(i, t)| {
                    let field = format!("{field}[{i}].podAffinityTerm");
                    Ok((
                        i64::from(t.weight),
                        parse_term(&t.pod_affinity_term, &namespace, &field)?,
                    ))
                })
                .collect::<Result<Vec<_>, PodInfoError>>()
        };
        const PA: &str = "spec.affinity.podAffinity";
        const PAA: &str = "spec.affinity.podAntiAffinity";
        const REQ: &str = "requiredDuringSchedulingIgnoredDuringExecution";
        const PREF: &str = "preferredDuringSchedulingIgnoredDuringExecution";
        Ok(PodInfo {
            uid: meta.uid.clone().ok_or(PodInfoError::NoUid)?,
            name: meta.name.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            requests,
            nonzero_requests,
            node_name: spec.node_name.clone().filter(|n| !n.is_empty()),
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            required_node_terms: node_aff
                .and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .map(|s| s.node_selector_terms.clone()),
            preferred_node_terms: node_aff
                .and_then(|a| {
                    a.preferred_during_scheduling_ignored_during_execution
                        .clone()
                })
                .unwrap_or_default(),
            tolerations: spec.tolerations.clone().unwrap_or_default(),
            affinity: terms(
                pod_aff.and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .as_ref()
                }),
                &format!("{PA}.{REQ}"),
            )?,
            anti_affinity: terms(
                anti.and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .as_ref()
                }),
                &format!("{PAA}.{REQ}"),
            )?,
            preferred_affinity: weighted(
                pod_aff.and_then(|a| {
                    a.preferred_during_scheduling_ignored_during_execution
                        .as_ref()
                }),
                &format!("{PA}.{PREF}"),
            )?,
            preferred_anti_affinity: weighted(
                anti.and_then(|a| {
                    a.preferred_during_scheduling_ignored_during_execution
                        .as_ref()
                }),
                &format!("{PAA}.{PREF}"),
            )?,
            owner: meta
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| o.uid.clone()),
            namespace,
        })
    }
}

fn parse_term(
    term: &PodAffinityTerm,
    pod_namespace: &str,
    field: &str,
) -> Result<AffinityTerm, PodInfoError> {
    // A term without a labelSelector matches no pods, as in Kubernetes.
    let label_selector = term.label_selector.clone().unwrap_or_else(|| {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_expressions: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                    key: "weir.dev/never-matches".into(),
                    operator: "In".into(),
                    values: Some(vec![]),
                },
            ]),
            match_labels: None,
        }
    });
    let match_labels = label_selector
        .match_labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let selector = Selector::try_from(label_selector).map_err(|e| PodInfoError::Selector {
        field: format!("{field}.labelSelector"),
        reason: e.0,
    })?;
    // namespaceSelector {} selects every namespace; a non-empty one needs namespace labels,
    // which the scheduler does not watch, so it falls back to the listed namespaces.
    let all = term.namespace_selector.as_ref().is_some_and(|s| {
        s.match_labels.as_ref().is_none_or(|m| m.is_empty())
            && s.match_expressions.as_ref().is_none_or(|m| m.is_empty())
    });
    let namespaces = match (all, term.namespaces.clone()) {
        (true, _) => Namespaces::All,
        (false, Some(list)) if !list.is_empty() => Namespaces::Only(list),
        _ => Namespaces::Only(vec![pod_namespace.to_string()]),
    };
    Ok(AffinityTerm {
        selector,
        match_labels,
        namespaces,
        topology_key: term.topology_key.clone(),
    })
}

/// (requests for fit, requests for scoring) of a pod spec: the larger of the sum over app
/// containers and the largest init container, plus overhead, as kube-scheduler computes them.
fn pod_requests(spec: &PodSpec) -> Result<(Resources, Resources), PodInfoError> {
    let mut sum = Resources::default();
    let mut sum_nz = Resources::default();
    for (i, c) in spec.containers.iter().enumerate() {
        let (r, nz) = container_requests(c, &format!("spec.containers[{i}]"))?;
        sum.add(r);
        sum_nz.add(nz);
    }
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let (r, nz) = container_requests(c, &format!("spec.initContainers[{i}]"))?;
        sum.milli_cpu = sum.milli_cpu.max(r.milli_cpu);
        sum.memory = sum.memory.max(r.memory);
        sum_nz.milli_cpu = sum_nz.milli_cpu.max(nz.milli_cpu);
        sum_nz.memory = sum_nz.memory.max(nz.memory);
    }
    if let Some(overhead) = &spec.overhead {
        let o = resource_map(overhead, "spec.overhead")?;
        sum.add(o);
        sum_nz.add(o);
    }
    Ok((sum, sum_nz))
}

fn container_requests(c: &Container, field: &str) -> Result<(Resources, Resources), PodInfoError> {
    let res = c.resources.as_ref();
    // Kubernetes defaults requests to limits when only limits are given.
    let (map, sub) = match res.and_then(|r| r.requests.as_ref()) {
        Some(req) => (Some(req), "resources.requests"),
        None => (res.and_then(|r| r.limits.as_ref()), "resources.limits"),
    };
    let r = match map {
        Some(m) => resource_map(m, &format!("{field}.{sub}"))?,
        None => Resources::default(),
    };
    let has = |k: &str| map.is_some_and(|m| m.contains_key(k));
    let nz = Resources {
        milli_cpu: if has("cpu") {
            r.milli_cpu
        } else {
            DEFAULT_MILLI_CPU
        },
        memory: if has("memory") {
            r.memory
        } else {
            DEFAULT_MEMORY
        },
    };
    Ok((r, nz))
}

fn resource_map(
    map: &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    field: &str,
) -> Result<Resources, PodInfoError> {
    let q = |key: &str, parse: fn(&str) -> Result<i64, QuantityError>| {
        map.get(key)
            .map(|v| parse(&v.0))
            .transpose()
            .map_err(|source| PodInfoError::Quantity {
                field: format!("{field}.{key}"),
                source,
            })
            .map(Option::unwrap_or_default)
    };
    Ok(Resources {
        milli_cpu: q("cpu", quantity::milli_cpu)?,
        memory: q("memory", quantity::value)?,
    })
}
