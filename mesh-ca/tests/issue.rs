//! Issuing certificates: what a workload gets, checked with rustls' own webpki
//! verifier (as a TLS peer would), and the CA's files across restarts.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::verify_as_client_cert;
use mesh_api::Identity;
use mesh_ca::{Authority, IssueError, SigningPolicy, load_or_create, store, verify_csr};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn authority(dir: &std::path::Path, policy: SigningPolicy) -> Authority {
    let material = load_or_create(dir, "cluster.local", TEN_YEARS).unwrap();
    Authority::new(&material, "cluster.local", policy).unwrap()
}

/// A CSR as a workload would make it, but asking for names of its choice.
fn csr(asked_for: &[&str]) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(
        asked_for
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    params.distinguished_name = DistinguishedName::new();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

fn ders(chain_pem: &[String]) -> Vec<CertificateDer<'static>> {
    chain_pem
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
        .collect()
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|name| match name {
                    GeneralName::URI(uri) => format!("URI:{uri}"),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn issued_chain_verifies_and_carries_only_the_authenticated_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = authority(dir.path(), SigningPolicy::default());
    let (_key, pem) = csr(&[
        "spiffe://cluster.local/ns/kube-system/sa/admin",
        "evil.example.com",
    ]);
    let identity: Identity = "spiffe://cluster.local/ns/default/sa/shell"
        .parse()
        .unwrap();
    let issued = ca
        .issue(&verify_csr(&pem).unwrap(), &identity, None)
        .unwrap();

    assert_eq!(issued.chain_pem.len(), 2, "leaf and root");
    assert!(
        issued
            .chain_pem
            .iter()
            .all(|pem| pem.ends_with("-----END CERTIFICATE-----\n"))
    );
    let chain = ders(&issued.chain_pem);
    assert_eq!(chain.last(), ca.roots().first(), "root last");
    verify_as_client_cert(&ca.roots(), &chain).unwrap();

    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    assert_eq!(
        uri_sans(&leaf),
        ["URI:spiffe://cluster.local/ns/default/sa/shell"]
    );
    assert!(leaf.subject().iter().next().is_none(), "empty subject");
    let san = leaf
        .extensions()
        .iter()
        .find(|e| {
            matches!(
                e.parsed_extension(),
                ParsedExtension::SubjectAlternativeName(_)
            )
        })
        .unwrap();
    assert!(san.critical, "SAN is critical with an empty subject");
    let usage = leaf.key_usage().unwrap().unwrap().value;
    assert!(usage.digital_signature() && usage.key_encipherment() && !usage.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!leaf.is_ca());
}

#[test]
fn validity_is_clamped_backdated_and_defaulted() {
    let dir = tempfile::tempdir().unwrap();
    let policy = SigningPolicy {
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(2 * 3600),
        backdate: Duration::from_secs(60),
    };
    let ca = authority(dir.path(), policy);
    let (_key, pem) = csr(&[]);
    let csr = verify_csr(&pem).unwrap();
    let identity: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
    let lifetime = |requested| {
        let issued = ca.issue(&csr, &identity, requested).unwrap();
        let der = ders(&issued.chain_pem).remove(0);
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        let validity = leaf.validity();
        validity.not_after.timestamp() - validity.not_before.timestamp()
    };
    // Lifetimes include the 60 s backdate.
    assert_eq!(lifetime(None), 3600 + 60, "default TTL");
    assert_eq!(
        lifetime(Some(Duration::from_secs(600))),
        600 + 60,
        "as requested"
    );
    assert_eq!(
        lifetime(Some(Duration::from_secs(365 * 24 * 3600))),
        2 * 3600 + 60,
        "clamped to the maximum"
    );
    assert_eq!(
        lifetime(Some(Duration::ZERO)),
        3600 + 60,
        "zero means default"
    );
}

#[test]
fn identities_of_another_trust_domain_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = authority(dir.path(), SigningPolicy::default());
    let (_key, pem) = csr(&[]);
    let foreign: Identity = "spiffe://example.org/ns/a/sa/b".parse().unwrap();
    let err = ca
        .issue(&verify_csr(&pem).unwrap(), &foreign, None)
        .unwrap_err();
    assert!(matches!(err, IssueError::WrongTrustDomain { .. }), "{err}");
}

#[test]
fn a_restart_keeps_the_root_and_the_key_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let first = load_or_create(dir.path(), "cluster.local", TEN_YEARS).unwrap();
    let second = load_or_create(dir.path(), "cluster.local", TEN_YEARS).unwrap();
    assert_eq!(first.roots, second.roots);
    assert_eq!(first.key_pem, second.key_pem);
    let mode = std::fs::metadata(dir.path().join(store::CA_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A certificate from before the restart verifies against the roots after it.
    let before = Authority::new(&first, "cluster.local", SigningPolicy::default()).unwrap();
    let after = Authority::new(&second, "cluster.local", SigningPolicy::default()).unwrap();
    let (_key, pem) = csr(&[]);
    let identity: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
    let issued = before
        .issue(&verify_csr(&pem).unwrap(), &identity, None)
        .unwrap();
    verify_as_client_cert(&after.roots(), &ders(&issued.chain_pem)).unwrap();
}

#[test]
fn a_directory_with_a_key_but_no_certificate_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    load_or_create(dir.path(), "cluster.local", TEN_YEARS).unwrap();
    std::fs::remove_file(dir.path().join(store::CA_CERT_FILE)).unwrap();
    let err = load_or_create(dir.path(), "cluster.local", TEN_YEARS).unwrap_err();
    assert!(
        err.to_string()
            .contains("ca-cert.pem (signing certificate) is missing"),
        "{err}"
    );
    // And a key that does not match the certificate is refused.
    let other = tempfile::tempdir().unwrap();
    load_or_create(other.path(), "cluster.local", TEN_YEARS).unwrap();
    std::fs::copy(
        other.path().join(store::CA_CERT_FILE),
        dir.path().join(store::CA_CERT_FILE),
    )
    .unwrap();
    let err = store::load(dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not belong to the certificate"),
        "{err}"
    );
}

#[test]
fn plugged_in_intermediate_signs_under_the_operator_root() {
    // The operator's root and an intermediate for the mesh, in Istio's layout.
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = CertificateParams::default();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = root_params.self_signed(&root_key).unwrap();
    let inter_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut inter_params = CertificateParams::default();
    inter_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    inter_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let intermediate = inter_params
        .signed_by(&inter_key, &Issuer::new(root_params, root_key))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
    write(store::CA_KEY_FILE, inter_key.serialize_pem());
    write(store::CA_CERT_FILE, intermediate.pem());
    write(store::ROOT_CERT_FILE, root.pem());
    write(
        store::CERT_CHAIN_FILE,
        format!("{}{}", intermediate.pem(), root.pem()),
    );

    let ca = authority(dir.path(), SigningPolicy::default());
    assert_eq!(ca.roots().as_slice(), [root.der().clone()]);
    let (_key, pem) = csr(&[]);
    let identity: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
    let issued = ca
        .issue(&verify_csr(&pem).unwrap(), &identity, None)
        .unwrap();
    let chain = ders(&issued.chain_pem);
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(&chain[1], intermediate.der());
    verify_as_client_cert(&ca.roots(), &chain).unwrap();
    // The CA did not replace the operator's files.
    assert_eq!(
        std::fs::read_to_string(dir.path().join(store::CA_CERT_FILE)).unwrap(),
        intermediate.pem()
    );
}
