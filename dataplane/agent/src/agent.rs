//! The set of pod workers of this node: one per pod bound here, started on first sight,
//! fed every later version of the pod, and reconciled against a full list after a (re)start
//! so that pods deleted while the agent was away are torn down too.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pod::{PodMeta, Runtime, Update, Worker};

pub struct Agent {
    rt: Arc<Runtime>,
    workers: HashMap<String, Worker>,
    updates: mpsc::UnboundedSender<Update>,
    stop: CancellationToken,
}

impl Agent {
    /// `stop` ends every worker without touching its processes (agent shutdown).
    pub fn new(
        rt: Arc<Runtime>,
        stop: CancellationToken,
    ) -> (Self, mpsc::UnboundedReceiver<Update>) {
        let (updates, rx) = mpsc::unbounded_channel();
        let agent = Self {
            rt,
            workers: HashMap::new(),
            updates,
            stop,
        };
        (agent, rx)
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    /// A pod bound to this node, as the API has it now.
    pub fn sync(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        self.workers.retain(|_, w| !w.finished());
        match self.workers.get(&uid) {
            Some(worker) => worker.update(pod),
            None => {
                let worker = Worker::start(
                    self.rt.clone(),
                    pod,
                    self.updates.clone(),
                    self.stop.child_token(),
                );
                self.workers.insert(uid, worker);
            }
        }
    }

    /// The pod is gone from the API: stop its containers and release its resources.
    pub fn delete(&mut self, uid: &str) {
        if let Some(worker) = self.workers.get(uid) {
            worker.delete();
        }
    }

    /// After a full list: `pods` is every pod bound to this node. Workers of other pods are
    /// stopped, and sandboxes left on disk by pods that no longer exist are removed.
    pub async fn resync(&mut self, pods: Vec<Pod>) {
        let known: std::collections::HashSet<String> =
            pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        for (uid, worker) in &self.workers {
            if !known.contains(uid) {
                worker.delete();
            }
        }
        for pod in pods {
            self.sync(pod);
        }
        let dir = self.rt.state_dir.join("pods");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&uid) && !self.workers.contains_key(&uid) {
                self.remove_orphan(&uid, &entry.path()).await;
            }
        }
    }

    async fn remove_orphan(&self, uid: &str, dir: &Path) {
        let who =
            PodMeta::load(dir).map_or(uid.to_string(), |m| format!("{}/{}", m.namespace, m.name));
        tracing::info!(pod = %who, "removing the sandbox of a pod that no longer exists");
        if let Err(e) = self.rt.cgroups.pod(uid).remove().await {
            tracing::error!(pod = %who, error = %e, "cannot remove pod cgroup");
        }
        if let Err(e) = self.rt.network.teardown_pod(uid).await {
            tracing::error!(pod = %who, error = %e, "cannot remove pod network");
        }
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::error!(pod = %who, error = %e, "cannot remove pod state");
        }
    }
}
