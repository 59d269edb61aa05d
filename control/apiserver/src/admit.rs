//! The server's use of the API crate's admission chain and patch engine: one place that
//! decides the order (decode → prepare update → default → validate) for every write path.

use serde_json::Value;
use weir_api::{ApiError, Resource};

/// What an incoming object replaces.
#[derive(Clone, Copy)]
pub enum Write<'a> {
    Create,
    /// PUT or PATCH of the object itself, over the stored object: fields the change makes
    /// meaningless (a former NodePort Service's node ports) are dropped before validation,
    /// as Kubernetes' update strategies do.
    Update(&'a Value),
    /// A write through `status` or `finalize`, over the stored object: the rest of the
    /// object is the stored one, so nothing is dropped.
    Subresource(&'a Value),
}

/// Type-check, default and validate an incoming object. Under `strict`, unknown fields are
/// rejected instead of pruned.
pub fn admit(
    res: &Resource,
    obj: Value,
    write: Write<'_>,
    strict: bool,
) -> Result<Value, ApiError> {
    let mut obj = weir_api::admission::decode_value(res, obj, strict)?;
    let old = match write {
        Write::Create => None,
        Write::Update(old) => {
            weir_api::admission::prepare_update(res, &mut obj, old);
            Some(old)
        }
        Write::Subresource(old) => Some(old),
    };
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
