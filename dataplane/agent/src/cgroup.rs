//! Pod cgroups. Every pod gets a cgroup v2 group under the agent's subtree, with one leaf per
//! container: membership there is how the agent finds and kills every process of a container
//! (`cgroup.kill`), whatever it forked. CPU and memory limits from `resources.limits` go to the
//! pod group through the v2 `cpu`/`memory` controllers when the v2 hierarchy has them; on a
//! hybrid host where those controllers are bound to cgroup v1 (as on this project's machines)
//! the limits go to a pod group in the v1 `cpu` and `memory` hierarchies instead. Mount points
//! come from `/proc/mounts`; nothing here hard-codes `/sys/fs/cgroup`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Container;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("no cgroup2 file system is mounted (looked in /proc/mounts)")]
    NoCgroup2,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{field}: invalid quantity {value:?}")]
    Quantity { field: String, value: String },
    #[error("cgroup {path} still has processes after kill")]
    Busy { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    std::fs::write(path, value).map_err(io(path))
}

/// CPU and memory limits of a pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
}

impl Limits {
    /// The pod's limits: the sum over its containers, as the kubelet sizes the pod cgroup. A
    /// resource is only limited when every app container limits it (one unlimited container
    /// makes the pod unlimited); init containers run alone, so the largest of them counts.
    pub fn of_pod(containers: &[Container], init: &[Container]) -> Result<Self, Error> {
        let mut sum = Limits {
            cpu_millis: Some(0),
            memory_bytes: Some(0),
        };
        for (i, c) in containers.iter().enumerate() {
            let own = Self::of_container(c, &format!("spec.containers[{i}]"))?;
            sum.cpu_millis = sum.cpu_millis.zip(own.cpu_millis).map(|(a, b)| a + b);
            sum.memory_bytes = sum.memory_bytes.zip(own.memory_bytes).map(|(a, b)| a + b);
        }
        for (i, c) in init.iter().enumerate() {
            let own = Self::of_container(c, &format!("spec.initContainers[{i}]"))?;
            sum.cpu_millis = sum.cpu_millis.zip(own.cpu_millis).map(|(a, b)| a.max(b));
            sum.memory_bytes = sum
                .memory_bytes
                .zip(own.memory_bytes)
                .map(|(a, b)| a.max(b));
        }
        if containers.is_empty() {
            return Ok(Limits::default());
        }
        Ok(sum)
    }

    fn of_container(c: &Container, field: &str) -> Result<Self, Error> {
        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        let get = |name: &str| limits.and_then(|l| l.get(name)).map(|q| q.0.as_str());
        let cpu = get("cpu")
            .map(|v| {
                parse_quantity(v, 1000).ok_or_else(|| Error::Quantity {
                    field: format!("{field}.resources.limits.cpu"),
                    value: v.to_string(),
                })
            })
            .transpose()?;
        let memory = get("memory")
            .map(|v| {
                parse_quantity(v, 1).ok_or_else(|| Error::Quantity {
                    field: format!("{field}.resources.limits.memory"),
                    value: v.to_string(),
                })
            })
            .transpose()?;
        Ok(Self {
            cpu_millis: cpu,
            memory_bytes: memory,
        })
    }
}

/// A Kubernetes quantity (`500m`, `1.5`, `128Mi`, `1G`) times `scale`, rounded up, as an
/// integer: `scale` 1000 gives millicores, 1 gives bytes.
pub fn parse_quantity(value: &str, scale: u64) -> Option<u64> {
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let (num, den): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1000, 1),
        "M" => (1000u128.pow(2), 1),
        "G" => (1000u128.pow(3), 1),
        "T" => (1000u128.pow(4), 1),
        "P" => (1000u128.pow(5), 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        _ => return None,
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let digits = format!("{int}{frac}");
    let mantissa: u128 = digits.parse().ok()?;
    let frac_den = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let numerator = mantissa.checked_mul(num)?.checked_mul(u128::from(scale))?;
    let denominator = den * frac_den;
    u64::try_from(numerator.div_ceil(denominator)).ok()
}

/// Where the cgroup file systems are, and the agent's own subtree in each.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// `<cgroup2 mount>/<subtree>`.
    v2: PathBuf,
    /// True when limits go to v2 controllers (they are available in the v2 hierarchy).
    v2_limits: bool,
    /// `<v1 cpu mount>/<subtree>` and `<v1 memory mount>/<subtree>` on hybrid hosts.
    v1_cpu: Option<PathBuf>,
    v1_memory: Option<PathBuf>,
}

impl Cgroups {
    /// Finds the mounts in `/proc/mounts` and creates the agent's subtree (e.g. `weir/node-1`).
    pub fn detect(subtree: &str) -> Result<Self, Error> {
        let mounts_path = Path::new("/proc/mounts");
        let mounts = std::fs::read_to_string(mounts_path).map_err(io(mounts_path))?;
        let mut v2_mount = None;
        let (mut v1_cpu, mut v1_memory) = (None, None);
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, mount, fstype, options, ..] = fields[..] else {
                continue;
            };
            let mount = PathBuf::from(mount);
            match fstype {
                "cgroup2" => v2_mount = v2_mount.or(Some(mount)),
                "cgroup" => {
                    let opts: Vec<&str> = options.split(',').collect();
                    if opts.contains(&"cpu") {
                        v1_cpu = v1_cpu.or(Some(mount.join(subtree)));
                    }
                    if opts.contains(&"memory") {
                        v1_memory = v1_memory.or(Some(mount.join(subtree)));
                    }
                }
                _ => {}
            }
        }
        let v2_mount = v2_mount.ok_or(Error::NoCgroup2)?;
        let controllers_path = v2_mount.join("cgroup.controllers");
        let controllers =
            std::fs::read_to_string(&controllers_path).map_err(io(&controllers_path))?;
        let v2_limits = ["cpu", "memory"]
            .iter()
            .all(|c| controllers.split_whitespace().any(|have| have == *c));
        let cgroups = Self {
            v2: v2_mount.join(subtree),
            v2_limits,
            v1_cpu: if v2_limits { None } else { v1_cpu },
            v1_memory: if v2_limits { None } else { v1_memory },
        };
        cgroups.create_subtree(&v2_mount, subtree)?;
        Ok(cgroups)
    }

    fn create_subtree(&self, v2_mount: &Path, subtree: &str) -> Result<(), Error> {
        let mut dir = v2_mount.to_path_buf();
        for part in Path::new(subtree).components() {
            if self.v2_limits {
                write(&dir.join("cgroup.subtree_control"), "+cpu +memory")?;
            }
            dir.push(part);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        if self.v2_limits {
            write(&dir.join("cgroup.subtree_control"), "+cpu +memory")?;
        }
        for v1 in [&self.v1_cpu, &self.v1_memory].into_iter().flatten() {
            std::fs::create_dir_all(v1).map_err(io(v1))?;
        }
        Ok(())
    }

    /// The v2 directory of the agent's subtree.
    pub fn root(&self) -> &Path {
        &self.v2
    }

    pub fn pod(&self, uid: &str) -> PodCgroup {
        let name = format!("pod{uid}");
        PodCgroup {
            v2: self.v2.join(&name),
            v2_limits: self.v2_limits,
            v1_cpu: self.v1_cpu.as_ref().map(|d| d.join(&name)),
            v1_memory: self.v1_memory.as_ref().map(|d| d.join(&name)),
        }
    }

    /// UIDs of the pods that have a group under the subtree (agent restart).
    pub fn pods(&self) -> Result<Vec<String>, Error> {
        let entries = std::fs::read_dir(&self.v2).map_err(io(&self.v2))?;
        let mut uids = Vec::new();
        for entry in entries.flatten() {
            if let Some(uid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("pod"))
            {
                uids.push(uid.to_string());
            }
        }
        Ok(uids)
    }

    /// Removes the agent's subtree once it is empty (tests, node teardown).
    pub fn remove_subtree(&self) -> Result<(), Error> {
        for dir in std::iter::once(&self.v2)
            .chain(self.v1_cpu.iter())
            .chain(self.v1_memory.iter())
        {
            rmdir(dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
impl Cgroups {
    /// The subtree's directories in every hierarchy, v2 first.
    pub(crate) fn dirs(&self) -> Vec<PathBuf> {
        std::iter::once(&self.v2)
            .chain(self.v1_cpu.iter())
            .chain(self.v1_memory.iter())
            .cloned()
            .collect()
    }
}

fn rmdir(dir: &Path) -> Result<(), Error> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The cgroups of one pod.
#[derive(Debug, Clone)]
pub struct PodCgroup {
    v2: PathBuf,
    v2_limits: bool,
    v1_cpu: Option<PathBuf>,
    v1_memory: Option<PathBuf>,
}

/// CFS period the CPU limit is expressed in (the kubelet's default).
const CFS_PERIOD_US: u64 = 100_000;

impl PodCgroup {
    /// Creates the pod's groups and writes its limits. Idempotent.
    pub fn create(&self, limits: Limits) -> Result<(), Error> {
        std::fs::create_dir_all(&self.v2).map_err(io(&self.v2))?;
        let quota = limits
            .cpu_millis
            .map(|m| (m * CFS_PERIOD_US / 1000).max(1000));
        if self.v2_limits {
            write(&self.v2.join("cgroup.subtree_control"), "+cpu +memory")?;
            let cpu = quota.map_or("max".to_string(), |q| q.to_string());
            write(&self.v2.join("cpu.max"), &format!("{cpu} {CFS_PERIOD_US}"))?;
            let mem = limits
                .memory_bytes
                .map_or("max".to_string(), |b| b.to_string());
            write(&self.v2.join("memory.max"), &mem)?;
        }
        if let Some(dir) = &self.v1_cpu {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
            let q = quota.map_or("-1".to_string(), |q| q.to_string());
            write(&dir.join("cpu.cfs_quota_us"), &q)?;
        }
        if let Some(dir) = &self.v1_memory {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let mem = limits
                .memory_bytes
                .map_or("-1".to_string(), |b| b.to_string());
            write(&dir.join("memory.limit_in_bytes"), &mem)?;
        }
        Ok(())
    }

    /// The v2 leaf of one container.
    pub fn container(&self, name: &str) -> PathBuf {
        self.v2.join(name)
    }

    /// Creates the container's leaf and returns the `cgroup.procs` files a new process of
    /// the container writes `0` into to join its groups (v2 leaf, v1 pod groups).
    pub fn prepare_container(&self, name: &str) -> Result<Vec<PathBuf>, Error> {
        let leaf = self.container(name);
        std::fs::create_dir_all(&leaf).map_err(io(&leaf))?;
        let mut procs = vec![leaf.join("cgroup.procs")];
        procs.extend(
            [&self.v1_cpu, &self.v1_memory]
                .into_iter()
                .flatten()
                .map(|d| d.join("cgroup.procs")),
        );
        Ok(procs)
    }

    /// True while any process of the container is alive.
    pub fn populated(&self, name: &str) -> bool {
        std::fs::read_to_string(self.container(name).join("cgroup.events"))
            .map(|events| events.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// SIGKILLs every process of the container and waits until they are gone. The wait is
    /// generous: a killed process leaves the group only when its exit completes, which on
    /// a loaded node (or one blocked on slow I/O) takes well over a second.
    pub async fn kill_container(&self, name: &str) -> Result<(), Error> {
        let leaf = self.container(name);
        if !leaf.exists() {
            return Ok(());
        }
        write(&leaf.join("cgroup.kill"), "1")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.populated(name) {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Busy { path: leaf });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Kills whatever is left in the pod and removes its groups.
    pub async fn remove(&self) -> Result<(), Error> {
        if let Ok(entries) = std::fs::read_dir(&self.v2) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    self.kill_container(&name).await?;
                    rmdir(&entry.path())?;
                }
            }
        }
        rmdir(&self.v2)?;
        for dir in [&self.v1_cpu, &self.v1_memory].into_iter().flatten() {
            rmdir(dir)?;
        }
        Ok(())
    }

    /// The limits as the kernel holds them: (CPU quota µs per period, memory bytes); `None`
    /// means unlimited. For tests and `weir` diagnostics.
    pub fn effective_limits(&self) -> Result<(Option<u64>, Option<u64>), Error> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p)
                .map_err(io(&p))
                .map(|s| s.trim().to_string())
        };
        if self.v2_limits {
            let cpu = read(self.v2.join("cpu.max"))?;
            let mem = read(self.v2.join("memory.max"))?;
            let quota = cpu.split_whitespace().next().and_then(|q| q.parse().ok());
            return Ok((quota, mem.parse().ok()));
        }
        let cpu = match &self.v1_cpu {
            Some(d) => read(d.join("cpu.cfs_quota_us"))?.parse::<i64>().ok(),
            None => None,
        };
        let mem = match &self.v1_memory {
            Some(d) => read(d.join("memory.limit_in_bytes"))?.parse::<u64>().ok(),
            None => None,
        };
        // v1 spells "unlimited" as -1 (CPU) and as a huge page-rounded number (memory).
        Ok((
            cpu.and_then(|c| u64::try_from(c).ok()),
            mem.filter(|m| *m < (1 << 62)),
        ))
    }
}

#[cfg(test)]
mod tests;
