//! The certificate authority proper: signs workload certificates for
//! authenticated identities and serving certificates for the CA's own TLS.
//!
//! A workload certificate has an empty subject, exactly one URI SAN (the
//! identity the caller was authenticated as, never what the CSR asked for, and
//! always in the CA's trust domain), key usage digitalSignature and
//! keyEncipherment, extended key usage serverAuth and clientAuth, and a validity
//! of `min(requested, max_ttl)` (the default TTL when none is asked), starting a
//! little in the past for clock skew and never outliving the signing certificate.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh_api::Identity;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::csr::VerifiedCsr;
use crate::store::CaMaterial;

/// How long certificates live, given to [`Authority::new`].
///
/// As configuration ([`mesh_net::config`]): `defaultTtl` (`"24h"`),
/// `maxTtl` (`"90days"`), `backdate` (`"5m"`), durations as text, each
/// optional.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct SigningPolicy {
    /// `defaultTtl`: validity when the request names none (default, as
    /// Istio's: 24 h).
    #[serde(with = "mesh_net::config::duration")]
    pub default_ttl: Duration,
    /// `maxTtl`: the longest validity granted, whatever is asked (default, as
    /// Istio's: 90 days).
    #[serde(with = "mesh_net::config::duration")]
    pub max_ttl: Duration,
    /// `backdate`: how far before "now" validity starts, for clock skew
    /// (default 5 min).
    #[serde(with = "mesh_net::config::duration")]
    pub backdate: Duration,
}

impl Default for SigningPolicy {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
            backdate: Duration::from_secs(5 * 60),
        }
    }
}

/// The longest validity any duration of a [`SigningPolicy`] may give (100
/// years): beyond it, dates leave what X.509 and the clock can hold.
pub const MAX_VALIDITY: Duration = Duration::from_secs(100 * 365 * 86400);

impl SigningPolicy {
    /// Whether the durations make sense: validities above zero, the default
    /// within the maximum, none beyond [`MAX_VALIDITY`], a backdate of at
    /// most a day.
    pub fn check(&self) -> Result<(), AuthorityError> {
        let wrong = |message: String| Err(AuthorityError::Policy(message));
        if self.default_ttl.is_zero() || self.max_ttl.is_zero() {
            return wrong("defaultTtl and maxTtl must be above zero".into());
        }
        if self.max_ttl > MAX_VALIDITY {
            return wrong(format!(
                "maxTtl {:?} is beyond {MAX_VALIDITY:?}",
                self.max_ttl
            ));
        }
        if self.default_ttl > self.max_ttl {
            return wrong(format!(
                "defaultTtl {:?} is beyond maxTtl {:?}",
                self.default_ttl, self.max_ttl
            ));
        }
        if self.backdate > Duration::from_secs(86400) {
            return wrong(format!("backdate {:?} is more than a day", self.backdate));
        }
        Ok(())
    }
}

/// A signed certificate with its chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// PEM certificates, each ending in a newline: the leaf, any
    /// intermediates, and last the trust bundle (every current root in one
    /// PEM string, as Istio's CA sends it).
    pub chain_pem: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The identity is in another trust domain than the CA's.
    #[error("identity {identity} is not in this CA's trust domain {trust_domain:?}")]
    WrongTrustDomain {
        /// The identity asked for.
        identity: Identity,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// The requested key could not be used.
    #[error("the CSR's public key is unusable: {0}")]
    BadKey(rcgen::Error),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
}

/// Why the CA material could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// The signing key or certificate is unusable.
    #[error("unusable CA material: {0}")]
    Material(String),
    /// The signing policy's durations are out of bounds.
    #[error("signing policy: {0}")]
    Policy(String),
}

/// The current signing key and chain.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate and any intermediates above it, PEM; not the
    /// root (the trust bundle is sent in its place).
    chain_pem: Vec<String>,
    not_after: OffsetDateTime,
}

/// The certificate authority. Cheap to share (`Arc`); signing is thread-safe.
/// [`Authority::reload`] swaps the signing key and trust bundle in place (root
/// rotation); [`Authority::generation`] tells dependents when to refresh.
pub struct Authority {
    trust_domain: String,
    policy: SigningPolicy,
    signer: RwLock<Arc<Signer>>,
    roots: RwLock<Arc<Vec<CertificateDer<'static>>>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// A random positive 128-bit serial number.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // aws-lc's generator only fails if the system has no entropy source at all.
    aws_lc_rs::rand::fill(&mut bytes).unwrap_or_default();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// PEM of one certificate, with `\n` line endings as Istio's CA API expects.
pub(crate) fn pem_of(der: &CertificateDer<'_>) -> String {
    let block = pem::Pem::new("CERTIFICATE", der.as_ref());
    pem::encode_config(
        &block,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

impl Signer {
    fn new(material: &CaMaterial) -> Result<Self, AuthorityError> {
        let key = KeyPair::from_pem(&material.key_pem)
            .map_err(|err| AuthorityError::Material(format!("signing key: {err}")))?;
        let signing_cert = material
            .chain
            .first()
            .ok_or_else(|| AuthorityError::Material("no signing certificate".into()))?;
        let (_, parsed) = X509Certificate::from_der(signing_cert)
            .map_err(|err| AuthorityError::Material(format!("signing certificate: {err}")))?;
        let not_after = OffsetDateTime::from_unix_timestamp(
            parsed.validity().not_after.timestamp(),
        )
        .map_err(|err| AuthorityError::Material(format!("signing certificate validity: {err}")))?;
        let issuer = Issuer::from_ca_cert_der(signing_cert, key)
            .map_err(|err| AuthorityError::Material(format!("signing certificate: {err}")))?;
        Ok(Self {
            issuer,
            chain_pem: material
                .chain
                .split_last()
                .map(|(_root, below)| below.iter().map(pem_of).collect())
                .unwrap_or_default(),
            not_after,
        })
    }
}

impl Authority {
    /// A CA over loaded or created material (see [`crate::store`]).
    pub fn new(
        material: &CaMaterial,
        trust_domain: impl Into<String>,
        policy: SigningPolicy,
    ) -> Result<Self, AuthorityError> {
        policy.check()?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            policy,
            signer: RwLock::new(Arc::new(Signer::new(material)?)),
            roots: RwLock::new(Arc::new(material.roots.clone())),
            generation: AtomicU64::new(0),
        })
    }

    /// Replaces the signing key, chain and trust bundle (each step of a root
    /// rotation). Certificates already issued stay valid while their root is in
    /// the bundle.
    pub fn reload(&self, material: &CaMaterial) -> Result<(), AuthorityError> {
        let signer = Arc::new(Signer::new(material)?);
        let roots = Arc::new(material.roots.clone());
        // Bundle first: a certificate from the new signer is never handed out
        // before its root is trusted.
        match self.roots.write() {
            Ok(mut current) => *current = roots,
            Err(poisoned) => *poisoned.into_inner() = roots,
        }
        match self.signer.write() {
            Ok(mut current) => *current = signer,
            Err(poisoned) => *poisoned.into_inner() = signer,
        }
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Changes on every [`Authority::reload`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The trust domain identities are issued in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The signing policy.
    pub fn policy(&self) -> SigningPolicy {
        self.policy
    }

    /// The roots workloads should trust (more than one during a root rotation).
    pub fn roots(&self) -> Arc<Vec<CertificateDer<'static>>> {
        match self.roots.read() {
            Ok(roots) => roots.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The roots as concatenated PEM.
    pub fn trust_bundle_pem(&self) -> String {
        self.roots().iter().map(pem_of).collect()
    }

    fn signer(&self) -> Arc<Signer> {
        match self.signer.read() {
            Ok(signer) => signer.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Signs a workload certificate for `identity` with the key of `csr`, valid
    /// for `requested` (clamped to the policy's maximum; `None` for the default).
    pub fn issue(
        &self,
        csr: &VerifiedCsr,
        identity: &Identity,
        requested: Option<Duration>,
    ) -> Result<IssuedCertificate, IssueError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(IssueError::WrongTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let public_key =
            SubjectPublicKeyInfo::from_der(&csr.public_key_der).map_err(IssueError::BadKey)?;
        let ttl = requested
            .filter(|ttl| !ttl.is_zero())
            .unwrap_or(self.policy.default_ttl)
            .min(self.policy.max_ttl);
        let uri = identity.as_uri().try_into().map_err(IssueError::Sign)?;
        let mut params = self.leaf_params(ttl);
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        self.sign(&params, &public_key)
    }

    /// Signs a serving certificate (with a fresh key) for the CA's own TLS
    /// endpoint, with the DNS names and IPs clients dial.
    pub fn issue_serving_certificate(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(IssueError::Sign)?;
        let mut params = self.leaf_params(validity);
        for name in dns_names {
            params.subject_alt_names.push(SanType::DnsName(
                name.as_str().try_into().map_err(IssueError::Sign)?,
            ));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issued = self.sign(&params, &key)?;
        // Present the leaf and intermediates; the trust bundle (last) is for
        // the peer to know already.
        let presented = issued.chain_pem.len().saturating_sub(1);
        let chain = issued.chain_pem[..presented]
            .iter()
            .filter_map(|pem| {
                use rustls_pki_types::pem::PemObject;
                CertificateDer::from_pem_slice(pem.as_bytes()).ok()
            })
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key))
    }

    fn leaf_params(&self, ttl: Duration) -> CertificateParams {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - self.policy.backdate;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params
    }

    fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<IssuedCertificate, IssueError> {
        let signer = self.signer();
        let mut params = params.clone();
        // Never outlive the signing certificate.
        params.not_after = params.not_after.min(signer.not_after);
        let leaf = params
            .signed_by(public_key, &signer.issuer)
            .map_err(IssueError::Sign)?;
        // Istio's layout: leaf, intermediates, then the whole trust bundle as
        // one PEM (every root during a rotation), which workloads trust.
        let mut chain_pem = Vec::with_capacity(signer.chain_pem.len() + 2);
        chain_pem.push(leaf.pem());
        chain_pem.extend(signer.chain_pem.iter().cloned());
        chain_pem.push(self.trust_bundle_pem());
        Ok(IssuedCertificate {
            chain_pem,
            not_before: params.not_before,
            not_after: params.not_after,
        })
    }
}

impl mesh_net::TrustRoots for Authority {
    fn generation(&self) -> u64 {
        Authority::generation(self)
    }

    fn roots(&self) -> Arc<Vec<CertificateDer<'static>>> {
        Authority::roots(self)
    }

    fn trust_domain(&self) -> &str {
        Authority::trust_domain(self)
    }
}
