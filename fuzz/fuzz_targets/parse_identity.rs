//! Parses SPIFFE identities (URI and principal forms) and resource names from
//! arbitrary strings: never a panic, and whatever parses prints back the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::{AddressName, Identity};

fuzz_target!(|input: &str| {
    if let Ok(id) = Identity::parse_uri(input) {
        assert_eq!(id.as_uri(), input);
        assert_eq!(Identity::from_principal(id.principal()).as_ref(), Ok(&id));
    }
    if let Ok(id) = Identity::from_principal(input) {
        assert_eq!(id.principal(), input);
    }
    if let Ok(name) = input.parse::<AddressName>() {
        let _ = name.to_string();
    }
});
