//! Renewal against a real CA with 2-second certificates: renewed at half-life,
//! kept while the CA is away until it expires, and fetched again when the CA
//! returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_api::Identity;
use mesh_ca::renewal::{Renewal, RenewalConfig};
use mesh_ca::{
    Authority, CaClient, CaHandle, CaServer, SigningPolicy, StaticTokens, load_or_create,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A generous bound on waiting for an event that is due within seconds.
const PATIENCE: Duration = Duration::from_secs(30);

fn shell() -> Identity {
    "spiffe://cluster.local/ns/default/sa/shell"
        .parse()
        .unwrap()
}

async fn serve(authority: &Arc<Authority>, listener: TcpListener) -> CaHandle {
    CaServer::builder()
        .authority(authority.clone())
        .authenticator(StaticTokens::new().token("t", shell()))
        .build()
        .unwrap()
        .spawn(listener)
        .unwrap()
}

async fn next<T: Clone>(receiver: &mut watch::Receiver<T>) -> T {
    tokio::time::timeout(PATIENCE, receiver.changed())
        .await
        .expect("no change in time")
        .unwrap();
    receiver.borrow_and_update().clone()
}

#[tokio::test]
async fn renews_at_half_life_and_keeps_the_old_certificate_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let material = load_or_create(dir.path(), "cluster.local", Duration::from_secs(86400)).unwrap();
    let policy = SigningPolicy {
        default_ttl: Duration::from_secs(2),
        max_ttl: Duration::from_secs(2),
        backdate: Duration::ZERO,
    };
    let authority = Arc::new(Authority::new(&material, "cluster.local", policy).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    let ca = serve(&authority, listener).await;

    let client = CaClient::builder()
        .address(address)
        .roots(authority.roots().iter().cloned())
        .token("t")
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let config = RenewalConfig {
        ttl: None,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
    };
    let renewal = Renewal::spawn(
        Arc::new(client),
        shell(),
        false,
        config,
        &CancellationToken::new(),
    );
    let mut updates = renewal.subscribe();

    let first = next(&mut updates).await.expect("a first certificate");
    let second = next(&mut updates).await.expect("a renewed certificate");
    assert_ne!(first.chain[0], second.chain[0]);
    assert!(second.not_after >= first.not_after);

    // The CA goes away: renewals fail, the certificate in use is kept until it
    // expires, then dropped.
    assert!(ca.drain(Duration::from_secs(5)).await.is_complete());
    let after_outage = next(&mut updates).await;
    assert!(
        after_outage.is_none(),
        "no other certificate could have been issued"
    );
    let expired_at = second.not_after;
    assert!(SystemTime::now() >= expired_at, "dropped only once expired");

    // The CA comes back on the same address: renewal resumes.
    let ca = serve(&authority, TcpListener::bind(address).await.unwrap()).await;
    let third = next(&mut updates)
        .await
        .expect("a certificate after the CA returned");
    assert_eq!(third.identity, shell());
    assert_eq!(renewal.current().unwrap().chain, third.chain);
    renewal.stop().await;
    assert!(ca.drain(Duration::from_secs(5)).await.is_complete());
}
