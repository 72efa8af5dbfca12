//! TLS for HBONE (WIRE.md §4): TLS 1.3 only, ALPN `h2`, both sides present
//! their workload certificate and verify the other's against the trust bundle
//! that came with their own (every root during a rotation). Mesh certificates
//! name workloads by SPIFFE URI, not by DNS name, so the client checks the
//! server's identity after the handshake instead of a server name, and sends no
//! SNI.
//!
//! Configurations are built per certificate ([`TlsConfigs`]): a renewed
//! certificate or a new trust bundle gives new configurations for new
//! connections, while established ones carry on.

use std::sync::{Arc, Mutex, PoisonError};

use mesh_api::Identity;
use mesh_ca::WorkloadCertificate;
use mesh_net::spiffe::{MeshServerVerifier, SpiffeError, peer_identity, root_store};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, CommonState, ServerConfig};

/// ALPN protocol of HBONE.
const ALPN_H2: &[u8] = b"h2";

/// Why TLS could not be set up, or a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate or its trust bundle cannot be used.
    #[error("the certificate of {identity} cannot be used: {problem}")]
    Certificate {
        /// Whose certificate.
        identity: Identity,
        /// What was wrong.
        problem: String,
    },
    /// The peer presented no certificate, no usable SPIFFE identity, or one
    /// in another trust domain.
    #[error("the peer: {0}")]
    Peer(#[from] SpiffeError),
    /// The server is not one of the identities the client expected.
    #[error("the server is {actual}, expected one of {expected:?}")]
    UnexpectedServer {
        /// Who answered.
        actual: Identity,
        /// Who was expected.
        expected: Vec<Identity>,
    },
}

/// The server and client configurations of one workload certificate.
#[derive(Debug, Clone)]
pub struct WorkloadTls {
    /// The certificate they present.
    pub certificate: Arc<WorkloadCertificate>,
    /// For accepting HBONE connections.
    pub server: Arc<ServerConfig>,
    /// For opening HBONE connections.
    pub client: Arc<ClientConfig>,
}

impl WorkloadTls {
    /// Both configurations for `certificate`.
    pub fn new(
        certificate: Arc<WorkloadCertificate>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let problem = |problem: String| TlsError::Certificate {
            identity: certificate.identity.clone(),
            problem,
        };
        let roots =
            Arc::new(root_store(&certificate.roots).map_err(|err| problem(err.to_string()))?);

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|err| problem(err.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| problem(err.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(certificate.chain.clone(), certificate.private_key())
            .map_err(|err| problem(err.to_string()))?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];

        let server_verifier = Arc::new(MeshServerVerifier::new(roots, provider.clone()));
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| problem(err.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(certificate.chain.clone(), certificate.private_key())
            .map_err(|err| problem(err.to_string()))?;
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        client.enable_sni = false;

        Ok(Self {
            certificate,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The identity presented.
    pub fn identity(&self) -> &Identity {
        &self.certificate.identity
    }

    /// The verified peer of an established connection: its SPIFFE identity,
    /// which must be in our trust domain.
    pub fn peer_identity(&self, connection: &CommonState) -> Result<Identity, TlsError> {
        Ok(peer_identity(
            connection.peer_certificates(),
            self.identity().trust_domain(),
        )?)
    }
}

/// The configurations for the current certificate, rebuilt only when the
/// certificate changes (renewal, root rotation).
#[derive(Debug)]
pub struct TlsConfigs {
    provider: Arc<CryptoProvider>,
    current: Mutex<Option<WorkloadTls>>,
}

impl TlsConfigs {
    /// Configurations built with `provider`.
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Self {
            provider,
            current: Mutex::new(None),
        }
    }

    /// The configurations built last, if any.
    pub fn current(&self) -> Option<WorkloadTls> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The configurations of `certificate` (the ones built last time if it is
    /// the same certificate).
    pub fn for_certificate(
        &self,
        certificate: &Arc<WorkloadCertificate>,
    ) -> Result<WorkloadTls, TlsError> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tls) = current.as_ref()
            && Arc::ptr_eq(&tls.certificate, certificate)
        {
            return Ok(tls.clone());
        }
        let tls = WorkloadTls::new(certificate.clone(), &self.provider)?;
        *current = Some(tls.clone());
        Ok(tls)
    }
}

/// Checks that a server is one of the identities a client expected.
pub fn check_server_identity(actual: &Identity, expected: &[Identity]) -> Result<(), TlsError> {
    if expected.iter().any(|identity| identity == actual) {
        Ok(())
    } else {
        Err(TlsError::UnexpectedServer {
            actual: actual.clone(),
            expected: expected.to_vec(),
        })
    }
}
