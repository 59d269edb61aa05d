//! API errors and the Kubernetes `Status` objects they become on the wire.
//!
//! Messages follow the formats of `k8s.io/apimachinery/pkg/api/errors` and
//! `pkg/util/validation/field`, because kubectl prints them verbatim and users grep for them
//! (`The Service "x" is invalid: spec.ports[0].port: Invalid value: 0: must be between 1 and
//! 65535, inclusive`).

use serde::Serialize;
use serde_json::{Value, json};

use crate::registry::Resource;

/// The machine-readable `reason` of a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusReason {
    NotFound,
    AlreadyExists,
    Conflict,
    Invalid,
    BadRequest,
    Gone,
    Expired,
    RequestEntityTooLarge,
    Unauthorized,
    Forbidden,
    MethodNotAllowed,
    NotAcceptable,
    UnsupportedMediaType,
    ServiceUnavailable,
    Timeout,
    InternalError,
}

impl StatusReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "NotFound",
            Self::AlreadyExists => "AlreadyExists",
            Self::Conflict => "Conflict",
            Self::Invalid => "Invalid",
            Self::BadRequest => "BadRequest",
            Self::Gone => "Gone",
            Self::Expired => "Expired",
            Self::RequestEntityTooLarge => "RequestEntityTooLarge",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden => "Forbidden",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::NotAcceptable => "NotAcceptable",
            Self::UnsupportedMediaType => "UnsupportedMediaType",
            Self::ServiceUnavailable => "ServiceUnavailable",
            Self::Timeout => "Timeout",
            Self::InternalError => "InternalError",
        }
    }
}

/// `Status.details`: which object failed and, for validation errors, why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatusDetails {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<Cause>,
}

/// One reason a request failed, usually one invalid field (`metav1.StatusCause`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cause {
    /// Field path as Kubernetes prints it, e.g. `spec.ports[0].port`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub field: String,
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`, ...
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The error body without the field, e.g. `Invalid value: 0: must be ...`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The way `field.Error` prints a bad value: strings quoted, numbers and bools bare,
/// anything else as JSON.
fn show_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".to_string(),
        other => other.to_string(),
    }
}

impl Cause {
    fn new(field: &str, reason: &str, message: String) -> Self {
        Self {
            field: field.to_string(),
            reason: reason.to_string(),
            message,
        }
    }

    /// `Required value[: detail]`.
    pub fn required(field: &str, detail: &str) -> Self {
        let mut message = "Required value".to_string();
        if !detail.is_empty() {
            message.push_str(": ");
            message.push_str(detail);
        }
        Self::new(field, "FieldValueRequired", message)
    }

    /// `Invalid value: <value>: detail`.
    pub fn invalid(field: &str, value: &Value, detail: &str) -> Self {
        Self::new(
            field,
            "FieldValueInvalid",
            format!("Invalid value: {}: {detail}", show_value(value)),
        )
    }

    /// `Unsupported value: <value>: supported values: "a", "b"`.
    pub fn not_supported(field: &str, value: &Value, supported: &[&str]) -> Self {
        let list = supported
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        Self::new(
            field,
            "FieldValueNotSupported",
            format!(
                "Unsupported value: {}: supported values: {list}",
                show_value(value)
            ),
        )
    }

    /// `Duplicate value: <value>`.
    pub fn duplicate(field: &str, value: &Value) -> Self {
        Self::new(
            field,
            "FieldValueDuplicate",
            format!("Duplicate value: {}", show_value(value)),
        )
    }

    /// `Not found: <value>`, e.g. a volume mount naming no volume.
    pub fn not_found(field: &str, value: &Value) -> Self {
        Self::new(
            field,
            "FieldValueNotFound",
            format!("Not found: {}", show_value(value)),
        )
    }

    /// `Forbidden: detail`.
    pub fn forbidden(field: &str, detail: &str) -> Self {
        Self::new(field, "FieldValueForbidden", format!("Forbidden: {detail}"))
    }

    /// `Too long: may not be more than <max> bytes`.
    pub fn too_long(field: &str, max: usize) -> Self {
        let unit = if max == 1 { "byte" } else { "bytes" };
        Self::new(
            field,
            "FieldValueTooLong",
            format!("Too long: may not be more than {max} {unit}"),
        )
    }

    /// A value of the wrong JSON type: `Invalid value: <value>: detail`.
    pub fn type_invalid(field: &str, value: &Value, detail: &str) -> Self {
        Self::new(
            field,
            "FieldValueTypeInvalid",
            format!("Invalid value: {}: {detail}", show_value(value)),
        )
    }

    /// An unknown field under `fieldValidation=Strict`.
    pub fn unknown_field(field: &str) -> Self {
        Self::new(
            field,
            "FieldValueInvalid",
            format!("unknown field {field:?}"),
        )
    }

    /// `field: body`, the line kubectl shows for each cause.
    pub fn line(&self) -> String {
        if self.field.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}

/// A failed API request: the HTTP status code plus everything the `Status` body carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: StatusReason,
    pub message: String,
    /// Boxed so that `Result<_, ApiError>` stays small on the success path.
    pub details: Option<Box<StatusDetails>>,
}

/// `pods` or `deployments.apps`, as Kubernetes names a resource in messages.
fn qualified_resource(res: &Resource) -> String {
    if res.group.is_empty() {
        res.plural.to_string()
    } else {
        format!("{}.{}", res.plural, res.group)
    }
}

/// `Pod` or `Deployment.apps`, as Kubernetes names a kind in validation messages.
fn qualified_kind(res: &Resource) -> String {
    if res.group.is_empty() {
        res.kind.to_string()
    } else {
        format!("{}.{}", res.kind, res.group)
    }
}

fn object_details(res: &Resource, name: &str, kind: &str) -> Option<Box<StatusDetails>> {
    Some(Box::new(StatusDetails {
        name: name.to_string(),
        group: res.group.to_string(),
        kind: kind.to_string(),
        causes: Vec::new(),
    }))
}

impl ApiError {
    pub fn new(code: u16, reason: StatusReason, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    /// 404: `pods "x" not found`.
    pub fn not_found(res: &Resource, name: &str) -> Self {
        Self {
            details: object_details(res, name, res.plural),
            ..Self::new(
                404,
                StatusReason::NotFound,
                format!("{} {name:?} not found", qualified_resource(res)),
            )
        }
    }

    /// 404 for a path or resource the server does not serve at all.
    pub fn unknown_resource() -> Self {
        Self::new(
            404,
            StatusReason::NotFound,
            "the server could not find the requested resource",
        )
    }

    /// 409: `pods "x" already exists`.
    pub fn already_exists(res: &Resource, name: &str) -> Self {
        Self {
            details: object_details(res, name, res.plural),
            ..Self::new(
                409,
                StatusReason::AlreadyExists,
                format!("{} {name:?} already exists", qualified_resource(res)),
            )
        }
    }

    /// 409: `Operation cannot be fulfilled on pods "x": msg`.
    pub fn conflict(res: &Resource, name: &str, msg: &str) -> Self {
        Self {
            details: object_details(res, name, res.plural),
            ..Self::new(
                409,
                StatusReason::Conflict,
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: {msg}",
                    qualified_resource(res)
                ),
            )
        }
    }

    /// 409 for an update whose `resourceVersion` is not the stored one.
    pub fn stale(res: &Resource, name: &str) -> Self {
        Self::conflict(
            res,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422: `Service "x" is invalid: <cause>` or `... is invalid: [<cause>, <cause>]`.
    pub fn invalid(res: &Resource, name: &str, causes: Vec<Cause>) -> Self {
        let kind = qualified_kind(res);
        let mut lines: Vec<String> = Vec::new();
        for line in causes.iter().map(Cause::line) {
            if !lines.contains(&line) {
                lines.push(line);
            }
        }
        let message = match lines.len() {
            0 => format!("{kind} {name:?} is invalid"),
            1 => format!("{kind} {name:?} is invalid: {}", lines[0]),
            _ => format!("{kind} {name:?} is invalid: [{}]", lines.join(", ")),
        };
        Self {
            details: Some(Box::new(StatusDetails {
                name: name.to_string(),
                group: res.group.to_string(),
                kind: res.kind.to_string(),
                causes,
            })),
            ..Self::new(422, StatusReason::Invalid, message)
        }
    }

    /// 400 with the message as given.
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(400, StatusReason::BadRequest, msg)
    }

    /// 410 Gone.
    pub fn gone(msg: impl Into<String>) -> Self {
        Self::new(410, StatusReason::Gone, msg)
    }

    /// 410 Expired: the requested resourceVersion was compacted; clients re-list.
    pub fn expired(msg: impl Into<String>) -> Self {
        Self::new(410, StatusReason::Expired, msg)
    }

    /// 413: `Request entity too large: msg`.
    pub fn too_large(msg: &str) -> Self {
        Self::new(
            413,
            StatusReason::RequestEntityTooLarge,
            format!("Request entity too large: {msg}"),
        )
    }

    /// 401 for a request without valid credentials.
    pub fn unauthorized() -> Self {
        Self::new(401, StatusReason::Unauthorized, "Unauthorized")
    }

    /// 403: `pods "x" is forbidden: msg`.
    pub fn forbidden(res: &Resource, name: &str, msg: &str) -> Self {
        Self {
            details: object_details(res, name, res.plural),
            ..Self::new(
                403,
                StatusReason::Forbidden,
                format!("{} {name:?} is forbidden: {msg}", qualified_resource(res)),
            )
        }
    }

    /// 405 for a verb the resource does not support.
    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            StatusReason::MethodNotAllowed,
            "the server does not allow this method on the requested resource",
        )
    }

    /// 406 for an `Accept` header the server cannot satisfy.
    pub fn not_acceptable(accept: &str) -> Self {
        Self::new(
            406,
            StatusReason::NotAcceptable,
            format!(
                "only the following media types are accepted: application/json, application/yaml (got {accept:?})"
            ),
        )
    }

    /// 415 for a body `Content-Type` the server cannot decode.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            StatusReason::UnsupportedMediaType,
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf, application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
            ),
        )
    }

    /// 503, e.g. when the store is unreachable.
    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self::new(503, StatusReason::ServiceUnavailable, msg)
    }

    /// 504: `Timeout: msg`.
    pub fn timeout(msg: &str) -> Self {
        Self::new(504, StatusReason::Timeout, format!("Timeout: {msg}"))
    }

    /// 500: `Internal error occurred: msg`.
    pub fn internal(msg: &str) -> Self {
        Self {
            details: Some(Box::new(StatusDetails {
                causes: vec![Cause {
                    field: String::new(),
                    reason: String::new(),
                    message: msg.to_string(),
                }],
                ..StatusDetails::default()
            })),
            ..Self::new(
                500,
                StatusReason::InternalError,
                format!("Internal error occurred: {msg}"),
            )
        }
    }

    /// The `metav1.Status` body for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason.as_str(),
            "code": self.code,
        });
        if let Some(details) = &self.details
            && let Ok(value) = serde_json::to_value(details.as_ref())
        {
            status["details"] = value;
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{find, find_by_name};

    fn res(name: &str) -> &'static Resource {
        find_by_name(name).expect("known resource")
    }

    #[test]
    fn invalid_service_matches_kubectl_output() {
        let err = ApiError::invalid(
            res("svc"),
            "x",
            vec![Cause::invalid(
                "spec.ports[0].port",
                &json!(0),
                "must be between 1 and 65535, inclusive",
            )],
        );
        assert_eq!(err.code, 422);
        assert_eq!(
            err.message,
            "Service \"x\" is invalid: spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"
        );
        assert_eq!(
            err.to_status(),
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": err.message, "reason": "Invalid", "code": 422,
                "details": {"name": "x", "kind": "Service", "causes": [{
                    "reason": "FieldValueInvalid",
                    "message": "Invalid value: 0: must be between 1 and 65535, inclusive",
                    "field": "spec.ports[0].port"
                }]}
            })
        );
    }

    #[test]
    fn several_causes_are_bracketed_and_grouped_kinds_qualified() {
        let err = ApiError::invalid(
            res("deploy"),
            "web",
            vec![
                Cause::required("spec.selector", ""),
                Cause::not_supported(
                    "spec.strategy.type",
                    &json!("Blue"),
                    &["Recreate", "RollingUpdate"],
                ),
            ],
        );
        assert_eq!(
            err.message,
            "Deployment.apps \"web\" is invalid: [spec.selector: Required value, spec.strategy.type: Unsupported value: \"Blue\": supported values: \"Recreate\", \"RollingUpdate\"]"
        );
        assert_eq!(err.to_status()["details"]["group"], "apps");
    }

    #[test]
    fn not_found_and_conflicts_name_the_resource() {
        let pods = find("", "v1", "pods").expect("pods");
        let err = ApiError::not_found(pods, "a");
        assert_eq!(err.message, "pods \"a\" not found");
        assert_eq!(
            err.to_status()["details"],
            json!({"name": "a", "kind": "pods"})
        );
        assert_eq!(
            ApiError::already_exists(res("deploy"), "w").message,
            "deployments.apps \"w\" already exists"
        );
        let stale = ApiError::stale(pods, "a");
        assert_eq!(stale.code, 409);
        assert_eq!(stale.reason, StatusReason::Conflict);
        assert!(
            stale
                .message
                .starts_with("Operation cannot be fulfilled on pods \"a\": the object")
        );
    }

    #[test]
    fn plain_errors_have_no_details() {
        let status = ApiError::bad_request("bad").to_status();
        assert_eq!(status["code"], 400);
        assert_eq!(status["reason"], "BadRequest");
        assert!(status.get("details").is_none());
        assert_eq!(ApiError::unauthorized().code, 401);
        assert_eq!(ApiError::too_large("limit is 3145728").code, 413);
        assert_eq!(ApiError::expired("too old").reason.as_str(), "Expired");
        let internal = ApiError::internal("boom").to_status();
        assert_eq!(internal["message"], "Internal error occurred: boom");
        assert_eq!(internal["details"]["causes"][0], json!({"message": "boom"}));
    }
}
