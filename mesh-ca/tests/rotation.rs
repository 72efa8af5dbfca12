//! Root rotation with the CA serving throughout: stage a new root (trusted by
//! all, not yet signing), promote it (signing), retire the old one. During the
//! overlap certificates from both roots verify; the trust bundle is there at
//! every step; a restart in the middle resumes; the CA's own TLS follows.

mod common;

use std::sync::Arc;
use std::time::Duration;

use mesh_api::Identity;
use mesh_ca::{
    Authority, CaClient, CaServer, ClientCertificate, SigningPolicy, StaticTokens,
    WorkloadCertificate, load, load_or_create, store,
};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;

const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 86400);

fn verifies(roots: &[CertificateDer<'static>], cert: &WorkloadCertificate) -> bool {
    common::verify_as_client_cert(roots, &cert.chain).is_ok()
}

#[tokio::test]
async fn rotation_keeps_old_and_new_certificates_valid_during_the_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let material = load_or_create(dir.path(), "cluster.local", TEN_YEARS).unwrap();
    let authority =
        Arc::new(Authority::new(&material, "cluster.local", SigningPolicy::default()).unwrap());
    let old_root = authority.roots()[0].clone();
    let shell: Identity = "spiffe://cluster.local/ns/default/sa/shell"
        .parse()
        .unwrap();
    let server = CaServer::builder()
        .authority(authority.clone())
        .authenticator(StaticTokens::new().token("t", shell.clone()))
        .authenticator(ClientCertificate::new(authority.clone()).unwrap())
        .build()
        .unwrap();
    let handle = server
        .spawn(TcpListener::bind("127.0.0.1:0").await.unwrap())
        .unwrap();
    let client = |roots: Vec<CertificateDer<'static>>| {
        CaClient::builder()
            .address(handle.local_addr())
            .roots(roots)
            .token("t")
            .build()
            .unwrap()
    };

    // Before: one root, certificates from it.
    let before = client(vec![old_root.clone()])
        .certificate(&shell, false, None)
        .await
        .unwrap();

    // Step 1: the new root is trusted, the old one still signs.
    let staged = store::stage_new_root(dir.path(), "cluster.local", TEN_YEARS).unwrap();
    authority.reload(&staged).unwrap();
    let bundle = authority.roots().to_vec();
    assert_eq!(bundle.len(), 2);
    assert_eq!(bundle[0], old_root);
    let new_root = bundle[1].clone();
    assert!(
        authority
            .trust_bundle_pem()
            .matches("BEGIN CERTIFICATE")
            .count()
            == 2
    );
    let staged_cert = client(bundle.clone())
        .certificate(&shell, false, None)
        .await
        .unwrap();
    assert!(
        verifies(std::slice::from_ref(&old_root), &staged_cert),
        "the old root still signs"
    );
    assert_eq!(staged_cert.roots, bundle, "the bundle comes with it");

    // A restart now resumes the same stage.
    let reloaded = load(dir.path()).unwrap();
    assert_eq!(reloaded.roots, bundle);

    // Step 2: the new root signs; both verify.
    let promoted = store::promote_new_root(dir.path()).unwrap();
    authority.reload(&promoted).unwrap();
    assert_eq!(
        authority.roots().to_vec(),
        bundle,
        "the bundle keeps both roots"
    );
    let after = client(bundle.clone())
        .certificate(&shell, false, None)
        .await
        .unwrap();
    assert!(verifies(std::slice::from_ref(&new_root), &after));
    assert!(!verifies(std::slice::from_ref(&old_root), &after));
    assert_eq!(after.roots, bundle);
    for cert in [&before, &staged_cert, &after] {
        assert!(
            verifies(&bundle, cert),
            "every certificate verifies during the overlap"
        );
    }
    // A client with an old-root certificate renews over mTLS during the overlap.
    let renewed = CaClient::builder()
        .address(handle.local_addr())
        .roots(bundle.clone())
        .client_certificate(before.chain.clone(), before.private_key())
        .build()
        .unwrap()
        .certificate(&shell, false, None)
        .await
        .unwrap();
    assert!(verifies(std::slice::from_ref(&new_root), &renewed));

    // Step 3: the old root is retired.
    let retired = store::retire_old_roots(dir.path()).unwrap();
    authority.reload(&retired).unwrap();
    assert_eq!(authority.roots().to_vec(), vec![new_root.clone()]);
    assert!(verifies(&authority.roots(), &after));
    assert!(
        !verifies(&authority.roots(), &before),
        "old-root certificates stop verifying"
    );
    // Clients that trust only the new root reach the CA: its serving
    // certificate was re-issued under the new root.
    let only_new = client(vec![new_root.clone()])
        .certificate(&shell, false, None)
        .await
        .unwrap();
    assert!(verifies(std::slice::from_ref(&new_root), &only_new));
    assert_eq!(only_new.roots, vec![new_root.clone()]);
    // And the CA kept the old signing files.
    assert!(
        dir.path()
            .join(store::PREVIOUS_DIR)
            .join(store::CA_KEY_FILE)
            .exists()
    );
    assert!(handle.drain(Duration::from_secs(5)).await.is_complete());
}

#[test]
fn rotation_steps_refuse_to_run_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    load_or_create(dir.path(), "cluster.local", TEN_YEARS).unwrap();
    let err = store::promote_new_root(dir.path()).unwrap_err();
    assert!(err.to_string().contains("stage a new root first"), "{err}");
    store::stage_new_root(dir.path(), "cluster.local", TEN_YEARS).unwrap();
    // Staging twice keeps the same staged root.
    let first = load(dir.path()).unwrap().roots;
    store::stage_new_root(dir.path(), "cluster.local", TEN_YEARS).unwrap();
    assert_eq!(load(dir.path()).unwrap().roots, first);
    let err = store::retire_old_roots(dir.path()).unwrap_err();
    assert!(err.to_string().contains("not promoted yet"), "{err}");
}
