//! The TC programs: identity-based policy and per-flow accounting, first with
//! `BPF_PROG_TEST_RUN` on crafted packets, then on a real veth between two pods.

use std::{collections::BTreeMap, net::SocketAddr, thread, time::Duration};

use mycel_agent::datapath::{
    Datapath, MapSizes, PolicyContent, TcMode, dump_flows, spawn_flow_reader,
};
use mycel_common::{
    flow::{FLOW_EVENT_DROP, FLOW_EVENT_NEW, FlowEvent},
    policy::{
        DIR_INGRESS, DROP_REASON_POLICY_DEFAULT_DENY, ENDPOINT_F_ENFORCE, EndpointInfo, PolicyKey,
        PolicyValue, VERDICT_ALLOW, VERDICT_DENY,
    },
    service::{PROTO_TCP, v4_mapped},
};
use mycel_tests::{Node, netns, require_root};

/// What the programs return to let a packet go on (`TCX_NEXT` / `TC_ACT_UNSPEC`).
const PASS: u32 = u32::MAX;
const DROP: u32 = 2;

fn endpoint(id: u32, identity: u32) -> EndpointInfo {
    EndpointInfo {
        endpoint_id: id,
        identity,
        flags: ENDPOINT_F_ENFORCE,
        policy_revision: 0,
    }
}

fn rule(endpoint_id: u32, peer: u32, port: u16, verdict: u8) -> (PolicyKey, PolicyValue) {
    (
        PolicyKey {
            endpoint_id,
            peer_identity: peer,
            dport_be: port.to_be(),
            proto: PROTO_TCP,
            direction: DIR_INGRESS,
        },
        PolicyValue {
            verdict,
            _pad: [0; 3],
            policy_id: 42,
        },
    )
}

/// Ethernet + IPv4 + TCP SYN.
fn syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let ip = [
        0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, src[0], src[1], src[2], src[3], dst[0], dst[1],
        dst[2], dst[3],
    ];
    p.extend_from_slice(&ip);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

#[test]
fn test_run_allows_and_denies_by_policy() {
    require_root!();
    let node = Node::new();
    let mut dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
    // Test runs see the loopback device of the caller's namespace: ifindex 1.
    let content = PolicyContent {
        ipcache: BTreeMap::from([(("10.1.0.1".parse().expect("ip"), 32), 300)]),
        endpoints: BTreeMap::from([(1, endpoint(7, 400))]),
        policy: BTreeMap::from([rule(7, 300, 8080, VERDICT_ALLOW)]),
    };
    let stats = dp.policy.apply(&content).expect("apply policy");
    assert_eq!(stats.policy_writes, 1);
    assert_eq!(dp.policy.endpoints()[&1].policy_revision, 1);

    let allowed = dp
        .tc_test_run("tc_to_pod", &syn([10, 1, 0, 1], [10, 1, 0, 2], 40000, 8080))
        .expect("test run");
    assert_eq!(allowed, PASS);
    let denied = dp
        .tc_test_run("tc_to_pod", &syn([10, 1, 0, 1], [10, 1, 0, 2], 40001, 9090))
        .expect("test run");
    assert_eq!(denied, DROP);
    // An unknown peer (WORLD) is denied by default, too.
    let world = dp
        .tc_test_run("tc_to_pod", &syn([10, 9, 0, 1], [10, 1, 0, 2], 40002, 8080))
        .expect("test run");
    assert_eq!(world, DROP);
    // Traffic the endpoint starts is allowed.
    let egress = dp
        .tc_test_run(
            "tc_from_pod",
            &syn([10, 1, 0, 2], [10, 9, 0, 1], 40003, 9090),
        )
        .expect("test run");
    assert_eq!(egress, PASS);
    // A second SYN of the allowed flow hits the cached verdict and is counted.
    dp.tc_test_run("tc_to_pod", &syn([10, 1, 0, 1], [10, 1, 0, 2], 40000, 8080))
        .expect("test run");

    let flows = dump_flows(&node.bpffs).expect("dump flows");
    let find = |sport: u16| {
        flows
            .iter()
            .find(|(k, _)| k.sport_be == sport.to_be())
            .unwrap_or_else(|| panic!("no flow from port {sport}: {flows:?}"))
            .1
    };
    let a = find(40000);
    assert_eq!(
        (a.verdict, a.packets_fwd, a.src_identity, a.dst_identity),
        (VERDICT_ALLOW, 2, 300, 400)
    );
    assert_eq!(a.policy_id, 42);
    let d = find(40001);
    assert_eq!((d.verdict, d.packets_fwd), (VERDICT_DENY, 1));
    assert_eq!(d.drop_reason, DROP_REASON_POLICY_DEFAULT_DENY);
    assert_eq!(
        find(40002).src_identity,
        mycel_common::policy::IDENTITY_WORLD
    );
    assert_eq!(find(40003).verdict, VERDICT_ALLOW);
    let key = flows
        .iter()
        .find(|(k, _)| k.sport_be == 40000u16.to_be())
        .map(|(k, _)| *k)
        .expect("flow");
    assert_eq!(key.saddr_be, v4_mapped(u32::from_ne_bytes([10, 1, 0, 1])));
    assert_eq!(key.direction, DIR_INGRESS);
    dp.detach_and_unpin().expect("detach");
}

fn answers(proc: &mycel_tests::Proc) -> usize {
    proc.stdout_lines()
        .iter()
        .filter(|l| l.contains("\"answer\"") && !l.contains("\"answer\":null"))
        .count()
}

#[test]
fn policy_on_a_veth_allows_denies_counts_and_cuts() {
    require_root!();
    let node = Node::new();
    let server = node.pod("server");
    let client = node.pod("client");
    let _s1 = server.tcp_server(8080);
    let _s2 = server.tcp_server(9090);

    let dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
    let host_if = server.host_if.clone();
    let (mut dp, attachment) = netns::run_in(&node.netns, move || {
        let mut dp = dp;
        let a = dp.attach_tc(&host_if).expect("attach TC programs");
        (dp, a)
    });
    let ifindex = attachment.ifindex;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let ring = dp.take_flow_events().expect("ring buffer");
    let (_reader, mut events) = {
        let _guard = rt.enter();
        spawn_flow_reader(ring, 1024).expect("flow reader")
    };

    let mut content = PolicyContent {
        ipcache: BTreeMap::from([
            ((client.ipv4.into(), 32), 300),
            ((server.ipv4.into(), 32), 400),
        ]),
        endpoints: BTreeMap::from([(ifindex, endpoint(1, 400))]),
        policy: BTreeMap::from([rule(1, 300, 8080, VERDICT_ALLOW)]),
    };
    dp.policy.apply(&content).expect("apply policy");

    let allowed = SocketAddr::from((server.ipv4, 8080));
    let denied = SocketAddr::from((server.ipv4, 9090));
    let ok = client.tcp_client_with(allowed, 3, &["--timeout-ms", "1000"]);
    assert_eq!(
        ok.answers_without_errors("server").get("server"),
        Some(&3),
        "{}",
        ok.summary()
    );
    let no = client.tcp_client_with(denied, 1, &["--timeout-ms", "500"]);
    assert!(
        no.results
            .iter()
            .all(|r| r.answer.is_none() && r.error.is_some()),
        "9090 should be denied: {}",
        no.summary()
    );

    // Flows counted both ways, from the server endpoint's side.
    let flows = dump_flows(&node.bpffs).expect("dump flows");
    let to_8080: Vec<_> = flows
        .iter()
        .filter(|(k, _)| k.dport_be == 8080u16.to_be() && k.direction == DIR_INGRESS)
        .collect();
    assert_eq!(to_8080.len(), 3, "{flows:?}");
    for (_, v) in &to_8080 {
        assert!(v.packets_fwd >= 3 && v.packets_rev >= 2, "{v:?}");
        assert!(v.bytes_fwd > 0 && v.bytes_rev > 0, "{v:?}");
        assert_eq!((v.src_identity, v.dst_identity), (300, 400));
    }
    let to_9090 = flows
        .iter()
        .find(|(k, _)| k.dport_be == 9090u16.to_be())
        .expect("denied flow recorded");
    assert_eq!(to_9090.1.verdict, VERDICT_DENY);

    // Events: one NEW per allowed connection, one DROP for the denied one (not one per
    // retransmitted SYN).
    thread::sleep(Duration::from_millis(200));
    let mut got: Vec<FlowEvent> = Vec::new();
    while let Ok(e) = events.try_recv() {
        got.push(e);
    }
    let new_8080 = got
        .iter()
        .filter(|e| e.kind == FLOW_EVENT_NEW && e.key.dport_be == 8080u16.to_be())
        .count();
    let drop_9090 = got
        .iter()
        .filter(|e| e.kind == FLOW_EVENT_DROP && e.key.dport_be == 9090u16.to_be())
        .count();
    assert_eq!((new_8080, drop_9090), (3, 1), "{got:?}");
    assert!(got.iter().all(|e| e.ifindex == ifindex));

    // An established connection that policy now denies is cut within a second.
    let (hold, _) = client.tcp_hold(allowed);
    thread::sleep(Duration::from_millis(500));
    assert!(answers(&hold) > 0, "hold: {:?}", hold.stdout_lines());
    content.policy = BTreeMap::from([rule(1, 300, 8080, VERDICT_DENY)]);
    let stats = dp.policy.apply(&content).expect("apply deny");
    assert_eq!(stats.revisions_bumped, 1);
    thread::sleep(Duration::from_secs(1));
    let after_1s = answers(&hold);
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        answers(&hold),
        after_1s,
        "answers kept coming after the deny: {:?}",
        hold.stdout_lines()
    );

    let dp = netns::run_in(&node.netns, move || {
        let mut dp = dp;
        dp.detach_tc(ifindex).expect("detach TC programs");
        dp
    });
    // Without the programs the denied port answers.
    let open = client.tcp_client_with(denied, 1, &["--timeout-ms", "1000"]);
    assert_eq!(
        open.answers_without_errors("server").get("server"),
        Some(&1)
    );
    drop(rt);
    dp.detach_and_unpin().expect("detach");
}

/// Filters on `dev`'s `hook` (ingress/egress) as `tc filter show` lists them in `netns`.
fn clsact_filters(netns: &str, dev: &str, hook: &str) -> usize {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", netns, "tc", "filter", "show", "dev", dev, hook,
        ])
        .output()
        .expect("run tc");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("bpf") && l.contains("direct-action"))
        .count()
}

fn takeover(mode: TcMode) {
    let node = Node::new();
    let server = node.pod("server");
    let client = node.pod("client");
    let _s = server.tcp_server(9090);
    let host_if = server.host_if.clone();
    let attach = move |dp: Datapath, host_if: String, netns: &str| {
        netns::run_in(netns, move || {
            let mut dp = dp;
            dp.set_tc_mode(mode);
            let a = dp.attach_tc(&host_if).expect("attach TC programs");
            (dp, a)
        })
    };
    let dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("load");
    let (mut dp, first) = attach(dp, host_if.clone(), &node.netns);
    assert_eq!((first.mode, first.took_over), (mode, false));
    // Default deny for the server endpoint: nothing is allowed.
    let content = PolicyContent {
        ipcache: BTreeMap::new(),
        endpoints: BTreeMap::from([(first.ifindex, endpoint(1, 400))]),
        policy: BTreeMap::new(),
    };
    dp.policy.apply(&content).expect("apply policy");
    // The agent goes away without detaching: the programs stay.
    drop(dp);
    let denied = SocketAddr::from((server.ipv4, 9090));
    let report = client.tcp_client_with(denied, 1, &["--timeout-ms", "500"]);
    assert!(
        report.results.iter().all(|r| r.answer.is_none()),
        "denied while no agent runs: {}",
        report.summary()
    );
    // A new agent takes the attachment over instead of adding a second one.
    let dp = Datapath::load_with(&node.cgroup, &node.bpffs, MapSizes::default()).expect("reload");
    let (dp, second) = attach(dp, host_if.clone(), &node.netns);
    assert_eq!((second.mode, second.took_over), (mode, true));
    match mode {
        TcMode::Clsact => {
            assert_eq!(clsact_filters(&node.netns, &host_if, "ingress"), 1);
            assert_eq!(clsact_filters(&node.netns, &host_if, "egress"), 1);
        }
        TcMode::Tcx => {
            for dir in ["ingress", "egress"] {
                let pin = node
                    .bpffs
                    .join("links/tc")
                    .join(format!("{}-{dir}", second.ifindex));
                assert!(pin.exists(), "{}", pin.display());
            }
        }
    }
    let report = client.tcp_client_with(denied, 1, &["--timeout-ms", "500"]);
    assert!(report.results.iter().all(|r| r.answer.is_none()));
    // Detaching removes them.
    let ifindex = second.ifindex;
    let dp = netns::run_in(&node.netns, move || {
        let mut dp = dp;
        dp.detach_tc(ifindex).expect("detach");
        dp
    });
    if mode == TcMode::Clsact {
        assert_eq!(clsact_filters(&node.netns, &host_if, "ingress"), 0);
    }
    let report = client.tcp_client_with(denied, 1, &["--timeout-ms", "1000"]);
    assert_eq!(
        report.answers_without_errors("server").get("server"),
        Some(&1)
    );
    dp.detach_and_unpin().expect("detach");
}

#[test]
fn tcx_attachment_survives_the_agent_and_is_taken_over() {
    require_root!();
    takeover(TcMode::Tcx);
}

#[test]
fn clsact_attachment_survives_the_agent_and_is_taken_over() {
    require_root!();
    takeover(TcMode::Clsact);
}
