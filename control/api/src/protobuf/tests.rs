//! The decoder against bodies captured from kubectl 1.32 (`testdata/`, one per
//! `kubectl create <generator>`), against messages built with the k8s-pb types for each
//! type with a custom JSON form, and against garbage and truncation.

use k8s_pb::apimachinery::pkg::runtime::TypeMeta;
use serde_json::json;

use super::*;
use crate::admission::{decode as admit, parse_body};
use crate::registry::find_kind;

const NAMESPACE: &[u8] = include_bytes!("testdata/kubectl-create-namespaces.pb");
const SECRET: &[u8] = include_bytes!("testdata/kubectl-create-secrets.pb");
const CONFIGMAP: &[u8] = include_bytes!("testdata/kubectl-create-configmaps.pb");
const DEPLOYMENT: &[u8] = include_bytes!("testdata/kubectl-create-deployments.pb");
const SERVICE: &[u8] = include_bytes!("testdata/kubectl-create-services.pb");
const INGRESS: &[u8] = include_bytes!("testdata/kubectl-create-ingresses.pb");

const CAPTURED: &[&[u8]] = &[NAMESPACE, SECRET, CONFIGMAP, DEPLOYMENT, SERVICE, INGRESS];

/// The body client-go sends for `obj`: magic, then `Unknown{typeMeta, raw}`.
fn envelope(api_version: &str, kind: &str, obj: &impl Message) -> Vec<u8> {
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
        }),
        raw: Some(obj.encode_to_vec()),
        ..Unknown::default()
    };
    let mut body = MAGIC.to_vec();
    body.extend(unknown.encode_to_vec());
    body
}

fn object_meta(name: &str) -> Option<meta::ObjectMeta> {
    Some(meta::ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    })
}

/// Decodes by media type and admits as the resource the envelope names, strictly: the JSON
/// the decoder makes must hold only fields the k8s-openapi type declares.
fn admitted(body: &[u8]) -> Value {
    let parsed = parse_body(body, MEDIA_TYPE).expect("protobuf body");
    let res = find_kind(
        parsed["apiVersion"].as_str().expect("apiVersion"),
        parsed["kind"].as_str().expect("kind"),
    )
    .expect("served kind");
    admit(res, body, "application/vnd.kubernetes.protobuf", true).expect("admitted")
}

#[test]
fn kubectl_create_namespace_decodes_as_go_marshals_it() {
    // Go's JSON of the same object: zero strings, the zero generation and the zero
    // creationTimestamp are left out; empty structs stay.
    assert_eq!(
        decode(NAMESPACE).expect("namespace"),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}, "spec": {}, "status": {}})
    );
}

#[test]
fn kubectl_create_secret_data_is_base64_of_the_bytes() {
    // kubectl create secret generic s --from-literal=a=b --from-literal=bin=$'\x01\x02'
    let secret = admitted(SECRET);
    assert_eq!(secret["data"], json!({"a": "Yg==", "bin": "AQI="}));
    // The namespace is in the URL only, as typed clients send it.
    assert_eq!(secret["metadata"], json!({"name": "s"}));
}

#[test]
fn kubectl_create_configmap_and_ingress() {
    let cm = admitted(CONFIGMAP);
    assert_eq!(cm["data"], json!({"k": "v"}));
    // kubectl create ingress ing --rule="foo.com/bar=svc1:8080,tls=my-cert"
    let ing = admitted(INGRESS);
    assert_eq!(
        ing["spec"],
        json!({
            "rules": [{"host": "foo.com", "http": {"paths": [{
                "path": "/bar",
                "pathType": "Exact",
                "backend": {"service": {"name": "svc1", "port": {"number": 8080}}},
            }]}}],
            "tls": [{"hosts": ["foo.com"], "secretName": "my-cert"}],
        })
    );
}

#[test]
fn kubectl_create_deployment_keeps_an_explicit_zero_and_drops_plain_zeros() {
    // kubectl create deployment d --image=nginx --replicas=0 -- sleep 10
    let d = admitted(DEPLOYMENT);
    assert_eq!(
        d["spec"]["replicas"], 0,
        "replicas is a pointer: 0 was asked for"
    );
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"],
        json!([{"name": "nginx", "image": "nginx", "command": ["sleep", "10"], "resources": {}}])
    );
    for plain in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(pod.get(plain).is_none(), "{plain} false is omitted: {pod}");
    }
    assert!(d["spec"].get("paused").is_none());
    assert!(
        d["spec"]["template"]["metadata"]
            .get("creationTimestamp")
            .is_none()
    );
}

#[test]
fn kubectl_create_service_target_port_is_an_int_or_string() {
    // kubectl create service clusterip svc --tcp=80:8080
    let svc = admitted(SERVICE);
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080}])
    );
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["selector"], json!({"app": "svc"}));

    // Go writes all three IntOrString fields; the type decides which one counts.
    let svc = core::v1::Service {
        metadata: object_meta("web"),
        spec: Some(core::v1::ServiceSpec {
            ports: vec![core::v1::ServicePort {
                port: Some(80),
                target_port: Some(IntOrString {
                    r#type: Some(1),
                    int_val: Some(0),
                    str_val: Some("http".into()),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    };
    let obj = admitted(&envelope("v1", "Service", &svc));
    assert_eq!(obj["spec"]["ports"][0]["targetPort"], "http");
}

#[test]
fn quantities_are_strings_and_times_rfc3339() {
    let container = core::v1::Container {
        name: Some("a".into()),
        image: Some("x".into()),
        resources: Some(core::v1::ResourceRequirements {
            limits: [(
                "cpu".to_string(),
                Quantity {
                    string: Some("500m".into()),
                },
            )]
            .into(),
            requests: [("memory".to_string(), Quantity::default())].into(),
            claims: vec![],
        }),
        ..Default::default()
    };
    let mut metadata = object_meta("d");
    if let Some(m) = metadata.as_mut() {
        m.creation_timestamp = Some(meta::Time {
            seconds: Some(1_700_000_000),
            nanos: Some(999_999_999),
        });
    }
    let deploy = apps::v1::Deployment {
        metadata,
        spec: Some(apps::v1::DeploymentSpec {
            template: Some(core::v1::PodTemplateSpec {
                metadata: None,
                spec: Some(core::v1::PodSpec {
                    containers: vec![container],
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
        status: None,
    };
    let obj = admitted(&envelope("apps/v1", "Deployment", &deploy));
    assert_eq!(
        obj["spec"]["template"]["spec"]["containers"][0]["resources"],
        json!({"limits": {"cpu": "500m"}, "requests": {"memory": "0"}})
    );
    // metav1.Time marshals whole seconds.
    assert_eq!(obj["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z");

    let lease = coordination::v1::Lease {
        metadata: object_meta("l"),
        spec: Some(coordination::v1::LeaseSpec {
            renew_time: Some(meta::MicroTime {
                seconds: Some(1_700_000_000),
                nanos: Some(123_456_789),
            }),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    };
    let obj = admitted(&envelope("coordination.k8s.io/v1", "Lease", &lease));
    assert_eq!(
        obj["spec"],
        json!({"renewTime": "2023-11-14T22:13:20.123456Z", "leaseTransitions": 0})
    );

    let mut metadata = object_meta("late");
    if let Some(m) = metadata.as_mut() {
        m.creation_timestamp = Some(meta::Time {
            seconds: Some(i64::MAX),
            nanos: None,
        });
    }
    let ns = core::v1::Namespace {
        metadata,
        ..Default::default()
    };
    let err = decode(&envelope("v1", "Namespace", &ns)).expect_err("out of range");
    assert_eq!(err.code, 400);
    assert!(err.message.contains("out of range"), "{}", err.message);
}

#[test]
fn managed_fields_carry_their_json() {
    let mut metadata = object_meta("c");
    if let Some(m) = metadata.as_mut() {
        m.managed_fields.push(meta::ManagedFieldsEntry {
            manager: Some("kubectl".into()),
            fields_v1: Some(meta::FieldsV1 {
                raw: Some(br#"{"f:data":{"f:a":{}}}"#.to_vec()),
            }),
            ..Default::default()
        });
    }
    let cm = core::v1::ConfigMap {
        metadata: metadata.clone(),
        ..Default::default()
    };
    let obj = admitted(&envelope("v1", "ConfigMap", &cm));
    assert_eq!(
        obj["metadata"]["managedFields"],
        json!([{"manager": "kubectl", "fieldsV1": {"f:data": {"f:a": {}}}}])
    );

    if let Some(m) = metadata.as_mut() {
        m.managed_fields[0].fields_v1 = Some(meta::FieldsV1 {
            raw: Some(b"{not json".to_vec()),
        });
    }
    let cm = core::v1::ConfigMap {
        metadata,
        ..Default::default()
    };
    let err = decode(&envelope("v1", "ConfigMap", &cm)).expect_err("bad raw");
    assert_eq!(err.code, 400);
    assert!(
        err.message
            .starts_with("error decoding protobuf body: ConfigMap: fieldsV1 holds no valid JSON"),
        "{}",
        err.message
    );
}

#[test]
fn explicit_false_and_zero_on_pointer_fields_are_kept() {
    let secret = core::v1::Secret {
        metadata: object_meta("s"),
        immutable: Some(false),
        ..Default::default()
    };
    assert_eq!(
        admitted(&envelope("v1", "Secret", &secret))["immutable"],
        false
    );
    let pod = core::v1::PodSpec {
        containers: vec![core::v1::Container {
            name: Some("a".into()),
            stdin: Some(false),
            ..Default::default()
        }],
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(0),
        host_network: Some(false),
        ..Default::default()
    };
    let obj = pod_spec(pod).ok().expect("pod spec");
    assert_eq!(
        obj,
        json!({
            "containers": [{"name": "a"}],
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 0,
        })
    );
}

#[test]
fn fields_not_converted_yet_are_refused_by_name() {
    let deploy = apps::v1::Deployment {
        metadata: object_meta("d"),
        spec: Some(apps::v1::DeploymentSpec {
            template: Some(core::v1::PodTemplateSpec {
                metadata: None,
                spec: Some(core::v1::PodSpec {
                    volumes: vec![core::v1::Volume::default()],
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
        status: None,
    };
    let err = decode(&envelope("apps/v1", "Deployment", &deploy)).expect_err("volumes");
    assert_eq!(err.code, 415);
    assert_eq!(
        err.message,
        "protobuf body of kind \"Deployment\" in \"apps/v1\": field spec.volumes is not supported in protobuf bodies; send it as JSON"
    );
}

#[test]
fn garbage_is_a_400_naming_the_problem() {
    let err = decode(b"{\"kind\":\"Namespace\"}").expect_err("json");
    assert_eq!(err.code, 400);
    assert!(
        err.message.contains("does not start with"),
        "{}",
        err.message
    );
    let err = decode(b"k8s").expect_err("short");
    assert_eq!(err.code, 400);

    let err = decode(b"k8s\0\xff\xff\xff\xff").expect_err("garbage envelope");
    assert_eq!(err.code, 400);
    assert!(
        err.message
            .starts_with("error decoding protobuf body: envelope:"),
        "{}",
        err.message
    );

    // A valid envelope whose raw bytes are not a Namespace.
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: Some("v1".into()),
            kind: Some("Namespace".into()),
        }),
        raw: Some(vec![0x0a, 0x05, 0x01]),
        ..Unknown::default()
    };
    let mut body = MAGIC.to_vec();
    body.extend(unknown.encode_to_vec());
    let err = decode(&body).expect_err("bad raw");
    assert_eq!(err.code, 400);
    assert!(
        err.message
            .starts_with("error decoding protobuf body: Namespace:"),
        "{}",
        err.message
    );

    let err = decode(MAGIC).expect_err("no kind");
    assert_eq!(
        err.message,
        "error decoding protobuf body: the envelope names no kind"
    );
}

#[test]
fn every_truncation_of_a_captured_body_fails_cleanly_or_decodes() {
    for body in CAPTURED {
        for cut in 0..body.len() {
            // Cutting only the envelope's trailing empty fields leaves a complete object, and
            // cutting before `raw` leaves an empty one; every other cut is a 400, none panics.
            match parse_body(&body[..cut], MEDIA_TYPE) {
                Ok(v) => assert!(
                    cut >= body.len() - 4 || v.get("metadata").is_none(),
                    "{cut}: {v}"
                ),
                Err(e) => assert_eq!(e.code, 400, "{cut}: {}", e.message),
            }
        }
        assert!(parse_body(body, MEDIA_TYPE).is_ok());
    }
}

#[test]
fn kinds_weir_does_not_serve_are_415() {
    let job = k8s_pb::api::batch::v1::Job {
        metadata: object_meta("j"),
        ..Default::default()
    };
    let err = decode(&envelope("batch/v1", "Job", &job)).expect_err("job");
    assert_eq!(err.code, 415);
    assert_eq!(
        err.message,
        "protobuf body of kind \"Job\" in \"batch/v1\": this server does not serve that kind; send it as JSON"
    );
    let pv = core::v1::PersistentVolume::default();
    let err = decode(&envelope("v1", "PersistentVolume", &pv)).expect_err("pv");
    assert_eq!(err.code, 415);

    let mut unknown =
        Unknown::decode(&envelope("v1", "Namespace", &core::v1::Namespace::default())[4..])
            .expect("envelope");
    unknown.content_encoding = Some("gzip".into());
    let mut body = MAGIC.to_vec();
    body.extend(unknown.encode_to_vec());
    assert_eq!(decode(&body).expect_err("gzip").code, 415);
}

#[test]
fn replica_sets_share_the_pod_template_conversion() {
    let rs = apps::v1::ReplicaSet {
        metadata: object_meta("rs"),
        spec: Some(apps::v1::ReplicaSetSpec {
            replicas: Some(0),
            selector: Some(meta::LabelSelector {
                match_labels: [("app".to_string(), "web".to_string())].into(),
                match_expressions: vec![],
            }),
            template: Some(core::v1::PodTemplateSpec {
                metadata: None,
                spec: Some(core::v1::PodSpec {
                    containers: vec![core::v1::Container {
                        name: Some("web".into()),
                        image: Some("x".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            }),
            min_ready_seconds: Some(0),
        }),
        status: None,
    };
    let obj = admitted(&envelope("apps/v1", "ReplicaSet", &rs));
    assert_eq!(
        obj["spec"],
        json!({
            "replicas": 0,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"spec": {"containers": [{"name": "web", "image": "x"}]}},
        })
    );
}

#[test]
fn scale_bodies_decode_for_the_scale_subresource() {
    let scale = autoscaling::v1::Scale {
        metadata: object_meta("d"),
        spec: Some(autoscaling::v1::ScaleSpec { replicas: Some(0) }),
        status: None,
    };
    let obj = decode(&envelope("autoscaling/v1", "Scale", &scale)).expect("scale");
    assert_eq!(obj["spec"], json!({"replicas": 0}));
}
