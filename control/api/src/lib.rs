//! Kubernetes API objects as weir serves them: the resource registry, defaulting, validation, patches, tables, discovery and OpenAPI documents.

pub mod admission;
pub mod names;
pub mod patch;
pub mod registry;
pub mod selector;
pub mod status;

pub use patch::apply_patch;
pub use registry::Resource;
pub use selector::{FieldSelector, LabelSelector};
pub use status::{ApiError, Cause, StatusDetails, StatusReason};
