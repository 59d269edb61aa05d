//! Kubernetes API objects as weir serves them: the resource registry, defaulting, validation, patches, tables, discovery and OpenAPI documents.

pub mod registry;
pub mod status;

pub use registry::Resource;
pub use status::{ApiError, Cause, StatusDetails, StatusReason};
