//! Certificates issued per second over gRPC + TLS on loopback, with 1 and 2
//! client tasks, against the raw ECDSA P-256 limit measured in the same run.
//!
//! Per certificate the CA does one P-256 verify (the CSR) and one P-256 sign (the
//! certificate), so the raw limit is the rate of sign+verify pairs on one thread.
//! The clients send a prepared CSR and do not check the answer, so the figure is
//! the CA's. The raw rate is measured before and after the gRPC runs; their mean
//! is the baseline.
//!
//! Run: `cargo bench -p mesh-ca --bench issuance`.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};
use mesh_api::ca::IstioCertificateRequest;
use mesh_ca::{Authority, CaClient, CaServer, SigningPolicy, StaticTokens, load_or_create};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use tokio::net::TcpListener;

const RUN: Duration = Duration::from_secs(4);

/// Sign+verify pairs per second on one thread.
fn raw_rate() -> f64 {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let public =
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
    // Roughly the size of a certificate's to-be-signed part.
    let message = [0x5a_u8; 400];
    let start = Instant::now();
    let mut pairs = 0u64;
    while start.elapsed() < RUN {
        let signature = key.sign(&rng, &message).unwrap();
        public.verify(&message, signature.as_ref()).unwrap();
        pairs += 1;
    }
    pairs as f64 / start.elapsed().as_secs_f64()
}

fn csr() -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// Certificates per second with `tasks` concurrent clients, each on its own
/// connection, for [`RUN`].
async fn grpc_rate(
    address: std::net::SocketAddr,
    roots: &[rustls_pki_types::CertificateDer<'static>],
    tasks: usize,
) -> f64 {
    let csr = Arc::new(csr());
    let deadline = Instant::now() + RUN;
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..tasks {
        let client = CaClient::builder()
            .address(address)
            .roots(roots.iter().cloned())
            .build()
            .unwrap();
        let csr = csr.clone();
        workers.push(tokio::spawn(async move {
            let mut grpc = client.grpc();
            let mut issued = 0u64;
            while Instant::now() < deadline {
                let mut request = tonic::Request::new(IstioCertificateRequest {
                    csr: csr.to_string(),
                    validity_duration: 3600,
                    metadata: None,
                });
                request
                    .metadata_mut()
                    .insert("authorization", "Bearer bench".parse().unwrap());
                let response = grpc.create_certificate(request).await.unwrap().into_inner();
                assert_eq!(response.cert_chain.len(), 2);
                issued += 1;
            }
            issued
        }));
    }
    let mut total = 0;
    for worker in workers {
        total += worker.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let raw_before = raw_rate();
    let (one, two) = runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let material = load_or_create(
            dir.path(),
            "cluster.local",
            Duration::from_secs(86400 * 365),
        )
        .unwrap();
        let authority =
            Arc::new(Authority::new(&material, "cluster.local", SigningPolicy::default()).unwrap());
        let identity = "spiffe://cluster.local/ns/bench/sa/bench".parse().unwrap();
        let handle = CaServer::builder()
            .authority(authority.clone())
            .authenticator(StaticTokens::new().token("bench", identity))
            .build()
            .unwrap()
            .spawn(TcpListener::bind("127.0.0.1:0").await.unwrap())
            .unwrap();
        let roots = authority.roots().to_vec();
        // Warm up connections and caches.
        grpc_rate(handle.local_addr(), &roots, 1).await;
        let one = grpc_rate(handle.local_addr(), &roots, 1).await;
        let two = grpc_rate(handle.local_addr(), &roots, 2).await;
        assert!(handle.drain(Duration::from_secs(5)).await.is_complete());
        (one, two)
    });
    let raw_after = raw_rate();
    let raw = (raw_before + raw_after) / 2.0;
    // Both cores at once, for comparison with the 2-task run, which uses both.
    let raw_two: f64 = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..2).map(|_| scope.spawn(raw_rate)).collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    println!(
        "raw ECDSA P-256 sign+verify: {raw:.0} pairs/s on one thread (before {raw_before:.0}, after {raw_after:.0}); {raw_two:.0} pairs/s on two threads"
    );
    println!(
        "gRPC CreateCertificate, 1 client task: {one:.0} certificates/s = {:.2} of the one-thread raw rate",
        one / raw
    );
    println!(
        "gRPC CreateCertificate, 2 client tasks: {two:.0} certificates/s = {:.2} of the one-thread raw rate, {:.2} of the two-thread raw rate",
        two / raw,
        two / raw_two
    );
}
