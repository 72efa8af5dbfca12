//! The certificate manager against podless's CA (`mesh-ca`), as a node agent
//! fetching its workloads' certificates by impersonation.

use std::sync::Arc;
use std::time::Duration;

use mesh_api::Identity;
use tokio_util::sync::CancellationToken;
use ztunnel_core::{CertError, CertManager};

mod support;

use support::mesh::{ca, identity};

/// The CA serves certificates for these identities to the node agent.
const SERVED: [&str; 2] = [
    "spiffe://cluster.local/ns/default/sa/echo",
    "spiffe://cluster.local/ns/default/sa/shell",
];

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn concurrent_requests_share_one_fetch_and_identities_are_fetched_in_parallel() {
    let shutdown = CancellationToken::new();
    let mesh = ca(&SERVED, &shutdown).await;
    let certs = &mesh.certs;
    let echo = identity("spiffe://cluster.local/ns/default/sa/echo");
    let shell = identity("spiffe://cluster.local/ns/default/sa/shell");

    let echoes = futures_join(certs, &echo, 8).await;
    assert!(
        echoes.iter().all(|cert| Arc::ptr_eq(cert, &echoes[0])),
        "one fetch, shared"
    );
    assert_eq!(echoes[0].identity, echo);

    let (a, b) = tokio::join!(
        certs.certificate(&shell, WAIT),
        certs.certificate(&echo, WAIT)
    );
    assert_eq!(a.expect("shell").identity, shell);
    assert!(Arc::ptr_eq(&b.expect("echo"), &echoes[0]), "cached");
    assert_eq!(certs.identities(), vec![echo.clone(), shell.clone()]);

    assert!(certs.forget(&shell));
    assert_eq!(certs.identities(), vec![echo]);
    shutdown.cancel();
}

async fn futures_join(
    certs: &CertManager,
    identity: &Identity,
    n: usize,
) -> Vec<Arc<mesh_ca::WorkloadCertificate>> {
    let mut set = Vec::new();
    for _ in 0..n {
        set.push(certs.certificate(identity, WAIT));
    }
    let mut out = Vec::new();
    for result in futures::future::join_all(set).await {
        out.push(result.expect("certificate"));
    }
    out
}

#[tokio::test]
async fn a_workload_the_ca_refuses_gets_no_certificate() {
    let shutdown = CancellationToken::new();
    let mesh = ca(&SERVED, &shutdown).await;
    let certs = &mesh.certs;
    let db = identity("spiffe://cluster.local/ns/default/sa/db");
    let err = certs
        .certificate(&db, Duration::from_millis(500))
        .await
        .expect_err("db is not on node-a");
    assert!(
        matches!(err, CertError::Unavailable { ref identity, .. } if *identity == db),
        "{err}"
    );
    shutdown.cancel();
}
