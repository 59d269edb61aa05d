//! The scheduling cycle for one pod: pre-compute the inter-pod state, run every filter over
//! the nodes (starting where the last cycle stopped, and stopping once enough feasible nodes
//! are found, as kube-scheduler's percentageOfNodesToScore does), score the feasible ones and
//! pick the best. The same code runs in the scheduler and in the benchmark.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::plugins::{self, Reason};
use crate::podinfo::PodInfo;
use crate::snapshot::{NodeInfo, Snapshot};

/// Plugin weights, kube-scheduler's defaults.
const W_LEAST_ALLOCATED: i64 = 1;
const W_BALANCED: i64 = 1;
const W_NODE_AFFINITY: i64 = 2;
const W_POD_AFFINITY: i64 = 2;
const W_SPREAD: i64 = 2;

/// Below this many nodes every node is considered (kube-scheduler's minFeasibleNodesToFind).
const MIN_FEASIBLE_NODES_TO_FIND: usize = 100;

#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Share of nodes to find feasible before scoring; 0 means kube-scheduler's adaptive
    /// default (50% minus 1% per 125 nodes, at least 5%), 100 means every node.
    pub percentage_of_nodes_to_score: u32,
}

/// A pod fits nowhere. Displays as kube-scheduler's
/// "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match ...".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FitError {
    pub nodes: usize,
    pub reasons: HashMap<Reason, usize>,
}

impl fmt::Display for FitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes == 0 {
            return f.write_str("no nodes available to schedule pods");
        }
        let mut parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        parts.sort();
        write!(
            f,
            "0/{} nodes are available: {}.",
            self.nodes,
            parts.join(", ")
        )
    }
}

impl std::error::Error for FitError {}

/// Topology domains (values of one topology key) that an inter-pod term is satisfied in.
struct Domains<'a> {
    key: &'a str,
    values: HashSet<&'a str>,
}

impl Domains<'_> {
    fn contains(&self, node: &NodeInfo) -> bool {
        node.topology_value(self.key)
            .is_some_and(|v| self.values.contains(v))
    }
}

/// Topology values grouped by topology key, for one lookup per key and node.
type ByKey<'a, V> = Vec<(&'a str, HashMap<&'a str, V>)>;

fn add_by_key<'a, 'm, V: Default>(
    map: &'m mut ByKey<'a, V>,
    key: &'a str,
    value: &'a str,
) -> &'m mut V {
    let i = match map.iter().position(|(k, _)| *k == key) {
        Some(i) => i,
        None => {
            map.push((key, HashMap::new()));
            map.len() - 1
        }
    };
    map[i].1.entry(value).or_default()
}

/// What the inter-pod filters and scores need, computed once per pod.
struct PreState<'a> {
    affinity: Vec<Domains<'a>>,
    /// No pod anywhere matches the pod's affinity terms, and the pod matches them itself:
    /// the first pod of a group may go anywhere.
    affinity_self_ok: bool,
    anti_affinity: Vec<Domains<'a>>,
    /// Topology domains where an existing pod's anti-affinity forbids this pod.
    existing_anti: ByKey<'a, ()>,
    /// Preferred (anti-)affinity weight per topology domain.
    preferred: ByKey<'a, i64>,
    owner_counts: Option<&'a HashMap<usize, u32>>,
}

impl<'a> PreState<'a> {
    fn compute(pod: &'a PodInfo, snap: &'a Snapshot) -> Self {
        let domains = |term: &'a crate::podinfo::AffinityTerm| Domains {
            key: &term.topology_key,
            values: snap
                .matching_pod_nodes(term)
                .into_iter()
                .filter_map(|slot| snap.node(slot).topology_value(&term.topology_key))
                .collect(),
        };
        let affinity: Vec<Domains<'a>> = pod.affinity.iter().map(domains).collect();
        let affinity_self_ok = affinity.iter().all(|d| d.values.is_empty())
            && pod
                .affinity
                .iter()
                .all(|t| t.matches(&pod.namespace, &pod.labels));
        let mut existing_anti = Vec::new();
        for (slot, key) in snap.existing_anti_affinity(pod) {
            if let Some(v) = snap.node(slot).topology_value(key) {
                add_by_key(&mut existing_anti, key, v);
            }
        }
        let mut preferred = Vec::new();
        let weighted = pod
            .preferred_affinity
            .iter()
            .map(|(w, t)| (*w, t))
            .chain(pod.preferred_anti_affinity.iter().map(|(w, t)| (-*w, t)));
        for (w, term) in weighted {
            for slot in snap.matching_pod_nodes(term) {
                if let Some(v) = snap.node(slot).topology_value(&term.topology_key) {
                    *add_by_key(&mut preferred, &term.topology_key, v) += w;
                }
            }
        }
        PreState {
            anti_affinity: pod.anti_affinity.iter().map(domains).collect(),
            affinity,
            affinity_self_ok,
            existing_anti,
            preferred,
            owner_counts: pod.owner.as_deref().and_then(|o| snap.owner_counts(o)),
        }
    }

    fn inter_pod_filter(&self, node: &NodeInfo) -> Result<(), Reason> {
        if !self.affinity_self_ok && !self.affinity.iter().all(|d| d.contains(node)) {
            return Err(Reason::PodAffinity);
        }
        if self.anti_affinity.iter().any(|d| d.contains(node)) {
            return Err(Reason::PodAntiAffinity);
        }
        if self.existing_anti.iter().any(|(k, values)| {
            node.topology_value(k)
                .is_some_and(|v| values.contains_key(v))
        }) {
            return Err(Reason::ExistingAntiAffinity);
        }
        Ok(())
    }

    fn inter_pod_score(&self, node: &NodeInfo) -> i64 {
        self.preferred
            .iter()
            .filter_map(|(k, weights)| weights.get(node.topology_value(k)?))
            .sum()
    }
}

/// Runs every filter, in kube-scheduler's order, stopping at the first failing one.
fn filter(pod: &PodInfo, node: &NodeInfo, pre: &PreState<'_>) -> Result<(), Vec<Reason>> {
    plugins::node_unschedulable(pod, node)
        .and_then(|()| plugins::node_name(pod, node))
        .and_then(|()| plugins::taint_toleration(pod, node))
        .and_then(|()| plugins::node_affinity(pod, node))
        .map_err(|r| vec![r])?;
    plugins::resource_fit(pod, node)?;
    pre.inter_pod_filter(node).map_err(|r| vec![r])
}

/// The scheduling core: a snapshot plus the round-robin position.
#[derive(Debug)]
pub struct Scheduler {
    pub snapshot: Snapshot,
    config: Config,
    next_start: usize,
    /// xorshift state for picking among equally scored nodes.
    rng: u64,
}

impl Scheduler {
    pub fn new(config: Config) -> Self {
        Scheduler {
            snapshot: Snapshot::new(),
            config,
            next_start: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn feasible_nodes_to_find(&self, nodes: usize) -> usize {
        let pct = self.config.percentage_of_nodes_to_score as usize;
        if nodes < MIN_FEASIBLE_NODES_TO_FIND || pct >= 100 {
            return nodes;
        }
        let pct = if pct == 0 {
            50usize.saturating_sub(nodes / 125).max(5)
        } else {
            pct
        };
        (nodes * pct / 100).max(MIN_FEASIBLE_NODES_TO_FIND)
    }

    /// Choose a node for `pod` without changing the snapshot.
    pub fn select(&mut self, pod: &PodInfo) -> Result<String, FitError> {
        let snap = &self.snapshot;
        let nodes = snap.node_count();
        let slots = snap.slots();
        let to_find = self.feasible_nodes_to_find(nodes);
        let pre = PreState::compute(pod, snap);
        let mut feasible: Vec<usize> = Vec::with_capacity(to_find.min(nodes));
        let mut reasons: HashMap<Reason, usize> = HashMap::new();
        let mut visited = 0;
        for i in 0..slots {
            let slot = (self.next_start + i) % slots;
            visited = i + 1;
            if !snap.is_present(slot) {
                continue;
            }
            match filter(pod, snap.node(slot), &pre) {
                Ok(()) => {
                    feasible.push(slot);
                    if feasible.len() >= to_find {
                        break;
                    }
                }
                Err(rs) => {
                    for r in rs {
                        *reasons.entry(r).or_default() += 1;
                    }
                }
            }
        }
        if slots > 0 {
            self.next_start = (self.next_start + visited) % slots;
        }
        if feasible.is_empty() {
            return Err(FitError { nodes, reasons });
        }
        let best = score(pod, snap, &pre, &feasible, &mut self.rng);
        Ok(snap.node(best).name.clone())
    }

    /// Choose a node and account the pod on it at once (assume), so the next pod sees it
    /// even before the binding is confirmed. Undo with `snapshot.remove_pod` if binding fails.
    pub fn schedule(&mut self, pod: &PodInfo) -> Result<String, FitError> {
        let node = self.select(pod)?;
        self.snapshot.add_pod(pod, &node);
        Ok(node)
    }
}

/// The feasible node with the highest weighted score; ties are broken at random (reservoir
/// sampling, as kube-scheduler does), so equal nodes fill evenly.
fn score(
    pod: &PodInfo,
    snap: &Snapshot,
    pre: &PreState<'_>,
    feasible: &[usize],
    rng: &mut u64,
) -> usize {
    let n = feasible.len();
    let mut node_aff = Vec::with_capacity(n);
    let mut pod_aff = Vec::with_capacity(n);
    let mut spread = Vec::with_capacity(n);
    let mut base = Vec::with_capacity(n);
    for &slot in feasible {
        let node = snap.node(slot);
        base.push(
            W_LEAST_ALLOCATED * plugins::least_allocated(pod, node)
                + W_BALANCED * plugins::balanced_allocation(pod, node),
        );
        node_aff.push(if pod.preferred_node_terms.is_empty() {
            0
        } else {
            plugins::preferred_node_affinity(pod, node)
        });
        pod_aff.push(if pre.preferred.is_empty() {
            0
        } else {
            pre.inter_pod_score(node)
        });
        spread.push(
            pre.owner_counts
                .and_then(|c| c.get(&slot))
                .copied()
                .map_or(0, i64::from),
        );
    }
    let max_aff = node_aff.iter().copied().max().unwrap_or(0);
    let (min_pa, max_pa) = (
        pod_aff.iter().copied().min().unwrap_or(0),
        pod_aff.iter().copied().max().unwrap_or(0),
    );
    let max_spread = spread.iter().copied().max().unwrap_or(0);
    let mut best = (i64::MIN, feasible[0]);
    let mut ties = 0u64;
    for i in 0..n {
        let na = if max_aff > 0 {
            node_aff[i] * 100 / max_aff
        } else {
            0
        };
        let pa = if max_pa > min_pa {
            (pod_aff[i] - min_pa) * 100 / (max_pa - min_pa)
        } else {
            0
        };
        let sp = if max_spread > 0 {
            (max_spread - spread[i]) * 100 / max_spread
        } else {
            100
        };
        let total = base[i] + W_NODE_AFFINITY * na + W_POD_AFFINITY * pa + W_SPREAD * sp;
        if total > best.0 {
            best = (total, feasible[i]);
            ties = 1;
        } else if total == best.0 {
            ties += 1;
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            if rng.is_multiple_of(ties) {
                best.1 = feasible[i];
            }
        }
    }
    best.1
}

#[cfg(test)]
mod tests;
