//! Service load balancing at connect() time: a client pod connects to a Service's cluster
//! IP and the agent's socket programs send it to a backend pod, with no proxy and no NAT.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use mycel_tests::scenario::{
    self, BACKEND_PORT, Backends, WEB_PORT, WEB_VIP4, WEB_VIP6, backend_addr, expect_all_via,
    web_ipv4, web_vip4, web_vip6,
};
use mycel_tests::stats::binomial_lower_bound;
use mycel_tests::{EndpointSliceYaml, Node, ServiceYaml, require_root};

/// Probability with which a statistical assertion may fail a correct agent.
const FLAKE_PROBABILITY: f64 = 1e-6;

#[test]
fn tcp_to_cluster_ip_reaches_all_backends() {
    require_root!();
    let node = Node::new();
    let backends = Backends::start(&node, "web", 3);
    let pods: Vec<_> = backends.pods.iter().collect();
    node.resources().write("web.yaml", &web_ipv4(&pods));
    let _agent = node.start_agent();
    let client = node.pod("client");

    let n = 240;
    let report = client.tcp_client(web_vip4(), n);
    let answers = expect_all_via(&report, web_vip4(), "TCP to the cluster IP");
    let bound = binomial_lower_bound(n.into(), 1.0 / 3.0, FLAKE_PROBABILITY / 3.0);
    for name in backends.names() {
        let got = answers.get(&name).copied().unwrap_or(0);
        assert!(
            got as u64 >= bound,
            "backend {name} got {got} of {n} connections, expected at least {bound} \
             (uniform choice among 3 fails this with p < {FLAKE_PROBABILITY}); answers {answers:?}"
        );
    }
    assert_eq!(
        answers.values().sum::<usize>(),
        n as usize,
        "answers from unexpected servers: {answers:?}"
    );
}

#[test]
fn ipv6_service_reports_the_vip_over_tcp_and_udp() {
    require_root!();
    let node = Node::new();
    let backends = Backends::start(&node, "web", 2);
    let mut slice = EndpointSliceYaml::ipv6("web6-v6", "web6")
        .port("http", BACKEND_PORT.into(), "TCP")
        .port("dns", BACKEND_PORT.into(), "UDP");
    for pod in &backends.pods {
        slice = slice.endpoint(pod.ipv6);
    }
    node.resources().write(
        "web6.yaml",
        &[
            ServiceYaml::new("web6", &WEB_VIP6.to_string())
                .port("http", WEB_PORT.into(), "TCP", BACKEND_PORT.into())
                .port("dns", 53, "UDP", BACKEND_PORT.into())
                .to_yaml(),
            slice.to_yaml(),
        ],
    );
    let _agent = node.start_agent();
    let client = node.pod("client");

    let report = client.tcp_client(web_vip6(), 30);
    let answers = expect_all_via(&report, web_vip6(), "TCP to the IPv6 cluster IP");
    assert_eq!(
        answers.keys().cloned().collect::<Vec<_>>(),
        backends.names(),
        "30 connects over 2 backends should reach both; {}",
        report.summary()
    );

    let dns = SocketAddr::from((WEB_VIP6, 53));
    for connected in [false, true] {
        let report = client.udp_client(dns, 10, connected);
        expect_all_via(
            &report,
            dns,
            &format!("UDP to the IPv6 cluster IP (connected socket: {connected})"),
        );
    }
}

#[test]
fn dual_stack_service_serves_both_families() {
    require_root!();
    let node = Node::new();
    let backends = Backends::start(&node, "web", 2);
    let mut v4 = EndpointSliceYaml::ipv4("web-v4", "web").port("http", BACKEND_PORT.into(), "TCP");
    let mut v6 = EndpointSliceYaml::ipv6("web-v6", "web").port("http", BACKEND_PORT.into(), "TCP");
    for pod in &backends.pods {
        v4 = v4.endpoint(pod.ipv4);
        v6 = v6.endpoint(pod.ipv6);
    }
    node.resources().write(
        "web.yaml",
        &[
            ServiceYaml::new("web", &WEB_VIP4.to_string())
                .cluster_ip(&WEB_VIP6.to_string())
                .port("http", WEB_PORT.into(), "TCP", BACKEND_PORT.into())
                .to_yaml(),
            v4.to_yaml(),
            v6.to_yaml(),
        ],
    );
    let agent = node.start_agent();
    let client = node.pod("client");
    for vip in [web_vip4(), web_vip6()] {
        let report = client.tcp_client(vip, 20);
        let answers = expect_all_via(&report, vip, &format!("TCP to {vip} (dual-stack service)"));
        let unexpected: Vec<_> = answers
            .keys()
            .filter(|a| !backends.names().contains(a))
            .collect();
        assert!(unexpected.is_empty(), "answers from {unexpected:?}");
    }
    // Each family's frontend has that family's backends.
    let services = agent.services();
    let v4: BTreeSet<String> = backends
        .pods
        .iter()
        .map(|p| backend_addr(p.ipv4, BACKEND_PORT))
        .collect();
    let v6: BTreeSet<String> = backends
        .pods
        .iter()
        .map(|p| backend_addr(p.ipv6, BACKEND_PORT))
        .collect();
    for (vip, want) in [(WEB_VIP4.to_string(), v4), (WEB_VIP6.to_string(), v6)] {
        let entry = services
            .iter()
            .find(|s| s.address == vip && s.port == WEB_PORT);
        let got: Option<BTreeSet<String>> = entry.map(|s| s.backends.iter().cloned().collect());
        assert_eq!(
            got.as_ref(),
            Some(&want),
            "/debug/services entry for {vip}:{WEB_PORT}: {services:?}"
        );
    }
}

#[test]
fn v4_mapped_address_on_an_ipv6_socket_is_balanced() {
    require_root!();
    let node = Node::new();
    let backends = Backends::start(&node, "web", 2);
    let pods: Vec<_> = backends.pods.iter().collect();
    node.resources().write("web.yaml", &web_ipv4(&pods));
    let _agent = node.start_agent();
    let client = node.pod("client");
    // An AF_INET6 socket connecting to ::ffff:10.96.0.10 (what a dual-stack application
    // does with an IPv4 service address).
    let mapped: SocketAddr = SocketAddr::from((WEB_VIP4.to_ipv6_mapped(), WEB_PORT));
    let report = client.tcp_client(mapped, 20);
    let answers = expect_all_via(&report, mapped, "TCP to the v4-mapped cluster IP");
    assert!(
        answers.keys().all(|a| backends.names().contains(a)),
        "{answers:?}"
    );
}

#[test]
fn udp_through_the_vip_with_unconnected_and_connected_sockets() {
    require_root!();
    let node = Node::new();
    let backends = Backends::start(&node, "dns", 2);
    let mut slice =
        EndpointSliceYaml::ipv4("dns-v4", "dns").port("dns", BACKEND_PORT.into(), "UDP");
    for pod in &backends.pods {
        slice = slice.endpoint(pod.ipv4);
    }
    node.resources().write(
        "dns.yaml",
        &[
            ServiceYaml::new("dns", "10.96.0.53")
                .port("dns", 53, "UDP", BACKEND_PORT.into())
                .to_yaml(),
            slice.to_yaml(),
        ],
    );
    let _agent = node.start_agent();
    let client = node.pod("client");
    let vip: SocketAddr = "10.96.0.53:53".parse().expect("address");
    for connected in [false, true] {
        let n = 30;
        let report = client.udp_client(vip, n, connected);
        // For the unconnected socket `peer` is recvfrom()'s source: the recvmsg hook must
        // have turned the backend's address back into the service's.
        let answers = expect_all_via(
            &report,
            vip,
            &format!("UDP through the VIP (connected socket: {connected})"),
        );
        assert_eq!(
            answers.keys().cloned().collect::<Vec<_>>(),
            backends.names(),
            "{n} requests over 2 backends (one socket each) should reach both; {}",
            report.summary()
        );
    }
}

/// The time from `since` (µs since the epoch) to the first result that satisfies `pred`,
/// in ms; panics with the report if there is none.
#[test]
fn scaling_endpoints_changes_new_connections_within_a_second() {
    require_root!();
    let node = Node::new();
    scenario::scale_up_and_down(&node, node.resources(), || node.start_agent());
}

#[test]
fn service_without_ready_endpoints_refuses_fast() {
    require_root!();
    let node = Node::new();
    let backends = Backends::start(&node, "web", 1);
    node.resources().write(
        "services.yaml",
        &[
            ServiceYaml::new("empty", "10.96.0.11")
                .port("http", 80, "TCP", BACKEND_PORT.into())
                .to_yaml(),
            ServiceYaml::new("unready", "10.96.0.12")
                .port("http", 80, "TCP", BACKEND_PORT.into())
                .to_yaml(),
            EndpointSliceYaml::ipv4("unready-v4", "unready")
                .endpoint_not_ready(backends.pods[0].ipv4)
                .port("http", BACKEND_PORT.into(), "TCP")
                .to_yaml(),
        ],
    );
    let _agent = node.start_agent();
    let client = node.pod("client");
    for vip in ["10.96.0.11:80", "10.96.0.12:80"] {
        let report =
            client.tcp_client_with(vip.parse().expect("address"), 5, &["--timeout-ms", "1000"]);
        for r in &report.results {
            assert_eq!(
                r.error.as_deref(),
                Some("ConnectionRefused"),
                "connect to {vip} (a service without ready endpoints) should be refused; {}",
                report.summary()
            );
            assert!(
                r.connect_us < 100_000,
                "refusing {vip} took {} µs, expected < 100 ms; {}",
                r.connect_us,
                report.summary()
            );
        }
    }
}

#[test]
fn session_affinity_keeps_each_client_on_one_backend() {
    require_root!();
    let node = Node::new();
    let backends = Backends::start(&node, "web", 3);
    let mut slice =
        EndpointSliceYaml::ipv4("sticky-v4", "sticky").port("http", BACKEND_PORT.into(), "TCP");
    for pod in &backends.pods {
        slice = slice.endpoint(pod.ipv4);
    }
    node.resources().write(
        "sticky.yaml",
        &[
            ServiceYaml::new("sticky", "10.96.0.13")
                .port("http", 80, "TCP", BACKEND_PORT.into())
                .session_affinity_client_ip()
                .to_yaml(),
            slice.to_yaml(),
        ],
    );
    let _agent = node.start_agent();
    let vip: SocketAddr = "10.96.0.13:80".parse().expect("address");

    // With 3 backends, k clients all land on one backend with probability 3^(1-k): add
    // clients until two backends are in use, up to 16 (3^-15 < 1e-7).
    let mut chosen: BTreeMap<String, String> = BTreeMap::new();
    for i in 1..=16 {
        let client = node.pod(&format!("client-{i}"));
        let report = client.tcp_client(vip, 15);
        let answers = expect_all_via(&report, vip, &format!("client-{i} to the sticky service"));
        assert_eq!(
            answers.len(),
            1,
            "with sessionAffinity: ClientIP, all connects of client-{i} should reach one \
             backend, got {answers:?}"
        );
        chosen.insert(
            client.name.clone(),
            answers.into_keys().next().unwrap_or_default(),
        );
        let distinct: BTreeSet<&String> = chosen.values().collect();
        if i >= 4 && distinct.len() > 1 {
            return;
        }
    }
    panic!("16 clients all stuck to the same backend: {chosen:?}");
}
