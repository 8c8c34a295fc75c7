//! `parse_authority` must never panic, and whatever it accepts must print back to the same
//! text: the parser takes exactly the canonical `ip:port` forms and nothing else.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mycel_agent::proxy::parse_authority;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(addr) = parse_authority(s) {
        let again = parse_authority(&addr.to_string());
        assert_eq!(
            again,
            Ok(addr),
            "{s:?} parsed to {addr} which does not parse back"
        );
    }
});
