//! Mesh parts the tests share: a certificate manager, fed by a CA served over
//! TLS ([`ca`]) or by certificates signed in memory ([`in_memory_ca`]), an
//! echo application, and a checked round trip.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::Identity;
use mesh_api::workload::Address;
use mesh_api::workload::Workload;
use mesh_api::workload::address::Type;
use mesh_ca::{
    Authenticated, Authority, CaClient, CaMaterial, CaServer, RenewalConfig, SigningPolicy,
    StaticNodeAuthorizer, StaticTokens, WorkloadCertificate,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel_core::{CertManager, SharedState, StaticCertificates};

/// A SPIFFE identity from its URI.
pub fn identity(uri: &str) -> Identity {
    Identity::parse_uri(uri).expect("identity")
}

/// A CA, and a certificate manager using it (shut down on drop).
pub struct Ca {
    pub certs: CertManager,
    pub authority: Arc<Authority>,
    /// The CA server, if served over TLS.
    _handle: Option<mesh_ca::CaHandle>,
    _dir: Option<tempfile::TempDir>,
}

/// A CA on loopback and a certificate manager fetching from it for any of
/// `identities` (as a node agent).
pub async fn ca(identities: &[&str]) -> Ca {
    let dir = tempfile::tempdir().expect("tempdir");
    let material = mesh_ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(86400))
        .expect("CA files");
    let authority = Arc::new(
        Authority::new(&material, "cluster.local", SigningPolicy::default()).expect("authority"),
    );
    let agent = identity("spiffe://cluster.local/ns/istio-system/sa/ztunnel");
    let mut node = StaticNodeAuthorizer::new();
    for uri in identities {
        node = node.workload("node-a", identity(uri));
    }
    let handle = CaServer::builder()
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
        .node_authorizer(node)
        .build()
        .expect("CA")
        .spawn(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
        .expect("spawn");
    let client = CaClient::builder()
        .address(handle.local_addr())
        .server_name("istiod.istio-system.svc")
        .roots(authority.roots().iter().cloned())
        .token("agent")
        .build()
        .expect("client");
    Ca {
        certs: CertManager::builder()
            .client(client)
            .impersonate(true)
            .renewal(RenewalConfig::default())
            .build()
            .expect("certificate manager"),
        authority,
        _handle: Some(handle),
        _dir: Some(dir),
    }
}

/// A CA in memory, no server: a certificate manager whose source holds a
/// certificate it signed for each of `identities`.
pub fn in_memory_ca(identities: &[&str]) -> Ca {
    let material =
        CaMaterial::self_signed("cluster.local", Duration::from_secs(86400)).expect("CA material");
    let authority = Arc::new(
        Authority::new(&material, "cluster.local", SigningPolicy::default()).expect("authority"),
    );
    let certificates = StaticCertificates::new();
    for uri in identities {
        certificates.insert(sign(&authority, &identity(uri)));
    }
    Ca {
        certs: CertManager::builder()
            .source(certificates)
            .build()
            .expect("certificate manager"),
        authority,
        _handle: None,
        _dir: None,
    }
}

/// A workload certificate for `identity` from `authority`, with a key made
/// here, as a CA client would get it.
pub fn sign(authority: &Authority, identity: &Identity) -> WorkloadCertificate {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity.as_uri().try_into().expect("SPIFFE URI"),
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .expect("CSR");
    let csr = mesh_ca::verify_csr(&csr).expect("verified CSR");
    let issued = authority.issue(&csr, identity, None).expect("issued");
    let der = |pem: &str| {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("PEM")
    };
    let (bundle, chain) = issued.chain_pem.split_last().expect("a chain");
    WorkloadCertificate {
        identity: identity.clone(),
        chain: chain.iter().flat_map(|pem| der(pem)).collect(),
        roots: der(bundle),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        not_before: issued.not_before.into(),
        not_after: issued.not_after.into(),
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        self.certs.shutdown();
    }
}

/// An application that echoes what it reads, then closes its side when the
/// client closes its own (half-close both ways).
pub async fn echo_app(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind app");
    let address = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    address
}

/// Sends `size` bytes, closes the sending side, and reads everything back:
/// whether it all came back intact.
pub async fn round_trip(mut stream: TcpStream, size: usize) -> std::io::Result<bool> {
    let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let (mut reader, mut writer) = stream.split();
    let send = async {
        writer.write_all(&payload).await?;
        writer.shutdown().await
    };
    let mut received = Vec::with_capacity(size);
    let receive = reader.read_to_end(&mut received);
    let (sent, read) = tokio::join!(send, receive);
    sent?;
    read?;
    Ok(received == payload)
}

/// Puts `workload` into `state` (as the xDS client would).
pub fn put(state: &SharedState, workload: Workload) {
    let name = workload.uid.clone();
    state
        .update(|s| {
            s.apply_address(
                &name,
                Address {
                    r#type: Some(Type::Workload(workload)),
                },
            )
        })
        .expect("workload");
}
