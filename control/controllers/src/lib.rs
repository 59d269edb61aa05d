//! weir's controllers: level-triggered kube-rs reconcilers that drive actual state towards
//! what users declared — EndpointSlices for Services (what the load balancer, DNS and ingress
//! read), ReplicaSets, Deployments, node lifecycle, garbage collection and pod garbage
//! collection. Each keeps its decision logic in pure functions over API objects,
//! unit-tested without an API server.

pub mod deployment;
pub mod endpointslice;
pub mod gc;
pub mod nodelifecycle;
pub mod podgc;
pub mod replicaset;
pub mod runtime;
pub mod util;

use std::future::Future;

use futures::FutureExt;

/// Settings of the controllers that have any.
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    pub node_lifecycle: nodelifecycle::Config,
}

/// Run every controller against `client` until `shutdown` resolves.
pub async fn run(client: kube::Client, config: Config, shutdown: impl Future<Output = ()>) {
    let shutdown = shutdown.shared();
    tokio::join!(
        endpointslice::run(client.clone(), shutdown.clone()),
        replicaset::run(client.clone(), shutdown.clone()),
        deployment::run(client.clone(), shutdown.clone()),
        nodelifecycle::run(client.clone(), config.node_lifecycle, shutdown.clone()),
        // A node missing for as long as one may stay silent before it turns NotReady is
        // gone; the default (40 s) is upstream PodGC's fixed quarantine.
        podgc::run(
            client.clone(),
            podgc::Config {
                quarantine: config.node_lifecycle.grace_period,
                ..podgc::Config::default()
            },
            shutdown.clone()
        ),
        gc::run(client, shutdown),
    );
}

#[cfg(test)]
mod tests;
