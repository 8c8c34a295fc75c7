//! Two test nodes on one machine, linked so that their pods reach each other by IP, each
//! with its own agent: the setting for traffic between nodes (HBONE tunnels, mTLS).
//!
//! ```text
//!  node 1 netns                                         node 2 netns
//!  ┌────────────────────────────┐                       ┌────────────────────────────┐
//!  │ br0 10.0.1.1/24            │  veth tonode2/tonode1 │ br0 10.0.2.1/24            │
//!  │     fd00:0:0:1::1/64       │ 10.255.0.1 ─ .2 (/30) │     fd00:0:0:2::1/64       │
//!  │ route 10.0.2.0/24 via .2 ──┼───────────────────────┼── route 10.0.1.0/24 via .1 │
//!  │ agent 1 (forwarding on)    │ fd00:255::1 ─ ::2     │ agent 2 (forwarding on)    │
//!  └──┬─────────────────────────┘                       └──┬─────────────────────────┘
//!     pods 10.0.1.N                                        pods 10.0.2.N
//! ```
//!
//! Each node's resource directory lists the workloads of both nodes: its own pods with
//! their network namespace, interface and cgroup (local), the other node's without them
//! (remote), as a node agent in Kubernetes sees pods of other nodes. Both agents get the
//! same CA directory, so that the certificates one issues are trusted by the other.

use std::fs;
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use crate::agent::{Agent, AgentOptions};
use crate::env::DIR_PREFIX;
use crate::netns;
use crate::node::{Node, Pod};
use crate::resources::WorkloadYaml;

/// The link's addresses on node 1 and node 2 (a /30).
pub const LINK_IPV4: [&str; 2] = ["10.255.0.1", "10.255.0.2"];
/// The link's IPv6 addresses on node 1 and node 2 (a /126).
pub const LINK_IPV6: [&str; 2] = ["fd00:255::1", "fd00:255::2"];
/// The link's interface in node 1 and in node 2: named after the node it leads to.
const LINK_IF: [&str; 2] = ["tonode2", "tonode1"];
/// Link-local addresses, valid at once (no duplicate address detection), of the link's
/// ends and of each node's bridge. See [`TwoNodes::link`] for why they are needed.
const LINK_LOCAL: [&str; 2] = ["fe80::1", "fe80::2"];
const BRIDGE_LINK_LOCAL: &str = "fe80::1";
/// How long the link's ends may take to become operational.
const LINK_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Nodes 1 and 2 (pods 10.0.1.N and 10.0.2.N), linked by a veth pair and routing each
/// other's pod subnets. Everything is removed when it is dropped, also when the test
/// panics: the nodes remove their namespaces (and the link with them) and the CA
/// directory is deleted.
#[derive(Debug)]
pub struct TwoNodes {
    /// Node 1: pods 10.0.1.N/24, fd00:0:0:1::N/64.
    pub node1: Node,
    /// Node 2: pods 10.0.2.N/24, fd00:0:0:2::N/64.
    pub node2: Node,
    ca_dir: TempDir,
}

impl TwoNodes {
    /// Builds both nodes and the link between them, with IPv4 and IPv6 forwarding on in
    /// both node namespaces. Panics if the machine cannot (call [`crate::require_root!`]
    /// first).
    #[expect(
        clippy::new_without_default,
        reason = "building nodes creates namespaces and cgroups; `Default` would hide that"
    )]
    pub fn new() -> TwoNodes {
        let node1 = Node::with_subnet(1);
        let node2 = Node::with_subnet(2);
        let ca_dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-ca-", std::process::id()))
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create the CA directory: {e}"));
        let two = TwoNodes {
            node1,
            node2,
            ca_dir,
        };
        two.link();
        two
    }

    /// Links the nodes. Besides the addresses and routes, each node needs a usable
    /// link-local address on both the link and its bridge: a router asks for the MAC
    /// address of the next hop (IPv6 neighbour solicitation) of a forwarded packet from
    /// its link-local address, and sends nothing while that is still tentative (duplicate
    /// address detection, a second or two after the device comes up), so the first
    /// forwarded IPv6 connections would time out.
    fn link(&self) {
        let nodes = [&self.node1, &self.node2];
        netns::ip_batch(
            Some(&self.node1.netns),
            &[format!(
                "link add {} type veth peer name {} netns {}",
                LINK_IF[0], LINK_IF[1], self.node2.netns
            )],
        );
        for (i, node) in nodes.iter().enumerate() {
            netns::ip_batch(
                Some(&node.netns),
                &[
                    format!("addr add {}/30 dev {}", LINK_IPV4[i], LINK_IF[i]),
                    format!("addr add {}/126 dev {} nodad", LINK_IPV6[i], LINK_IF[i]),
                    format!("addr add {}/64 dev {} nodad", LINK_LOCAL[i], LINK_IF[i]),
                    format!("addr add {BRIDGE_LINK_LOCAL}/64 dev br0 nodad"),
                    format!("link set {} up", LINK_IF[i]),
                ],
            );
        }
        for (i, node) in nodes.iter().enumerate() {
            netns::wait_link_ready(&node.netns, LINK_IF[i], LINK_READY_TIMEOUT);
            let other = nodes[1 - i];
            netns::ip_batch(
                Some(&node.netns),
                &[
                    format!(
                        "route add 10.0.{}.0/24 via {}",
                        other.subnet,
                        LINK_IPV4[1 - i]
                    ),
                    format!(
                        "route add fd00:0:0:{}::/64 via {}",
                        other.subnet,
                        LINK_IPV6[1 - i]
                    ),
                ],
            );
            // A new network namespace starts with forwarding off: the node would drop
            // what its pods send to the other node.
            netns::run_in(&node.netns, || {
                for knob in [
                    "/proc/sys/net/ipv4/ip_forward",
                    "/proc/sys/net/ipv6/conf/all/forwarding",
                ] {
                    fs::write(knob, "1")
                        .unwrap_or_else(|e| panic!("cannot turn forwarding on ({knob}): {e}"));
                }
            });
        }
    }

    /// Both nodes, node 1 first.
    pub fn nodes(&self) -> [&Node; 2] {
        [&self.node1, &self.node2]
    }

    /// The directory both agents keep their shared CA in (`ca.pem`, `ca-key.pem`).
    pub fn ca_dir(&self) -> &Path {
        self.ca_dir.path()
    }

    /// The node a pod was added to (by its address: node k's pods are 10.0.k.N). Panics
    /// for a pod of neither node.
    pub fn node_of(&self, pod: &Pod) -> &Node {
        let k = pod.ipv4.octets()[2];
        self.nodes()
            .into_iter()
            .find(|n| n.subnet == k)
            .unwrap_or_else(|| panic!("pod {} ({}) is on neither node", pod.name, pod.ipv4))
    }

    /// The agent options both agents start with: `opts` with the shared CA directory.
    pub fn agent_options(&self, opts: AgentOptions) -> AgentOptions {
        opts.ca_dir(self.ca_dir())
    }

    /// Starts node 1's agent and waits until it is ready (it creates the CA), then node
    /// 2's, both with [`TwoNodes::agent_options`]`(opts)`. `opts` should wait for
    /// readiness (no [`AgentOptions::no_wait`]): node 2's agent needs the CA node 1's
    /// created.
    pub fn start_agents(&self, opts: AgentOptions) -> (Agent<'_>, Agent<'_>) {
        let opts = self.agent_options(opts);
        let first = opts.clone().start(&self.node1);
        let second = opts.start(&self.node2);
        (first, second)
    }

    /// Writes these workloads into file `name` of both nodes' resource directories: as
    /// given on the pod's own node, and [`WorkloadYaml::remote`] on the other.
    pub fn write_workloads(&self, name: &str, workloads: &[(&Pod, WorkloadYaml)]) {
        for node in self.nodes() {
            let docs: Vec<String> = workloads
                .iter()
                .map(|(pod, yaml)| {
                    if self.node_of(pod).subnet == node.subnet {
                        yaml.to_yaml()
                    } else {
                        yaml.clone().remote().to_yaml()
                    }
                })
                .collect();
            node.resources().write(name, &docs);
        }
    }
}
