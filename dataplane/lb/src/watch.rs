//! The thin I/O layer: kube-rs reflectors keep the snapshot of Services and EndpointSlices.
//! A change to a Service or to one of its slices re-derives that Service's frontends only and
//! hands them to [`Syncer::sync_scoped`]; the initial list, a re-list and a periodic safety net
//! re-derive everything and write whatever differs. After each sync, connected UDP sockets
//! left aimed at backends that went away are destroyed ([`stale`]), and the health check
//! listeners of `externalTrafficPolicy: Local` Services follow the same snapshot
//! ([`crate::health`]).

pub mod stale;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio_util::sync::CancellationToken;

use crate::health::{HealthServer, health_checks};
use crate::metrics::LbMetrics;
use crate::model::{Desired, Frontend, ModelConfig, desired};
use crate::plan::service_keys;
use crate::{Error, Syncer};
use stale::{StaleUdp, UdpPairs};

const METRICS_EVERY: Duration = Duration::from_secs(5);
/// Every this many metric ticks, re-derive everything (catches e.g. a slice relabelled away).
const FULL_RESYNC_TICKS: u32 = 12;
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What a watch event touched.
enum Touch {
    /// A (re-)list: re-derive everything.
    All,
    Service(String, String),
}

fn touch_of<K: kube::Resource>(
    ev: &watcher::Event<K>,
    key: impl Fn(&K) -> Option<(String, String)>,
) -> Option<Touch> {
    match ev {
        watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
            key(o).map(|(ns, n)| Touch::Service(ns, n))
        }
        watcher::Event::InitDone => Some(Touch::All),
        watcher::Event::Init | watcher::Event::InitApply(_) => None,
    }
}

/// Follows the API server until `shutdown`, without the stale-UDP sweep and health checks.
pub async fn run(
    client: kube::Client,
    syncer: Syncer,
    cfg: ModelConfig,
    metrics: LbMetrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_with(client, syncer, cfg, metrics, None, None, shutdown).await
}

/// Follows the API server until `shutdown`; with `stale`, each sync that takes a backend out
/// of a UDP Service also destroys the connected sockets still aimed at it; with `health`, the
/// health check listeners follow the Services after each sync.
pub async fn run_with(
    client: kube::Client,
    mut syncer: Syncer,
    cfg: ModelConfig,
    metrics: LbMetrics,
    stale: Option<StaleUdp>,
    health: Option<HealthServer>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (svc_store, svc_writer) = reflector::store::<Service>();
    let (eps_store, eps_writer) = reflector::store::<EndpointSlice>();
    let ns_name = |m: &kube::api::ObjectMeta, name: Option<&String>| {
        Some((
            m.namespace.clone().unwrap_or_else(|| "default".into()),
            name?.clone(),
        ))
    };
    let services = reflector(
        svc_writer,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(move |e| {
        e.map(|ev| {
            touch_of(&ev, |s: &Service| {
                ns_name(&s.metadata, s.metadata.name.as_ref())
            })
        })
    })
    .boxed();
    let slices = reflector(
        eps_writer,
        watcher(
            Api::<EndpointSlice>::all(client),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(move |e| {
        e.map(|ev| {
            touch_of(&ev, |s: &EndpointSlice| {
                ns_name(
                    &s.metadata,
                    s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL)),
                )
            })
        })
    })
    .boxed();
    let mut events = futures::stream::select(services, slices);
    let mut ticker = tokio::time::interval(METRICS_EVERY);
    let mut state = WatchState {
        stale,
        health,
        ..WatchState::default()
    };
    let mut ticks = 0u32;
    loop {
        let mut full = false;
        let mut touched = HashSet::new();
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {
                metrics.update(&syncer, &state.names);
                ticks += 1;
                // A failed sync is retried here too, not only on the next change.
                full = state.failed || ticks.is_multiple_of(FULL_RESYNC_TICKS);
            }
            ev = events.next() => match ev {
                None => return Err(Error::Watch("watch streams ended".into())),
                Some(Err(e)) => tracing::warn!(error = %e, "watch error; retrying with backoff"),
                Some(Ok(t)) => collect(t, &mut full, &mut touched),
            },
        }
        // Take everything already queued, so a burst costs one sync.
        while let Some(Some(r)) = events.next().now_or_never() {
            if let Ok(t) = r {
                collect(t, &mut full, &mut touched);
            }
        }
        // Until both lists arrived, a partial snapshot would delete live Services from the maps.
        if !state.ready {
            if svc_store.wait_until_ready().now_or_never().is_none()
                || eps_store.wait_until_ready().now_or_never().is_none()
            {
                continue;
            }
            state.ready = true;
            full = true;
        }
        if full {
            state.full(&mut syncer, &svc_store, &eps_store, &cfg);
        } else if !touched.is_empty() {
            state.partial(&mut syncer, &svc_store, &eps_store, &cfg, touched);
        }
    }
}

fn collect(t: Option<Touch>, full: &mut bool, touched: &mut HashSet<(String, String)>) {
    match t {
        Some(Touch::All) => *full = true,
        Some(Touch::Service(ns, n)) => {
            touched.insert((ns, n));
        }
        None => {}
    }
}

#[derive(Default)]
struct WatchState {
    ready: bool,
    failed: bool,
    /// The frontends each Service (namespace, name) programmed last time.
    fronts: HashMap<(String, String), Vec<Frontend>>,
    /// Service id → Service port, for metrics labels.
    names: HashMap<u32, std::sync::Arc<crate::model::ServiceRef>>,
    stale: Option<StaleUdp>,
    health: Option<HealthServer>,
}

impl WatchState {
    fn full(
        &mut self,
        syncer: &mut Syncer,
        svcs: &Store<Service>,
        eps: &Store<EndpointSlice>,
        cfg: &ModelConfig,
    ) {
        let (services, slices) = (svcs.state(), eps.state());
        let (want, problems) = desired(&services, &slices, cfg);
        report(problems);
        let before = self.stale.as_ref().map(|_| UdpPairs::all(syncer.state()));
        let result = syncer.sync(&want);
        self.sweep(before, || UdpPairs::all(syncer.state()));
        if let Some(health) = &mut self.health {
            health.sync_all(health_checks(&services, &slices, cfg.node_name.as_deref()));
        }
        self.fronts.clear();
        self.names.clear();
        self.record(syncer, &want);
        self.done(result, want.len());
    }

    fn partial(
        &mut self,
        syncer: &mut Syncer,
        svcs: &Store<Service>,
        eps: &Store<EndpointSlice>,
        cfg: &ModelConfig,
        touched: HashSet<(String, String)>,
    ) {
        let services: Vec<_> = touched
            .iter()
            .filter_map(|(ns, n)| svcs.get(&ObjectRef::new(n).within(ns)))
            .collect();
        let slices = eps.state_filter(|s| {
            let ns = s
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|n| touched.contains(&(ns, n.clone())))
        });
        let (want, problems) = desired(&services, &slices, cfg);
        report(problems);
        let mut removable = Vec::new();
        for key in &touched {
            if let Some(old) = self.fronts.remove(key) {
                for key in old.iter().flat_map(service_keys) {
                    if let Some(v) = syncer.state().services.get(&key) {
                        self.names.remove(&v.id);
                    }
                }
                removable.extend(old);
            }
        }
        let scope = || removable.iter().chain(want.keys());
        let before = self
            .stale
            .as_ref()
            .map(|_| UdpPairs::of(syncer.state(), scope()));
        let result = syncer.sync_scoped(&want, &removable);
        self.sweep(before, || UdpPairs::of(syncer.state(), scope()));
        if let Some(health) = &mut self.health {
            let checks = health_checks(&services, &slices, cfg.node_name.as_deref());
            health.sync_some(&touched, checks);
        }
        self.record(syncer, &want);
        self.done(result, want.len());
    }

    /// Starts the stale-UDP sweep for the pairs in `before` that the sync took away; the
    /// sweep runs on its own thread, so the next change is not held up by it.
    fn sweep(&self, before: Option<UdpPairs>, after: impl FnOnce() -> UdpPairs) {
        if let (Some(stale), Some(before)) = (&self.stale, before) {
            let gone = before.gone(&after());
            if !gone.is_empty() {
                drop(stale.destroy(gone));
            }
        }
    }

    fn record(&mut self, syncer: &Syncer, want: &Desired) {
        for (fe, d) in want {
            let key = (d.service.namespace.clone(), d.service.name.clone());
            self.fronts.entry(key).or_default().push(*fe);
            // Both entries of a two-scope frontend count for its Service.
            for key in service_keys(fe) {
                if let Some(v) = syncer.state().services.get(&key) {
                    self.names.insert(v.id, d.service.clone());
                }
            }
        }
    }

    fn done(&mut self, result: Result<usize, Error>, frontends: usize) {
        // Maps short of room still serve everything else: only a failed write fails the
        // health checks (kube-proxy's failed sync does the same through its healthz).
        if let Some(health) = &self.health {
            health.set_proxy_healthy(!matches!(&result, Err(e) if !matches!(e, Error::Full(_))));
        }
        match result {
            Ok(n) => {
                self.failed = false;
                tracing::debug!(writes = n, frontends, "maps in step");
            }
            Err(e) => {
                self.failed = true;
                tracing::error!(error = %e, "map update failed; retrying");
            }
        }
    }
}

fn report(problems: Vec<crate::model::Problem>) {
    for p in problems {
        tracing::warn!(service = %p.service, reason = %p.reason, "Service field not usable");
    }
}
