//! weir's controllers: level-triggered kube-rs reconcilers that drive actual state towards
//! what users declared — EndpointSlices for Services (what the load balancer, DNS and ingress
//! read), ReplicaSets, Deployments, node lifecycle and garbage collection. Each keeps its
//! decision logic in pure functions over API objects, unit-tested without an API server.

pub mod deployment;
pub mod endpointslice;
pub mod nodelifecycle;
pub mod replicaset;
pub mod runtime;
pub mod util;
