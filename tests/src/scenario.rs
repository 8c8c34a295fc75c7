//! Building blocks the service tests share: well-known addresses, a set of backend pods
//! running test-pod servers, and the resources that describe them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::agent::Agent;
use crate::node::{Node, Pod};
use crate::process::Proc;
use crate::resources::{EndpointSliceYaml, Resources, ServiceYaml};
use crate::testpod::{ClientReport, now_us};

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

/// Asserts every attempt succeeded and reported `vip` as its peer; returns the answers.
pub fn expect_all_via(
    report: &ClientReport,
    vip: SocketAddr,
    what: &str,
) -> BTreeMap<String, usize> {
    let answers = report.answers_without_errors(what);
    assert_eq!(
        report.peers(),
        BTreeSet::from([vip.to_string()]),
        "{what}: every socket should report the service address {vip} as its peer; {}",
        report.summary()
    );
    answers
}

/// Milliseconds from `since` to the first answer matching `pred`.
pub fn first_after(
    report: &ClientReport,
    since: u64,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> f64 {
    let hit = report
        .results
        .iter()
        .find(|r| r.at_us >= since && r.answer.as_deref().is_some_and(&pred))
        .unwrap_or_else(|| panic!("{what} was never seen; {}", report.summary()));
    (hit.at_us - since) as f64 / 1000.0
}

/// Scales the `web` service from one backend to three and down to one other, through
/// `resources` (a resource directory or the Kubernetes API), and checks that new
/// connections follow within a second and never reach a removed backend. `start_agent`
/// starts an agent reading `resources`; it is called once the first version is written.
pub fn scale_up_and_down<'n>(
    node: &'n Node,
    resources: &dyn Resources,
    start_agent: impl FnOnce() -> Agent<'n>,
) {
    let backends = Backends::start(node, "web", 3);
    let [a, b, c] = [0, 1, 2].map(|i| &backends.pods[i]);
    resources.write("web.yaml", &web_ipv4(&[a]));
    let _agent = start_agent();
    let client = node.pod("client");
    let vip = web_vip4();
    let poll = |until: &str, consecutive: &str| {
        client.tcp_client_with(
            vip,
            250,
            &[
                "--interval-ms",
                "20",
                "--timeout-ms",
                "300",
                "--until-answer",
                until,
                "--consecutive",
                consecutive,
            ],
        )
    };

    let report = client.tcp_client(vip, 20);
    let answers = expect_all_via(&report, vip, "before scaling");
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        [&a.name],
        "before scaling"
    );

    // Scale up: a → a, b, c.
    let changed = now_us();
    resources.write("web.yaml", &web_ipv4(&[a, b, c]));
    let report = poll(&format!("{},{}", b.name, c.name), "1");
    expect_all_via(&report, vip, "while scaling up");
    let ms = first_after(&report, changed, "a connection to an added backend", |x| {
        x == b.name || x == c.name
    });
    assert!(
        ms < 1000.0,
        "scaling up took {ms} ms to reach new connections"
    );
    println!("scaling up reached new connections after {ms:.1} ms");
    let report = client.tcp_client(vip, 100);
    let answers = expect_all_via(&report, vip, "after scaling up");
    assert_eq!(
        answers.keys().cloned().collect::<Vec<_>>(),
        backends.names(),
        "100 connects after scaling up to 3 backends"
    );

    // Scale down: a, b, c → c. The change is seen once no connection reaches a or b.
    let changed = now_us();
    resources.write("web.yaml", &web_ipv4(&[c]));
    let report = poll(&c.name, "10");
    expect_all_via(&report, vip, "while scaling down");
    let results = &report.results;
    assert!(
        results.len() >= 10
            && results[results.len() - 10..]
                .iter()
                .all(|r| r.answer.as_deref() == Some(&c.name)),
        "after scaling down to {} connections kept reaching removed backends for 5 s; {}",
        c.name,
        report.summary()
    );
    let settled = results
        .iter()
        .rposition(|r| r.answer.as_deref() != Some(&c.name))
        .map_or(results[0].at_us, |i| results[i + 1].at_us);
    let ms = settled.saturating_sub(changed) as f64 / 1000.0;
    assert!(
        ms < 1000.0,
        "scaling down took {ms} ms to stop reaching removed backends"
    );
    println!("scaling down stopped reaching removed backends after {ms:.1} ms");
    let report = client.tcp_client(vip, 100);
    let answers = expect_all_via(&report, vip, "after scaling down");
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        [&c.name],
        "after scaling down to {} no connection may reach a removed backend",
        c.name
    );
}
