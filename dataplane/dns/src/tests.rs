use super::*;

#[test]
fn resolv_conf_gives_nameservers_and_the_last_search_line() {
    let rc = ResolvConf::parse(
        "# comment\nsearch a.example b.example\nnameserver 10.0.0.2\nnameserver fd00::53\n\
         nameserver not-an-ip\noptions ndots:5\nsearch corp.example\n",
    );
    assert_eq!(
        rc.nameservers,
        vec![
            "10.0.0.2:53".parse().unwrap(),
            "[fd00::53]:53".parse().unwrap()
        ]
    );
    assert_eq!(rc.search, vec!["corp.example".to_string()]);
}

#[test]
fn a_missing_resolv_conf_without_upstreams_is_an_error_naming_the_file() {
    let args = Args {
        listen: "127.0.0.1:0".parse().unwrap(),
        zone: "cluster.local".into(),
        ttl: 5,
        upstreams: Vec::new(),
        resolv_conf: "/nonexistent/resolv.conf".into(),
        forward_timeout_ms: 100,
        cache_size: 10,
        udp_workers: 1,
        no_autopath: false,
        metrics: None,
    };
    let err = build(&args).err().unwrap();
    assert!(
        err.to_string().contains("/nonexistent/resolv.conf"),
        "{err}"
    );
    let bad_zone = Args {
        zone: "bad..zone".into(),
        upstreams: vec!["127.0.0.1:1".parse().unwrap()],
        ..args
    };
    assert!(
        build(&bad_zone)
            .err()
            .unwrap()
            .to_string()
            .contains("bad..zone")
    );
}
