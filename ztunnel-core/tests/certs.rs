//! The certificate manager against podless's CA (`mesh-ca`), as a node agent
//! fetching its workloads' certificates by impersonation.

use std::sync::Arc;
use std::time::Duration;

use mesh_api::Identity;
use mesh_ca::{
    Authenticated, Authority, CaClient, CaServer, RenewalConfig, SigningPolicy,
    StaticNodeAuthorizer, StaticTokens,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use ztunnel_core::{CertError, CertManager};

fn identity(uri: &str) -> Identity {
    Identity::parse_uri(uri).expect("identity")
}

async fn manager(
    dir: &tempfile::TempDir,
    shutdown: &CancellationToken,
) -> (CertManager, mesh_ca::CaHandle) {
    let material = mesh_ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(86400))
        .expect("CA files");
    let authority = Arc::new(
        Authority::new(&material, "cluster.local", SigningPolicy::default()).expect("authority"),
    );
    let agent = identity("spiffe://cluster.local/ns/istio-system/sa/ztunnel");
    let server = CaServer::builder()
        .authority(authority.clone())
        .authenticator(StaticTokens::new().caller(
            "agent",
            Authenticated {
                identity: agent.clone(),
                node: Some("node-a".into()),
                pod: None,
            },
        ))
        .node_agent(agent)
        .node_authorizer(
            StaticNodeAuthorizer::new()
                .workload(
                    "node-a",
                    identity("spiffe://cluster.local/ns/default/sa/echo"),
                )
                .workload(
                    "node-a",
                    identity("spiffe://cluster.local/ns/default/sa/shell"),
                ),
        )
        .build()
        .expect("CA");
    let handle = server
        .spawn(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
        .expect("spawn");
    let client = CaClient::builder()
        .address(handle.local_addr())
        .server_name("istiod.istio-system.svc")
        .roots(authority.roots().iter().cloned())
        .token("agent")
        .build()
        .expect("client");
    (
        CertManager::new(client, true, RenewalConfig::default(), shutdown),
        handle,
    )
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn concurrent_requests_share_one_fetch_and_identities_are_fetched_in_parallel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let (certs, _ca) = manager(&dir, &shutdown).await;
    let echo = identity("spiffe://cluster.local/ns/default/sa/echo");
    let shell = identity("spiffe://cluster.local/ns/default/sa/shell");

    let echoes = futures_join(&certs, &echo, 8).await;
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
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let (certs, _ca) = manager(&dir, &shutdown).await;
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
