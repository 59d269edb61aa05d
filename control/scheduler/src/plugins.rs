//! Filters and scores: pure functions of a pod and one node. A filter says whether the pod
//! may run there and, if not, why (in kube-scheduler's words, which operators already grep
//! for); a score ranks the nodes that passed every filter.

use std::fmt;

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration};

use crate::podinfo::PodInfo;
use crate::snapshot::NodeInfo;

pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

/// Why a node was filtered out. The `Display` text is kube-scheduler's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Unschedulable,
    NodeName,
    UntoleratedTaint { key: String, value: String },
    NodeAffinity,
    Insufficient(&'static str),
    TooManyPods,
    PodAffinity,
    PodAntiAffinity,
    ExistingAntiAffinity,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Unschedulable => f.write_str("node(s) were unschedulable"),
            Reason::NodeName => f.write_str("node(s) didn't match the requested node name"),
            Reason::UntoleratedTaint { key, value } => {
                write!(f, "node(s) had untolerated taint {{{key}: {value}}}")
            }
            Reason::NodeAffinity => {
                f.write_str("node(s) didn't match Pod's node affinity/selector")
            }
            Reason::Insufficient(r) => write!(f, "Insufficient {r}"),
            Reason::TooManyPods => f.write_str("Too many pods"),
            Reason::PodAffinity => f.write_str("node(s) didn't match pod affinity rules"),
            Reason::PodAntiAffinity => f.write_str("node(s) didn't match pod anti-affinity rules"),
            Reason::ExistingAntiAffinity => {
                f.write_str("node(s) didn't satisfy existing pods anti-affinity rules")
            }
        }
    }
}

/// A cordoned node takes only pods that tolerate `node.kubernetes.io/unschedulable`.
pub fn node_unschedulable(pod: &PodInfo, node: &NodeInfo) -> Result<(), Reason> {
    let tolerated = || {
        pod.tolerations
            .iter()
            .any(|t| tolerates(t, TAINT_UNSCHEDULABLE, "", "NoSchedule"))
    };
    if node.unschedulable && !tolerated() {
        return Err(Reason::Unschedulable);
    }
    Ok(())
}

pub fn node_name(pod: &PodInfo, node: &NodeInfo) -> Result<(), Reason> {
    match &pod.node_name {
        Some(n) if *n != node.name => Err(Reason::NodeName),
        _ => Ok(()),
    }
}

/// NoSchedule and NoExecute taints must be tolerated. A node whose Ready condition is not
/// True carries an implicit `node.kubernetes.io/not-ready:NoSchedule`, as kubelet and the
/// node lifecycle controller put on it in Kubernetes.
pub fn taint_toleration(pod: &PodInfo, node: &NodeInfo) -> Result<(), Reason> {
    if !node.ready
        && !pod
            .tolerations
            .iter()
            .any(|t| tolerates(t, TAINT_NOT_READY, "", "NoSchedule"))
    {
        return Err(Reason::UntoleratedTaint {
            key: TAINT_NOT_READY.into(),
            value: String::new(),
        });
    }
    match node.taints.iter().find(|taint| {
        (taint.effect == "NoSchedule" || taint.effect == "NoExecute")
            && !pod.tolerations.iter().any(|t| tolerates_taint(t, taint))
    }) {
        Some(t) => Err(Reason::UntoleratedTaint {
            key: t.key.clone(),
            value: t.value.clone().unwrap_or_default(),
        }),
        None => Ok(()),
    }
}

pub fn tolerates_taint(t: &Toleration, taint: &Taint) -> bool {
    tolerates(
        t,
        &taint.key,
        taint.value.as_deref().unwrap_or(""),
        &taint.effect,
    )
}

fn tolerates(t: &Toleration, key: &str, value: &str, effect: &str) -> bool {
    let effect_ok = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == effect);
    let key_ok = match t.key.as_deref() {
        None | Some("") => t.operator.as_deref() == Some("Exists"),
        Some(k) => k == key,
    };
    let value_ok = match t.operator.as_deref() {
        Some("Exists") => true,
        _ => t.value.as_deref().unwrap_or("") == value,
    };
    effect_ok && key_ok && value_ok
}

/// `nodeSelector` and required node affinity (terms ORed, requirements ANDed).
pub fn node_affinity(pod: &PodInfo, node: &NodeInfo) -> Result<(), Reason> {
    let selector_ok = pod
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v));
    let affinity_ok = pod
        .required_node_terms
        .as_ref()
        .is_none_or(|terms| terms.iter().any(|t| term_matches(t, node)));
    if selector_ok && affinity_ok {
        Ok(())
    } else {
        Err(Reason::NodeAffinity)
    }
}

/// A node selector term; an empty term matches no node, as in Kubernetes.
pub fn term_matches(term: &NodeSelectorTerm, node: &NodeInfo) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, node.labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            let value = (r.key == "metadata.name").then_some(node.name.as_str());
            requirement_matches(r, value)
        })
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let int = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((value.and_then(int), values.first().and_then(|x| int(x))), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((value.and_then(int), values.first().and_then(|x| int(x))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

/// Requests against allocatable minus what is already bound; every shortfall is reported.
pub fn resource_fit(pod: &PodInfo, node: &NodeInfo) -> Result<(), Vec<Reason>> {
    let mut reasons = Vec::new();
    if node.pod_count + 1 > node.allocatable_pods {
        reasons.push(Reason::TooManyPods);
    }
    let free_cpu = node.allocatable.milli_cpu - node.requested.milli_cpu;
    if pod.requests.milli_cpu > 0 && pod.requests.milli_cpu > free_cpu {
        reasons.push(Reason::Insufficient("cpu"));
    }
    let free_mem = node.allocatable.memory - node.requested.memory;
    if pod.requests.memory > 0 && pod.requests.memory > free_mem {
        reasons.push(Reason::Insufficient("memory"));
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons)
    }
}

fn fractions(pod: &PodInfo, node: &NodeInfo) -> [(i64, i64); 2] {
    [
        (
            node.nonzero_requested.milli_cpu + pod.nonzero_requests.milli_cpu,
            node.allocatable.milli_cpu,
        ),
        (
            node.nonzero_requested.memory + pod.nonzero_requests.memory,
            node.allocatable.memory,
        ),
    ]
}

/// 0..=100: the share of CPU and memory left free after placing the pod, averaged.
pub fn least_allocated(pod: &PodInfo, node: &NodeInfo) -> i64 {
    let per = |(req, alloc): (i64, i64)| {
        if alloc <= 0 || req > alloc {
            0
        } else {
            (alloc - req) * 100 / alloc
        }
    };
    let [cpu, mem] = fractions(pod, node);
    (per(cpu) + per(mem)) / 2
}

/// 0..=100: how evenly CPU and memory would be used after placing the pod.
pub fn balanced_allocation(pod: &PodInfo, node: &NodeInfo) -> i64 {
    let frac = |(req, alloc): (i64, i64)| {
        if alloc <= 0 {
            1.0
        } else {
            (req as f64 / alloc as f64).min(1.0)
        }
    };
    let [cpu, mem] = fractions(pod, node);
    let std = (frac(cpu) - frac(mem)).abs() / 2.0;
    ((1.0 - std) * 100.0) as i64
}

/// Sum of the weights of the preferred node-affinity terms the node matches (normalised by
/// the caller).
pub fn preferred_node_affinity(pod: &PodInfo, node: &NodeInfo) -> i64 {
    pod.preferred_node_terms
        .iter()
        .filter(|t| term_matches(&t.preference, node))
        .map(|t| i64::from(t.weight))
        .sum()
}

#[cfg(test)]
mod tests;
