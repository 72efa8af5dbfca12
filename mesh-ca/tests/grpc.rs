//! The CA over real gRPC and TLS on loopback: who gets which certificate, and
//! what is refused with which status.

use std::time::Duration;

use mesh_api::Identity;
use mesh_api::ca::IstioCertificateRequest;
use mesh_ca::Authenticated;
use mesh_ca::{
    Authority, CaClient, CaHandle, CaServer, ClientCertificate, ClientError, SigningPolicy,
    StaticNodeAuthorizer, StaticTokens, load_or_create,
};
use mesh_net::HandshakeLimits;
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
};
use rustls_pki_types::CertificateDer;
use test_support::{Captured, Ended, connect_from, ended, still_open};

use tokio::net::TcpListener;
use tonic::Code;

const SHELL_TOKEN: &str = "shell-token";
const NODE_TOKEN: &str = "node-a-token";

fn id(uri: &str) -> Identity {
    uri.parse().unwrap()
}

struct Mesh {
    _dir: tempfile::TempDir,
    handle: CaHandle,
    roots: Vec<CertificateDer<'static>>,
}

async fn start() -> Mesh {
    start_with(HandshakeLimits::default()).await
}

async fn start_with(limits: HandshakeLimits) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let material = load_or_create(
        dir.path(),
        "cluster.local",
        Duration::from_secs(3650 * 86400),
    )
    .unwrap();
    let authority = std::sync::Arc::new(
        Authority::new(&material, "cluster.local", SigningPolicy::default()).unwrap(),
    );
    let ztunnel = id("spiffe://cluster.local/ns/istio-system/sa/ztunnel");
    let tokens = StaticTokens::new()
        .token(
            SHELL_TOKEN,
            id("spiffe://cluster.local/ns/default/sa/shell"),
        )
        .caller(
            NODE_TOKEN,
            Authenticated {
                identity: ztunnel.clone(),
                node: Some("node-a".into()),
                pod: None,
            },
        );
    let server = CaServer::builder()
        .authority(authority.clone())
        .authenticator(tokens)
        .authenticator(ClientCertificate::new(authority.clone()).unwrap())
        .node_agent(ztunnel)
        .node_authorizer(
            StaticNodeAuthorizer::new()
                .workload("node-a", id("spiffe://cluster.local/ns/default/sa/echo"))
                .workload("node-b", id("spiffe://cluster.local/ns/default/sa/db")),
        )
        .handshake_limits(limits)
        .build()
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = server.spawn(listener).unwrap();
    handle.ready(Duration::from_secs(1)).await.expect("ready");
    Mesh {
        _dir: dir,
        roots: authority.roots().to_vec(),
        handle,
    }
}

impl Mesh {
    fn client(&self) -> mesh_ca::client::CaClientBuilder {
        CaClient::builder()
            .address(self.handle.local_addr())
            .roots(self.roots.clone())
    }
}

fn status(err: ClientError) -> tonic::Status {
    match err {
        ClientError::Status(status) => status,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

#[tokio::test]
async fn a_token_gets_a_certificate_for_its_own_identity() {
    let mesh = start().await;
    let client = mesh.client().token(SHELL_TOKEN).build().unwrap();
    let shell = id("spiffe://cluster.local/ns/default/sa/shell");
    let cert = client
        .certificate(&shell, false, Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(cert.identity, shell);
    assert_eq!(cert.chain.len(), 1, "the leaf (no intermediates here)");
    assert_eq!(cert.roots.len(), 1, "the trust bundle");
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    assert!(lifetime <= Duration::from_secs(3600 + 300), "{lifetime:?}");
    assert!(cert.half_life() > cert.not_before && cert.half_life() < cert.not_after);

    // Asking for someone else's identity yields a certificate for our own: the
    // CA ignores the CSR's SAN, and the client notices the mismatch.
    let err = client
        .certificate(
            &id("spiffe://cluster.local/ns/default/sa/admin"),
            false,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("got spiffe://cluster.local/ns/default/sa/shell"),
        "{err}"
    );
    assert!(
        mesh.handle
            .drain(Duration::from_secs(5))
            .await
            .is_complete()
    );
}

#[tokio::test]
async fn missing_and_wrong_credentials_are_unauthenticated() {
    let mesh = start().await;
    let shell = id("spiffe://cluster.local/ns/default/sa/shell");
    let err = status(
        mesh.client()
            .build()
            .unwrap()
            .certificate(&shell, false, None)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("no credentials"),
        "{}",
        err.message()
    );

    let err = status(
        mesh.client()
            .token("guessed")
            .build()
            .unwrap()
            .certificate(&shell, false, None)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("the bearer token is not known"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn node_agents_impersonate_only_workloads_on_their_node() {
    let mesh = start().await;
    let node_agent = mesh.client().token(NODE_TOKEN).build().unwrap();
    let echo = id("spiffe://cluster.local/ns/default/sa/echo");
    let cert = node_agent.certificate(&echo, true, None).await.unwrap();
    assert_eq!(cert.identity, echo);

    // db runs on node-b, not on this agent's node.
    let db = id("spiffe://cluster.local/ns/default/sa/db");
    let err = status(node_agent.certificate(&db, true, None).await.unwrap_err());
    // Refused as Istio's CA refuses impersonation: Unauthenticated.
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("no workload with identity"),
        "{}",
        err.message()
    );

    // A workload token is not a node agent.
    let workload = mesh.client().token(SHELL_TOKEN).build().unwrap();
    let err = status(workload.certificate(&echo, true, None).await.unwrap_err());
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("not a trusted node agent"),
        "{}",
        err.message()
    );

    // An identity from another trust domain is never issued.
    let foreign = id("spiffe://example.org/ns/default/sa/echo");
    let err = status(
        node_agent
            .certificate(&foreign, true, None)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_workload_renews_with_its_mesh_certificate() {
    let mesh = start().await;
    let shell = id("spiffe://cluster.local/ns/default/sa/shell");
    let first = mesh
        .client()
        .token(SHELL_TOKEN)
        .build()
        .unwrap()
        .certificate(&shell, false, None)
        .await
        .unwrap();
    let renewing = mesh
        .client()
        .client_certificate(first.chain.clone(), first.private_key())
        .build()
        .unwrap();
    let second = renewing.certificate(&shell, false, None).await.unwrap();
    assert_eq!(second.identity, shell);
    assert_ne!(second.chain[0], first.chain[0]);
}

/// Sends a raw CSR with the shell token.
async fn raw(mesh: &Mesh, csr: String) -> tonic::Status {
    let client = mesh.client().build().unwrap();
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {SHELL_TOKEN}").parse().unwrap(),
    );
    client.grpc().create_certificate(request).await.unwrap_err()
}

fn csr_pem(key: &KeyPair) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.serialize_request(key).unwrap().pem().unwrap()
}

#[tokio::test]
async fn malformed_csrs_are_invalid_arguments_with_a_reason() {
    let mesh = start().await;
    let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    // A valid request whose last signature byte is flipped.
    let tampered = {
        let mut der = pem::parse(csr_pem(&p256)).unwrap().into_contents();
        *der.last_mut().unwrap() ^= 0x01;
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))
    };
    let cases = [
        ("not a csr at all".to_owned(), "not PEM"),
        (String::new(), "the CSR is empty"),
        (csr_pem(&p384), "must be EC P-256"),
        (tampered, "signature does not verify"),
        ("A".repeat(100 * 1024), "at most 16384 are accepted"),
    ];
    for (csr, needle) in cases {
        let status = raw(&mesh, csr).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(needle),
            "{:?} lacks {needle:?}",
            status.message()
        );
    }
    // Beyond the message limit the transport refuses before any parsing.
    let status = raw(&mesh, "A".repeat(2 * 1024 * 1024)).await;
    assert_ne!(status.code(), Code::Ok);
    // The CA still serves.
    let shell = id("spiffe://cluster.local/ns/default/sa/shell");
    mesh.client()
        .token(SHELL_TOKEN)
        .build()
        .unwrap()
        .certificate(&shell, false, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_serving_certificate_names_what_clients_dial() {
    let mesh = start().await;
    let shell = id("spiffe://cluster.local/ns/default/sa/shell");
    let err = mesh
        .client()
        .server_name("ca.example.com")
        .token(SHELL_TOKEN)
        .build()
        .unwrap()
        .certificate(&shell, false, None)
        .await
        .unwrap_err();
    assert_eq!(status(err).code(), Code::Unavailable);
    // By IP works too (127.0.0.1 is on the default serving certificate).
    mesh.client()
        .server_name("127.0.0.1")
        .token(SHELL_TOKEN)
        .build()
        .unwrap()
        .certificate(&shell, false, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn idle_connections_make_room_for_newer_ones() {
    // A deadline far off: whatever ends now was evicted, not timed out.
    let limits = HandshakeLimits::default()
        .with_timeout(Duration::from_secs(120))
        .with_max_in_progress_per_ip(4);
    let mesh = start_with(limits).await;
    let address = mesh.handle.local_addr();
    let attacker = [127, 0, 0, 9];
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(connect_from(attacker.into(), address).await.unwrap());
    }
    // A normal client is served meanwhile.
    let client = mesh.client().token(SHELL_TOKEN).build().unwrap();
    let shell = id("spiffe://cluster.local/ns/default/sa/shell");
    client
        .certificate(&shell, false, None)
        .await
        .expect("served during the attack");
    // The attacker's 16 oldest were closed to make room; its 4 newest wait.
    for stream in idle.drain(..16) {
        assert_eq!(
            ended(Ok(stream), Duration::from_secs(20)).await,
            Ended::Closed
        );
    }
    for stream in &mut idle {
        assert!(
            still_open(stream).await,
            "the newest wait for their deadline"
        );
    }
}

#[tokio::test]
async fn a_tls_client_without_http2_preface_is_closed_at_the_deadline() {
    let limits = HandshakeLimits::default().with_timeout(Duration::from_secs(1));
    let mesh = start_with(limits).await;
    let address = mesh.handle.local_addr();
    let idle = connect_from([127, 0, 0, 9].into(), address).await;
    assert_eq!(
        ended(idle, Duration::from_secs(20)).await,
        Ended::Closed,
        "idle"
    );
    let tcp = connect_from([127, 0, 0, 9].into(), address).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for root in &mesh.roots {
        roots.add(root.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("istiod.istio-system.svc").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (tcp, _) = tls.into_inner();
    assert_eq!(
        ended(Ok(tcp), Duration::from_secs(20)).await,
        Ended::Closed,
        "no preface"
    );
}

#[tokio::test]
async fn an_undecodable_request_is_an_invalid_argument() {
    let mesh = start().await;
    let client = mesh.client().build().unwrap();
    // Field 1 (`csr`, a string) holding bytes that are not UTF-8.
    // (prost encodes a `Vec<u8>` as `google.protobuf.BytesValue`: field 1.)
    let garbage: Vec<u8> = vec![0xff, 0xfe, 0xfd];
    let mut grpc = tonic::client::Grpc::new(client.channel());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(garbage);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {SHELL_TOKEN}").parse().unwrap(),
    );
    let path = http::uri::PathAndQuery::from_static(
        "/istio.v1.auth.IstioCertificateService/CreateCertificate",
    );
    let codec =
        mesh_api::codec::Codec::<Vec<u8>, mesh_api::ca::IstioCertificateResponse>::default();
    let status = grpc.unary(request, path, codec).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(status.message().contains("undecodable"), "{status}");
}

#[tokio::test(flavor = "current_thread")]
async fn refused_credentials_are_logged_with_the_peer_and_rate_limited() {
    let (captured, _guard) = Captured::install();
    let mesh = start().await;
    let client = mesh.client().token("not-a-token").build().unwrap();
    let shell = id("spiffe://cluster.local/ns/default/sa/shell");
    for _ in 0..3 {
        let err = status(client.certificate(&shell, false, None).await.unwrap_err());
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let text = captured.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("refused a client's credentials"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "three refusals, one line within 5 s: {text}"
    );
    assert!(lines[0].contains("remote=127.0.0.1:"), "{}", lines[0]);
    assert!(lines[0].contains("service=\"CA\""), "{}", lines[0]);
    assert!(lines[0].contains("credentials refused"), "{}", lines[0]);
}
