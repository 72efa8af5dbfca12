//! SPIFFE certificates: the identity a certificate names (its one
//! `spiffe://` URI SAN), the checks on a TLS peer (a certificate, a SPIFFE
//! identity, our trust domain), and the rustls verifiers the mesh uses, written
//! once for every component:
//!
//! - [`MeshServerVerifier`]: a client's check of a server's chain against the
//!   mesh roots whatever name was dialled (mesh certificates name workloads by
//!   SPIFFE URI, not DNS name; which identity is acceptable is checked after
//!   the handshake with [`peer_identity`]).
//! - [`MeshClientVerifier`]: a server's check of client chains against roots
//!   that rotate ([`TrustRoots`], e.g. the CA's authority), rebuilt when they
//!   change, so certificates under either root verify during an overlap.

use std::sync::{Arc, RwLock};

use mesh_api::{Identity, IdentityError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate names no usable SPIFFE identity, or a peer is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeError {
    /// The certificate is not readable X.509.
    #[error("unreadable certificate: {0}")]
    Unreadable(String),
    /// Its SAN extension is not readable.
    #[error("unreadable SAN: {0}")]
    UnreadableSan(String),
    /// It has no SAN extension.
    #[error("the certificate has no SAN")]
    NoSan,
    /// No SAN is a `spiffe://` URI.
    #[error("the certificate has no SPIFFE URI SAN")]
    NoSpiffeUri,
    /// More than one SAN is a `spiffe://` URI.
    #[error("the certificate has more than one SPIFFE URI SAN")]
    SeveralSpiffeUris,
    /// The URI is not a workload identity.
    #[error("the SPIFFE URI SAN: {0}")]
    Identity(#[from] IdentityError),
    /// The peer presented no certificate.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The peer is in another trust domain.
    #[error("{peer} is not in the trust domain {expected:?}")]
    TrustDomain {
        /// The peer's identity.
        peer: Identity,
        /// The trust domain required.
        expected: String,
    },
}

/// The SPIFFE identity in a certificate's URI SAN (exactly one is expected).
pub fn spiffe_identity(certificate: &CertificateDer<'_>) -> Result<Identity, SpiffeError> {
    let (_, parsed) = X509Certificate::from_der(certificate)
        .map_err(|err| SpiffeError::Unreadable(err.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|err| SpiffeError::UnreadableSan(err.to_string()))?
        .ok_or(SpiffeError::NoSan)?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => Ok(uri.parse()?),
        (None, _) => Err(SpiffeError::NoSpiffeUri),
        (Some(_), Some(_)) => Err(SpiffeError::SeveralSpiffeUris),
    }
}

/// The identity of a TLS peer whose chain (leaf first) the handshake
/// verified: its SPIFFE identity, which must be in `trust_domain`.
pub fn peer_identity(
    chain: Option<&[CertificateDer<'_>]>,
    trust_domain: &str,
) -> Result<Identity, SpiffeError> {
    let leaf = chain
        .and_then(<[_]>::first)
        .ok_or(SpiffeError::NoPeerCertificate)?;
    let peer = spiffe_identity(leaf)?;
    if peer.trust_domain() != trust_domain {
        return Err(SpiffeError::TrustDomain {
            peer,
            expected: trust_domain.to_owned(),
        });
    }
    Ok(peer)
}

/// Why a trust bundle cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// It has no root.
    #[error("the trust bundle is empty")]
    Empty,
    /// A root is not a usable trust anchor.
    #[error("a root of the trust bundle: {0}")]
    Root(String),
    /// The verifier could not be built from it.
    #[error("a verifier over the trust bundle: {0}")]
    Verifier(String),
}

/// A root store of `roots`, refusing an empty bundle (which would trust
/// nothing, and fail later with a less helpful error).
pub fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, BundleError> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store
            .add(root.clone())
            .map_err(|err| BundleError::Root(err.to_string()))?;
    }
    if store.is_empty() {
        return Err(BundleError::Empty);
    }
    Ok(store)
}

/// Verifies a server's chain against the mesh roots, whatever name was asked
/// for: which identity is acceptable is decided per connection, after the
/// handshake ([`peer_identity`]).
#[derive(Debug)]
pub struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl MeshServerVerifier {
    /// A verifier trusting `roots`, with `provider`'s signature algorithms.
    pub fn new(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>) -> Self {
        Self { roots, provider }
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Roots that can change while a server runs (a CA's, during a root
/// rotation), with a generation that moves on every change.
pub trait TrustRoots: Send + Sync + 'static {
    /// Changes whenever [`TrustRoots::roots`] does.
    fn generation(&self) -> u64;
    /// Every root trusted now.
    fn roots(&self) -> Arc<Vec<CertificateDer<'static>>>;
    /// The trust domain identities under these roots belong to.
    fn trust_domain(&self) -> &str;
}

/// Verifies TLS client certificates against [`TrustRoots`], rebuilding the
/// webpki verifier when their generation moves; if a rebuild fails, the
/// previous roots stay (rather than trusting nothing or everything).
pub struct MeshClientVerifier {
    roots: Arc<dyn TrustRoots>,
    provider: Arc<CryptoProvider>,
    allow_unauthenticated: bool,
    current: RwLock<(u64, Arc<dyn ClientCertVerifier>)>,
}

impl std::fmt::Debug for MeshClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClientVerifier")
            .field("trust_domain", &self.roots.trust_domain())
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .finish_non_exhaustive()
    }
}

impl MeshClientVerifier {
    /// A verifier over `roots`; `allow_unauthenticated` lets clients without
    /// a certificate through (they then authenticate otherwise, e.g. with a
    /// token).
    pub fn new(
        roots: Arc<dyn TrustRoots>,
        provider: Arc<CryptoProvider>,
        allow_unauthenticated: bool,
    ) -> Result<Self, BundleError> {
        let generation = roots.generation();
        let verifier = build_client_verifier(&*roots, &provider, allow_unauthenticated)?;
        Ok(Self {
            roots,
            provider,
            allow_unauthenticated,
            current: RwLock::new((generation, verifier)),
        })
    }

    /// The trust domain of the roots.
    pub fn trust_domain(&self) -> &str {
        self.roots.trust_domain()
    }

    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        let generation = self.roots.generation();
        if let Ok(current) = self.current.read()
            && current.0 == generation
        {
            return current.1.clone();
        }
        match build_client_verifier(&*self.roots, &self.provider, self.allow_unauthenticated) {
            Ok(verifier) => {
                if let Ok(mut current) = self.current.write() {
                    *current = (generation, verifier.clone());
                }
                verifier
            }
            Err(err) => {
                tracing::error!(error = %err, "could not rebuild the client verifier: keeping the previous roots");
                match self.current.read() {
                    Ok(current) => current.1.clone(),
                    Err(poisoned) => poisoned.into_inner().1.clone(),
                }
            }
        }
    }
}

fn build_client_verifier(
    roots: &dyn TrustRoots,
    provider: &Arc<CryptoProvider>,
    allow_unauthenticated: bool,
) -> Result<Arc<dyn ClientCertVerifier>, BundleError> {
    let store = root_store(&roots.roots())?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone());
    let builder = if allow_unauthenticated {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .build()
        .map_err(|err| BundleError::Verifier(err.to_string()))
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.allow_unauthenticated
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // Hints are optional; mesh clients know which certificate to send.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}
