//! Building blocks the service tests share: well-known addresses, a set of backend pods
//! running test-pod servers, and the resources that describe them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::node::{Node, Pod};
use crate::process::Proc;
use crate::resources::{EndpointSliceYaml, ServiceYaml};

/// The IPv4 cluster IP of the `web` service.
pub const WEB_VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The IPv6 cluster IP of the `web` service.
pub const WEB_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// The `web` service's port.
pub const WEB_PORT: u16 = 80;
/// The port backends' TCP and UDP servers listen on.
pub const BACKEND_PORT: u16 = 8080;

/// `WEB_VIP4:WEB_PORT`.
pub fn web_vip4() -> SocketAddr {
    SocketAddr::from((WEB_VIP4, WEB_PORT))
}

/// `[WEB_VIP6]:WEB_PORT`.
pub fn web_vip6() -> SocketAddr {
    SocketAddr::from((WEB_VIP6, WEB_PORT))
}

/// Backend pods, each running a TCP and a UDP test-pod server on [`BACKEND_PORT`] that
/// answer the pod's name.
#[derive(Debug)]
pub struct Backends {
    /// The pods, in order.
    pub pods: Vec<Pod>,
    servers: Vec<Proc>,
}

impl Backends {
    /// Starts `n` pods `<prefix>-1` … `<prefix>-<n>` with their servers.
    pub fn start(node: &Node, prefix: &str, n: usize) -> Backends {
        let mut backends = Backends {
            pods: Vec::new(),
            servers: Vec::new(),
        };
        for i in 1..=n {
            backends.add(node, &format!("{prefix}-{i}"));
        }
        backends
    }

    /// Adds one backend pod named `name`; returns it.
    pub fn add(&mut self, node: &Node, name: &str) -> Pod {
        let pod = node.pod(name);
        self.servers.push(pod.tcp_server(BACKEND_PORT));
        self.servers.push(pod.udp_server(BACKEND_PORT));
        self.pods.push(pod.clone());
        pod
    }

    /// The backends' names (what their servers answer).
    pub fn names(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.name.clone()).collect()
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no backend named {name}"))
    }
}

/// `ip:port` as the agent reports a backend (`[ip]:port` for IPv6).
pub fn backend_addr(ip: impl Into<IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

/// The `web` service (IPv4 [`WEB_VIP4`], TCP port `http` 80 → 8080) and an IPv4 slice
/// `web-v4` with `pods` as ready endpoints.
pub fn web_ipv4(pods: &[&Pod]) -> Vec<String> {
    let mut slice =
        EndpointSliceYaml::ipv4("web-v4", "web").port("http", BACKEND_PORT.into(), "TCP");
    for pod in pods {
        slice = slice.endpoint(pod.ipv4);
    }
    vec![
        ServiceYaml::new("web", &WEB_VIP4.to_string())
            .port("http", WEB_PORT.into(), "TCP", BACKEND_PORT.into())
            .to_yaml(),
        slice.to_yaml(),
    ]
}
