//! Two nodes, each with its own agent: a pod on node 1 reaches a pod on node 2 by IP over
//! the link between the nodes, and the server sees the client pod's own address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mycel_tests::twonode::TwoNodes;
use mycel_tests::{AgentOptions, Pod, Proc, WorkloadYaml, require_root};

const PORT: u16 = 8080;

/// Starts `mycel-testpod tcp-peer-server` in `pod` and waits until it listens.
fn peer_server(pod: &Pod) -> Proc {
    let mut proc = pod.testpod(&["tcp-peer-server", "--port", &PORT.to_string()]);
    if proc
        .wait_for_line(Duration::from_secs(5), |l| l == "ready")
        .is_none()
    {
        let status = proc.try_status();
        panic!(
            "{} did not get ready (exit status {status:?}); stderr: {}",
            proc.desc(),
            proc.stderr()
        );
    }
    proc
}

/// `count` connections from `client` to `server` at `ip`; each answer (the address the
/// server saw) must be the client pod's `ip_client`, and the port the client's own.
fn assert_server_sees_client(client: &Pod, server_ip: IpAddr, client_ip: IpAddr, what: &str) {
    let addr = SocketAddr::new(server_ip, PORT);
    let report = client.tcp_client(addr, 5);
    report.answers_without_errors(what);
    for r in &report.results {
        let seen: SocketAddr = r
            .answer
            .as_deref()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{what}: the server's answer is no address: {r:?}"));
        assert_eq!(seen.ip(), client_ip, "{what}: the server saw {seen}: {r:?}");
        assert_eq!(
            r.local.as_deref(),
            Some(seen.to_string().as_str()),
            "{what}: the server saw another port than the client's own: {r:?}"
        );
        assert_eq!(
            r.peer.as_deref(),
            Some(addr.to_string().as_str()),
            "{what}: {r:?}"
        );
    }
}

#[test]
fn pod_on_node1_reaches_pod_on_node2_by_ip() {
    require_root!();
    let two = TwoNodes::new();
    let client = two.node1.pod("client");
    let server = two.node2.pod("server");
    assert_eq!(two.node_of(&client).subnet, 1);
    assert_eq!(two.node_of(&server).subnet, 2);
    assert_eq!(client.ipv4.octets()[..3], [10, 0, 1]);
    assert_eq!(server.ipv4.octets()[..3], [10, 0, 2]);
    let _server = peer_server(&server);

    // Without agents: plain routing between the nodes.
    assert_server_sees_client(
        &client,
        IpAddr::V4(server.ipv4),
        IpAddr::V4(client.ipv4),
        "IPv4 without agents",
    );
    assert_server_sees_client(
        &client,
        IpAddr::V6(server.ipv6),
        IpAddr::V6(client.ipv6),
        "IPv6 without agents",
    );

    // Both agents, each knowing its own pod as local and the other one as remote; nothing
    // enrolled in the mesh, so the traffic stays plain L4 and passes the TC programs on
    // both pods' interfaces.
    two.write_workloads(
        "workloads.yaml",
        &[
            (&client, WorkloadYaml::for_pod(&client, "client")),
            (&server, WorkloadYaml::for_pod(&server, "server")),
        ],
    );
    let (agent1, agent2) = two.start_agents(AgentOptions::default());
    for (agent, node) in [(&agent1, &two.node1), (&agent2, &two.node2)] {
        // One local workload each, with both pods' addresses in the ipcache.
        agent.wait_for(
            &format!("the agent of {} to know both workloads", node.netns),
            Duration::from_secs(10),
            |a| {
                a.metric_sum("mycel_policy_endpoints") == 1.0
                    && a.metric_sum("mycel_ipcache_entries") >= 4.0
            },
        );
    }
    assert!(
        two.ca_dir().join("ca.pem").is_file(),
        "node 1's agent did not create ca.pem in the shared CA directory {}",
        two.ca_dir().display()
    );
    assert_server_sees_client(
        &client,
        IpAddr::V4(server.ipv4),
        IpAddr::V4(client.ipv4),
        "IPv4 with both agents",
    );
    assert_server_sees_client(
        &client,
        IpAddr::V6(server.ipv6),
        IpAddr::V6(client.ipv6),
        "IPv6 with both agents",
    );
    // The flows went through the TC programs of both nodes: each counted the connections.
    for (agent, name) in [(&agent1, "node 1"), (&agent2, "node 2")] {
        agent.wait_for(
            &format!("{name}'s agent to count the connections"),
            Duration::from_secs(5),
            |a| a.metric_sum("istio_tcp_connections_opened_total") >= 10.0,
        );
    }
}
