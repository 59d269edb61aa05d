//! Request bodies to objects: JSON or YAML parsing with positions, `apiVersion`/`kind` checks,
//! and type checking against the k8s-openapi type of the resource, which also finds the
//! fields the type does not know (rejected under `fieldValidation=Strict`, pruned otherwise).

use k8s_openapi::api::{apps, coordination, core, discovery, networking};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use serde_path_to_error::Segment;

use crate::registry::Resource;
use crate::status::{ApiError, Cause};

/// Parses a request body as the object of `res`. `content_type` is the request's
/// `Content-Type` (parameters ignored; empty means JSON). With `strict`, fields the type
/// does not declare are a 400 naming each; without, they are dropped, as Kubernetes prunes.
pub fn decode(
    res: &Resource,
    body: &[u8],
    content_type: &str,
    strict: bool,
) -> Result<Value, ApiError> {
    let value = parse_body(body, content_type)?;
    decode_value(res, value, strict)
}

/// Parses JSON, YAML or Kubernetes protobuf by media type; malformed JSON or YAML is a 400
/// with line and column, malformed protobuf a 400 naming the problem.
pub fn parse_body(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "" | "application/json" | "*/*" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON body: {e}"))),
        "application/yaml" | "application/x-yaml" | "text/yaml" => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML body: {e}"))),
        crate::protobuf::MEDIA_TYPE => crate::protobuf::decode(body),
        _ => Err(ApiError::unsupported_media_type(content_type)),
    }
}

/// [`decode`] for an already parsed value, e.g. the result of a patch.
pub fn decode_value(res: &Resource, mut value: Value, strict: bool) -> Result<Value, ApiError> {
    let Some(obj) = value.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the body of a {} must be a JSON object, not {}",
            res.kind,
            type_name(&value)
        )));
    };
    check_type_meta(res, obj)?;
    drop_nulls(&mut value);
    quantities_as_strings(&mut value, false);
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let typed = roundtrip(res.kind, value.clone()).map_err(|e| match e {
        RoundtripError::Field(cause) => ApiError::invalid(res, &name, vec![cause]),
        RoundtripError::Internal(msg) => ApiError::internal(&msg),
    })?;
    if strict {
        let mut unknown = Vec::new();
        unknown_fields(&value, &typed, "", &mut unknown);
        if !unknown.is_empty() {
            let list = unknown
                .iter()
                .map(|f| format!("unknown field {f:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {list}"
            )));
        }
    }
    Ok(typed)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Fills a missing `apiVersion`/`kind` from the URL (as the Kubernetes decoder does with its
/// default GVK) and rejects ones that name another resource.
fn check_type_meta(res: &Resource, obj: &mut Map<String, Value>) -> Result<(), ApiError> {
    let expected_version = res.api_version();
    match obj.get("apiVersion") {
        None | Some(Value::Null) => {
            obj.insert("apiVersion".into(), Value::String(expected_version));
        }
        Some(Value::String(v)) if *v == expected_version => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({}) does not match the expected API version ({expected_version})",
                other.as_str().unwrap_or(&other.to_string())
            )));
        }
    }
    match obj.get("kind") {
        None | Some(Value::Null) => {
            obj.insert("kind".into(), Value::String(res.kind.into()));
        }
        Some(Value::String(k)) if k == res.kind => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({}) does not match the expected kind ({})",
                other.as_str().unwrap_or(&other.to_string()),
                res.kind
            )));
        }
    }
    Ok(())
}

/// JSON `null` means "absent" in Kubernetes objects (`creationTimestamp: null` in YAML that
/// kubectl wrote), so nulls are removed before type checking.
fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Maps whose values are resource quantities, and single quantity fields.
const QUANTITY_MAPS: &[&str] = &["limits", "requests", "capacity", "allocatable", "overhead"];
const QUANTITY_FIELDS: &[&str] = &["sizeLimit"];

/// Kubernetes accepts quantities as JSON numbers (`cpu: 1`, `memory: 134217728`); the
/// k8s-openapi `Quantity` type is a string, so numbers there become their decimal text.
fn quantities_as_strings(v: &mut Value, in_quantity_map: bool) {
    match v {
        Value::Number(n) if in_quantity_map => *v = Value::String(n.to_string()),
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                let quantity = QUANTITY_MAPS.contains(&k.as_str());
                if QUANTITY_FIELDS.contains(&k.as_str()) && child.is_number() {
                    *child = Value::String(child.to_string());
                } else {
                    quantities_as_strings(child, quantity && child.is_object());
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|i| quantities_as_strings(i, false)),
        _ => {}
    }
}

enum RoundtripError {
    Field(Cause),
    Internal(String),
}

fn typed<T: DeserializeOwned + Serialize>(value: Value) -> Result<Value, RoundtripError> {
    let input = value.clone();
    let obj: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = String::new();
        let mut pointer = String::new();
        for seg in e.path().iter() {
            match seg {
                Segment::Seq { index } => {
                    path.push_str(&format!("[{index}]"));
                    pointer.push_str(&format!("/{index}"));
                }
                Segment::Map { key } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    pointer.push('/');
                    pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
                }
                Segment::Enum { .. } | Segment::Unknown => {}
            }
        }
        let msg = e.inner().to_string();
        let bad = input.pointer(&pointer).cloned().unwrap_or(Value::Null);
        RoundtripError::Field(Cause::type_invalid(&path, &bad, &msg))
    })?;
    serde_json::to_value(obj).map_err(|e| RoundtripError::Internal(e.to_string()))
}

/// Deserialises into the k8s-openapi type of `kind` and serialises back: a wrong type fails
/// naming its field path, and the result holds only the fields the type declares.
fn roundtrip(kind: &str, value: Value) -> Result<Value, RoundtripError> {
    match kind {
        "Namespace" => typed::<core::v1::Namespace>(value),
        "Node" => typed::<core::v1::Node>(value),
        "Pod" => typed::<core::v1::Pod>(value),
        "Service" => typed::<core::v1::Service>(value),
        "Secret" => typed::<core::v1::Secret>(value),
        "ConfigMap" => typed::<core::v1::ConfigMap>(value),
        "Event" => typed::<core::v1::Event>(value),
        "Deployment" => typed::<apps::v1::Deployment>(value),
        "ReplicaSet" => typed::<apps::v1::ReplicaSet>(value),
        "EndpointSlice" => typed::<discovery::v1::EndpointSlice>(value),
        "Ingress" => typed::<networking::v1::Ingress>(value),
        "IngressClass" => typed::<networking::v1::IngressClass>(value),
        "Lease" => typed::<coordination::v1::Lease>(value),
        other => Err(RoundtripError::Internal(format!(
            "no type registered for kind {other}"
        ))),
    }
}

/// Paths of fields present in `input` but not in `known` (its typed round trip).
fn unknown_fields(input: &Value, known: &Value, path: &str, out: &mut Vec<String>) {
    match (input, known) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(kv) => unknown_fields(v, kv, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, kv)) in a.iter().zip(b).enumerate() {
                unknown_fields(v, kv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::find_by_name;
    use crate::status::StatusReason;
    use serde_json::json;

    fn svc() -> &'static Resource {
        find_by_name("svc").expect("svc")
    }

    #[test]
    fn decodes_json_and_multi_line_yaml() {
        let yaml = b"apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  creationTimestamp: null\nspec:\n  ports:\n  - port: 80\n    targetPort: http\n";
        let obj = decode(svc(), yaml, "application/yaml", true).expect("valid yaml");
        assert_eq!(obj["spec"]["ports"][0]["port"], 80);
        assert_eq!(obj["spec"]["ports"][0]["targetPort"], "http");
        assert!(obj["metadata"].get("creationTimestamp").is_none());
        let json = br#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web"}}"#;
        let obj = decode(svc(), json, "application/json; charset=utf-8", true).expect("json");
        assert_eq!(obj["metadata"]["name"], "web");
    }

    #[test]
    fn malformed_bodies_are_400_with_position() {
        let err = decode(
            svc(),
            b"{\"metadata\": {\"name\": }",
            "application/json",
            false,
        )
        .expect_err("bad json");
        assert_eq!(err.code, 400);
        assert_eq!(err.reason, StatusReason::BadRequest);
        assert!(err.message.contains("line 1 column 23"), "{}", err.message);

        let err = decode(
            svc(),
            b"metadata:\n  name: a\n bad: [\n",
            "application/yaml",
            false,
        )
        .expect_err("bad yaml");
        assert_eq!(err.code, 400);
        assert!(err.message.contains("line 3"), "{}", err.message);

        let err = decode(svc(), b"[1]", "application/json", false).expect_err("array");
        assert!(err.message.contains("must be a JSON object"));
        let err = decode(svc(), b"{}", "application/xml", false).expect_err("xml");
        assert_eq!(err.code, 415);
    }

    #[test]
    fn wrong_types_are_422_naming_the_field() {
        let body = br#"{"metadata":{"name":"web"},"spec":{"ports":[{"port":"eighty"}]}}"#;
        let err = decode(svc(), body, "", false).expect_err("wrong type");
        assert_eq!(err.code, 422);
        let details = err.details.as_ref().expect("details");
        assert_eq!(details.causes[0].field, "spec.ports[0].port");
        assert_eq!(details.causes[0].reason, "FieldValueTypeInvalid");
        assert!(
            err.message
                .starts_with("Service \"web\" is invalid: spec.ports[0].port: Invalid value: \"eighty\": invalid type: string \"eighty\", expected i32"),
            "{}",
            err.message
        );

        let deploy = find_by_name("deploy").expect("deploy");
        let body = br#"{"metadata":{"name":"d","labels":{"a":1}}}"#;
        let err = decode(deploy, body, "", false).expect_err("label int");
        assert_eq!(
            err.details.as_ref().expect("details").causes[0].field,
            "metadata.labels.a"
        );
    }

    #[test]
    fn unknown_fields_rejected_when_strict_and_pruned_otherwise() {
        let body = br#"{"metadata":{"name":"web","bogus":1},"spec":{"foo":true,"ports":[{"port":80,"weight":2}]}}"#;
        let err = decode(svc(), body, "", true).expect_err("strict");
        assert_eq!(err.code, 400);
        assert_eq!(
            err.message,
            "strict decoding error: unknown field \"metadata.bogus\", unknown field \"spec.foo\", unknown field \"spec.ports[0].weight\""
        );
        let obj = decode(svc(), body, "", false).expect("lenient");
        assert!(obj["spec"].get("foo").is_none());
        assert!(obj["metadata"].get("bogus").is_none());
        assert_eq!(obj["spec"]["ports"][0], json!({"port": 80}));
    }

    #[test]
    fn numeric_quantities_are_accepted() {
        let deploy = find_by_name("deploy").expect("deploy");
        let body = b"spec:\n  template:\n    spec:\n      containers:\n      - name: a\n        image: x\n        resources:\n          limits: {cpu: 0.5, memory: 134217728}\n          requests: {cpu: 1}\n      volumes:\n      - name: v\n        emptyDir: {sizeLimit: 1024}\n";
        let obj = decode(deploy, body, "application/yaml", true).expect("numbers are quantities");
        let pod = &obj["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"][0]["resources"],
            json!({"limits": {"cpu": "0.5", "memory": "134217728"}, "requests": {"cpu": "1"}})
        );
        assert_eq!(pod["volumes"][0]["emptyDir"]["sizeLimit"], "1024");
    }

    #[test]
    fn type_meta_is_filled_or_checked() {
        let obj = decode(svc(), br#"{"metadata":{"name":"a"}}"#, "", true).expect("filled");
        assert_eq!(obj["apiVersion"], "v1");
        assert_eq!(obj["kind"], "Service");
        let err = decode(
            svc(),
            br#"{"apiVersion":"apps/v1","kind":"Service"}"#,
            "",
            true,
        )
        .expect_err("version");
        assert_eq!(
            err.message,
            "the API version in the data (apps/v1) does not match the expected API version (v1)"
        );
        let err =
            decode(svc(), br#"{"apiVersion":"v1","kind":"Pod"}"#, "", true).expect_err("kind");
        assert_eq!(err.code, 400);
        assert!(
            err.message
                .contains("(Pod) does not match the expected kind (Service)")
        );
    }
}
