//! The CA's keys and certificates on disk, in Istio's plug-in CA layout:
//!
//! | file | contents |
//! |---|---|
//! | `ca-key.pem` | the signing key (mode 0600) |
//! | `ca-cert.pem` | the signing certificate |
//! | `cert-chain.pem` | the signing certificate up to the root |
//! | `root-cert.pem` | the root(s) workloads trust |
//!
//! A root rotation goes through three steps, each persisted before it takes
//! effect, so a restart resumes where it stopped: [`stage_new_root`] creates a
//! new root in `next/` and adds it to `root-cert.pem` (workloads learn to trust
//! it); [`promote_new_root`] makes it the signer (the old key and certificate are
//! kept in `previous/`); [`retire_old_roots`] leaves only the signer's root in
//! `root-cert.pem`. Reload the [`crate::Authority`] with what each step returns.
//!
//! An operator may put these files in place (the CA then runs as an
//! intermediate under their root). Otherwise the first start creates a
//! self-signed root and writes the same files, and every later start loads them:
//! a restart never re-keys and never loses the root. Files are written to a
//! temporary name and renamed, so a crash never leaves half a key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

/// File of the signing key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File of the signing certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// File of the chain from the signing certificate to the root.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// File of the trusted root(s).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// Folder of the root staged by a rotation.
pub const NEXT_DIR: &str = "next";
/// Folder of the signing files a rotation replaced.
pub const PREVIOUS_DIR: &str = "previous";

/// The signing material, loaded or created.
#[derive(Clone, Debug)]
pub struct CaMaterial {
    /// PEM of the signing key.
    pub key_pem: String,
    /// The signing certificate, then its issuers up to and including the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The roots workloads trust (more than one during a root rotation).
    pub roots: Vec<CertificateDer<'static>>,
}

impl CaMaterial {
    /// A new self-signed P-256 root for `trust_domain`, valid for `validity`,
    /// kept in memory only: a CA for tests, or for an embedder that keeps
    /// its keys elsewhere (`key_pem` and the certificates are all there is to
    /// save). Material from files is [`load`]'s; an operator's own can be put
    /// together from its fields.
    pub fn self_signed(trust_domain: &str, validity: Duration) -> Result<Self, StoreError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let root = root_params(trust_domain, validity).self_signed(&key)?;
        let der = root.der().clone();
        Ok(Self {
            key_pem: key.serialize_pem(),
            chain: vec![der.clone()],
            roots: vec![der],
        })
    }

    /// The root certificates as PEM, for clients to trust.
    pub fn roots_pem(&self) -> String {
        self.roots
            .iter()
            .map(|root| {
                pem::encode_config(
                    &pem::Pem::new("CERTIFICATE", root.to_vec()),
                    pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
                )
            })
            .collect()
    }
}

/// Why the CA's files could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file holds something unusable.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Some of the CA files are there and others are not.
    #[error("{dir}: {problem}")]
    Incomplete {
        /// The directory.
        dir: PathBuf,
        /// Which files are missing.
        problem: String,
    },
    /// Creating the root failed.
    #[error("could not create the root CA: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, problem: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// Loads the CA files from `dir`, or, when `dir` holds none of them, creates a
/// self-signed root for `trust_domain` valid for `root_validity` and writes it.
pub fn load_or_create(
    dir: &Path,
    trust_domain: &str,
    root_validity: Duration,
) -> Result<CaMaterial, StoreError> {
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_CERT_FILE);
    if !key_path.exists() && !cert_path.exists() {
        create_self_signed(dir, trust_domain, root_validity)?;
    }
    load(dir)
}

/// Loads existing CA files from `dir`; fails if they are missing or inconsistent.
pub fn load(dir: &Path) -> Result<CaMaterial, StoreError> {
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_CERT_FILE);
    let root_path = dir.join(ROOT_CERT_FILE);
    for (path, what) in [
        (&key_path, "signing key"),
        (&cert_path, "signing certificate"),
        (&root_path, "root certificate"),
    ] {
        if !path.exists() {
            return Err(StoreError::Incomplete {
                dir: dir.to_owned(),
                problem: format!(
                    "{} ({what}) is missing; the CA never replaces a key it may have issued with",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ),
            });
        }
    }
    let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|err| invalid(&key_path, format!("not a usable private key: {err}")))?;
    let ca_cert = read_certs(&cert_path)?
        .into_iter()
        .next()
        .ok_or_else(|| invalid(&cert_path, "holds no certificate"))?;
    let roots = read_certs(&root_path)?;
    if roots.is_empty() {
        return Err(invalid(&root_path, "holds no certificate"));
    }
    let chain_path = dir.join(CERT_CHAIN_FILE);
    let mut chain = if chain_path.exists() {
        read_certs(&chain_path)?
    } else {
        Vec::new()
    };
    if chain.first() != Some(&ca_cert) {
        chain.insert(0, ca_cert.clone());
    }
    if !roots.iter().any(|root| chain.last() == Some(root)) {
        chain.push(roots[0].clone());
    }

    let (_, parsed) = X509Certificate::from_der(&ca_cert)
        .map_err(|err| invalid(&cert_path, format!("not a certificate: {err}")))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(
            &key_path,
            format!("does not belong to the certificate in {CA_CERT_FILE}"),
        ));
    }
    if !parsed.is_ca() {
        return Err(invalid(
            &cert_path,
            "is not a CA certificate (basicConstraints CA:TRUE)",
        ));
    }
    Ok(CaMaterial {
        key_pem,
        chain,
        roots,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let pem = fs::read(path).map_err(io(path))?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(path, format!("not PEM certificates: {err}")))
}

/// The parameters of a self-signed mesh root.
pub(crate) fn root_params(trust_domain: &str, validity: Duration) -> CertificateParams {
    let now = time::OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, trust_domain);
    name.push(DnType::CommonName, "podless mesh root CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + validity;
    params.serial_number = Some(crate::authority::random_serial());
    params
}

fn create_self_signed(
    dir: &Path,
    trust_domain: &str,
    validity: Duration,
) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let material = CaMaterial::self_signed(trust_domain, validity)?;
    let root_pem = material.roots_pem();
    // The key first: a directory with a key and no certificate refuses to start
    // rather than silently making a new root.
    write_atomic(&dir.join(CA_KEY_FILE), material.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join(ROOT_CERT_FILE), root_pem.as_bytes(), 0o644)?;
    write_atomic(&dir.join(CERT_CHAIN_FILE), root_pem.as_bytes(), 0o644)?;
    write_atomic(&dir.join(CA_CERT_FILE), root_pem.as_bytes(), 0o644)?;
    Ok(())
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StoreError> {
    let tmp = path.with_extension("pem.tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(contents).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

/// Rotation step 1: creates a new self-signed root in `next/` (or keeps the one
/// already staged) and adds it to the trust bundle. Signing is unchanged.
pub fn stage_new_root(
    dir: &Path,
    trust_domain: &str,
    validity: Duration,
) -> Result<CaMaterial, StoreError> {
    let current = load(dir)?;
    let next = dir.join(NEXT_DIR);
    let next_key = next.join(CA_KEY_FILE);
    let next_cert = next.join(CA_CERT_FILE);
    if !(next_key.exists() && next_cert.exists()) {
        fs::create_dir_all(&next).map_err(io(&next))?;
        fs::set_permissions(&next, fs::Permissions::from_mode(0o700)).map_err(io(&next))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let root = root_params(trust_domain, validity).self_signed(&key)?;
        write_atomic(&next_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&next_cert, root.pem().as_bytes(), 0o644)?;
    }
    let new_root = read_certs(&next_cert)?
        .into_iter()
        .next()
        .ok_or_else(|| invalid(&next_cert, "holds no certificate"))?;
    let mut bundle = current.roots;
    if !bundle.contains(&new_root) {
        bundle.push(new_root);
    }
    write_certs(&dir.join(ROOT_CERT_FILE), &bundle)?;
    load(dir)
}

/// Rotation step 2: the staged root becomes the signer. The trust bundle keeps
/// both roots, so certificates from either verify.
pub fn promote_new_root(dir: &Path) -> Result<CaMaterial, StoreError> {
    let current = load(dir)?;
    let next = dir.join(NEXT_DIR);
    let (next_key, next_cert) = (next.join(CA_KEY_FILE), next.join(CA_CERT_FILE));
    if !(next_key.exists() && next_cert.exists()) {
        return Err(StoreError::Incomplete {
            dir: dir.to_owned(),
            problem: "no staged root in next/: stage a new root first".into(),
        });
    }
    let new_root = read_certs(&next_cert)?;
    if !new_root.iter().all(|root| current.roots.contains(root)) {
        return Err(invalid(
            &dir.join(ROOT_CERT_FILE),
            "does not trust the staged root yet",
        ));
    }
    let previous = dir.join(PREVIOUS_DIR);
    fs::create_dir_all(&previous).map_err(io(&previous))?;
    fs::set_permissions(&previous, fs::Permissions::from_mode(0o700)).map_err(io(&previous))?;
    write_atomic(
        &previous.join(CA_KEY_FILE),
        current.key_pem.as_bytes(),
        0o600,
    )?;
    write_certs(&previous.join(CERT_CHAIN_FILE), &current.chain)?;
    let key_pem = fs::read(&next_key).map_err(io(&next_key))?;
    write_certs(&dir.join(CERT_CHAIN_FILE), &new_root)?;
    write_atomic(&dir.join(CA_KEY_FILE), &key_pem, 0o600)?;
    write_certs(&dir.join(CA_CERT_FILE), &new_root)?;
    fs::remove_dir_all(&next).map_err(io(&next))?;
    load(dir)
}

/// Rotation step 3: only the signer's root stays in the trust bundle.
pub fn retire_old_roots(dir: &Path) -> Result<CaMaterial, StoreError> {
    let current = load(dir)?;
    if dir.join(NEXT_DIR).exists() {
        return Err(StoreError::Incomplete {
            dir: dir.to_owned(),
            problem: "a staged root in next/ is not promoted yet".into(),
        });
    }
    let signer_root = current
        .chain
        .last()
        .cloned()
        .into_iter()
        .collect::<Vec<_>>();
    write_certs(&dir.join(ROOT_CERT_FILE), &signer_root)?;
    load(dir)
}

fn write_certs(path: &Path, certs: &[CertificateDer<'_>]) -> Result<(), StoreError> {
    let pem: String = certs.iter().map(crate::authority::pem_of).collect();
    write_atomic(path, pem.as_bytes(), 0o644)
}
