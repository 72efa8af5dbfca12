//! Feeds arbitrary text to the CA's CSR reader (PEM, PKCS#10, key type,
//! signature): it must answer with a CSR or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = mesh_ca::verify_csr(text);
});
