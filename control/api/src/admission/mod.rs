//! Admission of objects into the API: decoding request bodies with type checks, defaulting,
//! and validation, each as a pure function over `serde_json::Value`.
//!
//! They are meant to run in this order on a write: [`decode`] → on update
//! [`prepare_update`] → [`default`] → [`validate`] (with the stored object on update).

mod decode;
mod defaults;
mod update;
mod validate;

pub use decode::{decode, decode_value, parse_body};
pub use defaults::default;
pub use update::{needs_health_check_node_port, prepare_update};
pub use validate::validate;
