//! The certificate manager against podless's CA (`mesh-ca`), as a node agent
//! fetching its workloads' certificates by impersonation; and against other
//! certificate sources, in memory.

use std::sync::Arc;
use std::time::Duration;

use mesh_api::Identity;
use mesh_ca::RenewalConfig;
use mesh_net::Drained;
use ztunnel_core::certs::{BuildError, Fetch};
use ztunnel_core::{
    CertError, CertManager, CertificateRequest, CertificateSource, StaticCertificates,
};

mod support;

use support::mesh::{ca, identity, in_memory_ca, sign};

/// The CA serves certificates for these identities to the node agent.
const SERVED: [&str; 2] = [
    "spiffe://cluster.local/ns/default/sa/echo",
    "spiffe://cluster.local/ns/default/sa/shell",
];

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn concurrent_requests_share_one_fetch_and_identities_are_fetched_in_parallel() {
    let mesh = ca(&SERVED).await;
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
    let mesh = ca(&SERVED).await;
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
}

#[tokio::test]
async fn an_identity_is_dropped_when_its_last_lease_ends() {
    let mesh = ca(&SERVED).await;
    let certs = &mesh.certs;
    let echo = identity("spiffe://cluster.local/ns/default/sa/echo");
    let shell = identity("spiffe://cluster.local/ns/default/sa/shell");

    // Two users of echo (two pods of one service account), one of shell.
    let first = certs.lease(&echo).expect("lease");
    let second = certs.lease(&echo).expect("lease");
    let shell_lease = certs.lease(&shell).expect("lease");
    assert_eq!(first.identity(), &echo);
    let cert = first.certificate(WAIT).await.expect("echo's certificate");
    assert_eq!(cert.identity, echo);
    assert!(Arc::ptr_eq(
        &second.certificate(WAIT).await.expect("shared"),
        &cert
    ));
    assert_eq!(certs.identities(), vec![echo.clone(), shell.clone()]);

    drop(first);
    assert_eq!(
        certs.identities(),
        vec![echo.clone(), shell.clone()],
        "echo still has a user"
    );
    drop(second);
    assert_eq!(
        certs.identities(),
        vec![shell.clone()],
        "echo's last user is gone: its certificate is dropped"
    );
    drop(shell_lease);
    assert!(certs.identities().is_empty());

    // Asked for again, it is fetched again.
    let again = certs.lease(&echo).expect("lease");
    assert_eq!(
        again.certificate(WAIT).await.expect("refetched").identity,
        echo
    );

    // A leased identity is not forgotten: its lease decides.
    assert!(!certs.forget(&echo), "still leased");
    assert_eq!(certs.identities(), vec![echo.clone()]);
    let another = certs.lease(&echo).expect("lease");
    drop(again);
    assert_eq!(certs.identities(), vec![echo.clone()], "one lease left");
    drop(another);
    assert!(certs.identities().is_empty());
    // Unleased, it can be forgotten.
    certs.prefetch(&shell);
    assert!(certs.forget(&shell));
}

#[tokio::test]
async fn a_stopped_manager_renews_and_fetches_nothing() {
    let mesh = ca(&SERVED).await;
    let certs = mesh.certs.clone();
    let echo = identity("spiffe://cluster.local/ns/default/sa/echo");
    let shell = identity("spiffe://cluster.local/ns/default/sa/shell");
    certs.certificate(&echo, WAIT).await.expect("certificate");
    certs.certificate(&shell, WAIT).await.expect("certificate");

    // join waits for a stop from elsewhere, and never stops the manager.
    let joined = tokio::spawn(certs.clone().join());
    tokio::task::yield_now().await;
    assert!(!joined.is_finished(), "join alone does not stop it");
    assert_eq!(certs.identities().len(), 2);

    assert_eq!(certs.drain(WAIT).await, Drained::Complete);
    tokio::time::timeout(WAIT, joined)
        .await
        .expect("joined after the drain")
        .expect("join task");
    assert!(certs.identities().is_empty(), "every renewal stopped");
    assert!(
        matches!(
            certs.certificate(&echo, WAIT).await,
            Err(CertError::Stopped(ref stopped)) if *stopped == echo
        ),
        "nothing fetched once stopped"
    );
    assert!(
        matches!(certs.lease(&echo), Err(CertError::Stopped(_))),
        "no lease once stopped"
    );
    certs.shutdown();
    certs.shutdown();
    assert!(certs.identities().is_empty(), "idempotent");
}

#[tokio::test]
async fn certificates_held_in_memory_are_served_with_no_ca_server() {
    let mesh = in_memory_ca(&SERVED);
    let echo = identity("spiffe://cluster.local/ns/default/sa/echo");
    let lease = mesh.certs.lease(&echo).expect("lease");
    let cert = lease.certificate(WAIT).await.expect("held in memory");
    assert_eq!(cert.identity, echo);
    assert_eq!(cert.roots, *mesh.authority.roots());
    // One not held never arrives: the renewal keeps trying, as with a CA
    // that refuses.
    let db = identity("spiffe://cluster.local/ns/default/sa/db");
    let err = mesh
        .certs
        .certificate(&db, Duration::from_millis(300))
        .await
        .expect_err("not held");
    assert!(
        matches!(err, CertError::Unavailable { ref identity, .. } if *identity == db),
        "{err}"
    );
}

/// A source that records what it is asked, then asks `inner`.
#[derive(Debug)]
struct Recording {
    inner: StaticCertificates,
    asked: std::sync::Mutex<Vec<CertificateRequest>>,
}

impl CertificateSource for Recording {
    fn fetch<'a>(&'a self, request: &'a CertificateRequest) -> Fetch<'a> {
        self.asked
            .lock()
            .expect("not poisoned")
            .push(request.clone());
        self.inner.fetch(request)
    }
}

#[tokio::test]
async fn any_source_plugs_in_and_is_asked_as_the_manager_is_configured() {
    let authority = in_memory_ca(&[]).authority.clone();
    let echo = identity("spiffe://cluster.local/ns/default/sa/echo");
    let source = Arc::new(Recording {
        inner: StaticCertificates::new().with(sign(&authority, &echo)),
        asked: std::sync::Mutex::new(Vec::new()),
    });
    let ttl = Duration::from_secs(3600);
    let certs = CertManager::builder()
        .source(source.clone())
        .impersonate(true)
        .renewal(RenewalConfig {
            ttl: Some(ttl),
            ..RenewalConfig::default()
        })
        .build()
        .expect("built");
    let (a, b) = tokio::join!(
        certs.certificate(&echo, WAIT),
        certs.certificate(&echo, WAIT)
    );
    assert!(Arc::ptr_eq(&a.expect("first"), &b.expect("second")));
    let asked = source.asked.lock().expect("not poisoned").clone();
    assert_eq!(asked.len(), 1, "one fetch, shared: {asked:?}");
    assert_eq!(asked[0].identity, echo);
    assert!(asked[0].impersonate);
    assert_eq!(asked[0].ttl, Some(ttl));
    certs.shutdown();

    assert!(matches!(
        CertManager::builder().build(),
        Err(BuildError::NoSource)
    ));
}

/// A source that answers every request with one fixed certificate.
#[derive(Debug)]
struct Always(mesh_ca::WorkloadCertificate);

impl CertificateSource for Always {
    fn fetch<'a>(&'a self, _request: &'a CertificateRequest) -> Fetch<'a> {
        Box::pin(std::future::ready(Ok(self.0.clone())))
    }
}

#[tokio::test]
async fn a_source_is_not_believed_on_whose_or_how_old_its_certificates_are() {
    let authority = in_memory_ca(&[]).authority.clone();
    let shell = identity("spiffe://cluster.local/ns/default/sa/shell");
    let echo = identity("spiffe://cluster.local/ns/default/sa/echo");
    let wait = Duration::from_millis(500);
    let manager = |certificate| {
        CertManager::builder()
            .source(Always(certificate))
            .build()
            .expect("built")
    };

    // Echo's certificate, handed out for shell.
    let certs = manager(sign(&authority, &echo));
    assert!(matches!(
        certs.certificate(&shell, wait).await,
        Err(CertError::Unavailable { .. })
    ));
    certs.shutdown();

    // Echo's certificate, labelled as shell's.
    let mut relabelled = sign(&authority, &echo);
    relabelled.identity = shell.clone();
    let certs = manager(relabelled);
    assert!(matches!(
        certs.certificate(&shell, wait).await,
        Err(CertError::Unavailable { .. })
    ));
    certs.shutdown();

    // Shell's own, but expired.
    let mut expired = sign(&authority, &shell);
    expired.not_after = std::time::SystemTime::UNIX_EPOCH;
    let certs = manager(expired);
    assert!(matches!(
        certs.certificate(&shell, wait).await,
        Err(CertError::Unavailable { .. })
    ));
    certs.shutdown();

    // Shell's own and valid: served.
    let certs = manager(sign(&authority, &shell));
    let served = certs.certificate(&shell, WAIT).await.expect("served");
    assert_eq!(served.identity, shell);
    certs.shutdown();
}
