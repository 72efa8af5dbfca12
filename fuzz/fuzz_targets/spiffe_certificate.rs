//! Feeds arbitrary bytes, as a peer's certificate, to the SPIFFE identity
//! reader every TLS peer check goes through: an identity or an error, never a
//! panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|bytes: &[u8]| {
    let certificate = CertificateDer::from(bytes);
    let _ = mesh_net::spiffe::spiffe_identity(&certificate);
    let _ = mesh_net::spiffe::peer_identity(Some(&[certificate]), "cluster.local");
});
