//! Kubernetes object semantics as weir serves them, as pure functions over JSON: the
//! resource registry, `Status` errors, label and field selectors, decoding with type checks,
//! defaulting, validation and patches. HTTP, storage, tables and discovery live in the API
//! server.

pub mod admission;
pub mod names;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod selector;
pub mod status;

pub use patch::apply_patch;
pub use registry::Resource;
pub use selector::{FieldSelector, LabelSelector};
pub use status::{ApiError, Cause, StatusDetails, StatusReason};
