//! Kubernetes service-account tokens (JWTs) as credentials.
//!
//! A token is accepted when its signature verifies with a key of the configured
//! JWKS (ES256 or RS256, chosen by the key, never by the token alone), its
//! issuer is the configured one, its audience includes the configured one
//! (`istio-ca` by default), and it is within its validity (60 s leeway). The
//! identity is `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`
//! from the `kubernetes.io` claims (or the legacy
//! `sub: system:serviceaccount:<ns>:<sa>`); the pod and node, when the token names
//! them, go along for impersonation checks.
//!
//! The JWKS is given, not fetched: the embedding binary reads it from its API
//! server and calls [`JwtAuthenticator::set_jwks`] when keys rotate.
//! (jsonwebtoken is built with its aws-lc-rs backend only; a binary that also
//! enables its `rust_crypto` backend must install a jsonwebtoken provider itself.)

use std::sync::{Arc, RwLock};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use mesh_api::Identity;
use serde::Deserialize;

use crate::auth::{Authenticated, Authenticator, BoxFuture, Caller, PodRef};

/// The audience Istio's CA expects by default.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECONDS: u64 = 60;

/// Accepts Kubernetes service-account JWTs.
#[derive(Debug)]
pub struct JwtAuthenticator {
    issuer: String,
    audience: String,
    trust_domain: String,
    keys: RwLock<Arc<JwkSet>>,
}

/// Why a JWKS could not be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid JWKS: {0}")]
pub struct JwksError(String);

impl JwtAuthenticator {
    /// Accepts tokens from `issuer` for `audience`, signed by a key in `jwks`
    /// (a JWKS JSON document), mapping them into `trust_domain`.
    pub fn new(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        trust_domain: impl Into<String>,
        jwks: &str,
    ) -> Result<Self, JwksError> {
        Ok(Self {
            issuer: issuer.into(),
            audience: audience.into(),
            trust_domain: trust_domain.into(),
            keys: RwLock::new(Arc::new(parse_jwks(jwks)?)),
        })
    }

    /// Replaces the keys (the issuer rotated its signing keys).
    pub fn set_jwks(&self, jwks: &str) -> Result<(), JwksError> {
        let keys = Arc::new(parse_jwks(jwks)?);
        match self.keys.write() {
            Ok(mut current) => *current = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
        Ok(())
    }

    fn keys(&self) -> Arc<JwkSet> {
        match self.keys.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn verify(&self, token: &str) -> Result<Authenticated, String> {
        let header = decode_header(token).map_err(|err| format!("malformed JWT header: {err}"))?;
        let keys = self.keys();
        let jwk = match &header.kid {
            Some(kid) => keys
                .find(kid)
                .ok_or_else(|| format!("no key with kid {kid:?}"))?,
            None if keys.keys.len() == 1 => &keys.keys[0],
            None => return Err("the token names no key (kid) and the JWKS has several".into()),
        };
        // The algorithm follows from the key; the token's header must agree.
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            _ => return Err("the key is neither EC P-256 nor RSA".into()),
        };
        if header.alg != algorithm {
            return Err(format!(
                "the token is signed with {:?}, the key needs {algorithm:?}",
                header.alg
            ));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|err| format!("unusable key: {err}"))?;
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = LEEWAY_SECONDS;
        let claims = decode::<Claims>(token, &key, &validation)
            .map_err(|err| format!("token refused: {err}"))?
            .claims;
        claims.into_caller(&self.trust_domain)
    }
}

fn parse_jwks(jwks: &str) -> Result<JwkSet, JwksError> {
    let set: JwkSet = serde_json::from_str(jwks).map_err(|err| JwksError(err.to_string()))?;
    if set.keys.is_empty() {
        return Err(JwksError("no keys".into()));
    }
    Ok(set)
}

/// A JWT is three base64url parts separated by dots.
fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("ey")
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: Named,
    #[serde(default)]
    pod: Option<Named>,
    #[serde(default)]
    node: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
    #[serde(default)]
    uid: Option<String>,
}

impl Claims {
    fn into_caller(self, trust_domain: &str) -> Result<Authenticated, String> {
        if let Some(k8s) = self.kubernetes {
            let identity = Identity::new(trust_domain, &k8s.namespace, &k8s.serviceaccount.name)
                .map_err(|err| err.to_string())?;
            return Ok(Authenticated {
                identity,
                node: k8s.node.map(|node| node.name),
                pod: k8s.pod.map(|pod| PodRef {
                    namespace: k8s.namespace.clone(),
                    name: pod.name,
                    uid: pod.uid,
                }),
            });
        }
        let sub = self.sub.unwrap_or_default();
        let parts: Vec<&str> = sub.split(':').collect();
        let ["system", "serviceaccount", namespace, service_account] = parts.as_slice() else {
            return Err(format!(
                "the token names no service account (no kubernetes.io claims, sub {sub:?})"
            ));
        };
        let identity = Identity::new(trust_domain, namespace, service_account)
            .map_err(|err| err.to_string())?;
        Ok(Authenticated::identity(identity))
    }
}

impl Authenticator for JwtAuthenticator {
    fn name(&self) -> &'static str {
        "service-account token"
    }

    fn authenticate<'a>(
        &'a self,
        caller: &'a Caller<'a>,
    ) -> BoxFuture<'a, Result<Option<Authenticated>, String>> {
        let result = match caller.bearer_token() {
            Some(token) if looks_like_jwt(token) => self.verify(token).map(Some),
            _ => Ok(None),
        };
        Box::pin(std::future::ready(result))
    }
}
