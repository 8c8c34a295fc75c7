//! Reading what the TC programs record: flow events from the `FLOW_EVENTS` ring buffer and
//! the per-flow counters in `FLOWS`.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, RingBuf};
use mycel_common::flow::{FlowEvent, FlowKey, FlowValue};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::warn;

use super::Error;

const FLOWS: &str = "FLOWS";
const FLOW_EVENTS: &str = "FLOW_EVENTS";

/// Opens the pinned `FLOW_EVENTS` ring buffer under `pin_dir`.
pub fn flow_events_from_pin(pin_dir: &Path) -> Result<RingBuf<MapData>, Error> {
    let data =
        MapData::from_pin(pin_dir.join(FLOW_EVENTS)).map_err(|e| Error::map(FLOW_EVENTS, e))?;
    RingBuf::try_from(Map::RingBuf(data)).map_err(|e| Error::map(FLOW_EVENTS, e))
}

/// A running flow event reader; stops when dropped.
#[derive(Debug)]
pub struct FlowReader {
    dropped: Arc<AtomicU64>,
    malformed: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FlowReader {
    /// Events read from the ring buffer but dropped because the consumer lagged (the
    /// channel was full).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records of the wrong size (an object built from other sources), skipped.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
}

impl Drop for FlowReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often the reader drains the ring buffer without being woken: the delay of flow
/// events when the node is quiet.
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Moves every event in `ring` to `tx`, counting malformed records and events the
/// consumer had no room for; false once the consumer is gone.
fn forward(
    ring: &mut RingBuf<MapData>,
    tx: &mpsc::Sender<FlowEvent>,
    dropped: &AtomicU64,
    malformed: &AtomicU64,
) -> bool {
    while let Some(item) = ring.next() {
        let Some(event) = parse(&item) else {
            malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        drop(item);
        match tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
        }
    }
    true
}

/// Starts reading `ring` on the current tokio runtime, delivering each event to the
/// returned channel (holding at most `capacity` events). The reader never waits for the
/// consumer: when the channel is full, the event is counted in [`FlowReader::dropped`].
/// Events lost in the kernel (ring buffer full) are counted there in the
/// `flow_events_lost` counter.
pub fn spawn_flow_reader(
    ring: RingBuf<MapData>,
    capacity: usize,
) -> Result<(FlowReader, mpsc::Receiver<FlowEvent>), Error> {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    #[expect(
        deprecated,
        reason = "the replacement is an unsafe fn and this crate forbids unsafe code; the \
                  ring buffer owns its fd, which stays open while registered"
    )]
    let mut fd =
        AsyncFd::with_interest(ring, Interest::READABLE).map_err(|source| Error::FlowEvents {
            detail: format!("cannot register the ring buffer with the runtime: {source}"),
        })?;
    let dropped = Arc::new(AtomicU64::new(0));
    let malformed = Arc::new(AtomicU64::new(0));
    let (d, m) = (dropped.clone(), malformed.clone());
    let task = tokio::spawn(async move {
        // The kernel wakes the reader only when the ring fills up (a wakeup per event would
        // cost a context switch per connection); otherwise it is drained on this timer.
        let mut drain = tokio::time::interval(DRAIN_INTERVAL);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ready = fd.readable_mut() => {
                    let mut guard = match ready {
                        Ok(g) => g,
                        Err(e) => {
                            warn!("flow event reader stopped: {e}");
                            return;
                        }
                    };
                    if !forward(guard.get_inner_mut(), &tx, &d, &m) {
                        return;
                    }
                    guard.clear_ready();
                }
                _ = drain.tick() => {
                    if !forward(fd.get_mut(), &tx, &d, &m) {
                        return;
                    }
                }
            }
        }
    });
    Ok((
        FlowReader {
            dropped,
            malformed,
            task,
        },
        rx,
    ))
}

/// Decodes one ring buffer record (`FlowEvent`'s `#[repr(C)]` layout, native byte order).
pub fn parse(b: &[u8]) -> Option<FlowEvent> {
    if b.len() != size_of::<FlowEvent>() {
        return None;
    }
    let u8_at = |o: usize| b.get(o).copied();
    let u16_at = |o: usize| Some(u16::from_ne_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_ne_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let addr = |o: usize| -> Option<[u32; 4]> {
        Some([u32_at(o)?, u32_at(o + 4)?, u32_at(o + 8)?, u32_at(o + 12)?])
    };
    let key = FlowKey {
        saddr_be: addr(0)?,
        daddr_be: addr(16)?,
        sport_be: u16_at(32)?,
        dport_be: u16_at(34)?,
        proto: u8_at(36)?,
        direction: u8_at(37)?,
        _pad: [0; 2],
    };
    let v = 40;
    let value = FlowValue {
        packets_fwd: u64_at(v)?,
        bytes_fwd: u64_at(v + 8)?,
        packets_rev: u64_at(v + 16)?,
        bytes_rev: u64_at(v + 24)?,
        first_ns: u64_at(v + 32)?,
        last_ns: u64_at(v + 40)?,
        src_identity: u32_at(v + 48)?,
        dst_identity: u32_at(v + 52)?,
        policy_revision: u32_at(v + 56)?,
        tcp_flags: u8_at(v + 60)?,
        verdict: u8_at(v + 61)?,
        drop_reason: u8_at(v + 62)?,
        closed: u8_at(v + 63)?,
        policy_id: u32_at(v + 64)?,
        fin_seen: u8_at(v + 68)?,
        flags: u8_at(v + 69)?,
        _pad: [0; 2],
    };
    Some(FlowEvent {
        key,
        value,
        kind: u8_at(112)?,
        direction: u8_at(113)?,
        _pad: [0; 2],
        ifindex: u32_at(116)?,
    })
}

/// Every flow in the pinned `FLOWS` map under `pin_dir`.
pub fn dump_flows(pin_dir: &Path) -> Result<Vec<(FlowKey, FlowValue)>, Error> {
    let data = MapData::from_pin(pin_dir.join(FLOWS)).map_err(|e| Error::map(FLOWS, e))?;
    let map: BpfHashMap<MapData, FlowKey, FlowValue> =
        BpfHashMap::try_from(Map::LruHashMap(data)).map_err(|e| Error::map(FLOWS, e))?;
    let mut out = Vec::new();
    for entry in map.iter() {
        match entry {
            Ok(kv) => out.push(kv),
            // An LRU entry evicted while iterating: skip it.
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(Error::map(FLOWS, e)),
        }
    }
    Ok(out)
}
