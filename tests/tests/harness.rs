//! Self-tests of the harness, without the agent: a node with pods talking to each other
//! directly, processes landing in the right namespace and cgroup, and cleanup.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mycel_tests::{Node, require_root};

#[test]
fn pods_talk_tcp_and_udp_directly() {
    require_root!();
    let node = Node::new();
    let server = node.pod("server");
    let client = node.pod("client");
    let _tcp = server.tcp_server(8080);
    let _udp = server.udp_server(5353);

    for addr in [
        SocketAddr::from((server.ipv4, 8080)),
        SocketAddr::from((server.ipv6, 8080)),
    ] {
        let report = client.tcp_client(addr, 5);
        let answers = report.answers_without_errors(&format!("TCP to {addr}"));
        assert_eq!(
            answers.get("server"),
            Some(&5),
            "TCP to {addr}: {}",
            report.summary()
        );
        assert_eq!(
            report.peers().into_iter().collect::<Vec<_>>(),
            vec![addr.to_string()]
        );
    }
    for connected in [false, true] {
        for addr in [
            SocketAddr::from((server.ipv4, 5353)),
            SocketAddr::from((server.ipv6, 5353)),
        ] {
            let report = client.udp_client(addr, 3, connected);
            let answers = report.answers_without_errors(&format!("UDP to {addr}"));
            assert_eq!(answers.get("server"), Some(&3), "{}", report.summary());
            assert_eq!(
                report.peers().into_iter().collect::<Vec<_>>(),
                vec![addr.to_string()],
                "UDP (connected: {connected}) peer"
            );
        }
    }
}

#[test]
fn nothing_listening_is_refused() {
    require_root!();
    let node = Node::new();
    let server = node.pod("server");
    let client = node.pod("client");
    let report = client.tcp_client_with(
        SocketAddr::from((server.ipv4, 9)),
        1,
        &["--timeout-ms", "500"],
    );
    assert_eq!(
        report.results[0].error.as_deref(),
        Some("ConnectionRefused"),
        "{}",
        report.summary()
    );
}

#[test]
fn processes_run_in_the_pod_namespace_and_cgroup() {
    require_root!();
    let node = Node::new();
    let pod = node.pod("p");
    let server = pod.tcp_server(8080);
    let cgroup_line = fs::read_to_string(format!("/proc/{}/cgroup", server.pid()))
        .expect("read /proc/PID/cgroup");
    let relative = pod
        .cgroup
        .strip_prefix(mycel_tests::env::cgroup2_root().expect("cgroup2"))
        .expect("pod cgroup below the cgroup2 root");
    assert!(
        cgroup_line
            .lines()
            .any(|l| l.starts_with("0::") && Path::new(&l[3..]) == Path::new("/").join(relative)),
        "server not in {}: {cgroup_line}",
        pod.cgroup.display()
    );
    let ns = fs::read_link(format!("/proc/{}/ns/net", server.pid())).expect("read ns link");
    let mine = fs::read_link("/proc/self/ns/net").expect("read own ns link");
    assert_ne!(ns, mine, "server runs in the test's own network namespace");
    let procs = fs::read_to_string(pod.cgroup.join("cgroup.procs")).expect("cgroup.procs");
    assert!(procs.lines().any(|l| l.trim() == server.pid().to_string()));
}

#[test]
fn cleanup_removes_everything() {
    require_root!();
    let node = Node::new();
    let pod = node.pod("p");
    let mut server = pod.tcp_server(8080);
    let pid = server.pid();
    let (netns, pod_netns) = (node.netns.clone(), pod.netns.clone());
    let (cgroup, bpffs, dir) = (
        node.cgroup.clone(),
        node.bpffs.clone(),
        node.dir().to_owned(),
    );
    assert!(Path::new("/run/netns").join(&pod_netns).exists());
    // The server is still running: the node's cleanup kills it (by PID, from the cgroup).
    drop(node);
    assert!(
        server.wait_timeout(Duration::from_secs(2)).is_some(),
        "process {pid} survived the node"
    );
    for path in [
        Path::new("/run/netns").join(&netns),
        Path::new("/run/netns").join(&pod_netns),
        cgroup,
        bpffs,
        dir,
    ] {
        assert!(!path.exists(), "{} still exists", path.display());
    }
}
