use super::*;
use crate::testutil::{CgroupGuard, unique};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

#[test]
fn quantities_parse_like_kubernetes() {
    for (value, scale, want) in [
        ("500m", 1000, Some(500)),
        ("1", 1000, Some(1000)),
        ("1.5", 1000, Some(1500)),
        ("0.1", 1000, Some(100)),
        ("128Mi", 1, Some(128 << 20)),
        ("1Gi", 1, Some(1 << 30)),
        ("1G", 1, Some(1_000_000_000)),
        ("64k", 1, Some(64_000)),
        ("100", 1, Some(100)),
        ("", 1, None),
        ("12Q", 1, None),
        ("Mi", 1, None),
        ("1.2.3", 1, None),
    ] {
        assert_eq!(parse_quantity(value, scale), want, "{value}");
    }
}

fn container(cpu: Option<&str>, memory: Option<&str>) -> Container {
    let mut limits = std::collections::BTreeMap::new();
    if let Some(cpu) = cpu {
        limits.insert("cpu".to_string(), Quantity(cpu.to_string()));
    }
    if let Some(memory) = memory {
        limits.insert("memory".to_string(), Quantity(memory.to_string()));
    }
    Container {
        name: "c".into(),
        resources: Some(ResourceRequirements {
            limits: Some(limits),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn pod_limits_sum_containers_and_name_the_bad_field() {
    let limits = Limits::of_pod(
        &[
            container(Some("500m"), Some("64Mi")),
            container(Some("250m"), None),
        ],
        &[container(Some("2"), Some("1Gi"))],
    )
    .unwrap();
    assert_eq!(limits.cpu_millis, Some(2000));
    assert_eq!(limits.memory_bytes, None, "one unlimited container");
    let err = Limits::of_pod(&[container(Some("lots"), None)], &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.containers[0].resources.limits.cpu: invalid quantity \"lots\""
    );
}

#[tokio::test]
async fn pod_group_limits_and_kills_its_processes() {
    let guard = CgroupGuard::new();
    let cgroups = &guard.cgroups;
    let pod = cgroups.pod(&unique("p"));
    pod.create(Limits {
        cpu_millis: Some(250),
        memory_bytes: Some(64 << 20),
    })
    .unwrap();
    let (quota, memory) = pod.effective_limits().unwrap();
    let procs = pod.prepare_container("app").unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    for file in &procs {
        std::fs::write(file, child.id().to_string()).unwrap();
    }
    let populated = pod.populated("app");
    pod.kill_container("app").await.unwrap();
    let status = child.wait().unwrap();
    pod.remove().await.unwrap();
    cgroups.remove_subtree().unwrap();
    let dirs = [
        Some(&cgroups.v2),
        cgroups.v1_cpu.as_ref(),
        cgroups.v1_memory.as_ref(),
    ];
    for dir in dirs.into_iter().flatten() {
        let _ = std::fs::remove_dir(dir.parent().unwrap());
    }

    assert_eq!(quota, Some(25_000));
    assert_eq!(memory, Some(64 << 20));
    assert!(populated);
    assert!(!status.success(), "sleep was killed: {status}");
    assert!(!pod.v2.exists());
}
