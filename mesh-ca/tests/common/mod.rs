//! Helpers shared by the integration tests.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};

/// Verifies `chain` (leaf first, root last) as a TLS client certificate against
/// `roots` with rustls' webpki verifier, as an HBONE server does.
pub(crate) fn verify_as_client_cert(
    roots: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
) -> Result<(), rustls::Error> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
        .build()
        .unwrap();
    // Any root at the end is not an intermediate.
    let intermediates = chain.get(1..chain.len().saturating_sub(1)).unwrap_or(&[]);
    verifier
        .verify_client_cert(&chain[0], intermediates, UnixTime::now())
        .map(|_| ())
}
