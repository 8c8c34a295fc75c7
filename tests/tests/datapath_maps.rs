//! The datapath's map writers against real kernel maps: a full map gives a clear error and
//! leaves nothing half-written.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use mycel_agent::{
    datapath::{self, Datapath, MapSizes, PolicyContent, dump_pinned},
    state::{Affinity, Frontend, FrontendChanges, FrontendSpec, ObjectRef, Protocol},
};
use mycel_common::{
    policy::{IpcacheAddr, IpcacheValue, PolicyKey, PolicyValue, VERDICT_ALLOW},
    service::{Backend, BackendKey},
};
use mycel_tests::{Node, require_root};

fn frontend(ip: &str) -> Frontend {
    Frontend {
        ip: ip.parse().expect("ip"),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn spec(name: &str, backends: std::ops::Range<u8>) -> FrontendSpec {
    FrontendSpec {
        service: ObjectRef {
            namespace: "default".into(),
            name: name.into(),
        },
        port_name: Some("http".into()),
        backends: backends
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect(),
        affinity: Affinity::None,
    }
}

fn one(f: Frontend, s: FrontendSpec) -> FrontendChanges {
    BTreeMap::from([(f, Some(s))])
}

/// Backend slots in the pinned map, whatever any agent believes.
fn backend_entries(node: &Node) -> usize {
    let data = MapData::from_pin(node.bpffs.join("BACKENDS")).expect("open BACKENDS");
    let map: BpfHashMap<MapData, BackendKey, Backend> =
        BpfHashMap::try_from(Map::HashMap(data)).expect("BACKENDS is a hash map");
    map.keys().count()
}

#[test]
fn a_full_map_leaves_nothing_half_written() {
    require_root!();
    let node = Node::new();
    let sizes = MapSizes {
        services: 16,
        backends: 8,
        revnat: 64,
        ..MapSizes::default()
    };
    let mut dp = Datapath::load_with(&node.cgroup, &node.bpffs, sizes).expect("load datapath");
    let (a, b) = (frontend("10.96.0.1"), frontend("10.96.0.2"));

    let (_, errors) = dp.services.apply(&one(a, spec("a", 1..6)));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(backend_entries(&node), 5);

    // b needs five slots; three are left.
    let (stats, errors) = dp.services.apply(&one(b, spec("b", 11..16)));
    assert_eq!(stats.frontends_written, 0);
    match errors.as_slice() {
        [e @ datapath::Error::MapFull { map, what }] => {
            assert_eq!(*map, "BACKENDS");
            assert!(what.contains("default/b"), "{what}");
            assert!(e.to_string().contains("map BACKENDS is full"), "{e}");
        }
        other => panic!("expected one MapFull error, got {other:?}"),
    }
    // Nothing of b was written, a is untouched.
    assert_eq!(
        backend_entries(&node),
        5,
        "b's partial writes must be rolled back"
    );
    let dump = dump_pinned(&node.bpffs, &HashMap::new()).expect("dump");
    assert_eq!(dump.len(), 1, "{dump:?}");
    assert_eq!(dump[0].address, a.ip);
    assert_eq!(dump[0].backends.len(), 5);
    assert_eq!(dp.services.counts(), (1, 5));

    // Growing a past the map's size fails the same way and keeps its five backends.
    let (_, errors) = dp.services.apply(&one(a, spec("a", 1..11)));
    assert_eq!(errors.len(), 1, "{errors:?}");
    let dump = dump_pinned(&node.bpffs, &HashMap::new()).expect("dump");
    let kept: Vec<SocketAddr> = dump[0].backends.iter().map(|b| b.address).collect();
    assert_eq!(kept, spec("a", 1..6).backends);
    assert_eq!(backend_entries(&node), 5);

    // What fits still goes in.
    let (_, errors) = dp.services.apply(&one(b, spec("b", 11..14)));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(backend_entries(&node), 8);
    assert_eq!(dp.services.counts(), (2, 8));
    dp.detach_and_unpin().expect("detach");
}

/// IPCACHE and POLICY entries in the pinned maps, whatever any agent believes.
fn policy_entries(node: &Node) -> (usize, usize) {
    let data = MapData::from_pin(node.bpffs.join("IPCACHE")).expect("open IPCACHE");
    let ipcache: LpmTrie<MapData, IpcacheAddr, IpcacheValue> =
        LpmTrie::try_from(Map::LpmTrie(data)).expect("IPCACHE is an LPM trie");
    let data = MapData::from_pin(node.bpffs.join("POLICY")).expect("open POLICY");
    let policy: BpfHashMap<MapData, PolicyKey, PolicyValue> =
        BpfHashMap::try_from(Map::HashMap(data)).expect("POLICY is a hash map");
    (ipcache.keys().count(), policy.keys().count())
}

/// `n` addresses of 10.7.x.y, each its own identity, and one ALLOW entry per identity for
/// endpoint 1.
fn policy_content(addresses: std::ops::Range<u16>, rules: std::ops::Range<u32>) -> PolicyContent {
    let mut c = PolicyContent::default();
    for i in addresses {
        let ip = std::net::IpAddr::from([10, 7, (i >> 8) as u8, i as u8]);
        c.ipcache.insert((ip, 32), 1000 + u32::from(i));
    }
    for i in rules {
        c.policy.insert(
            PolicyKey {
                endpoint_id: 1,
                peer_identity: 1000 + i,
                dport_be: 80u16.to_be(),
                proto: 6,
                direction: 0,
            },
            PolicyValue {
                verdict: VERDICT_ALLOW,
                _pad: [0; 3],
                policy_id: 1,
            },
        );
    }
    c
}

#[test]
fn a_policy_change_that_does_not_fit_changes_nothing() {
    require_root!();
    let node = Node::new();
    let sizes = MapSizes {
        ipcache: 16,
        policy: 16,
        ..MapSizes::default()
    };
    let mut dp = Datapath::load_with(&node.cgroup, &node.bpffs, sizes).expect("load datapath");
    dp.policy
        .apply(&policy_content(0..10, 0..10))
        .expect("a change that fits");
    assert_eq!(policy_entries(&node), (10, 10));

    // Twenty addresses: IPCACHE cannot hold them. Nothing is written — not the ten that
    // would fit, nor the POLICY entries of the same change.
    let err = dp
        .policy
        .apply(&policy_content(0..20, 0..12))
        .expect_err("IPCACHE is too small");
    match &err {
        datapath::Error::MapFull { map, what } => {
            assert_eq!(*map, "IPCACHE");
            assert!(what.contains("20") && what.contains("16"), "{what}");
        }
        other => panic!("expected MapFull, got {other:?}"),
    }
    assert_eq!(policy_entries(&node), (10, 10), "the previous state stays");
    assert_eq!(dp.policy.counts(), (10, 10));

    // Replacing all ten addresses by ten others needs twenty slots while it is written.
    let err = dp
        .policy
        .apply(&policy_content(100..110, 0..10))
        .expect_err("no room to write before removing");
    assert!(
        matches!(err, datapath::Error::MapFull { map: "IPCACHE", .. }),
        "{err:?}"
    );
    assert_eq!(policy_entries(&node), (10, 10));

    // What fits still goes in.
    dp.policy
        .apply(&policy_content(0..14, 0..14))
        .expect("a change that fits");
    assert_eq!(policy_entries(&node), (14, 14));
    dp.detach_and_unpin().expect("detach");
}
