//! The TLS client certificate of a mesh workload as a credential: the chain
//! verified against the mesh roots (all of them during a root rotation), the
//! identity from its SPIFFE URI SAN, in the roots' trust domain.

use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::UnixTime;

use super::{Authenticated, Authenticator, BoxFuture, Caller};
use crate::spiffe::{BundleError, MeshClientVerifier, TrustRoots, peer_identity};

/// Authenticates callers by their mesh client certificate.
#[derive(Debug)]
pub struct ClientCertificate {
    verifier: MeshClientVerifier,
}

impl ClientCertificate {
    /// Trusts certificates chaining to `roots` (e.g. the CA's authority),
    /// with identities in their trust domain.
    pub fn new(roots: Arc<impl TrustRoots>) -> Result<Self, BundleError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Ok(Self {
            verifier: MeshClientVerifier::new(roots, provider, false)?,
        })
    }
}

impl Authenticator for ClientCertificate {
    fn name(&self) -> &'static str {
        "client certificate"
    }

    fn authenticate<'a>(
        &'a self,
        caller: &'a Caller<'a>,
    ) -> BoxFuture<'a, Result<Option<Authenticated>, String>> {
        let result = (|| {
            let Some([leaf, intermediates @ ..]) = caller.peer_certificates else {
                return Ok(None);
            };
            self.verifier
                .verify_client_cert(leaf, intermediates, UnixTime::now())
                .map_err(|err| format!("the client certificate is not trusted: {err}"))?;
            let identity = peer_identity(caller.peer_certificates, self.verifier.trust_domain())
                .map_err(|err| err.to_string())?;
            Ok(Some(Authenticated::identity(identity)))
        })();
        Box::pin(std::future::ready(result))
    }
}
