//! Recent flows in memory, and followers: a bounded ring of the newest records and a
//! broadcast channel that never waits for a slow reader (a lagging follower is told how
//! many records it lost).

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::{broadcast, mpsc};

use super::record::{Flow, Verdict};

/// Records a follower may fall behind by before it is told it lost some.
pub const FOLLOW_BUFFER: usize = 1_024;
/// Encoded lines waiting for one follower's connection.
const FOLLOW_LINES: usize = 64;

/// Which flows a query or follower wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Source is this workload (`namespace/name` or name) or IP.
    pub from: Option<String>,
    /// Destination is this workload or IP.
    pub to: Option<String>,
    pub verdict: Option<Verdict>,
    /// Source or destination is in this namespace.
    pub namespace: Option<String>,
}

impl Filter {
    /// Whether `flow` passes every condition.
    pub fn matches(&self, flow: &Flow) -> bool {
        self.from.as_deref().is_none_or(|p| flow.source.matches(p))
            && self
                .to
                .as_deref()
                .is_none_or(|p| flow.destination.matches(p))
            && self.verdict.is_none_or(|v| flow.verdict == v)
            && self.namespace.as_deref().is_none_or(|ns| {
                flow.source.namespace.as_deref() == Some(ns)
                    || flow.destination.namespace.as_deref() == Some(ns)
            })
    }
}

#[derive(Debug)]
struct Ring {
    flows: VecDeque<Arc<Flow>>,
    capacity: usize,
}

/// The newest flows and the followers' channel.
#[derive(Debug)]
pub struct Store {
    // One lock over ring and send, so a new follower's backlog and live stream neither
    // overlap nor leave a gap.
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Arc<Flow>>,
}

impl Store {
    /// A store keeping the newest `capacity` flows (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            ring: Mutex::new(Ring {
                flows: VecDeque::with_capacity(capacity),
                capacity,
            }),
            tx: broadcast::channel(FOLLOW_BUFFER).0,
        }
    }

    /// Keeps `flow` and hands it to the followers.
    pub fn push(&self, flow: Arc<Flow>) {
        let Ok(mut ring) = self.ring.lock() else {
            return;
        };
        if ring.flows.len() >= ring.capacity {
            ring.flows.pop_front();
        }
        ring.flows.push_back(flow.clone());
        // No receivers is not an error: nobody follows.
        let _ = self.tx.send(flow);
    }

    /// The newest `limit` flows matching `filter`, oldest first.
    pub fn query(&self, filter: &Filter, limit: Option<usize>) -> Vec<Arc<Flow>> {
        let Ok(ring) = self.ring.lock() else {
            return Vec::new();
        };
        let limit = limit.unwrap_or(usize::MAX);
        let mut out: Vec<Arc<Flow>> = ring
            .flows
            .iter()
            .rev()
            .filter(|f| filter.matches(f))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Starts following: the newest `backlog` matching flows, then every new one, as JSON
    /// lines. Must be called within a Tokio runtime (it spawns the follower's task).
    pub fn follow(&self, filter: Filter, backlog: usize) -> FollowBody {
        let (lines_tx, lines_rx) = mpsc::channel(FOLLOW_LINES);
        let (first, mut rx) = match self.ring.lock() {
            Ok(ring) => {
                let first: Vec<Arc<Flow>> = {
                    let mut v: Vec<_> = ring
                        .flows
                        .iter()
                        .rev()
                        .filter(|f| filter.matches(f))
                        .take(backlog)
                        .cloned()
                        .collect();
                    v.reverse();
                    v
                };
                (first, self.tx.subscribe())
            }
            Err(_) => (Vec::new(), self.tx.subscribe()),
        };
        tokio::spawn(async move {
            for f in first {
                if lines_tx.send(line(&f)).await.is_err() {
                    return;
                }
            }
            loop {
                let l = match rx.recv().await {
                    Ok(f) if filter.matches(&f) => line(&f),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        Bytes::from(format!("{{\"lost\":{n}}}\n"))
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                // Waits only for this follower's connection; the broadcast channel keeps
                // going without it, and the follower learns what it lost.
                if lines_tx.send(l).await.is_err() {
                    return;
                }
            }
        });
        FollowBody { rx: lines_rx }
    }
}

fn line(flow: &Flow) -> Bytes {
    match serde_json::to_vec(flow) {
        Ok(mut v) => {
            v.push(b'\n');
            Bytes::from(v)
        }
        Err(e) => Bytes::from(format!(
            "{{\"error\":{}}}\n",
            serde_json::Value::String(e.to_string())
        )),
    }
}

/// A streaming HTTP body of JSON lines for one follower; ends when the agent stops.
#[derive(Debug)]
pub struct FollowBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for FollowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|l| l.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use http_body_util::BodyExt as _;
    use mycel_common::flow::{FLOW_EVENT_DROP, FLOW_EVENT_NEW};

    use super::*;
    use crate::flows::record::tests::{directory, event};

    fn flow(kind: u8, src: &str, dst: &str) -> Arc<Flow> {
        Arc::new(Flow::from_event(
            &event(kind, src, dst, 6),
            &directory(),
            SystemTime::now(),
        ))
    }

    #[test]
    fn ring_keeps_the_newest_and_filters() {
        let s = Store::new(3);
        s.push(flow(FLOW_EVENT_NEW, "10.0.0.1:1", "10.0.0.2:80"));
        s.push(flow(FLOW_EVENT_DROP, "10.0.0.2:2", "10.0.0.1:80"));
        s.push(flow(FLOW_EVENT_NEW, "10.0.0.1:3", "192.0.2.1:80"));
        s.push(flow(FLOW_EVENT_DROP, "10.0.0.1:4", "10.0.0.2:9090"));
        let all = s.query(&Filter::default(), None);
        let ports: Vec<u16> = all.iter().map(|f| f.source.address.port()).collect();
        assert_eq!(ports, [2, 3, 4], "oldest dropped, newest last");
        let ports = |f: &Filter, limit| -> Vec<u16> {
            s.query(f, limit)
                .iter()
                .map(|f| f.source.address.port())
                .collect()
        };
        let from_a = Filter {
            from: Some("shop/a".into()),
            ..Default::default()
        };
        assert_eq!(ports(&from_a, None), [3, 4]);
        assert_eq!(ports(&from_a, Some(1)), [4]);
        let dropped = Filter {
            verdict: Some(Verdict::Dropped),
            ..Default::default()
        };
        assert_eq!(ports(&dropped, None), [2, 4]);
        let to_b = Filter {
            to: Some("10.0.0.2".into()),
            ..Default::default()
        };
        assert_eq!(ports(&to_b, None), [4]);
        let to_world = Filter {
            to: Some("world".into()),
            ..Default::default()
        };
        assert_eq!(ports(&to_world, None), [3]);
        let other_ns = Filter {
            namespace: Some("other".into()),
            ..Default::default()
        };
        assert_eq!(ports(&other_ns, None), Vec::<u16>::new());
        let shop = Filter {
            namespace: Some("shop".into()),
            ..Default::default()
        };
        assert_eq!(ports(&shop, None), [2, 3, 4]);
    }

    async fn next_line(body: &mut FollowBody) -> String {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
            .await
            .expect("a line within 5 s")
            .expect("the stream goes on")
            .unwrap();
        String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn followers_get_backlog_then_live_flows_and_hear_about_losses() {
        let s = Store::new(16);
        s.push(flow(FLOW_EVENT_NEW, "10.0.0.1:1", "10.0.0.2:80"));
        s.push(flow(FLOW_EVENT_DROP, "10.0.0.2:2", "10.0.0.1:80"));
        let mut body = s.follow(
            Filter {
                from: Some("a".into()),
                ..Default::default()
            },
            5,
        );
        let l = next_line(&mut body).await;
        let f: Flow = serde_json::from_str(&l).unwrap();
        assert_eq!(f.source.address.port(), 1);
        s.push(flow(FLOW_EVENT_DROP, "10.0.0.2:3", "10.0.0.1:80"));
        s.push(flow(FLOW_EVENT_NEW, "10.0.0.1:4", "10.0.0.2:80"));
        let f: Flow = serde_json::from_str(&next_line(&mut body).await).unwrap();
        assert_eq!(f.source.address.port(), 4, "the filter skips b's flow");

        // A follower that reads nothing falls behind; the agent does not wait for it.
        let mut slow = s.follow(Filter::default(), 0);
        for p in 0..(FOLLOW_BUFFER + FOLLOW_LINES + 500) as u16 {
            s.push(flow(
                FLOW_EVENT_NEW,
                &format!("10.0.0.1:{p}"),
                "10.0.0.2:80",
            ));
        }
        let mut lost = None;
        for _ in 0..(FOLLOW_LINES + 10) {
            let l = next_line(&mut slow).await;
            if l.starts_with("{\"lost\":") {
                lost = Some(l);
                break;
            }
        }
        let lost = lost.expect("a lost line");
        let v: serde_json::Value = serde_json::from_str(&lost).unwrap();
        assert!(v["lost"].as_u64().unwrap() > 0, "{lost}");
    }
}
