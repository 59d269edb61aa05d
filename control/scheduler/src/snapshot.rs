//! The scheduler's picture of the cluster: every node with what is already bound to it, and
//! indexes over bound pods (labels, owners, anti-affinity) that the inter-pod filters and the
//! spreading score query. Updated incrementally from watch events and by assuming a pod on
//! its chosen node before the binding is confirmed, so the next pod sees it at once.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Node, Taint};

use crate::podinfo::{AffinityTerm, PodInfo, Resources};
use crate::quantity::{self, QuantityError};

/// The hostname label kube-scheduler's inter-pod rules are usually keyed on.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The hostname label (or the name), kept apart: inter-pod rules look it up per node.
    hostname: String,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    /// The node's Ready condition is True.
    pub ready: bool,
    pub allocatable: Resources,
    pub allocatable_pods: i64,
    /// Sum of the requests of pods bound (or assumed) here.
    pub requested: Resources,
    /// Same with kube-scheduler's defaults for request-less containers; for scoring.
    pub nonzero_requested: Resources,
    pub pod_count: i64,
    /// False once the Node object is deleted; slots are kept so indexes stay stable.
    present: bool,
}

impl NodeInfo {
    /// The scheduling view of a Node object. `allocatable` falls back to `capacity`.
    pub fn from_node(node: &Node) -> Result<Self, QuantityError> {
        let status = node.status.clone().unwrap_or_default();
        let alloc = status.allocatable.or(status.capacity).unwrap_or_default();
        let get = |k: &str, f: fn(&str) -> Result<i64, QuantityError>| {
            alloc
                .get(k)
                .map(|q| f(&q.0))
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let spec = node.spec.clone().unwrap_or_default();
        let name = node.metadata.name.clone().unwrap_or_default();
        let labels = node.metadata.labels.clone().unwrap_or_default();
        Ok(NodeInfo {
            hostname: labels.get(HOSTNAME_LABEL).unwrap_or(&name).clone(),
            name,
            labels,
            taints: spec.taints.unwrap_or_default(),
            unschedulable: spec.unschedulable.unwrap_or(false),
            ready: status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            allocatable: Resources {
                milli_cpu: get("cpu", quantity::milli_cpu)?,
                memory: get("memory", quantity::value)?,
            },
            allocatable_pods: get("pods", quantity::value)?,
            requested: Resources::default(),
            nonzero_requested: Resources::default(),
            pod_count: 0,
            present: true,
        })
    }

    /// The node's value for a topology key; `kubernetes.io/hostname` falls back to the node
    /// name when the label is missing.
    pub fn topology_value<'a>(&'a self, key: &str) -> Option<&'a str> {
        if key == HOSTNAME_LABEL {
            return Some(&self.hostname);
        }
        self.labels.get(key).map(String::as_str)
    }
}

/// A pod bound (or assumed) to a node, as the indexes need it.
#[derive(Clone, Debug)]
struct BoundPod {
    node: usize,
    namespace: String,
    labels: BTreeMap<String, String>,
    requests: Resources,
    nonzero_requests: Resources,
    owner: Option<String>,
    anti_affinity: Vec<AffinityTerm>,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    nodes: Vec<NodeInfo>,
    node_index: HashMap<String, usize>,
    pods: HashMap<String, BoundPod>,
    /// (namespace, label key, label value) → pod UIDs.
    label_index: HashMap<(String, String, String), HashSet<String>>,
    namespace_index: HashMap<String, HashSet<String>>,
    /// owner UID → node slot → pods of that owner there.
    owner_counts: HashMap<String, HashMap<usize, u32>>,
    /// Pods with required anti-affinity, checked against every incoming pod (symmetry).
    anti_affinity_pods: HashSet<String>,
}

impl Snapshot {
    pub fn new() -> Self {
        Self::default()
    }

    /// All node slots, including deleted ones (check [`Snapshot::is_present`]).
    pub fn slots(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, slot: usize) -> &NodeInfo {
        &self.nodes[slot]
    }

    pub fn is_present(&self, slot: usize) -> bool {
        self.nodes[slot].present
    }

    /// Number of nodes that exist.
    pub fn node_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.present).count()
    }

    pub fn node_slot(&self, name: &str) -> Option<usize> {
        self.node_index
            .get(name)
            .copied()
            .filter(|&i| self.nodes[i].present)
    }

    /// Insert or replace a node, keeping the accounting of pods already bound to it.
    /// Returns whether anything a filter or score reads changed (a new node, labels,
    /// taints, schedulability, readiness, allocatable), so that a status heartbeat does not
    /// make pods that fit nowhere try again.
    pub fn upsert_node(&mut self, mut info: NodeInfo) -> bool {
        match self.node_index.get(&info.name) {
            Some(&slot) => {
                let old = &self.nodes[slot];
                let changed = !old.present
                    || old.labels != info.labels
                    || old.taints != info.taints
                    || old.unschedulable != info.unschedulable
                    || old.ready != info.ready
                    || old.allocatable != info.allocatable
                    || old.allocatable_pods != info.allocatable_pods;
                info.requested = old.requested;
                info.nonzero_requested = old.nonzero_requested;
                info.pod_count = old.pod_count;
                self.nodes[slot] = info;
                changed
            }
            None => {
                self.node_index.insert(info.name.clone(), self.nodes.len());
                self.nodes.push(info);
                true
            }
        }
    }

    /// Mark a node deleted. Its pods stay accounted in case it comes back (a node object
    /// re-created by its agent keeps its pods).
    pub fn remove_node(&mut self, name: &str) {
        if let Some(&slot) = self.node_index.get(name) {
            self.nodes[slot].present = false;
        }
    }

    /// Names of the nodes that exist.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.present)
            .map(|n| n.name.clone())
            .collect()
    }

    /// UIDs of every accounted pod.
    pub fn pod_uids(&self) -> impl Iterator<Item = String> + '_ {
        self.pods.keys().cloned()
    }

    pub fn has_pod(&self, uid: &str) -> bool {
        self.pods.contains_key(uid)
    }

    /// The node a pod is accounted on.
    pub fn pod_node(&self, uid: &str) -> Option<&str> {
        self.pods.get(uid).map(|p| self.nodes[p.node].name.as_str())
    }

    /// Account `pod` on `node_name` (bound, or assumed while its binding is in flight).
    /// A node not seen yet gets a placeholder slot so the accounting is never lost.
    pub fn add_pod(&mut self, pod: &PodInfo, node_name: &str) {
        if self.pods.contains_key(&pod.uid) {
            self.remove_pod(&pod.uid);
        }
        let slot = match self.node_index.get(node_name) {
            Some(&s) => s,
            None => {
                let placeholder = NodeInfo {
                    name: node_name.to_string(),
                    hostname: node_name.to_string(),
                    labels: BTreeMap::new(),
                    taints: Vec::new(),
                    unschedulable: true,
                    ready: false,
                    allocatable: Resources::default(),
                    allocatable_pods: 0,
                    requested: Resources::default(),
                    nonzero_requested: Resources::default(),
                    pod_count: 0,
                    present: false,
                };
                self.node_index
                    .insert(node_name.to_string(), self.nodes.len());
                self.nodes.push(placeholder);
                self.nodes.len() - 1
            }
        };
        let node = &mut self.nodes[slot];
        node.requested.add(pod.requests);
        node.nonzero_requested.add(pod.nonzero_requests);
        node.pod_count += 1;
        for (k, v) in &pod.labels {
            self.label_index
                .entry((pod.namespace.clone(), k.clone(), v.clone()))
                .or_default()
                .insert(pod.uid.clone());
        }
        self.namespace_index
            .entry(pod.namespace.clone())
            .or_default()
            .insert(pod.uid.clone());
        if let Some(owner) = &pod.owner {
            *self
                .owner_counts
                .entry(owner.clone())
                .or_default()
                .entry(slot)
                .or_default() += 1;
        }
        if !pod.anti_affinity.is_empty() {
            self.anti_affinity_pods.insert(pod.uid.clone());
        }
        self.pods.insert(
            pod.uid.clone(),
            BoundPod {
                node: slot,
                namespace: pod.namespace.clone(),
                labels: pod.labels.clone(),
                requests: pod.requests,
                nonzero_requests: pod.nonzero_requests,
                owner: pod.owner.clone(),
                anti_affinity: pod.anti_affinity.clone(),
            },
        );
    }

    /// Forget a pod (deleted, finished, or an assumed binding that failed).
    pub fn remove_pod(&mut self, uid: &str) {
        let Some(p) = self.pods.remove(uid) else {
            return;
        };
        let node = &mut self.nodes[p.node];
        node.requested.sub(p.requests);
        node.nonzero_requested.sub(p.nonzero_requests);
        node.pod_count -= 1;
        for (k, v) in &p.labels {
            let key = (p.namespace.clone(), k.clone(), v.clone());
            if let Some(set) = self.label_index.get_mut(&key) {
                set.remove(uid);
                if set.is_empty() {
                    self.label_index.remove(&key);
                }
            }
        }
        if let Some(set) = self.namespace_index.get_mut(&p.namespace) {
            set.remove(uid);
        }
        if let Some(owner) = &p.owner
            && let Some(counts) = self.owner_counts.get_mut(owner)
        {
            if let Some(c) = counts.get_mut(&p.node) {
                *c -= 1;
                if *c == 0 {
                    counts.remove(&p.node);
                }
            }
            if counts.is_empty() {
                self.owner_counts.remove(owner);
            }
        }
        self.anti_affinity_pods.remove(uid);
    }

    /// Pods of `owner` per node slot.
    pub fn owner_counts(&self, owner: &str) -> Option<&HashMap<usize, u32>> {
        self.owner_counts.get(owner)
    }

    /// Node slots of the bound pods that `term` matches.
    pub fn matching_pod_nodes(&self, term: &AffinityTerm) -> Vec<usize> {
        let check = |uid: &String| {
            self.pods
                .get(uid)
                .filter(|p| term.matches(&p.namespace, &p.labels))
                .map(|p| p.node)
        };
        // Narrow by the rarest equality label when the term has one.
        let namespaces: Vec<&String> = match &term.namespaces {
            crate::podinfo::Namespaces::All => self.namespace_index.keys().collect(),
            crate::podinfo::Namespaces::Only(list) => list.iter().collect(),
        };
        let mut out = Vec::new();
        for ns in namespaces {
            let candidates = term
                .match_labels
                .iter()
                .filter_map(|(k, v)| {
                    self.label_index
                        .get(&(ns.clone(), k.clone(), v.clone()))
                        .or(Some(&EMPTY))
                })
                .min_by_key(|s| s.len())
                .or_else(|| self.namespace_index.get(ns));
            out.extend(candidates.into_iter().flatten().filter_map(check));
        }
        out
    }

    /// Node slots where an existing pod's required anti-affinity forbids `pod`, with the
    /// topology key of the forbidding term.
    pub fn existing_anti_affinity(&self, pod: &PodInfo) -> Vec<(usize, &str)> {
        let mut out = Vec::new();
        for uid in &self.anti_affinity_pods {
            if let Some(p) = self.pods.get(uid) {
                for t in &p.anti_affinity {
                    if t.matches(&pod.namespace, &pod.labels) {
                        out.push((p.node, t.topology_key.as_str()));
                    }
                }
            }
        }
        out
    }
}

static EMPTY: std::sync::LazyLock<HashSet<String>> = std::sync::LazyLock::new(HashSet::new);
