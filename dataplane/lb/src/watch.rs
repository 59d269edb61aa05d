//! The thin I/O layer: kube-rs reflectors keep the snapshot of Services and EndpointSlices;
//! every change (batched with whatever else is already queued) recomputes the desired state and
//! hands it to the [`Syncer`], which writes only the difference.

use std::collections::HashMap;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio_util::sync::CancellationToken;

use crate::metrics::LbMetrics;
use crate::model::{ModelConfig, desired};
use crate::plan::service_key;
use crate::{Error, Syncer};

const METRICS_EVERY: Duration = Duration::from_secs(5);

pub async fn run(
    client: kube::Client,
    mut syncer: Syncer,
    cfg: ModelConfig,
    metrics: LbMetrics,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (svc_store, svc_writer) = reflector::store::<Service>();
    let (eps_store, eps_writer) = reflector::store::<EndpointSlice>();
    let services = reflector(
        svc_writer,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|e| e.map(|_| ()))
    .boxed();
    let slices = reflector(
        eps_writer,
        watcher(
            Api::<EndpointSlice>::all(client),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|e| e.map(|_| ()))
    .boxed();
    let mut events = futures::stream::select(services, slices);
    let mut ticker = tokio::time::interval(METRICS_EVERY);
    let mut names = HashMap::new();
    let mut ready = false;
    let mut failed = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {
                metrics.update(&syncer, &names);
                // A failed sync is retried here too, not only on the next change.
                if !failed {
                    continue;
                }
            }
            ev = events.next() => match ev {
                None => return Err(Error::Watch("watch streams ended".into())),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watch error; retrying with backoff");
                    continue;
                }
                Some(Ok(())) => {}
            },
        }
        // Take everything already queued, so a burst costs one sync.
        while let Some(Some(Ok(()))) = events.next().now_or_never() {}
        // Until both lists arrived, a partial snapshot would delete live Services from the maps.
        if !ready {
            if svc_store.wait_until_ready().now_or_never().is_none()
                || eps_store.wait_until_ready().now_or_never().is_none()
            {
                continue;
            }
            ready = true;
        }
        let (want, problems) = desired(&svc_store.state(), &eps_store.state(), &cfg);
        for p in problems {
            tracing::warn!(service = %p.service, reason = %p.reason, "Service field not usable");
        }
        match syncer.sync(&want) {
            Ok(n) => {
                failed = false;
                tracing::debug!(writes = n, frontends = want.len(), "maps in step");
            }
            Err(e) => {
                failed = true;
                tracing::error!(error = %e, "map update failed; retrying");
            }
        }
        names = want
            .iter()
            .filter_map(|(fe, d)| {
                Some((
                    syncer.state().services.get(&service_key(fe))?.id,
                    d.service.clone(),
                ))
            })
            .collect();
    }
}
