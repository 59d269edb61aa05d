//! weir's scheduler: picks a node for every unscheduled pod and binds it through the
//! `pods/binding` subresource. The decision ([`core::Scheduler`], [`plugins`]) is pure and
//! runs over a [`snapshot::Snapshot`]; [`run`] is the thin kube-rs layer that feeds the
//! snapshot from watches and writes bindings and PodScheduled conditions.

pub mod core;
pub mod events;
pub mod plugins;
pub mod podinfo;
pub mod quantity;
pub mod run;
pub mod snapshot;

pub use crate::core::{Config, FitError, Scheduler};
pub use crate::podinfo::PodInfo;
pub use crate::run::{RunConfig, RunError, run};

#[cfg(test)]
mod testutil;
