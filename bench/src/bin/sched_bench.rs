//! Scheduler throughput: 10,000 pods onto 5,000 nodes, in-process, through the same code
//! the scheduler runs per pod — parsing the Pod object into its scheduling view
//! (`PodInfo::from_pod`), every filter, every score, and assuming the pod on the chosen node
//! in the snapshot (`Scheduler::schedule`). Not covered: the watch that delivers the pod and
//! the `pods/binding` request that follows, which cost an API round trip each.
//!
//! The workload turns on every filter and score: node selector, required node affinity,
//! taints with tolerations, cordoned and NotReady nodes, required pod affinity and
//! anti-affinity, preferred node and pod (anti-)affinity, and owner spreading.
//!
//! Run: `cargo run --release -p weir-bench --bin sched_bench` (writes the `scheduler`
//! section of docs/benchmarks.md).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use weir_scheduler::snapshot::NodeInfo;
use weir_scheduler::{Config, PodInfo, Scheduler};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Pods per owning ReplicaSet.
    #[arg(long, default_value_t = 100)]
    pods_per_owner: usize,
    /// Do not write docs/benchmarks.md.
    #[arg(long)]
    no_write: bool,
}

const ZONES: usize = 10;

fn node(i: usize) -> Result<NodeInfo> {
    let name = format!("node-{i:05}");
    let mut taints = vec![];
    if i % 10 == 3 {
        taints.push(json!({"key": "dedicated", "value": "infra", "effect": "NoSchedule"}));
    }
    let ready = if i % 100 == 7 { "False" } else { "True" };
    let n: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "topology.kubernetes.io/zone": format!("zone-{}", i % ZONES),
            "disk": if i.is_multiple_of(4) { "ssd" } else { "hdd" },
        }},
        "spec": {"taints": taints, "unschedulable": i % 100 == 11},
        "status": {
            "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": ready}]
        }
    }))?;
    Ok(NodeInfo::from_node(&n)?)
}

/// Pod `i` of owner `o`. Owner 0 is the "cache" group; owners ≡ 1 (mod 10) require
/// anti-affinity among their own pods per host; owners ≡ 2 (mod 10) require affinity to the
/// cache group per zone; the others prefer not to share a host with their siblings.
fn pod(i: usize, o: usize) -> Result<Pod> {
    let app = format!("app-{o}");
    let own = json!({"labelSelector": {"matchLabels": {"app": app}},
                     "topologyKey": "kubernetes.io/hostname"});
    let mut affinity = json!({
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "NotIn",
                                       "values": ["zone-9"]}]}]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [
                    {"key": "disk", "operator": "In", "values": ["ssd"]}]}}]
        },
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "podAffinityTerm": own}]}
    });
    if o % 10 == 1 {
        affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] =
            json!([own]);
    }
    if o % 10 == 2 {
        affinity["podAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "app-0"}},
             "topologyKey": "topology.kubernetes.io/zone"}]});
    }
    let tolerations = if i.is_multiple_of(2) {
        json!([{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}])
    } else {
        json!([])
    };
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": format!("pod-{i:05}"), "namespace": "default", "uid": format!("uid-{i}"),
            "labels": {"app": app},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": format!("rs-{o}"), "uid": format!("rs-uid-{o}"),
                                 "controller": true}]
        },
        "spec": {
            "containers": [{"name": "app", "image": "weir/echo",
                            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "affinity": affinity,
            "tolerations": tolerations
        }
    }))?)
}

/// CPU time this thread has used (utime + stime from /proc, in clock ticks of 10 ms), so
/// throughput can be stated per CPU-second too: the machine is shared and wall time
/// includes time the benchmark was not running.
fn thread_cpu() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")
        .context("reading /proc/thread-self/stat")?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .context("parsing /proc/thread-self/stat")
    };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

struct Run {
    label: &'static str,
    pods_per_sec: f64,
    pods_per_cpu_sec: f64,
    total: Duration,
    p50: Duration,
    p99: Duration,
    nodes_used: usize,
}

fn run(args: &Args, label: &'static str, config: Config) -> Result<Run> {
    let mut sched = Scheduler::new(config);
    for i in 0..args.nodes {
        sched.snapshot.upsert_node(node(i)?);
    }
    // Pods are built before the clock starts: in the scheduler they arrive decoded from the
    // watch. Owners' pods arrive interleaved, as ReplicaSets scaling together produce them.
    let owners = args.pods.div_ceil(args.pods_per_owner);
    let pods: Vec<Pod> = (0..args.pods)
        .map(|i| pod(i, i % owners))
        .collect::<Result<_>>()?;
    let mut latencies = Vec::with_capacity(pods.len());
    let cpu_start = thread_cpu()?;
    let start = Instant::now();
    for p in &pods {
        let t = Instant::now();
        let info = PodInfo::from_pod(p).context("pod info")?;
        let placed = sched.schedule(&info);
        latencies.push(t.elapsed());
        if let Err(e) = placed {
            bail!("{label}: pod {} did not fit: {e}", info.name);
        }
    }
    let total = start.elapsed();
    let cpu = thread_cpu()?.saturating_sub(cpu_start);
    let nodes_used = (0..sched.snapshot.slots())
        .filter(|&s| sched.snapshot.node(s).pod_count > 0)
        .count();
    Ok(Run {
        label,
        pods_per_sec: args.pods as f64 / total.as_secs_f64(),
        pods_per_cpu_sec: args.pods as f64 / cpu.as_secs_f64().max(0.01),
        total,
        p50: weir_bench::percentile(&mut latencies, 50.0).unwrap_or_default(),
        p99: weir_bench::percentile(&mut latencies, 99.0).unwrap_or_default(),
        nodes_used,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let load_before = load_average();
    let runs = [
        run(
            &args,
            "adaptive share of nodes (kube-scheduler default: 10% at 5,000 nodes)",
            Config::default(),
        )?,
        run(
            &args,
            "every node filtered and scored (percentageOfNodesToScore=100)",
            Config {
                percentage_of_nodes_to_score: 100,
            },
        )?,
    ];
    let mut md = format!(
        "## Scheduler\n\n\
         `cargo run --release -p weir-bench --bin sched_bench`: {} pods onto {} nodes, in \
         process, one core. Per pod: decoding into the scheduling view, every filter (node \
         selector, required node affinity, taints/tolerations, cordoned and NotReady nodes, \
         resource fit, required pod affinity and anti-affinity), every score (least allocated, \
         balanced allocation, preferred node affinity, preferred pod (anti-)affinity, owner \
         spreading) and assuming the pod in the snapshot. Not included: the watch and the \
         `pods/binding` API request. Anchor: kube-scheduler's scheduler_perf threshold for \
         SchedulingBasic 5000Nodes_10000Pods is 680 pods/s (a workload without affinity \
         rules); goal ≥ 5,000 pods/s.\n\n\
         Load average (1 min) on this shared 2-core machine: {} before, {} after; pods per \
         CPU-second counts only the time the benchmark thread ran. Nodes used: the preferred \
         node affinity for `disk=ssd` (weight 10, a quarter of the nodes) outweighs the \
         resource scores, so pods land on the ssd nodes.\n\n\
         | nodes considered per pod | pods/s (wall) | pods per CPU-second | total | p50 per pod | p99 per pod | nodes used |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        args.pods,
        args.nodes,
        load_before,
        load_average()
    );
    for r in &runs {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2} s | {:.1} µs | {:.1} µs | {} |\n",
            r.label,
            r.pods_per_sec,
            r.pods_per_cpu_sec,
            r.total.as_secs_f64(),
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.nodes_used
        ));
    }
    print!("{md}");
    if !args.no_write {
        weir_bench::write_section("scheduler", &md)?;
    }
    Ok(())
}
