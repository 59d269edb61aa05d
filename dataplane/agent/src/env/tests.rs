use super::*;
use futures::FutureExt;
use k8s_openapi::api::core::v1::{
    ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector,
    SecretEnvSource, SecretKeySelector,
};

/// In-memory ConfigMaps and Secrets (the API-backed lookup is exercised end to end).
struct Fixed;

impl Lookup for Fixed {
    fn config_map<'a>(
        &'a self,
        _: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, String>> {
        let data =
            (name == "cfg").then(|| BTreeMap::from([("mode".to_string(), "fast".to_string())]));
        async move { Ok(data) }.boxed()
    }
    fn secret<'a>(
        &'a self,
        _: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<BTreeMap<String, String>>, String>> {
        let data = (name == "creds")
            .then(|| BTreeMap::from([("password".to_string(), "hunter2".to_string())]));
        async move { Ok(data) }.boxed()
    }
}

fn var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn from(name: &str, source: EnvVarSource) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(source),
    }
}

fn pod() -> Pod {
    let mut pod = Pod::default();
    pod.metadata.name = Some("web-1".into());
    pod.metadata.namespace = Some("shop".into());
    pod
}

#[test]
fn expansion_follows_kubernetes_rules() {
    let vars = vec![("A".to_string(), "x".to_string())];
    assert_eq!(expand("$(A)-$(B)-$$(A)-$-$", &vars), "x-$(B)-$(A)-$-$");
    assert_eq!(expand("$(A", &vars), "$(A");
}

#[tokio::test]
async fn env_resolves_every_source_in_order() {
    let pod = pod();
    let fields = PodFields {
        pod: &pod,
        pod_ip: "10.244.0.7",
        host_ip: "192.168.1.2",
    };
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.into(),
            api_version: None,
        }),
        ..Default::default()
    };
    let container = Container {
        name: "app".into(),
        env_from: Some(vec![EnvFromSource {
            prefix: Some("S_".into()),
            secret_ref: Some(SecretEnvSource {
                name: "creds".into(),
                optional: None,
            }),
            ..Default::default()
        }]),
        env: Some(vec![
            from("POD_IP", field("status.podIP")),
            from("POD_NAME", field("metadata.name")),
            from("NS", field("metadata.namespace")),
            from(
                "MODE",
                EnvVarSource {
                    config_map_key_ref: Some(ConfigMapKeySelector {
                        name: "cfg".into(),
                        key: "mode".into(),
                        optional: None,
                    }),
                    ..Default::default()
                },
            ),
            from(
                "PW",
                EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: "creds".into(),
                        key: "password".into(),
                        optional: None,
                    }),
                    ..Default::default()
                },
            ),
            var("URL", "http://$(POD_IP):8080/$(MODE)"),
        ]),
        command: Some(vec!["echo".into()]),
        args: Some(vec!["$(POD_NAME)".into()]),
        ..Default::default()
    };
    let vars = build(&fields, &container, &Fixed).await.unwrap();
    let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("S_password"), Some("hunter2"));
    assert_eq!(get("POD_IP"), Some("10.244.0.7"));
    assert_eq!(get("POD_NAME"), Some("web-1"));
    assert_eq!(get("NS"), Some("shop"));
    assert_eq!(get("MODE"), Some("fast"));
    assert_eq!(get("PW"), Some("hunter2"));
    assert_eq!(get("URL"), Some("http://10.244.0.7:8080/fast"));
    assert_eq!(get("HOSTNAME"), Some("web-1"));
    assert!(get("PATH").is_some());
    assert_eq!(argv(&container, &vars), ["echo", "web-1"]);
}

#[tokio::test]
async fn missing_references_are_named_like_the_kubelet_does() {
    let pod = pod();
    let fields = PodFields {
        pod: &pod,
        pod_ip: "",
        host_ip: "",
    };
    let key = |name: &str, key: &str, optional| EnvVarSource {
        config_map_key_ref: Some(ConfigMapKeySelector {
            name: name.into(),
            key: key.into(),
            optional,
        }),
        ..Default::default()
    };
    let with = |env| Container {
        name: "c".into(),
        env: Some(vec![env]),
        ..Default::default()
    };
    let err = build(&fields, &with(from("X", key("cfg", "nope", None))), &Fixed)
        .await
        .unwrap_err();
    assert_eq!(err, "couldn't find key nope in ConfigMap shop/cfg");
    let err = build(&fields, &with(from("X", key("gone", "k", None))), &Fixed)
        .await
        .unwrap_err();
    assert_eq!(err, "configmap \"gone\" not found");
    let vars = build(
        &fields,
        &with(from("X", key("gone", "k", Some(true)))),
        &Fixed,
    )
    .await
    .unwrap();
    assert!(
        !vars.iter().any(|(k, _)| k == "X"),
        "optional and missing: unset"
    );
}
