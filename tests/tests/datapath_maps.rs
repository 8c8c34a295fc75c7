//! The datapath's map writer against real kernel maps: a full map gives a clear error and
//! leaves nothing half-written.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use mycel_agent::{
    datapath::{self, Datapath, MapSizes, dump_pinned},
    state::{Affinity, Frontend, FrontendChanges, FrontendSpec, ObjectRef, Protocol},
};
use mycel_common::service::{Backend, BackendKey};
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
