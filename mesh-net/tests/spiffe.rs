//! The SPIFFE identity of a certificate and the checks on a TLS peer, over
//! real certificates and arbitrary bytes.

use mesh_net::spiffe::{SpiffeError, peer_identity, spiffe_identity};
use proptest::prelude::*;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::CertificateDer;

fn certificate(sans: &[&str]) -> CertificateDer<'static> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|san| match san.strip_prefix("dns:") {
            Some(dns) => SanType::DnsName(dns.try_into().expect("a DNS name")),
            None => SanType::URI((*san).try_into().expect("a URI")),
        })
        .collect();
    let key = KeyPair::generate().expect("a key");
    params
        .self_signed(&key)
        .expect("a certificate")
        .der()
        .clone()
}

#[test]
fn the_one_spiffe_uri_is_the_identity() {
    let cert = certificate(&[
        "dns:shell.default",
        "spiffe://cluster.local/ns/default/sa/shell",
    ]);
    let identity = spiffe_identity(&cert).expect("an identity");
    assert_eq!(
        identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/shell"
    );
    assert_eq!(peer_identity(Some(&[cert]), "cluster.local"), Ok(identity));
}

#[test]
fn no_several_or_malformed_spiffe_uris_are_refused_by_name() {
    assert_eq!(
        spiffe_identity(&certificate(&["dns:shell.default"])),
        Err(SpiffeError::NoSpiffeUri)
    );
    assert_eq!(
        spiffe_identity(&certificate(&[
            "spiffe://cluster.local/ns/default/sa/a",
            "spiffe://cluster.local/ns/default/sa/b",
        ])),
        Err(SpiffeError::SeveralSpiffeUris)
    );
    assert!(matches!(
        spiffe_identity(&certificate(&["spiffe://cluster.local/not-a-workload"])),
        Err(SpiffeError::Identity(_))
    ));
    assert!(matches!(
        spiffe_identity(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
        Err(SpiffeError::Unreadable(_))
    ));
}

#[test]
fn a_peer_must_present_a_certificate_in_our_trust_domain() {
    assert_eq!(
        peer_identity(None, "cluster.local"),
        Err(SpiffeError::NoPeerCertificate)
    );
    assert_eq!(
        peer_identity(Some(&[]), "cluster.local"),
        Err(SpiffeError::NoPeerCertificate)
    );
    let other = certificate(&["spiffe://other.example/ns/default/sa/shell"]);
    let refused = peer_identity(Some(&[other]), "cluster.local").expect_err("refused");
    assert!(
        refused
            .to_string()
            .contains("not in the trust domain \"cluster.local\""),
        "{refused}"
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = spiffe_identity(&CertificateDer::from(bytes));
    }

    #[test]
    fn a_certificate_with_a_flipped_byte_never_panics(position in 0usize..400, bit in 0u8..8) {
        let mut bytes = certificate(&["spiffe://cluster.local/ns/default/sa/shell"]).to_vec();
        let position = position % bytes.len();
        bytes[position] ^= 1 << bit;
        let _ = spiffe_identity(&CertificateDer::from(bytes));
    }
}
