//! The CONNECT request head check must never panic, and every refusal must map to a 4xx
//! status.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mycel_agent::proxy::connect_target;

fuzz_target!(|data: &[u8]| {
    // First byte splits the input into a method and an optional authority.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    let at = (split as usize).min(s.len());
    let (method, authority) = match s.get(..at).zip(s.get(at..)) {
        Some(parts) => parts,
        None => return,
    };
    let authority = (split % 2 == 0).then_some(authority);
    if let Err(e) = connect_target(method, authority) {
        assert!(
            (400..500).contains(&e.status()),
            "{e} maps to {}",
            e.status()
        );
    }
});
