//! weir's node agent: the pod network, the process runtime, pod lifecycle and the API
//! integration (node registration, heartbeat, pod status) of one node.

pub mod network;

#[cfg(test)]
mod testutil;
