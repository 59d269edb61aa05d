//! The server's use of the API crate's admission chain and patch engine: one place that
//! decides the order (decode → default → validate) for every write path.

use serde_json::Value;
use weir_api::{ApiError, Resource};

/// Type-check, default and validate an incoming object (`old` is the stored object on
/// update). Under `strict`, unknown fields are rejected instead of pruned.
pub fn admit(
    res: &Resource,
    obj: Value,
    old: Option<&Value>,
    strict: bool,
) -> Result<Value, ApiError> {
    let mut obj = weir_api::admission::decode_value(res, obj, strict)?;
    weir_api::admission::default(res, &mut obj);
    weir_api::admission::validate(res, &obj, old)
        .map_err(|causes| ApiError::invalid(res, crate::meta::name(&obj), causes))?;
    Ok(obj)
}

/// Apply a PATCH body of media type `content_type` to `current`, an object of `res` (or the
/// `Scale` of one: it has no lists, so `res`'s strategic merge keys never apply to it).
pub fn apply_patch(
    res: &Resource,
    current: &Value,
    content_type: &str,
    patch: &[u8],
) -> Result<Value, ApiError> {
    weir_api::patch::apply_patch(res, current, content_type, patch)
}
