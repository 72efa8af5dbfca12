//! Arbitrary text as HBONE request headers: `:authority`, `forwarded` and
//! `baggage`, read as the HBONE server reads them. Never a panic; an authority
//! that is accepted prints back to an equal address.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel_core::hbone::headers::{Baggage, parse_authority, parse_forwarded_for};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(addr) = parse_authority(text) {
        assert_eq!(parse_authority(&addr.to_string()), Ok(addr));
    }
    let _ = parse_forwarded_for(text);
    let baggage = Baggage::parse(text);
    assert_eq!(Baggage::parse(&baggage.to_string()).namespace, baggage.namespace);
});
