//! Arbitrary bytes as a SOCKS5 greeting and CONNECT request, read as the
//! SOCKS5 listener reads them. Never a panic; what is taken never exceeds the
//! input, and a parsed request parses the same from exactly the bytes taken.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel_core::proxy::socks5::{parse_greeting, parse_request};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(taken)) = parse_greeting(data) {
        assert!(taken <= data.len());
    }
    if let Ok(Some((target, taken))) = parse_request(data) {
        assert!(taken <= data.len());
        assert_eq!(parse_request(&data[..taken]), Ok(Some((target, taken))));
    }
});
