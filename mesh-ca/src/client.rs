//! A client of Istio's CA API: makes a P-256 key and CSR, calls
//! `CreateCertificate` over TLS (optionally on behalf of a workload), and checks
//! what comes back: a leaf for our key with exactly the identity asked for,
//! that verifies against the trust bundle sent with it (the last element of the
//! chain, every current root: how root rotations reach workloads).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_api::Identity;
use mesh_api::ca::IstioCertificateRequest;
use mesh_api::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use prost_types::{Struct, Value, value::Kind};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tonic::transport::Channel;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::service::IMPERSONATED_IDENTITY;
use mesh_net::grpc::{TlsChannel, tls_channel};
use mesh_net::spiffe::{BundleError, root_store};
use mesh_net::spiffe_identity;

/// A workload certificate with its key.
#[derive(Debug)]
pub struct WorkloadCertificate {
    /// Whose certificate it is.
    pub identity: Identity,
    /// What to present: the leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The trust bundle that came with it: every root the mesh trusts now
    /// (more than one during a root rotation).
    pub roots: Vec<CertificateDer<'static>>,
    /// The private key (PKCS#8), generated here and never sent.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Clone for WorkloadCertificate {
    fn clone(&self) -> Self {
        Self {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            roots: self.roots.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl WorkloadCertificate {
    /// The private key as rustls takes it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The moment half of the validity has passed: when to renew.
    pub fn half_life(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The CA refused or could not be reached.
    #[error("the CA answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// Making the key or CSR failed.
    #[error("could not make a key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    /// The answer is not a usable certificate for the request.
    #[error("the CA's answer is unusable: {0}")]
    BadChain(String),
    /// TLS setup failed.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// A [`CaClient`]'s plain settings, as configuration ([`mesh_net::config`]):
/// camelCase names, every field optional, unknown fields refused.
///
/// ```yaml
/// address: "10.0.0.1:15012"           # where the CA listens (required to build)
/// serverName: istiod.istio-system.svc # the name its serving certificate must carry
/// timeout: 10s                        # per call
/// socketMark: 1337                    # SO_MARK on connections to the CA; unset: none
/// ```
///
/// Not here: the bearer token and the client certificate are secrets, and the
/// mesh roots are certificates: a binary reads them from files of its own and
/// gives them with [`CaClientBuilder::token`],
/// [`CaClientBuilder::client_certificate`] and [`CaClientBuilder::roots`];
/// the crypto provider too is given to the builder.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct CaClientConfig {
    /// `address`: where the CA listens, as `IP:PORT` (default unset;
    /// [`CaClientBuilder::build`] needs one, from here or
    /// [`CaClientBuilder::address`]).
    pub address: Option<SocketAddr>,
    /// `serverName`: the name the CA's serving certificate must carry
    /// (default `istiod.istio-system.svc`).
    pub server_name: String,
    /// `timeout`: per-call timeout, connecting included (default `10s`).
    #[serde(with = "mesh_net::config::duration")]
    pub timeout: Duration,
    /// `socketMark`: a mark (`SO_MARK`) on the connections to the CA, e.g. a
    /// data plane's own so its redirect rules let them pass (needs
    /// `CAP_NET_ADMIN`); default unset: no mark.
    pub socket_mark: Option<u32>,
}

impl Default for CaClientConfig {
    fn default() -> Self {
        Self {
            address: None,
            server_name: DEFAULT_SERVER_NAME.into(),
            timeout: DEFAULT_TIMEOUT,
            socket_mark: None,
        }
    }
}

impl From<CaClientConfig> for CaClientBuilder {
    fn from(config: CaClientConfig) -> Self {
        CaClientBuilder::default().config(config)
    }
}

/// The name a CA's serving certificate carries by default (Istio's).
const DEFAULT_SERVER_NAME: &str = "istiod.istio-system.svc";
/// The default per-call timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a [`CaClient`].
#[derive(Debug)]
pub struct CaClientBuilder {
    address: Option<SocketAddr>,
    server_name: String,
    roots: Vec<CertificateDer<'static>>,
    token: Option<String>,
    client_certificate: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    provider: Option<Arc<CryptoProvider>>,
    timeout: Duration,
    mark: Option<u32>,
}

impl Default for CaClientBuilder {
    fn default() -> Self {
        Self {
            address: None,
            server_name: DEFAULT_SERVER_NAME.into(),
            roots: Vec::new(),
            token: None,
            client_certificate: None,
            provider: None,
            timeout: DEFAULT_TIMEOUT,
            mark: None,
        }
    }
}

impl CaClientBuilder {
    /// Takes every field of `config`, as its setter would: the server name
    /// and timeout are set, and the address and socket mark when the
    /// configuration has them (unset, they keep what was given before). The
    /// token, client certificate, roots and crypto provider are given with
    /// their own methods.
    pub fn config(mut self, config: CaClientConfig) -> Self {
        let CaClientConfig {
            address,
            server_name,
            timeout,
            socket_mark,
        } = config;
        if address.is_some() {
            self.address = address;
        }
        self.server_name = server_name;
        self.timeout = timeout;
        if socket_mark.is_some() {
            self.mark = socket_mark;
        }
        self
    }

    /// A mark (`SO_MARK`) on the connections to the CA, e.g. a data plane's
    /// own mark so its redirect rules let them pass (needs `CAP_NET_ADMIN`).
    pub fn socket_mark(mut self, mark: u32) -> Self {
        self.mark = Some(mark);
        self
    }

    /// Where the CA listens.
    pub fn address(mut self, address: SocketAddr) -> Self {
        self.address = Some(address);
        self
    }

    /// The name the CA's serving certificate must carry (default
    /// `istiod.istio-system.svc`).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// The mesh roots the CA's serving certificate must chain to. (Issued
    /// certificates are checked against the trust bundle sent with them.)
    pub fn roots(mut self, roots: impl IntoIterator<Item = CertificateDer<'static>>) -> Self {
        self.roots.extend(roots);
        self
    }

    /// A bearer token sent with every request.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// A mesh certificate to present in TLS (renewal without a token).
    pub fn client_certificate(
        mut self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        self.client_certificate = Some((chain, key));
        self
    }

    /// The rustls crypto provider (default: aws-lc-rs).
    pub fn crypto_provider(mut self, provider: Arc<CryptoProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Per-call timeout (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Assembles the client; the connection is made on first use.
    pub fn build(self) -> Result<CaClient, ClientError> {
        let address = self
            .address
            .ok_or_else(|| ClientError::Tls("no CA address given".into()))?;
        let provider = self
            .provider
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let roots = Arc::new(root_store(&self.roots).map_err(|err| match err {
            BundleError::Empty => ClientError::Tls("no mesh roots given".into()),
            other => ClientError::Tls(other.to_string()),
        })?);
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|err| ClientError::Tls(err.to_string()))?
            .with_root_certificates(roots.clone());
        let tls = match self.client_certificate {
            Some((chain, key)) => tls
                .with_client_auth_cert(chain, key)
                .map_err(|err| ClientError::Tls(err.to_string()))?,
            None => tls.with_no_client_auth(),
        };
        let channel = tls_channel(TlsChannel {
            address,
            server_name: self.server_name,
            tls,
            mark: self.mark,
            timeout: self.timeout,
        })
        .map_err(|err| ClientError::Tls(err.to_string()))?;
        Ok(CaClient {
            grpc: IstioCertificateServiceClient::new(channel.clone()),
            channel,
            token: self.token,
            provider,
        })
    }
}

/// A client of the CA. Cheap to clone; calls may run concurrently.
#[derive(Clone)]
pub struct CaClient {
    grpc: IstioCertificateServiceClient<Channel>,
    channel: Channel,
    token: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient").finish_non_exhaustive()
    }
}

impl CaClient {
    /// A builder.
    pub fn builder() -> CaClientBuilder {
        CaClientBuilder::default()
    }

    /// The TLS channel to the server (presenting this client's certificate, if
    /// any), for other services served beside the CA, such as xDS.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The raw gRPC client, for requests this type does not make.
    pub fn grpc(&self) -> IstioCertificateServiceClient<Channel> {
        self.grpc.clone()
    }

    /// Obtains a certificate for `identity`: the caller's own, or, with
    /// `impersonate`, a workload's on whose behalf a node agent asks. `ttl` is
    /// the validity asked for (the CA may grant less).
    pub async fn certificate(
        &self,
        identity: &Identity,
        impersonate: bool,
        ttl: Option<Duration>,
    ) -> Result<WorkloadCertificate, ClientError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.as_uri().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let metadata = impersonate.then(|| Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                Value {
                    kind: Some(Kind::StringValue(identity.as_uri().to_owned())),
                },
            )]
            .into(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: ttl
                .map_or(0, |ttl| i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            metadata,
        });
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::Tls("the token is not a valid header value".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        let response = self
            .grpc
            .clone()
            .create_certificate(request)
            .await?
            .into_inner();
        self.check(identity, &key, &response.cert_chain)
    }

    /// Checks an answer: PEM leaf, intermediates and trust bundle; our key; the
    /// identity asked for; a leaf that verifies against the bundle.
    fn check(
        &self,
        identity: &Identity,
        key: &KeyPair,
        chain_pem: &[String],
    ) -> Result<WorkloadCertificate, ClientError> {
        let bad = |problem: String| ClientError::BadChain(problem);
        let [leaf_pem, rest @ ..] = chain_pem else {
            return Err(bad("an empty chain".into()));
        };
        let Some((bundle_pem, intermediates_pem)) = rest.split_last() else {
            return Err(bad("no trust bundle after the leaf".into()));
        };
        let one = |what: &str, pem: &str| {
            CertificateDer::from_pem_slice(pem.as_bytes())
                .map(CertificateDer::into_owned)
                .map_err(|err| bad(format!("{what} is not a PEM certificate: {err}")))
        };
        let leaf = one("the leaf", leaf_pem)?;
        let mut chain = vec![leaf];
        for pem in intermediates_pem {
            chain.push(one("an intermediate", pem)?);
        }
        let roots = CertificateDer::pem_slice_iter(bundle_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| bad(format!("the trust bundle is not PEM certificates: {err}")))?;
        if roots.is_empty() {
            return Err(bad("the trust bundle is empty".into()));
        }
        let leaf = &chain[0];
        let (_, parsed) = X509Certificate::from_der(leaf)
            .map_err(|err| bad(format!("unreadable leaf: {err}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad("the leaf is not for the key we sent".into()));
        }
        let granted = spiffe_identity(leaf).map_err(|err| bad(err.to_string()))?;
        if &granted != identity {
            return Err(bad(format!("asked for {identity}, got {granted}")));
        }
        let store = root_store(&roots).map_err(|err| bad(err.to_string()))?;
        WebPkiClientVerifier::builder_with_provider(Arc::new(store), self.provider.clone())
            .build()
            .map_err(|err| bad(format!("the trust bundle: {err}")))?
            .verify_client_cert(leaf, &chain[1..], UnixTime::now())
            .map_err(|err| {
                bad(format!(
                    "the chain does not verify against its trust bundle: {err}"
                ))
            })?;
        let time = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        Ok(WorkloadCertificate {
            identity: granted,
            not_before: time(parsed.validity().not_before),
            not_after: time(parsed.validity().not_after),
            chain,
            roots,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_is_the_builders_default() {
        let config = CaClientConfig::default();
        let builder = CaClientBuilder::default();
        assert_eq!(config.address, builder.address);
        assert_eq!(config.server_name, builder.server_name);
        assert_eq!(config.timeout, builder.timeout);
        assert_eq!(config.socket_mark, builder.mark);
        let from = CaClientBuilder::from(config);
        assert_eq!(from.address, builder.address);
        assert_eq!(from.server_name, builder.server_name);
        assert_eq!(from.timeout, builder.timeout);
        assert_eq!(from.mark, builder.mark);
    }

    #[test]
    fn config_sets_every_field_and_keeps_what_it_leaves_unset() {
        let config = CaClientConfig {
            address: Some(SocketAddr::from(([10, 0, 0, 1], 15012))),
            server_name: "ca.example".into(),
            timeout: Duration::from_millis(250),
            socket_mark: Some(1337),
        };
        let builder = CaClientBuilder::default().config(config.clone());
        assert_eq!(builder.address, config.address);
        assert_eq!(builder.server_name, "ca.example");
        assert_eq!(builder.timeout, Duration::from_millis(250));
        assert_eq!(builder.mark, Some(1337));

        let given = SocketAddr::from(([127, 0, 0, 1], 1));
        let builder = CaClientBuilder::default()
            .address(given)
            .socket_mark(7)
            .config(CaClientConfig::default());
        assert_eq!(builder.address, Some(given));
        assert_eq!(builder.mark, Some(7));
    }
}
