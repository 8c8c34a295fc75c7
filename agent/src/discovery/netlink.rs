//! The few rtnetlink queries discovery needs, each answering in plain Rust types: a
//! route lookup, one link by index, the neighbour and bridge forwarding tables, the
//! addresses of a namespace and namespace ids.
//!
//! "Not there" (no route, no such link) is `Ok(None)`: a pod may not be wired up yet, or
//! may be gone already, and the caller retries later. Only failures of the netlink
//! connection itself, or answers the kernel should never give, are errors.

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};

use futures::TryStreamExt as _;
use rtnetlink::Handle;
use rtnetlink::packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState,
};
use rtnetlink::packet_route::nsid::{NsidAttribute, NsidMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

/// What discovery needs to know about one network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: `veth`, `bridge`, … (`None` for devices without one, like `lo`).
    pub kind: Option<InfoKind>,
    /// `IFLA_LINK`: for a veth, its peer's ifindex (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// `IFLA_LINK_NETNSID`: present when the peer lives in another namespace; the id that
    /// namespace has in this one.
    pub peer_netnsid: Option<i32>,
}

impl Link {
    /// Whether this is one end of a pair whose other end sits in a pod: a veth, or a
    /// netkit device (the veth replacement some CNIs use on recent kernels).
    pub fn is_pod_pair(&self) -> bool {
        matches!(self.kind, Some(InfoKind::Veth | InfoKind::Netkit))
    }

    /// `name (ifindex N)`, for messages.
    pub fn describe(&self) -> String {
        format!("{} (ifindex {})", self.name, self.index)
    }
}

/// The answer of a route lookup for one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RouteLookup {
    /// The output interface.
    pub oif: u32,
    /// Whether the route goes through a gateway: then the address is not on a link of
    /// this namespace, so the output interface is not the pod's.
    pub via_gateway: bool,
}

/// Whether a netlink error is the kernel's errno `errno`.
fn is_errno(error: &rtnetlink::Error, errno: i32) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// `ip route get <ip>`: the route the kernel would use to send to `ip`. `Ok(None)` when
/// there is none, or when it is not a unicast route (local, unreachable, blackhole, …).
pub(crate) async fn route_get(
    handle: &Handle,
    ip: IpAddr,
) -> Result<Option<RouteLookup>, rtnetlink::Error> {
    let mut message = RouteMessage::default();
    let (family, prefix) = match ip {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    message.header.address_family = family;
    message.header.destination_prefix_length = prefix;
    message
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(ip)));
    let answer = handle.route().get(message).execute().try_next().await;
    let route = match answer {
        Ok(Some(route)) => route,
        Ok(None) => return Ok(None),
        // No route at all: nothing on this node leads to the address (yet).
        Err(e) if is_errno(&e, libc::ENETUNREACH) || is_errno(&e, libc::EHOSTUNREACH) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if route.header.kind != RouteType::Unicast {
        return Ok(None);
    }
    let mut oif = None;
    let mut via_gateway = false;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => via_gateway = true,
            _ => {}
        }
    }
    Ok(oif.map(|oif| RouteLookup { oif, via_gateway }))
}

/// `ip link show` for one ifindex; `Ok(None)` when there is no such interface.
pub(crate) async fn link_by_index(
    handle: &Handle,
    index: u32,
) -> Result<Option<Link>, rtnetlink::Error> {
    let answer = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await;
    let message = match answer {
        Ok(Some(message)) => message,
        Ok(None) => return Ok(None),
        Err(e) if is_errno(&e, libc::ENODEV) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        kind: None,
        peer_index: None,
        peer_netnsid: None,
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Link(peer) => link.peer_index = Some(peer),
            LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(id),
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.into_iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Ok(Some(link))
}

/// `ip neigh show <ip> dev <ifindex>`: the link-layer address the neighbour table holds
/// for `ip` on interface `ifindex`, if it has a usable one (incomplete and failed entries
/// have none).
pub(crate) async fn neighbour_mac(
    handle: &Handle,
    ifindex: u32,
    ip: IpAddr,
) -> Result<Option<Vec<u8>>, rtnetlink::Error> {
    let family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let wanted = match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    };
    let mut entries = handle
        .neighbours()
        .get()
        .set_address_family(family)
        .execute();
    let mut found = None;
    // Read the dump to its end: stopping early would leave the rest of it queued on the
    // connection.
    while let Some(entry) = entries.try_next().await? {
        if found.is_some()
            || entry.header.ifindex != ifindex
            || matches!(
                entry.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
            )
        {
            continue;
        }
        let mut destination = false;
        let mut mac = None;
        for attribute in entry.attributes {
            match attribute {
                NeighbourAttribute::Destination(address) => destination = address == wanted,
                NeighbourAttribute::LinkLayerAddress(address) if !address.is_empty() => {
                    mac = Some(address);
                }
                _ => {}
            }
        }
        if destination {
            found = mac;
        }
    }
    Ok(found)
}

/// `bridge fdb show br <bridge>`: the bridge ports on which the bridge has learned (or
/// was told) the MAC address `mac`. Entries for the ports' own addresses (`permanent`)
/// are left out: a pod's MAC is never one of them.
pub(crate) async fn fdb_ports(
    handle: &Handle,
    bridge: u32,
    mac: &[u8],
) -> Result<Vec<u32>, rtnetlink::Error> {
    let mut entries = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute();
    let mut ports = Vec::new();
    while let Some(entry) = entries.try_next().await? {
        // The bridge's own entries carry NTF_SELF and name the bridge itself; learned
        // entries name the port and carry NDA_MASTER = the bridge.
        if entry.header.ifindex == bridge
            || entry.header.flags.contains(NeighbourFlags::Own)
            || entry.header.state == NeighbourState::Permanent
        {
            continue;
        }
        let mut on_bridge = false;
        let mut same_mac = false;
        for attribute in &entry.attributes {
            match attribute {
                NeighbourAttribute::Controller(master) => on_bridge = *master == bridge,
                NeighbourAttribute::LinkLayerAddress(address) => {
                    same_mac = address.as_slice() == mac;
                }
                _ => {}
            }
        }
        if on_bridge && same_mac && !ports.contains(&entry.header.ifindex) {
            ports.push(entry.header.ifindex);
        }
    }
    Ok(ports)
}

/// `ip addr show to <ip>`: the ifindex of the interface holding `ip` in this namespace.
pub(crate) async fn interface_with_address(
    handle: &Handle,
    ip: IpAddr,
) -> Result<Option<u32>, rtnetlink::Error> {
    let mut addresses = handle.address().get().execute();
    let mut found = None;
    while let Some(address) = addresses.try_next().await? {
        if found.is_some() {
            continue;
        }
        // IFA_LOCAL is the address itself; IFA_ADDRESS is the same except on
        // point-to-point links configured with a peer, where it names the peer.
        let local = address.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(local) => Some(*local),
            _ => None,
        });
        let own = local.or_else(|| {
            address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(address) => Some(*address),
                _ => None,
            })
        });
        if own == Some(ip) {
            found = Some(address.header.index);
        }
    }
    Ok(found)
}

/// `ip netns identify`-like: the id this namespace gives the namespace `ns` (an open
/// `/proc/<pid>/ns/net` or similar), or `None` when it has given it none.
pub(crate) async fn netnsid_of(
    handle: &Handle,
    ns: impl AsFd,
) -> Result<Option<i32>, rtnetlink::Error> {
    let mut message = NsidMessage::default();
    // NETNSA_FD: the kernel resolves the descriptor in the calling process; it is only
    // read while this request is handled, and `ns` outlives the call.
    let fd = ns.as_fd().as_raw_fd();
    let fd = u32::try_from(fd).map_err(|_| rtnetlink::Error::InvalidNla(format!("fd {fd}")))?;
    message.attributes.push(NsidAttribute::Fd(fd));
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(message));
    request.header.flags = NLM_F_REQUEST;
    let mut handle = handle.clone();
    let mut answers = handle.request(request)?;
    let mut id = None;
    while let Some(answer) = futures::StreamExt::next(&mut answers).await {
        match answer.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(reply)) => {
                id = reply.attributes.iter().find_map(|a| match a {
                    NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                    _ => None,
                });
            }
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
            _ => {}
        }
    }
    Ok(id)
}
