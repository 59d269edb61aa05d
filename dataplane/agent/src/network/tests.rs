use super::*;
use crate::testutil::{NetnsGuard, run_in, unique};

#[test]
fn cidr_parses_and_addresses() {
    let cidr: Ipv4Cidr = "10.244.3.0/24".parse().unwrap();
    assert_eq!(cidr.gateway(), Some(Ipv4Addr::new(10, 244, 3, 1)));
    assert_eq!(cidr.nth(255), Some(Ipv4Addr::new(10, 244, 3, 255)));
    assert_eq!(cidr.nth(256), None);
    assert!(cidr.contains(Ipv4Addr::new(10, 244, 3, 9)));
    assert!(!cidr.contains(Ipv4Addr::new(10, 244, 4, 9)));
    assert_eq!(cidr.to_string(), "10.244.3.0/24");
    for bad in [
        "10.244.3.0",
        "10.244.3.5/24",
        "10.244.3.0/33",
        "x/24",
        "10.0.0.0/x",
    ] {
        let err = bad.parse::<Ipv4Cidr>().unwrap_err().to_string();
        assert!(err.contains(bad), "{err}");
    }
}

#[test]
fn ipam_persists_and_never_hands_out_a_used_address() {
    let dir = tempfile::tempdir().unwrap();
    let cidr: Ipv4Cidr = "10.244.0.0/29".parse().unwrap();
    let ipam = Ipam::new(dir.path(), cidr);
    let a = ipam.allocate("pod-a").unwrap();
    let b = ipam.allocate("pod-b").unwrap();
    assert_eq!(a, Ipv4Addr::new(10, 244, 0, 2));
    assert_eq!(b, Ipv4Addr::new(10, 244, 0, 3));
    assert_eq!(
        ipam.allocate("pod-a").unwrap(),
        a,
        "allocation is idempotent"
    );

    // A new allocator over the same directory (an agent restart) sees both addresses used.
    let restarted = Ipam::new(dir.path(), cidr);
    assert_eq!(restarted.lookup("pod-b").unwrap(), Some(b));
    let c = restarted.allocate("pod-c").unwrap();
    assert!(c != a && c != b);

    restarted.release("pod-a").unwrap();
    assert_eq!(restarted.lookup("pod-a").unwrap(), None);
    assert_eq!(restarted.allocate("pod-d").unwrap(), a);
    // .2–.6 usable in a /29: .2 .3 .4 taken; .5 .6 left, then exhausted.
    restarted.allocate("pod-e").unwrap();
    restarted.allocate("pod-f").unwrap();
    let err = restarted.allocate("pod-g").unwrap_err();
    assert!(matches!(err, Error::Exhausted { .. }), "{err}");
}

#[tokio::test]
async fn pods_on_one_bridge_reach_each_other_and_teardown_cleans_up() {
    let node = NetnsGuard::new("wn");
    let dir = tempfile::tempdir().unwrap();
    let net = PodNetwork::new(
        Some(node.name.clone()),
        "10.244.7.0/24".parse().unwrap(),
        dir.path(),
    );
    net.ensure_bridge().await.unwrap();
    net.ensure_bridge().await.unwrap();
    let (ua, ub) = (unique("a"), unique("b"));
    let a = net.setup_pod(&ua).await.unwrap();
    let b = net.setup_pod(&ub).await.unwrap();
    assert_eq!(net.setup_pod(&ua).await.unwrap(), a, "setup is idempotent");
    assert_ne!(a.ip, b.ip);

    let reach = reaches(&a, &b).await && reaches(&b, &a).await && reaches(&a, &a).await;
    let hairpin = ip(
        Some(&node.name),
        &["-d", "link", "show", &PodNetwork::veth_name(&ua)],
    )
    .await
    .unwrap();
    let forward = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.name,
            "sysctl",
            "-n",
            "net.ipv4.ip_forward",
        ])
        .output()
        .unwrap();

    net.teardown_pod(&ua).await.unwrap();
    net.teardown_pod(&ub).await.unwrap();
    assert!(!a.netns_path().exists());
    assert_eq!(net.existing(&ub).unwrap(), None);
    assert!(reach, "pods did not reach each other over weir0");
    assert!(hairpin.contains("hairpin on"), "{hairpin}");
    assert_eq!(String::from_utf8_lossy(&forward.stdout).trim(), "1");
}

#[tokio::test]
async fn routes_to_other_nodes_are_synced_exactly() {
    let node = NetnsGuard::new("wr");
    let dir = tempfile::tempdir().unwrap();
    let net = PodNetwork::new(
        Some(node.name.clone()),
        "10.244.1.0/24".parse().unwrap(),
        dir.path(),
    );
    run_in(
        &node.name,
        &["ip", "link", "add", "n0", "type", "veth", "peer", "n1"],
    );
    run_in(
        &node.name,
        &["ip", "addr", "add", "192.168.77.1/24", "dev", "n0"],
    );
    run_in(&node.name, &["ip", "link", "set", "n0", "up"]);
    let via: Ipv4Addr = "192.168.77.2".parse().unwrap();
    let two = [
        ("10.244.2.0/24".parse().unwrap(), via),
        ("10.244.3.0/24".parse().unwrap(), via),
    ];
    net.guard("10.244.0.0/16".parse().unwrap()).await.unwrap();
    net.sync_routes(&two).await.unwrap();
    net.sync_routes(&two[1..]).await.unwrap();
    let routes = ip(Some(&node.name), &["route", "show", "proto", ROUTE_PROTO])
        .await
        .unwrap();
    assert!(!routes.contains("10.244.2.0/24"), "{routes}");
    assert!(
        routes.contains("10.244.3.0/24 via 192.168.77.2"),
        "{routes}"
    );
}

/// A TCP connection from inside `from`'s namespace to a listener inside `to`'s.
async fn reaches(from: &PodNet, to: &PodNet) -> bool {
    let ip = to.ip;
    let listener = in_netns(&to.netns_path(), move || {
        std::net::TcpListener::bind((ip, 0))
    })
    .unwrap();
    let addr = listener.local_addr().unwrap();
    connect_in(&from.netns_path(), addr, std::time::Duration::from_secs(10))
        .await
        .is_ok()
}
