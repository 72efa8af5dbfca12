//! Kubernetes service-account tokens: what is accepted, what is refused and why,
//! and a node agent impersonating a workload on its node with its token.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use mesh_api::Identity;
use mesh_ca::{
    Authority, CaClient, CaServer, JwtAuthenticator, SigningPolicy, StaticNodeAuthorizer,
    load_or_create,
};
use mesh_net::auth::{Authenticator, Caller};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, PublicKeyData, RsaKeySize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::metadata::MetadataMap;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key and its JWK.
struct Signer {
    key: KeyPair,
    kid: &'static str,
    algorithm: Algorithm,
}

impl Signer {
    fn ec(kid: &'static str) -> Self {
        Self {
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
            kid,
            algorithm: Algorithm::ES256,
        }
    }

    fn rsa(kid: &'static str) -> Self {
        Self {
            key: KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap(),
            kid,
            algorithm: Algorithm::RS256,
        }
    }

    fn jwk(&self) -> Value {
        match self.algorithm {
            Algorithm::ES256 => {
                let point = self.key.public_key_raw(); // 0x04 || X || Y
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig", "alg": "ES256",
                       "x": b64(&point[1..33]), "y": b64(&point[33..65])})
            }
            _ => {
                let der = self.key.subject_public_key_info();
                let (_, spki) = SubjectPublicKeyInfo::from_der(&der).unwrap();
                let PublicKey::RSA(rsa) = spki.parsed().unwrap() else {
                    unreachable!()
                };
                let modulus = rsa.modulus.strip_prefix(&[0]).unwrap_or(rsa.modulus);
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                       "n": b64(modulus), "e": b64(rsa.exponent)})
            }
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.into());
        let pem = self.key.serialize_pem();
        let key = match self.algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        };
        encode(&header, claims, &key).unwrap()
    }
}

fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(namespace: &str, service_account: &str, node: Option<&str>) -> Value {
    let mut claims = json!({
        "iss": ISSUER,
        "aud": ["istio-ca"],
        "iat": now(),
        "nbf": now(),
        "exp": now() + 3600,
        "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": "sa-uid"},
            "pod": {"name": format!("{service_account}-0"), "uid": "pod-uid"},
        },
    });
    if let Some(node) = node {
        claims["kubernetes.io"]["node"] = json!({"name": node, "uid": "node-uid"});
    }
    claims
}

async fn authenticate(
    authenticator: &JwtAuthenticator,
    token: &str,
) -> Result<Option<mesh_ca::Authenticated>, String> {
    let mut metadata = MetadataMap::new();
    metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
    let caller = Caller {
        metadata: &metadata,
        peer_certificates: None,
        remote: None,
    };
    authenticator.authenticate(&caller).await
}

#[tokio::test]
async fn accepts_es256_and_rs256_service_account_tokens() {
    let ec = Signer::ec("ec-1");
    let rsa = Signer::rsa("rsa-1");
    let authenticator =
        JwtAuthenticator::new(ISSUER, "istio-ca", "cluster.local", &jwks(&[&ec, &rsa])).unwrap();
    for signer in [&ec, &rsa] {
        let caller = authenticate(
            &authenticator,
            &signer.sign(&claims("default", "shell", Some("node-a"))),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            caller.identity.as_uri(),
            "spiffe://cluster.local/ns/default/sa/shell"
        );
        assert_eq!(caller.node.as_deref(), Some("node-a"));
        assert_eq!(caller.pod.unwrap().name, "shell-0");
    }
    // A legacy token with only `sub`.
    let mut legacy = claims("other", "app", None);
    legacy.as_object_mut().unwrap().remove("kubernetes.io");
    let caller = authenticate(&authenticator, &ec.sign(&legacy))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        caller.identity.as_uri(),
        "spiffe://cluster.local/ns/other/sa/app"
    );
    // Something that is not a JWT is not this authenticator's business.
    assert_eq!(authenticate(&authenticator, "static-token").await, Ok(None));
}

#[tokio::test]
async fn refuses_tokens_that_do_not_check_out() {
    let ec = Signer::ec("ec-1");
    let impostor = Signer::ec("ec-1"); // same kid, different key
    let authenticator =
        JwtAuthenticator::new(ISSUER, "istio-ca", "cluster.local", &jwks(&[&ec])).unwrap();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims("default", "shell", None);
        edit(&mut c);
        c
    };
    let cases: Vec<(String, &str)> = vec![
        (
            ec.sign(&with(&|c| c["aud"] = json!(["kubernetes"]))),
            "InvalidAudience",
        ),
        (
            ec.sign(&with(&|c| c["iss"] = json!("https://evil.example"))),
            "InvalidIssuer",
        ),
        (
            ec.sign(&with(&|c| c["exp"] = json!(now() - 3600))),
            "ExpiredSignature",
        ),
        (
            ec.sign(&with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
            "exp",
        ),
        (
            impostor.sign(&claims("default", "shell", None)),
            "InvalidSignature",
        ),
        (
            Signer {
                kid: "ec-2",
                ..Signer::ec("ec-2")
            }
            .sign(&claims("default", "shell", None)),
            "no key with kid \"ec-2\"",
        ),
        (
            ec.sign(&with(&|c| {
                c.as_object_mut().unwrap().remove("kubernetes.io");
                c["sub"] = json!("alice");
            })),
            "names no service account",
        ),
        (
            format!("{}x", ec.sign(&claims("default", "shell", None))),
            "token refused",
        ),
    ];
    for (token, needle) in cases {
        let err = authenticate(&authenticator, &token).await.unwrap_err();
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
    // A token whose header claims another algorithm than the key's is refused.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("ec-1".into());
    let hs = encode(
        &header,
        &claims("default", "shell", None),
        &EncodingKey::from_secret(b"k"),
    )
    .unwrap();
    let err = authenticate(&authenticator, &hs).await.unwrap_err();
    assert!(err.contains("needs ES256"), "{err}");
}

#[tokio::test]
async fn rotated_keys_replace_the_old_ones() {
    let old = Signer::ec("old");
    let new = Signer::ec("new");
    let authenticator =
        JwtAuthenticator::new(ISSUER, "istio-ca", "cluster.local", &jwks(&[&old])).unwrap();
    let token = claims("default", "shell", None);
    assert!(
        authenticate(&authenticator, &old.sign(&token))
            .await
            .unwrap()
            .is_some()
    );
    authenticator.set_jwks(&jwks(&[&new])).unwrap();
    assert!(
        authenticate(&authenticator, &old.sign(&token))
            .await
            .is_err()
    );
    assert!(
        authenticate(&authenticator, &new.sign(&token))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        authenticator.set_jwks("{\"keys\": []}").is_err(),
        "an empty JWKS is refused"
    );
}

#[tokio::test]
async fn a_node_agent_token_impersonates_workloads_on_its_node_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let material = load_or_create(dir.path(), "cluster.local", Duration::from_secs(86400)).unwrap();
    let authority =
        Arc::new(Authority::new(&material, "cluster.local", SigningPolicy::default()).unwrap());
    let signer = Signer::ec("k");
    let ztunnel: Identity = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        .parse()
        .unwrap();
    let echo: Identity = "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
    let handle = CaServer::builder()
        .authority(authority.clone())
        .authenticator(
            JwtAuthenticator::new(ISSUER, "istio-ca", "cluster.local", &jwks(&[&signer])).unwrap(),
        )
        .node_agent(ztunnel)
        .node_authorizer(StaticNodeAuthorizer::new().workload("node-a", echo.clone()))
        .build()
        .unwrap()
        .spawn(TcpListener::bind("127.0.0.1:0").await.unwrap())
        .unwrap();
    let client = |node: &str| {
        CaClient::builder()
            .address(handle.local_addr())
            .roots(authority.roots().iter().cloned())
            .token(signer.sign(&claims("istio-system", "ztunnel", Some(node))))
            .build()
            .unwrap()
    };
    let cert = client("node-a")
        .certificate(&echo, true, None)
        .await
        .unwrap();
    assert_eq!(cert.identity, echo);
    let err = client("node-b")
        .certificate(&echo, true, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, mesh_ca::ClientError::Status(status) if status.code() == tonic::Code::Unauthenticated),
        "{err}"
    );
    assert!(handle.drain(Duration::from_secs(5)).await.is_complete());
}
