//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`), which client-go's
//! typed clients send for built-in kinds (so every `kubectl create <generator>` does), decoded
//! into the JSON object the JSON path would have parsed, so admission, storage and responses
//! do not know which encoding the client used.
//!
//! The body is the magic `k8s\0` and a `runtime.Unknown` whose `typeMeta` names the kind and
//! whose `raw` is the object's protobuf encoding. Wire decoding is k8s-pb's (prost types of
//! Kubernetes' `generated.proto`); this module turns those types into Kubernetes JSON. Each
//! conversion destructures its type without `..`, so every field is either converted or, for
//! the parts not converted yet, refused with a 415 naming it when set: nothing is dropped
//! silently, and a k8s-pb upgrade that adds a field fails to compile here. Of the registry's
//! kinds, Node, Pod, Event and EndpointSlice are not converted yet (415).
//!
//! Zero values follow Go's JSON: gogo-protobuf writes every plain (non-pointer) field, zero
//! or not, and `omitempty` drops the zero ones, so zero strings, numbers and `false` are left
//! out, except in fields Go declares as pointers (`replicas: 0` is a choice), which use the
//! `keep_*` setters.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as openapi_meta;
use k8s_openapi::jiff::Timestamp;
use k8s_pb::api::{apps, autoscaling, coordination, core, networking};
use k8s_pb::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;
use serde_json::{Map, Value};

use crate::registry;
use crate::status::{ApiError, StatusReason};

/// The media type of Kubernetes' protobuf encoding.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

const MAGIC: &[u8] = b"k8s\0";

/// Why a body could not be converted.
enum Error {
    /// The bytes are not what they claim to be: 400.
    Malformed(String),
    /// A field this decoder does not convert yet is set: 415, the client can send JSON.
    Unsupported(String),
}

type Result<T> = std::result::Result<T, Error>;

/// Decodes a protobuf body into the JSON object it encodes, with `apiVersion` and `kind` from
/// the envelope. Malformed input is a 400 naming what is wrong; a kind (or a field) this
/// decoder does not convert is a 415 naming it.
pub fn decode(body: &[u8]) -> std::result::Result<Value, ApiError> {
    let envelope = body.strip_prefix(MAGIC).ok_or_else(|| {
        ApiError::bad_request(
            "error decoding protobuf body: it does not start with the Kubernetes protobuf prefix \"k8s\\x00\"",
        )
    })?;
    let unknown = Unknown::decode(envelope).map_err(|e| {
        ApiError::bad_request(format!("error decoding protobuf body: envelope: {e}"))
    })?;
    let encoding = unknown.content_encoding.as_deref().unwrap_or_default();
    if !encoding.is_empty() {
        return Err(unsupported(format!(
            "protobuf body with contentEncoding {encoding:?} is not supported"
        )));
    }
    let content_type = unknown.content_type.as_deref().unwrap_or_default();
    if !matches!(content_type, "" | MEDIA_TYPE) {
        return Err(unsupported(format!(
            "protobuf body wrapping contentType {content_type:?} is not supported"
        )));
    }
    let type_meta = unknown.type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    if kind.is_empty() {
        return Err(ApiError::bad_request(
            "error decoding protobuf body: the envelope names no kind",
        ));
    }
    let raw = unknown.raw.unwrap_or_default();
    let object = object(&api_version, &kind, &raw).map_err(|e| match e {
        Error::Malformed(msg) => {
            ApiError::bad_request(format!("error decoding protobuf body: {kind}: {msg}"))
        }
        Error::Unsupported(msg) => unsupported(format!(
            "protobuf body of kind {kind:?} in {api_version:?}: {msg}; send it as JSON"
        )),
    })?;
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), Value::String(api_version));
    obj.insert("kind".into(), Value::String(kind));
    if let Value::Object(fields) = object {
        obj.extend(fields);
    }
    Ok(Value::Object(obj))
}

fn unsupported(msg: String) -> ApiError {
    ApiError::new(415, StatusReason::UnsupportedMediaType, msg)
}

fn parse<M: Message + Default>(raw: &[u8]) -> Result<M> {
    M::decode(raw).map_err(|e| Error::Malformed(e.to_string()))
}

/// The object of `kind`, by the kinds of the registry plus the bodies of subresources.
fn object(api_version: &str, kind: &str, raw: &[u8]) -> Result<Value> {
    let served = registry::find_kind(api_version, kind).is_some()
        || matches!(
            (api_version, kind),
            ("v1", "Binding") | ("autoscaling/v1", "Scale")
        );
    if !served {
        return Err(Error::Unsupported(
            "this server does not serve that kind".into(),
        ));
    }
    match kind {
        "Namespace" => namespace(parse(raw)?),
        "Secret" => secret(parse(raw)?),
        "ConfigMap" => config_map(parse(raw)?),
        "Service" => service(parse(raw)?),
        "Binding" => binding(parse(raw)?),
        "Deployment" => deployment(parse(raw)?),
        "ReplicaSet" => replica_set(parse(raw)?),
        "Scale" => scale(parse(raw)?),
        "Ingress" => ingress(parse(raw)?),
        "IngressClass" => ingress_class(parse(raw)?),
        "Lease" => lease(parse(raw)?),
        // Node, Pod, Event, EndpointSlice: no kubectl generator creates them and weir's own
        // components write them as JSON.
        _ => Err(Error::Unsupported(
            "protobuf decoding of this kind is not implemented".into(),
        )),
    }
}

/// Refuses a field this decoder does not convert when the client set it.
fn not_set(field: &str, set: bool) -> Result<()> {
    if set {
        return Err(Error::Unsupported(format!(
            "field {field} is not supported in protobuf bodies"
        )));
    }
    Ok(())
}

/// A JSON object built field by field with Go's `omitempty` rules.
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn set(mut self, key: &str, v: Value) -> Self {
        if !v.is_null() {
            self.0.insert(key.into(), v);
        }
        self
    }

    fn str(self, key: &str, v: Option<String>) -> Self {
        match v.filter(|s| !s.is_empty()) {
            Some(s) => self.set(key, Value::String(s)),
            None => self,
        }
    }

    /// A `*string`, where `""` was set on purpose.
    fn keep_str(self, key: &str, v: Option<String>) -> Self {
        match v {
            Some(s) => self.set(key, Value::String(s)),
            None => self,
        }
    }

    fn int<N: Into<Value> + Default + PartialEq>(self, key: &str, v: Option<N>) -> Self {
        match v.filter(|n| *n != N::default()) {
            Some(n) => self.set(key, n.into()),
            None => self,
        }
    }

    /// A `*int32`/`*int64`, where 0 was set on purpose.
    fn keep_int<N: Into<Value>>(self, key: &str, v: Option<N>) -> Self {
        match v {
            Some(n) => self.set(key, n.into()),
            None => self,
        }
    }

    fn bool(self, key: &str, v: Option<bool>) -> Self {
        match v {
            Some(true) => self.set(key, Value::Bool(true)),
            _ => self,
        }
    }

    /// A `*bool`, where `false` was set on purpose.
    fn keep_bool(self, key: &str, v: Option<bool>) -> Self {
        match v {
            Some(b) => self.set(key, Value::Bool(b)),
            None => self,
        }
    }

    fn strs(self, key: &str, v: Vec<String>) -> Self {
        if v.is_empty() {
            return self;
        }
        self.set(key, Value::from(v))
    }

    fn string_map(self, key: &str, v: BTreeMap<String, String>) -> Self {
        if v.is_empty() {
            return self;
        }
        let m = v.into_iter().map(|(k, s)| (k, Value::String(s))).collect();
        self.set(key, Value::Object(m))
    }

    /// `map[string][]byte`: base64 values, as Go's JSON writes `[]byte`.
    fn bytes_map(self, key: &str, v: BTreeMap<String, Vec<u8>>) -> Self {
        if v.is_empty() {
            return self;
        }
        let m = v.into_iter().map(|(k, b)| (k, base64(&b))).collect();
        self.set(key, Value::Object(m))
    }

    fn quantities(self, key: &str, v: BTreeMap<String, Quantity>) -> Self {
        if v.is_empty() {
            return self;
        }
        let m = v.into_iter().map(|(k, q)| (k, quantity(q))).collect();
        self.set(key, Value::Object(m))
    }

    fn obj<T>(self, key: &str, v: Option<T>, f: impl FnOnce(T) -> Result<Value>) -> Result<Self> {
        Ok(match v {
            Some(t) => self.set(key, f(t)?),
            None => self,
        })
    }

    fn list<T>(self, key: &str, v: Vec<T>, f: impl Fn(T) -> Result<Value>) -> Result<Self> {
        if v.is_empty() {
            return Ok(self);
        }
        let items = v.into_iter().map(f).collect::<Result<Vec<_>>>()?;
        Ok(self.set(key, Value::Array(items)))
    }

    fn done(self) -> Value {
        Value::Object(self.0)
    }

    fn ok(self) -> Result<Value> {
        Ok(self.done())
    }
}

fn base64(b: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(b))
}

/// Go's zero `Quantity` marshals as `"0"`.
fn quantity(q: Quantity) -> Value {
    let Quantity { string } = q;
    Value::String(
        string
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "0".into()),
    )
}

fn int_or_string(v: IntOrString) -> Result<Value> {
    let IntOrString {
        r#type,
        int_val,
        str_val,
    } = v;
    match r#type.unwrap_or_default() {
        0 => Ok(Value::from(int_val.unwrap_or_default())),
        1 => Ok(Value::String(str_val.unwrap_or_default())),
        other => Err(Error::Malformed(format!(
            "IntOrString of unknown type {other}"
        ))),
    }
}

fn timestamp(seconds: Option<i64>, nanos: Option<i32>) -> Result<Option<Timestamp>> {
    // An empty Time message is Go's zero time, which marshals as null.
    if seconds.is_none() && nanos.is_none() {
        return Ok(None);
    }
    let (s, n) = (seconds.unwrap_or_default(), nanos.unwrap_or_default());
    Timestamp::new(s, n)
        .map(Some)
        .map_err(|e| Error::Malformed(format!("time {s}s {n}ns is out of range: {e}")))
}

/// `metav1.Time`: RFC 3339 in whole seconds, through k8s-openapi's own serialisation so the
/// text is the JSON path's.
fn time(t: meta::Time) -> Result<Value> {
    let meta::Time { seconds, nanos } = t;
    to_json(timestamp(seconds, nanos)?.map(openapi_meta::Time))
}

/// `metav1.MicroTime`: RFC 3339 with microseconds.
fn micro_time(t: meta::MicroTime) -> Result<Value> {
    let meta::MicroTime { seconds, nanos } = t;
    to_json(timestamp(seconds, nanos)?.map(openapi_meta::MicroTime))
}

fn to_json<T: serde::Serialize>(v: Option<T>) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Malformed(e.to_string()))
}

fn object_meta(m: meta::ObjectMeta) -> Result<Value> {
    let meta::ObjectMeta {
        name,
        generate_name,
        namespace,
        self_link,
        uid,
        resource_version,
        generation,
        creation_timestamp,
        deletion_timestamp,
        deletion_grace_period_seconds,
        labels,
        annotations,
        owner_references,
        finalizers,
        managed_fields,
    } = m;
    Obj::default()
        .str("name", name)
        .str("generateName", generate_name)
        .str("namespace", namespace)
        .str("selfLink", self_link)
        .str("uid", uid)
        .str("resourceVersion", resource_version)
        .int("generation", generation)
        .obj("creationTimestamp", creation_timestamp, time)?
        .obj("deletionTimestamp", deletion_timestamp, time)?
        .keep_int("deletionGracePeriodSeconds", deletion_grace_period_seconds)
        .string_map("labels", labels)
        .string_map("annotations", annotations)
        .list("ownerReferences", owner_references, owner_reference)?
        .strs("finalizers", finalizers)
        .list("managedFields", managed_fields, managed_fields_entry)
        .map(Obj::done)
}

fn owner_reference(r: meta::OwnerReference) -> Result<Value> {
    let meta::OwnerReference {
        api_version,
        kind,
        name,
        uid,
        controller,
        block_owner_deletion,
    } = r;
    Ok(Obj::default()
        .str("apiVersion", api_version)
        .str("kind", kind)
        .str("name", name)
        .str("uid", uid)
        .keep_bool("controller", controller)
        .keep_bool("blockOwnerDeletion", block_owner_deletion)
        .done())
}

fn managed_fields_entry(e: meta::ManagedFieldsEntry) -> Result<Value> {
    let meta::ManagedFieldsEntry {
        manager,
        operation,
        api_version,
        time: at,
        fields_type,
        fields_v1,
        subresource,
    } = e;
    Obj::default()
        .str("manager", manager)
        .str("operation", operation)
        .str("apiVersion", api_version)
        .obj("time", at, time)?
        .str("fieldsType", fields_type)
        .obj("fieldsV1", fields_v1, |meta::FieldsV1 { raw }| {
            raw_json("fieldsV1", raw)
        })?
        .str("subresource", subresource)
        .ok()
}

/// `FieldsV1` and `RawExtension` carry JSON text, which Go's JSON writes as is.
fn raw_json(field: &str, raw: Option<Vec<u8>>) -> Result<Value> {
    match raw.filter(|r| !r.is_empty()) {
        Some(r) => serde_json::from_slice(&r)
            .map_err(|e| Error::Malformed(format!("{field} holds no valid JSON: {e}"))),
        None => Ok(Value::Null),
    }
}

fn label_selector(s: meta::LabelSelector) -> Result<Value> {
    let meta::LabelSelector {
        match_labels,
        match_expressions,
    } = s;
    Obj::default()
        .string_map("matchLabels", match_labels)
        .list("matchExpressions", match_expressions, |r| {
            let meta::LabelSelectorRequirement {
                key,
                operator,
                values,
            } = r;
            Ok(Obj::default()
                .str("key", key)
                .str("operator", operator)
                .strs("values", values)
                .done())
        })
        .map(Obj::done)
}

fn namespace(ns: core::v1::Namespace) -> Result<Value> {
    let core::v1::Namespace {
        metadata,
        spec,
        status,
    } = ns;
    Obj::default()
        .obj("metadata", metadata, object_meta)?
        .obj("spec", spec, |s| {
            let core::v1::NamespaceSpec { finalizers } = s;
            Ok(Obj::default().strs("finalizers", finalizers).done())
        })?
        .obj("status", status, |s| {
            let core::v1::NamespaceStatus { phase, conditions } = s;
            Obj::default()
                .str("phase", phase)
                .list("conditions", conditions, |c| {
                    let core::v1::NamespaceCondition {
                        r#type,
                        status,
                        last_transition_time,
                        reason,
                        message,
                    } = c;
                    Obj::default()
                        .str("type", r#type)
                        .str("status", status)
                        .obj("lastTransitionTime", last_transition_time, time)?
                        .str("reason", reason)
                        .str("message", message)
                        .ok()
                })
                .map(Obj::done)
        })
        .map(Obj::done)
}

fn secret(s: core::v1::Secret) -> Result<Value> {
    let core::v1::Secret {
        metadata,
        immutable,
        data,
        string_data,
        r#type,
    } = s;
    Ok(Obj::default()
        .obj("metadata", metadata, object_meta)?
        .keep_bool("immutable", immutable)
        .bytes_map("data", data)
        .string_map("stringData", string_data)
        .str("type", r#type)
        .done())
}

fn config_map(c: core::v1::ConfigMap) -> Result<Value> {
    let core::v1::ConfigMap {
        metadata,
        immutable,
        data,
        binary_data,
    } = c;
    Ok(Obj::default()
        .obj("metadata", metadata, object_meta)?
        .keep_bool("immutable", immutable)
        .string_map("data", data)
        .bytes_map("binaryData", binary_data)
        .done())
}

fn binding(b: core::v1::Binding) -> Result<Value> {
    let core::v1::Binding { metadata, target } = b;
    Obj::default()
        .obj("metadata", metadata, object_meta)?
        .obj("target", target, |t| {
            let core::v1::ObjectReference {
                kind,
                namespace,
                name,
                uid,
                api_version,
                resource_version,
                field_path,
            } = t;
            Ok(Obj::default()
                .str("kind", kind)
                .str("namespace", namespace)
                .str("name", name)
                .str("uid", uid)
                .str("apiVersion", api_version)
                .str("resourceVersion", resource_version)
                .str("fieldPath", field_path)
                .done())
        })
        .map(Obj::done)
}

fn service(s: core::v1::Service) -> Result<Value> {
    let core::v1::Service {
        metadata,
        spec,
        status,
    } = s;
    Obj::default()
        .obj("metadata", metadata, object_meta)?
        .obj("spec", spec, service_spec)?
        .obj("status", status, |s| {
            let core::v1::ServiceStatus {
                load_balancer,
                conditions,
            } = s;
            not_set(
                "status.loadBalancer.ingress",
                load_balancer
                    .is_some_and(|core::v1::LoadBalancerStatus { ingress }| !ingress.is_empty()),
            )?;
            not_set("status.conditions", !conditions.is_empty())?;
            Ok(Obj::default()
                .set("loadBalancer", Value::Object(Map::new()))
                .done())
        })
        .map(Obj::done)
}

fn service_spec(s: core::v1::ServiceSpec) -> Result<Value> {
    let core::v1::ServiceSpec {
        ports,
        selector,
        cluster_ip,
        cluster_ips,
        r#type,
        external_ips,
        session_affinity,
        load_balancer_ip,
        load_balancer_source_ranges,
        external_name,
        external_traffic_policy,
        health_check_node_port,
        publish_not_ready_addresses,
        session_affinity_config,
        ip_families,
        ip_family_policy,
        allocate_load_balancer_node_ports,
        load_balancer_class,
        internal_traffic_policy,
        traffic_distribution,
    } = s;
    not_set(
        "spec.sessionAffinityConfig",
        session_affinity_config.is_some(),
    )?;
    Obj::default()
        .list("ports", ports, |p| {
            let core::v1::ServicePort {
                name,
                protocol,
                app_protocol,
                port,
                target_port,
                node_port,
            } = p;
            Obj::default()
                .str("name", name)
                .str("protocol", protocol)
                .str("appProtocol", app_protocol)
                .int("port", port)
                .obj("targetPort", target_port, int_or_string)?
                .int("nodePort", node_port)
                .ok()
        })?
        .string_map("selector", selector)
        .str("clusterIP", cluster_ip)
        .strs("clusterIPs", cluster_ips)
        .str("type", r#type)
        .strs("externalIPs", external_ips)
        .str("sessionAffinity", session_affinity)
        .str("loadBalancerIP", load_balancer_ip)
        .strs("loadBalancerSourceRanges", load_balancer_source_ranges)
        .str("externalName", external_name)
        .str("externalTrafficPolicy", external_traffic_policy)
        .int("healthCheckNodePort", health_check_node_port)
        .bool("publishNotReadyAddresses", publish_not_ready_addresses)
        .strs("ipFamilies", ip_families)
        .str("ipFamilyPolicy", ip_family_policy)
        .keep_bool(
            "allocateLoadBalancerNodePorts",
            allocate_load_balancer_node_ports,
        )
        .str("loadBalancerClass", load_balancer_class)
        .str("internalTrafficPolicy", internal_traffic_policy)
        .str("trafficDistribution", traffic_distribution)
        .ok()
}

fn deployment(d: apps::v1::Deployment) -> Result<Value> {
    let apps::v1::Deployment {
        metadata,
        spec,
        status,
    } = d;
    Obj::default()
        .obj("metadata", metadata, object_meta)?
        .obj("spec", spec, |s| {
            let apps::v1::DeploymentSpec {
                replicas,
                selector,
                template,
                strategy,
                min_ready_seconds,
                revision_history_limit,
                paused,
                progress_deadline_seconds,
            } = s;
            Obj::default()
                .keep_int("replicas", replicas)
                .obj("selector", selector, label_selector)?
                .obj("template", template, pod_template)?
                .obj("strategy", strategy, |st| {
                    let apps::v1::DeploymentStrategy {
                        r#type,
                        rolling_update,
                    } = st;
                    Obj::default()
                        .str("type", r#type)
                        .obj("rollingUpdate", rolling_update, |r| {
                            let apps::v1::RollingUpdateDeployment {
                                max_unavailable,
                                max_surge,
                            } = r;
                            Obj::default()
                                .obj("maxUnavailable", max_unavailable, int_or_string)?
                                .obj("maxSurge", max_surge, int_or_string)
                                .map(Obj::done)
                        })
                        .map(Obj::done)
                })?
                .int("minReadySeconds", min_ready_seconds)
                .keep_int("revisionHistoryLimit", revision_history_limit)
                .bool("paused", paused)
                .keep_int("progressDeadlineSeconds", progress_deadline_seconds)
                .ok()
        })?
        .obj("status", status, |s| {
            let apps::v1::DeploymentStatus {
                observed_generation,
                replicas,
                updated_replicas,
                ready_replicas,
                available_replicas,
                unavailable_replicas,
                terminating_replicas,
                conditions,
                collision_count,
            } = s;
            not_set("status.conditions", !conditions.is_empty())?;
            Ok(Obj::default()
                .int("observedGeneration", observed_generation)
                .int("replicas", replicas)
                .int("updatedReplicas", updated_replicas)
                .int("readyReplicas", ready_replicas)
                .int("availableReplicas", available_replicas)
                .int("unavailableReplicas", unavailable_replicas)
                .keep_int("terminatingReplicas", terminating_replicas)
                .keep_int("collisionCount", collision_count)
                .done())
        })
        .map(Obj::done)
}

fn replica_set(r: apps::v1::ReplicaSet) -> Result<Value> {
    let apps::v1::ReplicaSet {
        metadata,
        spec,
        status,
    } = r;
    Obj::default()
        .obj("metadata", metadata, object_meta)?
        .obj("spec", spec, |s| {
            let apps::v1::ReplicaSetSpec {
                replicas,
                min_ready_seconds,
                selector,
                template,
            } = s;
            Obj::default()
                .keep_int("replicas", replicas)
                .int("minReadySeconds", min_ready_seconds)
                .obj("selector", selector, label_selector)?
                .obj("template", template, pod_template)?
                .ok()
        })?
        .obj("status", status, |s| {
            let apps::v1::ReplicaSetStatus {
                replicas,
                fully_labeled_replicas,
                ready_replicas,
                available_replicas,
                terminating_replicas,
                observed_generation,
                conditions,
            } = s;
            not_set("status.conditions", !conditions.is_empty())?;
            Obj::default()
                .int("replicas", replicas)
                .int("fullyLabeledReplicas", fully_labeled_replicas)
                .int("readyReplicas", ready_replicas)
                .int("availableReplicas", available_replicas)
                .keep_int("terminatingReplicas", terminating_replicas)
                .int("observedGeneration", observed_generation)
                .ok()
        })
        .map(Obj::done)
}

fn scale(s: autoscaling::v1::Scale) -> Result<Value> {
    let autoscaling::v1::Scale {
        metadata,
        spec,
        status,
    } = s;
    Obj::default()
        .obj("metadata", metadata, object_meta)?
        // ScaleSpec.replicas is a plain int32, but 0 there means "scale to zero".
        .obj("spec", spec, |s| {
            let autoscaling::v1::ScaleSpec { replicas } = s;
            Ok(Obj::default().keep_int("replicas", replicas).done())
        })?
        .obj("status", status, |s| {
            let autoscaling::v1::ScaleStatus { replicas, selector } = s;
            Ok(Obj::default()
                .keep_int("replicas", replicas)
                .str("selector", selector)
                .done())
        })
        .map(Obj::done)
}

fn pod_template(t: core::v1::PodTemplateSpec) -> Result<Value> {
    let core::v1::PodTemplateSpec { metadata, spec } = t;
    Obj::default()
        .obj("metadata", metadata, object_meta)?
        .obj("spec", spec, pod_spec)
        .map(Obj::done)
}

fn pod_spec(s: core::v1::PodSpec) -> Result<Value> {
    let core::v1::PodSpec {
        volumes,
        init_containers,
        containers,
        ephemeral_containers,
        restart_policy,
        termination_grace_period_seconds,
        active_deadline_seconds,
        dns_policy,
        node_selector,
        service_account_name,
        service_account,
        automount_service_account_token,
        node_name,
        host_network,
        host_pid,
        host_ipc,
        share_process_namespace,
        security_context,
        image_pull_secrets,
        hostname,
        subdomain,
        affinity,
        scheduler_name,
        tolerations,
        host_aliases,
        priority_class_name,
        priority,
        dns_config,
        readiness_gates,
        runtime_class_name,
        enable_service_links,
        preemption_policy,
        overhead,
        topology_spread_constraints,
        set_hostname_as_fqdn,
        os,
        host_users,
        scheduling_gates,
        resource_claims,
        resources,
        hostname_override,
        workload_ref,
    } = s;
    for (field, set) in [
        ("volumes", !volumes.is_empty()),
        ("ephemeralContainers", !ephemeral_containers.is_empty()),
        ("securityContext", security_context.is_some()),
        ("affinity", affinity.is_some()),
        ("tolerations", !tolerations.is_empty()),
        ("hostAliases", !host_aliases.is_empty()),
        ("dnsConfig", dns_config.is_some()),
        ("readinessGates", !readiness_gates.is_empty()),
        ("overhead", !overhead.is_empty()),
        (
            "topologySpreadConstraints",
            !topology_spread_constraints.is_empty(),
        ),
        ("os", os.is_some()),
        ("schedulingGates", !scheduling_gates.is_empty()),
        ("resourceClaims", !resource_claims.is_empty()),
        ("resources", resources.is_some()),
        ("hostnameOverride", hostname_override.is_some()),
        ("workloadRef", workload_ref.is_some()),
    ] {
        not_set(&format!("spec.{field}"), set)?;
    }
    Obj::default()
        .list("initContainers", init_containers, container)?
        .list("containers", containers, container)?
        .str("restartPolicy", restart_policy)
        .keep_int(
            "terminationGracePeriodSeconds",
            termination_grace_period_seconds,
        )
        .keep_int("activeDeadlineSeconds", active_deadline_seconds)
        .str("dnsPolicy", dns_policy)
        .string_map("nodeSelector", node_selector)
        .str("serviceAccountName", service_account_name)
        .str("serviceAccount", service_account)
        .keep_bool(
            "automountServiceAccountToken",
            automount_service_account_token,
        )
        .str("nodeName", node_name)
        .bool("hostNetwork", host_network)
        .bool("hostPID", host_pid)
        .bool("hostIPC", host_ipc)
        .keep_bool("shareProcessNamespace", share_process_namespace)
        .list("imagePullSecrets", image_pull_secrets, |r| {
            let core::v1::LocalObjectReference { name } = r;
            Ok(Obj::default().str("name", name).done())
        })?
        .str("hostname", hostname)
        .str("subdomain", subdomain)
        .str("schedulerName", scheduler_name)
        .str("priorityClassName", priority_class_name)
        .keep_int("priority", priority)
        .keep_str("runtimeClassName", runtime_class_name)
        .keep_bool("enableServiceLinks", enable_service_links)
        .keep_str("preemptionPolicy", preemption_policy)
        .keep_bool("setHostnameAsFQDN", set_hostname_as_fqdn)
        .keep_bool("hostUsers", host_users)
        .ok()
}

fn container(c: core::v1::Container) -> Result<Value> {
    let core::v1::Container {
        name,
        image,
        command,
        args,
        working_dir,
        ports,
        env_from,
        env,
        resources,
        resize_policy,
        restart_policy,
        restart_policy_rules,
        volume_mounts,
        volume_devices,
        liveness_probe,
        readiness_probe,
        startup_probe,
        lifecycle,
        termination_message_path,
        termination_message_policy,
        image_pull_policy,
        security_context,
        stdin,
        stdin_once,
        tty,
    } = c;
    for (field, set) in [
        ("envFrom", !env_from.is_empty()),
        ("resizePolicy", !resize_policy.is_empty()),
        ("restartPolicyRules", !restart_policy_rules.is_empty()),
        ("volumeDevices", !volume_devices.is_empty()),
        ("livenessProbe", liveness_probe.is_some()),
        ("readinessProbe", readiness_probe.is_some()),
        ("startupProbe", startup_probe.is_some()),
        ("lifecycle", lifecycle.is_some()),
        ("securityContext", security_context.is_some()),
    ] {
        not_set(&format!("containers[].{field}"), set)?;
    }
    Obj::default()
        .str("name", name)
        .str("image", image)
        .strs("command", command)
        .strs("args", args)
        .str("workingDir", working_dir)
        .list("ports", ports, |p| {
            let core::v1::ContainerPort {
                name,
                host_port,
                container_port,
                protocol,
                host_ip,
            } = p;
            Ok(Obj::default()
                .str("name", name)
                .int("hostPort", host_port)
                .int("containerPort", container_port)
                .str("protocol", protocol)
                .str("hostIP", host_ip)
                .done())
        })?
        .list("env", env, |e| {
            let core::v1::EnvVar {
                name,
                value,
                value_from,
            } = e;
            not_set("containers[].env[].valueFrom", value_from.is_some())?;
            Ok(Obj::default().str("name", name).str("value", value).done())
        })?
        .obj("resources", resources, |r| {
            let core::v1::ResourceRequirements {
                limits,
                requests,
                claims,
            } = r;
            not_set("containers[].resources.claims", !claims.is_empty())?;
            Ok(Obj::default()
                .quantities("limits", limits)
                .quantities("requests", requests)
                .done())
        })?
        .keep_str("restartPolicy", restart_policy)
        .list("volumeMounts", volume_mounts, |m| {
            let core::v1::VolumeMount {
                name,
                read_only,
                recursive_read_only,
                mount_path,
                sub_path,
                mount_propagation,
                sub_path_expr,
            } = m;
            Ok(Obj::default()
                .str("name", name)
                .bool("readOnly", read_only)
                .keep_str("recursiveReadOnly", recursive_read_only)
                .str("mountPath", mount_path)
                .str("subPath", sub_path)
                .keep_str("mountPropagation", mount_propagation)
                .str("subPathExpr", sub_path_expr)
                .done())
        })?
        .str("terminationMessagePath", termination_message_path)
        .str("terminationMessagePolicy", termination_message_policy)
        .str("imagePullPolicy", image_pull_policy)
        .bool("stdin", stdin)
        .bool("stdinOnce", stdin_once)
        .bool("tty", tty)
        .ok()
}

fn ingress(i: networking::v1::Ingress) -> Result<Value> {
    let networking::v1::Ingress {
        metadata,
        spec,
        status,
    } = i;
    Obj::default()
        .obj("metadata", metadata, object_meta)?
        .obj("spec", spec, |s| {
            let networking::v1::IngressSpec {
                ingress_class_name,
                default_backend,
                tls,
                rules,
            } = s;
            Obj::default()
                .keep_str("ingressClassName", ingress_class_name)
                .obj("defaultBackend", default_backend, ingress_backend)?
                .list("tls", tls, |t| {
                    let networking::v1::IngressTls { hosts, secret_name } = t;
                    Ok(Obj::default()
                        .strs("hosts", hosts)
                        .str("secretName", secret_name)
                        .done())
                })?
                .list("rules", rules, |r| {
                    let networking::v1::IngressRule {
                        host,
                        ingress_rule_value,
                    } = r;
                    // IngressRuleValue is inlined in Go's JSON: `http` sits in the rule.
                    let http = ingress_rule_value
                        .and_then(|networking::v1::IngressRuleValue { http }| http);
                    Obj::default()
                        .str("host", host)
                        .obj("http", http, |h| {
                            let networking::v1::HttpIngressRuleValue { paths } = h;
                            Obj::default()
                                .list("paths", paths, |p| {
                                    let networking::v1::HttpIngressPath {
                                        path,
                                        path_type,
                                        backend,
                                    } = p;
                                    Obj::default()
                                        .str("path", path)
                                        .keep_str("pathType", path_type)
                                        .obj("backend", backend, ingress_backend)
                                        .map(Obj::done)
                                })
                                .map(Obj::done)
                        })
                        .map(Obj::done)
                })
                .map(Obj::done)
        })?
        .obj("status", status, |s| {
            let networking::v1::IngressStatus { load_balancer } = s;
            not_set(
                "status.loadBalancer.ingress",
                load_balancer.is_some_and(
                    |networking::v1::IngressLoadBalancerStatus { ingress }| !ingress.is_empty(),
                ),
            )?;
            Ok(Obj::default()
                .set("loadBalancer", Value::Object(Map::new()))
                .done())
        })
        .map(Obj::done)
}

fn ingress_backend(b: networking::v1::IngressBackend) -> Result<Value> {
    let networking::v1::IngressBackend { service, resource } = b;
    not_set("backend.resource", resource.is_some())?;
    Obj::default()
        .obj("service", service, |s| {
            let networking::v1::IngressServiceBackend { name, port } = s;
            Ok(Obj::default()
                .str("name", name)
                .obj("port", port, |p| {
                    let networking::v1::ServiceBackendPort { name, number } = p;
                    Ok(Obj::default()
                        .str("name", name)
                        .int("number", number)
                        .done())
                })?
                .done())
        })
        .map(Obj::done)
}

fn ingress_class(c: networking::v1::IngressClass) -> Result<Value> {
    let networking::v1::IngressClass { metadata, spec } = c;
    Obj::default()
        .obj("metadata", metadata, object_meta)?
        .obj("spec", spec, |s| {
            let networking::v1::IngressClassSpec {
                controller,
                parameters,
            } = s;
            Obj::default()
                .str("controller", controller)
                .obj("parameters", parameters, |p| {
                    let networking::v1::IngressClassParametersReference {
                        a_pi_group,
                        kind,
                        name,
                        scope,
                        namespace,
                    } = p;
                    Ok(Obj::default()
                        .keep_str("apiGroup", a_pi_group)
                        .str("kind", kind)
                        .str("name", name)
                        .keep_str("scope", scope)
                        .keep_str("namespace", namespace)
                        .done())
                })
                .map(Obj::done)
        })
        .map(Obj::done)
}

fn lease(l: coordination::v1::Lease) -> Result<Value> {
    let coordination::v1::Lease { metadata, spec } = l;
    Obj::default()
        .obj("metadata", metadata, object_meta)?
        .obj("spec", spec, |s| {
            let coordination::v1::LeaseSpec {
                holder_identity,
                lease_duration_seconds,
                acquire_time,
                renew_time,
                lease_transitions,
                strategy,
                preferred_holder,
            } = s;
            Obj::default()
                .keep_str("holderIdentity", holder_identity)
                .keep_int("leaseDurationSeconds", lease_duration_seconds)
                .obj("acquireTime", acquire_time, micro_time)?
                .obj("renewTime", renew_time, micro_time)?
                .keep_int("leaseTransitions", lease_transitions)
                .keep_str("strategy", strategy)
                .keep_str("preferredHolder", preferred_holder)
                .ok()
        })
        .map(Obj::done)
}

#[cfg(test)]
mod tests;
