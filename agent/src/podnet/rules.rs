//! The policy rules and routes of [`super::PodNet::prepare`], one per address family:
//! `ip rule add fwmark TRANSPARENT_MARK/MARK_MASK lookup TRANSPARENT_TABLE
//! priority TRANSPARENT_RULE_PRIORITY` and `ip route add local 0.0.0.0/0 dev lo table
//! TRANSPARENT_TABLE` (`::/0` for IPv6).
//!
//! Adding uses `NLM_F_EXCL`, so the kernel answers `EEXIST` rather than adding a duplicate
//! (it compares priority, mark, mask and table for rules): that is success. Removing what
//! is not there (`ENOENT` for rules, `ESRCH` for routes) is success too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::{MARK_MASK, TRANSPARENT_MARK, TRANSPARENT_RULE_PRIORITY, TRANSPARENT_TABLE};

/// `lo` is always interface 1 of a network namespace (`LOOPBACK_IFINDEX` in the kernel's
/// `include/net/flow.h`): it is created first, with that index, in every namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// Removing a rule removes one copy; copies can only exist if something other than
/// `prepare` added them (`prepare` never adds a second). Bounded all the same.
const MAX_RULE_COPIES: usize = 16;

/// A netlink request that failed, and what it was doing.
#[derive(Debug)]
pub(super) struct Failure {
    pub action: String,
    pub source: Box<rtnetlink::Error>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Adds the rule and the route of both families. The IPv6 ones are skipped for an IPv4
/// workload when the namespace cannot have them (IPv6 disabled on `lo`, or not built in).
pub(super) async fn install(handle: Handle, pod_ip: IpAddr) -> Result<(), Failure> {
    install_family(&handle, Family::V4).await?;
    match install_family(&handle, Family::V6).await {
        Err(failure) if pod_ip.is_ipv4() && ipv6_unavailable(&failure.source) => {
            tracing::debug!(
                %pod_ip,
                error = %failure.source,
                "no IPv6 in the pod's namespace; transparent sockets there are IPv4 only"
            );
            Ok(())
        }
        other => other,
    }
}

/// Whether the namespace holds `prepare`'s rule (either family): the mark that mycel set
/// the namespace up, which `tcp_fwmark_accept` is undone by.
pub(super) async fn present(handle: &Handle) -> Result<bool, Failure> {
    for family in [Family::V4, Family::V6] {
        let version = match family {
            Family::V4 => IpVersion::V4,
            Family::V6 => IpVersion::V6,
        };
        let rules: Vec<RuleMessage> = match handle.rule().get(version).execute().try_collect().await
        {
            Ok(rules) => rules,
            Err(e) if ipv6_gone(family, &e) => continue,
            Err(source) => {
                return Err(Failure {
                    action: format!("list the {} rules", family.name()),
                    source: Box::new(source),
                });
            }
        };
        let ours = rule_message(family).attributes;
        if rules
            .iter()
            .any(|r| ours.iter().all(|a| r.attributes.contains(a)))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Removes the route(s) and then the rule(s) of both families (the rule last: it is what
/// [`present`] finds, so an interrupted removal is finished by the next one), and says what
/// it removed in `removed`.
pub(super) async fn remove(handle: &Handle, removed: &mut Vec<String>) -> Result<(), Failure> {
    for family in [Family::V4, Family::V6] {
        match handle.route().del(route_message(family)).execute().await {
            Ok(()) => removed.push(format!(
                "{} route `local default dev lo table {TRANSPARENT_TABLE}`",
                family.name()
            )),
            Err(e) if is_errno(&e, libc::ESRCH) || is_errno(&e, libc::ENOENT) => {}
            Err(e) if ipv6_gone(family, &e) => {}
            Err(source) => {
                return Err(Failure {
                    action: format!(
                        "remove the {} local route of table {TRANSPARENT_TABLE}",
                        family.name()
                    ),
                    source: Box::new(source),
                });
            }
        }
    }
    for family in [Family::V4, Family::V6] {
        for _ in 0..MAX_RULE_COPIES {
            match handle.rule().del(rule_message(family)).execute().await {
                Ok(()) => removed.push(format!(
                    "{} rule `fwmark {TRANSPARENT_MARK:#x}/{MARK_MASK:#x} lookup {TRANSPARENT_TABLE}`",
                    family.name()
                )),
                Err(e) if is_errno(&e, libc::ENOENT) || ipv6_gone(family, &e) => break,
                Err(source) => {
                    return Err(Failure {
                        action: format!(
                            "remove the {} rule for the transparent mark",
                            family.name()
                        ),
                        source: Box::new(source),
                    });
                }
            }
        }
    }
    Ok(())
}

async fn install_family(handle: &Handle, family: Family) -> Result<(), Failure> {
    let mut rule = handle.rule().add();
    *rule.message_mut() = rule_message(family);
    match rule.execute().await {
        Ok(()) => {}
        Err(e) if is_errno(&e, libc::EEXIST) => {}
        Err(source) => {
            return Err(Failure {
                action: format!(
                    "add the {} rule `fwmark {TRANSPARENT_MARK:#x}/{MARK_MASK:#x} \
                     lookup {TRANSPARENT_TABLE}`",
                    family.name()
                ),
                source: Box::new(source),
            });
        }
    }
    match handle.route().add(route_message(family)).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
        Err(source) => Err(Failure {
            action: format!(
                "add the {} route `local default dev lo table {TRANSPARENT_TABLE}`",
                family.name()
            ),
            source: Box::new(source),
        }),
    }
}

/// `fwmark TRANSPARENT_MARK/MARK_MASK lookup TRANSPARENT_TABLE priority
/// TRANSPARENT_RULE_PRIORITY`. The same message adds and removes it.
fn rule_message(family: Family) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    message.header.action = RuleAction::ToTable;
    // Tables above 255 go in FRA_TABLE; the header's one-byte field stays RT_TABLE_UNSPEC.
    message.header.table = 0;
    message.attributes = vec![
        RuleAttribute::Priority(TRANSPARENT_RULE_PRIORITY),
        RuleAttribute::FwMark(TRANSPARENT_MARK),
        RuleAttribute::FwMask(MARK_MASK),
        RuleAttribute::Table(TRANSPARENT_TABLE),
    ];
    message
}

/// `local 0.0.0.0/0 dev lo table TRANSPARENT_TABLE` (`::/0` for IPv6), as `ip route add`
/// makes it (scope host, protocol boot). The same message adds and removes it.
fn route_message(family: Family) -> RouteMessage {
    match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .table_id(TRANSPARENT_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .protocol(RouteProtocol::Boot)
            .output_interface(LOOPBACK_IFINDEX)
            .build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .table_id(TRANSPARENT_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .protocol(RouteProtocol::Boot)
            .output_interface(LOOPBACK_IFINDEX)
            .build(),
    }
}

/// Whether a netlink error is the kernel's errno `errno`.
fn is_errno(error: &rtnetlink::Error, errno: i32) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// The answers of a namespace without usable IPv6: `EAFNOSUPPORT` (not built in),
/// `EACCES` (disabled on `lo`: "IPv6 is disabled on nexthop device").
fn ipv6_unavailable(error: &rtnetlink::Error) -> bool {
    is_errno(error, libc::EAFNOSUPPORT) || is_errno(error, libc::EACCES)
}

/// Removing an IPv6 rule or route where IPv6 cannot exist: nothing to remove.
fn ipv6_gone(family: Family, error: &rtnetlink::Error) -> bool {
    family == Family::V6 && is_errno(error, libc::EAFNOSUPPORT)
}
