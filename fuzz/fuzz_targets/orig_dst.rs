//! `decode_orig_dst` reads a record the kernel wrote into a pinned map, which any process
//! with access to the pin can write too. It must never panic, and what it accepts must be a
//! destination the proxy can connect to: a unicast address, a port that is neither 0 nor
//! the proxy's own outbound port (a loop).

#![no_main]

use libfuzzer_sys::fuzz_target;
use mycel_agent::datapath::{OrigDst, decode_orig_dst};

/// The proxy's outbound listener port, which no original destination may name.
const OUTBOUND_PORT: u16 = 15001;

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.get(..24) else {
        return;
    };
    let word = |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let orig = OrigDst {
        addr_be: [word(0), word(4), word(8), word(12)],
        port_be: u16::from_ne_bytes([bytes[16], bytes[17]]),
        _pad: [bytes[18], bytes[19]],
        flags: word(20),
    };
    if let Ok(addr) = decode_orig_dst(&orig) {
        assert_ne!(addr.port(), 0, "{orig:?} decoded to {addr}");
        assert_ne!(addr.port(), OUTBOUND_PORT, "{orig:?} decoded to {addr}");
        assert!(!addr.ip().is_unspecified(), "{orig:?} decoded to {addr}");
        assert!(!addr.ip().is_multicast(), "{orig:?} decoded to {addr}");
        assert_eq!(u16::from_be(orig.port_be), addr.port());
    }
});
