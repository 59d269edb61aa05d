//! weir's node agent: the pod network, the process runtime, pod lifecycle and the API
//! integration (node registration, heartbeat, pod status) of one node.
//!
//! `weir node` is [`node::Args`] + [`node::run`]. The process runtime runs each container's
//! `command` from the node's own file system; `image` is recorded in status, never pulled.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod cgroup;
pub mod env;
pub mod logs;
pub mod network;
pub mod node;
pub mod pod;
pub mod probe;
pub mod runtime;

pub use node::{Args, Error, default_node_name, detect_node_ip, run};

#[cfg(test)]
mod testutil;
