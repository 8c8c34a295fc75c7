//! [`Flow`]: one kernel [`FlowEvent`] as users see it (JSON in the flow log, the admin
//! endpoint and `mycel flows`), with addresses, names, verdict and counters.

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{SystemTime, UNIX_EPOCH},
};

use mycel_common::{
    flow::{FLOW_EVENT_CLOSED, FLOW_EVENT_DROP, FLOW_EVENT_NEW, FlowEvent},
    policy::{
        DIR_INGRESS, DROP_REASON_INVALID_IPV6_EXTENSION_HEADER, DROP_REASON_INVALID_L4_HEADER,
        DROP_REASON_INVALID_PACKET, DROP_REASON_INVALID_SOURCE_IP, DROP_REASON_MTLS_STRICT,
        DROP_REASON_NONE, DROP_REASON_POLICY_DEFAULT_DENY, DROP_REASON_POLICY_DENY, IDENTITY_HOST,
        VERDICT_DENY,
    },
};
use serde::{Deserialize, Serialize};

use super::directory::Directory;

/// What the kernel reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The first packet of a connection was allowed.
    New,
    /// The connection ended (FIN/RST seen, or the flow expired).
    Closed,
    /// A packet was dropped by policy.
    Drop,
    /// An event kind this agent does not know (a newer kernel program).
    Unknown,
}

/// Hubble's verdict names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Forwarded,
    Dropped,
}

impl Verdict {
    /// `FORWARDED` or `DROPPED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "FORWARDED",
            Verdict::Dropped => "DROPPED",
        }
    }
}

/// Which way the connection goes, seen from the endpoint whose interface reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Initiated by the peer, towards the endpoint: the endpoint is the destination.
    Ingress,
    /// Initiated by the endpoint.
    Egress,
}

/// One side of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `ip:port`.
    pub address: SocketAddr,
    /// The numeric identity the kernel resolved.
    pub identity: u32,
    /// The workload's name, or `world` (outside every workload) or `host` (the node).
    pub workload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

impl Endpoint {
    /// `namespace/name` for workloads, else the reserved name.
    pub fn display_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.workload),
            None => self.workload.clone(),
        }
    }

    /// Whether `pattern` names this endpoint: `namespace/name`, a bare name, or an IP.
    pub fn matches(&self, pattern: &str) -> bool {
        if let Ok(ip) = pattern.parse::<IpAddr>() {
            return self.address.ip().to_canonical() == ip.to_canonical();
        }
        match pattern.split_once('/') {
            Some((ns, name)) => self.namespace.as_deref() == Some(ns) && self.workload == name,
            None => self.workload == pattern,
        }
    }
}

/// Packets and bytes one way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// One flow event, resolved to names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When the agent received the event, RFC 3339 in UTC.
    pub time: String,
    pub kind: Kind,
    pub verdict: Verdict,
    /// Hubble's drop reason name (`POLICY_DENIED`, `POLICY_DENY`), for drops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<Cow<'static, str>>,
    pub direction: Direction,
    /// The initiator.
    pub source: Endpoint,
    pub destination: Endpoint,
    /// `TCP`, `UDP`, `ICMPv4`, `ICMPv6`, or the protocol number.
    pub protocol: Cow<'static, str>,
    /// TCP flags seen on the flow so far (empty for other protocols).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_flags: Vec<Cow<'static, str>>,
    /// Source → destination, cumulative over the flow.
    pub forward: Counters,
    /// Destination → source, cumulative over the flow.
    pub reply: Counters,
    /// From the flow's first packet to its last, in nanoseconds.
    pub duration_ns: u64,
    /// The policy that decided (`namespace/name`), when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// ifindex of the host-side interface that reported the flow.
    pub ifindex: u32,
}

/// Hubble's name for an IP protocol number.
pub fn protocol_name(proto: u8) -> Cow<'static, str> {
    match proto {
        1 => "ICMPv4".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => Cow::Owned(n.to_string()),
    }
}

/// Hubble's `DropReason` name for a kernel `DROP_REASON_*`.
pub fn drop_reason_name(reason: u8) -> Cow<'static, str> {
    match reason {
        // Cilium's DROP_POLICY ("Policy denied"): nothing allowed it.
        DROP_REASON_POLICY_DEFAULT_DENY => "POLICY_DENIED".into(),
        // Cilium's DROP_POLICY_DENY ("Policy denied by denylist").
        DROP_REASON_POLICY_DENY => "POLICY_DENY".into(),
        // Cilium's DROP_POLICY_AUTH_REQUIRED ("Authentication required"): the workload
        // accepts only mutually authenticated traffic and this was plaintext.
        DROP_REASON_MTLS_STRICT => "AUTH_REQUIRED".into(),
        // Cilium's DROP_INVALID_SIP ("Invalid source ip"): anti-spoofing.
        DROP_REASON_INVALID_SOURCE_IP => "INVALID_SOURCE_IP".into(),
        // Cilium's DROP_INVALID ("Invalid packet"): a broken IP header, or a TCP fragment
        // overlapping the TCP header.
        DROP_REASON_INVALID_PACKET => "INVALID_PACKET_DROPPED".into(),
        // Cilium's DROP_CT_INVALID_HDR ("CT: Truncated or invalid header").
        DROP_REASON_INVALID_L4_HEADER => "CT_TRUNCATED_OR_INVALID_HEADER".into(),
        // Cilium's DROP_INVALID_EXTHDR ("Invalid IPv6 extension header").
        DROP_REASON_INVALID_IPV6_EXTENSION_HEADER => "INVALID_IPV6_EXTENSION_HEADER".into(),
        n => Cow::Owned(format!("UNKNOWN_{n}")),
    }
}

const TCP_FLAGS: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];

/// Names of the bits set in a TCP flags byte, lowest bit first.
pub fn tcp_flag_names(flags: u8) -> Vec<Cow<'static, str>> {
    TCP_FLAGS
        .iter()
        .enumerate()
        .filter(|(i, _)| flags & (1 << i) != 0)
        .map(|(_, n)| Cow::Borrowed(*n))
        .collect()
}

/// The address in a kernel `*_be` address (16 bytes in network order, IPv4 mapped).
pub fn words_ip(w: &[u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o).to_canonical()
}

/// The verdict of one event.
pub fn verdict_of(ev: &FlowEvent) -> Verdict {
    if ev.kind == FLOW_EVENT_DROP || ev.value.verdict == VERDICT_DENY {
        Verdict::Dropped
    } else {
        Verdict::Forwarded
    }
}

fn endpoint(dir: &Directory, address: SocketAddr, identity: u32) -> Endpoint {
    match dir.workload(address.ip()) {
        Some(w) => Endpoint {
            address,
            identity,
            workload: w.name.clone(),
            namespace: Some(w.namespace.clone()),
            service_account: Some(w.service_account.clone()),
            principal: Some(w.principal.clone()),
            app: w.app.clone(),
        },
        None => Endpoint {
            address,
            identity,
            workload: if identity == IDENTITY_HOST {
                "host"
            } else {
                "world"
            }
            .to_string(),
            namespace: None,
            service_account: None,
            principal: None,
            app: None,
        },
    }
}

impl Flow {
    /// Resolves `ev`, received at `now`, through `dir`.
    pub fn from_event(ev: &FlowEvent, dir: &Directory, now: SystemTime) -> Self {
        let k = &ev.key;
        let v = &ev.value;
        let src = SocketAddr::new(words_ip(&k.saddr_be), u16::from_be(k.sport_be));
        let dst = SocketAddr::new(words_ip(&k.daddr_be), u16::from_be(k.dport_be));
        let verdict = verdict_of(ev);
        let drop_reason = (verdict == Verdict::Dropped).then(|| {
            if v.drop_reason == DROP_REASON_NONE {
                drop_reason_name(DROP_REASON_POLICY_DEFAULT_DENY)
            } else {
                drop_reason_name(v.drop_reason)
            }
        });
        let policy = (v.policy_id != 0).then(|| match dir.policy(v.policy_id) {
            Some(name) => name.to_string(),
            None => format!("#{}", v.policy_id),
        });
        Flow {
            time: rfc3339(now),
            kind: match ev.kind {
                FLOW_EVENT_NEW => Kind::New,
                FLOW_EVENT_CLOSED => Kind::Closed,
                FLOW_EVENT_DROP => Kind::Drop,
                _ => Kind::Unknown,
            },
            verdict,
            drop_reason,
            direction: if ev.key.direction == DIR_INGRESS {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            source: endpoint(dir, src, v.src_identity),
            destination: endpoint(dir, dst, v.dst_identity),
            protocol: protocol_name(k.proto),
            tcp_flags: if k.proto == 6 {
                tcp_flag_names(v.tcp_flags)
            } else {
                Vec::new()
            },
            forward: Counters {
                packets: v.packets_fwd,
                bytes: v.bytes_fwd,
            },
            reply: Counters {
                packets: v.packets_rev,
                bytes: v.bytes_rev,
            },
            duration_ns: v.last_ns.saturating_sub(v.first_ns),
            policy,
            ifindex: ev.ifindex,
        }
    }
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2026-01-02T03:04:05.678Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use mycel_common::{
        flow::{FlowKey, FlowValue},
        policy::{DIR_EGRESS, VERDICT_ALLOW},
    };

    use super::*;
    use crate::flows::directory::WorkloadInfo;

    pub(crate) fn ip_words(ip: IpAddr) -> [u32; 4] {
        let o = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        [w(0), w(4), w(8), w(12)]
    }

    /// A synthetic event: `src` → `dst` over `proto`.
    pub(crate) fn event(kind: u8, src: &str, dst: &str, proto: u8) -> FlowEvent {
        let src: SocketAddr = src.parse().unwrap();
        let dst: SocketAddr = dst.parse().unwrap();
        FlowEvent {
            key: FlowKey {
                saddr_be: ip_words(src.ip()),
                daddr_be: ip_words(dst.ip()),
                sport_be: src.port().to_be(),
                dport_be: dst.port().to_be(),
                proto,
                direction: DIR_INGRESS,
                _pad: [0; 2],
            },
            value: FlowValue {
                packets_fwd: 1,
                bytes_fwd: 60,
                packets_rev: 0,
                bytes_rev: 0,
                first_ns: 1_000,
                last_ns: 1_000,
                src_identity: 256,
                dst_identity: 257,
                policy_revision: 1,
                tcp_flags: 0x02,
                verdict: if kind == FLOW_EVENT_DROP {
                    VERDICT_DENY
                } else {
                    VERDICT_ALLOW
                },
                drop_reason: if kind == FLOW_EVENT_DROP {
                    DROP_REASON_POLICY_DEFAULT_DENY
                } else {
                    DROP_REASON_NONE
                },
                closed: u8::from(kind == FLOW_EVENT_CLOSED),
                policy_id: 0,
                fin_seen: 0,
                flags: 0,
                _pad: [0; 2],
            },
            kind,
            direction: DIR_INGRESS,
            _pad: [0; 2],
            ifindex: 7,
        }
    }

    pub(crate) fn workload(ns: &str, name: &str) -> WorkloadInfo {
        WorkloadInfo {
            namespace: ns.into(),
            name: name.into(),
            service_account: name.into(),
            principal: format!("spiffe://cluster.local/ns/{ns}/sa/{name}"),
            app: Some(name.into()),
        }
    }

    /// Source ports of JSON flow lines (how tests tell their synthetic flows apart).
    pub(crate) fn source_ports<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<u16> {
        lines
            .into_iter()
            .map(|l| {
                serde_json::from_str::<Flow>(l)
                    .unwrap()
                    .source
                    .address
                    .port()
            })
            .collect()
    }

    /// An admin server on 127.0.0.1:0 whose flow ring holds a forwarded flow from
    /// 10.0.0.1:40000 and a dropped one from 10.0.0.2:40001; also the pipeline, for more.
    pub(crate) async fn admin_with_two_flows() -> (
        tokio::task::JoinHandle<()>,
        std::net::SocketAddr,
        crate::flows::Flows,
        Directory,
        std::sync::Arc<crate::admin::Shared>,
        tempfile::TempDir,
    ) {
        use std::sync::Arc;

        use crate::{
            admin::{Role, Shared, serve_with_flows},
            flows::{self, Flows},
            metrics::KernelCounters,
        };
        use mycel_common::flow::{FLOW_EVENT_DROP, FLOW_EVENT_NEW};

        let dir = tempfile::tempdir().unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let (mut flows, handle) = Flows::new(&flows::Config::default(), &mut registry).unwrap();
        let shared = Arc::new(Shared {
            ready: Default::default(),
            status: Default::default(),
            owners: Default::default(),
            registry,
            kernel: Arc::new(KernelCounters::new(dir.path())),
            pin_dir: dir.path().to_path_buf(),
        });
        let names = directory();
        flows.handle(
            &event(FLOW_EVENT_NEW, "10.0.0.1:40000", "10.0.0.2:8080", 6),
            &names,
        );
        flows.handle(
            &event(FLOW_EVENT_DROP, "10.0.0.2:40001", "10.0.0.1:9090", 6),
            &names,
        );
        let (task, addr) = serve_with_flows(
            "127.0.0.1:0".parse().unwrap(),
            Role::Admin,
            shared.clone(),
            Some(handle),
        )
        .await
        .unwrap();
        (task, addr, flows, names, shared, dir)
    }

    pub(crate) fn directory() -> Directory {
        let d = Directory::new();
        d.set_workloads([
            ("10.0.0.1".parse().unwrap(), workload("shop", "a")),
            ("10.0.0.2".parse().unwrap(), workload("shop", "b")),
            ("fd00::2".parse().unwrap(), workload("shop", "b")),
        ]);
        d.set_policies([(3, "shop/deny-b".to_string())]);
        d
    }

    #[test]
    fn a_new_flow_becomes_a_record_with_names() {
        let mut ev = event(FLOW_EVENT_NEW, "10.0.0.1:40000", "10.0.0.2:8080", 6);
        ev.value.tcp_flags = 0x12;
        ev.value.last_ns = 1_000 + 5_000_000;
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let f = Flow::from_event(&ev, &directory(), at);
        assert_eq!(f.time, "2023-11-14T22:13:20.123Z");
        assert_eq!(f.kind, Kind::New);
        assert_eq!(f.verdict, Verdict::Forwarded);
        assert_eq!(f.drop_reason, None);
        assert_eq!(f.source.address.to_string(), "10.0.0.1:40000");
        assert_eq!(f.source.display_name(), "shop/a");
        assert_eq!(
            f.destination.principal.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/b")
        );
        assert_eq!(f.protocol, "TCP");
        assert_eq!(f.tcp_flags, ["SYN", "ACK"]);
        assert_eq!(f.duration_ns, 5_000_000);
        assert_eq!(
            f.forward,
            Counters {
                packets: 1,
                bytes: 60
            }
        );
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["verdict"], "FORWARDED");
        assert_eq!(json["kind"], "new");
        assert_eq!(json["destination"]["address"], "10.0.0.2:8080");
        let back: Flow = serde_json::from_value(json).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn packet_drop_reasons_have_hubble_names() {
        for (reason, name) in [
            (DROP_REASON_INVALID_SOURCE_IP, "INVALID_SOURCE_IP"),
            (DROP_REASON_INVALID_PACKET, "INVALID_PACKET_DROPPED"),
            (
                DROP_REASON_INVALID_L4_HEADER,
                "CT_TRUNCATED_OR_INVALID_HEADER",
            ),
            (
                DROP_REASON_INVALID_IPV6_EXTENSION_HEADER,
                "INVALID_IPV6_EXTENSION_HEADER",
            ),
            (DROP_REASON_MTLS_STRICT, "AUTH_REQUIRED"),
        ] {
            assert_eq!(drop_reason_name(reason), name);
        }
    }

    #[test]
    fn drops_name_reason_policy_and_world() {
        let mut ev = event(FLOW_EVENT_DROP, "192.0.2.9:5353", "[fd00::2]:53", 17);
        ev.value.src_identity = 2;
        ev.value.drop_reason = DROP_REASON_POLICY_DENY;
        ev.value.policy_id = 3;
        ev.key.direction = DIR_EGRESS;
        ev.direction = DIR_EGRESS;
        let f = Flow::from_event(&ev, &directory(), SystemTime::now());
        assert_eq!(f.verdict, Verdict::Dropped);
        assert_eq!(f.drop_reason.as_deref(), Some("POLICY_DENY"));
        assert_eq!(f.policy.as_deref(), Some("shop/deny-b"));
        assert_eq!(f.source.workload, "world");
        assert_eq!(f.source.namespace, None);
        assert_eq!(f.destination.display_name(), "shop/b");
        assert_eq!(f.destination.address.to_string(), "[fd00::2]:53");
        assert_eq!(f.protocol, "UDP");
        assert!(f.tcp_flags.is_empty());
        assert_eq!(f.direction, Direction::Egress);

        ev.value.drop_reason = DROP_REASON_POLICY_DEFAULT_DENY;
        ev.value.policy_id = 99;
        let f = Flow::from_event(&ev, &directory(), SystemTime::now());
        assert_eq!(f.drop_reason.as_deref(), Some("POLICY_DENIED"));
        assert_eq!(f.policy.as_deref(), Some("#99"));
    }

    #[test]
    fn endpoints_match_names_namespaces_and_ips() {
        let ev = event(FLOW_EVENT_NEW, "10.0.0.1:40000", "10.0.0.2:8080", 6);
        let f = Flow::from_event(&ev, &directory(), SystemTime::now());
        assert!(f.source.matches("shop/a"));
        assert!(f.source.matches("a"));
        assert!(f.source.matches("10.0.0.1"));
        assert!(f.source.matches("::ffff:10.0.0.1"));
        assert!(!f.source.matches("other/a"));
        assert!(!f.source.matches("b"));
    }

    #[test]
    fn dates_format_as_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
