//! weir's node agent: the pod network, the process runtime, pod lifecycle and the API
//! integration (node registration, heartbeat, pod status) of one node.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod cgroup;
pub mod env;
pub mod logs;
pub mod network;
pub mod pod;
pub mod probe;
pub mod runtime;

#[cfg(test)]
mod testutil;
