//! Pod discovery on a node: finding each pod's host-side interface the way the agent does
//! in Kubernetes mode, on a bridged node (the harness's `br0`, like flannel's `cni0`) and
//! on a routed one (a /32 route per pod through its veth, like Calico or kindnet).
//!
//! Discovery runs inside the test node's namespace: on a thread that entered it, with a
//! runtime of its own, as the agent runs in the host's.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mycel_agent::discovery::{Discovery, Method, PodInterface};
use mycel_tests::env::{self, DIR_PREFIX, NETNS_PREFIX};
use mycel_tests::{Node, Proc, netns, require_root};

/// One lookup: the pod's address and, optionally, its cgroup.
type Lookup = (IpAddr, Option<PathBuf>);

/// Runs the lookups, in order, with one [`Discovery`] made inside namespace `ns`. Panics
/// (naming the address) on an error.
fn discover(ns: &str, lookups: &[Lookup]) -> Vec<Option<PodInterface>> {
    let lookups = lookups.to_vec();
    netns::run_in(ns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build a runtime: {e}"));
        runtime.block_on(async {
            let discovery = Discovery::new().unwrap_or_else(|e| panic!("Discovery::new: {e}"));
            let mut found = Vec::new();
            for (ip, cgroup) in lookups {
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    discovery.host_interface(ip, cgroup.as_deref()),
                )
                .await
                .unwrap_or_else(|_| panic!("lookup of {ip} did not finish within 10 s"))
                .unwrap_or_else(|e| panic!("lookup of {ip} (cgroup {cgroup:?}) failed: {e}"));
                found.push(answer);
            }
            found
        })
    })
}

/// The ifindex of `dev` in namespace `ns`, as iproute2 reports it.
fn ifindex(ns: &str, dev: &str) -> u32 {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", "dev", dev])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip -j link show`: {e}"));
    assert!(
        out.status.success(),
        "`ip -n {ns} link show dev {dev}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("`ip -j link show dev {dev}` is not JSON: {e}"));
    links[0]["ifindex"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or_else(|| panic!("no ifindex for {dev} in {links}"))
}

fn expect(ifindex: u32, name: &str, method: Method) -> Option<PodInterface> {
    Some(PodInterface {
        ifindex,
        name: name.to_owned(),
        method,
    })
}

/// Opens (and closes) one TCP connection to each address, from inside namespace `ns`, so
/// that the node learns the pods' MACs (neighbour table, bridge forwarding table).
fn connect_from(ns: &str, addrs: Vec<SocketAddr>) {
    netns::run_in(ns, move || {
        for addr in addrs {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        }
    });
}

#[test]
fn bridged_pod_is_found_in_its_namespace_then_in_the_forwarding_table() {
    require_root!();
    let node = Node::new();
    let web = node.pod("web");
    let other = node.pod("other");
    let _web_server = web.tcp_server(8080);
    let _other_server = other.tcp_server(8080);
    let veth = ifindex(&node.netns, &web.host_if);
    assert_ne!(
        veth,
        ifindex(&node.netns, &other.host_if),
        "two pods, two veths"
    );

    // The node has not talked to the pods: nothing in its neighbour table yet.
    netns::ip(&["-n", &node.netns, "neigh", "flush", "dev", "br0"]);
    let found = discover(
        &node.netns,
        &[
            (web.ipv4.into(), Some(web.cgroup.clone())),
            (web.ipv6.into(), Some(web.cgroup.clone())),
            // Without the cgroup there is no way in yet.
            (web.ipv4.into(), None),
            // Another pod's namespace does not hold this address.
            (web.ipv4.into(), Some(other.cgroup.clone())),
            // A cgroup without processes.
            (web.ipv4.into(), Some(node.cgroup.clone())),
        ],
    );
    assert_eq!(
        found,
        vec![
            expect(veth, &web.host_if, Method::PodNamespace),
            expect(veth, &web.host_if, Method::PodNamespace),
            None,
            None,
            None,
        ]
    );

    connect_from(
        &node.netns,
        vec![
            SocketAddr::from((web.ipv4, 8080)),
            SocketAddr::from((web.ipv6, 8080)),
        ],
    );
    let found = discover(
        &node.netns,
        &[
            (web.ipv4.into(), None),
            (web.ipv6.into(), None),
            // The cheap way first, even when the cgroup is known.
            (web.ipv4.into(), Some(web.cgroup.clone())),
            // The other pod is still unknown to the node's tables.
            (other.ipv4.into(), None),
            (other.ipv4.into(), Some(other.cgroup.clone())),
        ],
    );
    let other_veth = ifindex(&node.netns, &other.host_if);
    assert_eq!(
        found,
        vec![
            expect(veth, &web.host_if, Method::BridgeFdb),
            expect(veth, &web.host_if, Method::BridgeFdb),
            expect(veth, &web.host_if, Method::BridgeFdb),
            None,
            expect(other_veth, &other.host_if, Method::PodNamespace),
        ]
    );
}

#[test]
fn addresses_that_are_nowhere_are_none() {
    require_root!();
    let node = Node::new();
    let web = node.pod("web");
    let _server = web.tcp_server(8080);
    let unused_on_bridge = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 200));
    let unrouted = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
    let unrouted6 = IpAddr::V6(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1));
    let found = discover(
        &node.netns,
        &[
            (unused_on_bridge, None),
            (unused_on_bridge, Some(web.cgroup.clone())),
            (unrouted, None),
            (unrouted, Some(web.cgroup.clone())),
            (unrouted6, Some(web.cgroup.clone())),
            // The node's own address is not a pod's.
            (IpAddr::V4(mycel_tests::node::NODE_IPV4), None),
            // A cgroup that does not exist (the pod is gone).
            (web.ipv4.into(), Some(node.cgroup.join("gone"))),
        ],
    );
    assert_eq!(found, vec![None; 7]);
}

static ROUTED_SEQ: AtomicU32 = AtomicU32::new(0);

/// A routed node built by hand, as Calico or kindnet wire pods: the pod's address is a
/// /32 on its `eth0`, its gateway a link-local address, and the node reaches it by a /32
/// route through the host-side veth; no bridge.
struct RoutedNode {
    host: String,
    pod: String,
    cgroup: PathBuf,
}

impl RoutedNode {
    const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
    const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 5);
    const HOST_IF: &str = "cali1";

    fn new() -> RoutedNode {
        let cgroup_root = env::cgroup2_root().unwrap_or_else(|e| panic!("{e}"));
        // Unique per test process and node: tests run in parallel.
        let id = format!(
            "{}-{}",
            std::process::id(),
            ROUTED_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let node = RoutedNode {
            host: format!("{NETNS_PREFIX}{id}-routed-host"),
            pod: format!("{NETNS_PREFIX}{id}-routed-pod"),
            cgroup: cgroup_root.join(format!("{DIR_PREFIX}{id}-routed-pod")),
        };
        // From here on, a panic drops `node`, which removes what exists.
        fs::create_dir(&node.cgroup)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", node.cgroup.display()));
        netns::add(&node.host);
        netns::add(&node.pod);
        netns::ip_batch(
            Some(&node.host),
            &[
                format!(
                    "link add {} type veth peer name eth0 netns {}",
                    Self::HOST_IF,
                    node.pod
                ),
                format!("link set {} up", Self::HOST_IF),
                // Something else routed that is not a pod: an overlay to other nodes'
                // pods, like flannel's `flannel.1`.
                "link add vxlan0 type vxlan id 7 dstport 4789".to_owned(),
                "addr add 192.168.77.1/24 dev vxlan0".to_owned(),
                "link set vxlan0 up".to_owned(),
            ],
        );
        netns::ip_batch(
            Some(&node.pod),
            &[
                format!("addr add {}/32 dev eth0", Self::POD_V4),
                format!("addr add {}/128 dev eth0 nodad", Self::POD_V6),
                "link set eth0 up".to_owned(),
                "route add 169.254.1.1 dev eth0 scope link".to_owned(),
                "route add default via 169.254.1.1 dev eth0".to_owned(),
            ],
        );
        node
    }

    /// Adds the node's routes to the pod, as the CNI does once the pod is wired.
    fn add_routes(&self) {
        netns::ip_batch(
            Some(&self.host),
            &[
                format!("route add {}/32 dev {}", Self::POD_V4, Self::HOST_IF),
                format!("route add {}/128 dev {}", Self::POD_V6, Self::HOST_IF),
            ],
        );
    }

    /// Starts a long-lived process in the pod's namespace and cgroup and waits until the
    /// cgroup lists it.
    fn start_process(&self) -> Proc {
        let proc = Proc::spawn(Some(&self.pod), Some(&self.cgroup), "sleep", &["60"]);
        let procs = self.cgroup.join("cgroup.procs");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_to_string(&procs)
            .unwrap_or_default()
            .trim()
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "{} did not enter {} within 5 s",
                proc.desc(),
                self.cgroup.display()
            );
            thread::sleep(Duration::from_millis(10));
        }
        proc
    }

    fn cgroup(&self) -> Option<PathBuf> {
        Some(self.cgroup.clone())
    }
}

impl Drop for RoutedNode {
    fn drop(&mut self) {
        env::remove_cgroup_tree(&self.cgroup);
        for ns in [&self.pod, &self.host] {
            netns::kill_netns_processes(ns);
            netns::delete(ns);
        }
    }
}

#[test]
fn routed_pod_is_found_by_its_route() {
    require_root!();
    let node = RoutedNode::new();
    let _process = node.start_process();
    let veth = ifindex(&node.host, RoutedNode::HOST_IF);
    let pod_v4 = IpAddr::V4(RoutedNode::POD_V4);
    let pod_v6 = IpAddr::V6(RoutedNode::POD_V6);

    // Before the CNI adds the routes, only the pod's namespace knows.
    let found = discover(
        &node.host,
        &[
            (pod_v4, None),
            (pod_v4, node.cgroup()),
            (pod_v6, node.cgroup()),
        ],
    );
    assert_eq!(
        found,
        vec![
            None,
            expect(veth, RoutedNode::HOST_IF, Method::PodNamespace),
            expect(veth, RoutedNode::HOST_IF, Method::PodNamespace),
        ]
    );

    node.add_routes();
    let found = discover(
        &node.host,
        &[
            (pod_v4, None),
            (pod_v6, None),
            (pod_v4, node.cgroup()),
            // Routed, but to a device that is no pod's (an overlay).
            (IpAddr::V4(Ipv4Addr::new(192, 168, 77, 9)), None),
            (IpAddr::V4(Ipv4Addr::new(192, 168, 77, 9)), node.cgroup()),
        ],
    );
    assert_eq!(
        found,
        vec![
            expect(veth, RoutedNode::HOST_IF, Method::Route),
            expect(veth, RoutedNode::HOST_IF, Method::Route),
            expect(veth, RoutedNode::HOST_IF, Method::Route),
            None,
            None,
        ]
    );
}

/// Extra namespaces a test made, deleted on drop (also when the test panics).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            netns::kill_netns_processes(ns);
            netns::delete(ns);
        }
    }
}

/// Ifindexes are per namespace: a namespace other than the one holding the pod's peer
/// can have a veth with the peer's ifindex whose own peer has the pod's ifindex. Discovery
/// running there must not take it for the pod's. Nor is a pod whose processes share
/// discovery's own namespace (host network) one with an interface of its own.
#[test]
fn lookalike_veth_in_another_namespace_is_not_the_pod() {
    require_root!();
    let node = RoutedNode::new();
    let _process = node.start_process();
    node.add_routes();
    let peer = ifindex(&node.host, RoutedNode::HOST_IF);
    let pod_if = ifindex(&node.pod, "eth0");
    let other = format!("{}-lookalike", node.host);
    let far = format!("{}-lookalike-far", node.host);
    let _namespaces = Namespaces(vec![other.clone(), far.clone()]);
    netns::add(&other);
    netns::add(&far);
    netns::ip_batch(
        Some(&other),
        &[
            format!(
                "link add look index {peer} type veth peer name lookpeer index {pod_if} netns {far}"
            ),
            "link set look up".to_owned(),
        ],
    );
    assert_eq!(ifindex(&other, "look"), peer);
    assert_eq!(ifindex(&far, "lookpeer"), pod_if);

    let pod_v4 = IpAddr::V4(RoutedNode::POD_V4);
    assert_eq!(discover(&other, &[(pod_v4, node.cgroup())]), vec![None]);
    // From inside the pod itself: its address is local there, and its process is in
    // discovery's own namespace.
    assert_eq!(discover(&node.pod, &[(pod_v4, node.cgroup())]), vec![None]);
    // The real host still finds it, through the pod's namespace too.
    netns::ip(&[
        "-n",
        &node.host,
        "route",
        "del",
        &format!("{}/32", RoutedNode::POD_V4),
    ]);
    assert_eq!(
        discover(&node.host, &[(pod_v4, node.cgroup())]),
        vec![expect(peer, RoutedNode::HOST_IF, Method::PodNamespace)]
    );
}
