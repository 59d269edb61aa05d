//! Admission of objects into the API: decoding request bodies with type checks, defaulting,
//! and validation, each as a pure function over `serde_json::Value`.
//!
//! The server's order for a write is: [`decode`] → [`default`] → [`validate`] (with the
//! stored object on update) → store.

mod decode;
mod defaults;
mod validate;

pub use decode::{decode, decode_value, parse_body};
pub use defaults::default;
pub use validate::validate;
