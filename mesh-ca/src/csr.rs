//! Reading certificate signing requests from callers: PEM, then PKCS#10, then the
//! key type, then the signature. Only the public key is kept: the CA never trusts
//! what a CSR says about identity (its subject and SANs are ignored).

use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
};
use x509_parser::prelude::FromDer;

/// The largest CSR accepted, in bytes of PEM. A P-256 CSR is well under 1 KiB.
pub const MAX_CSR_PEM_LEN: usize = 16 * 1024;

/// A CSR whose signature checked out: the requester holds the private key of
/// `public_key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCsr {
    /// The DER `SubjectPublicKeyInfo` of the requested key.
    pub(crate) public_key_der: Vec<u8>,
}

/// Why a CSR was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// No CSR was given.
    #[error("the CSR is empty")]
    Empty,
    /// Over [`MAX_CSR_PEM_LEN`].
    #[error("the CSR is {len} bytes; at most {MAX_CSR_PEM_LEN} are accepted")]
    TooLarge {
        /// Size of the input.
        len: usize,
    },
    /// No `-----BEGIN CERTIFICATE REQUEST-----` block could be read.
    #[error("the CSR is not PEM: expected a \"-----BEGIN CERTIFICATE REQUEST-----\" block")]
    NotPem,
    /// The PEM block is not a PKCS#10 request.
    #[error("the CSR is not a valid PKCS#10 certification request: {0}")]
    Malformed(String),
    /// The key is not an EC P-256 key.
    #[error("the CSR's key must be EC P-256 (prime256v1), found {0}")]
    UnsupportedKey(String),
    /// The signature algorithm is not ECDSA with SHA-256.
    #[error("the CSR must be signed with ECDSA-SHA256, found {0}")]
    UnsupportedSignature(String),
    /// The signature does not verify with the CSR's own key.
    #[error("the CSR's signature does not verify: the requester does not hold the key")]
    BadSignature,
}

/// Parses and checks a PEM CSR.
pub fn verify_csr(pem: &str) -> Result<VerifiedCsr, CsrError> {
    if pem.trim().is_empty() {
        return Err(CsrError::Empty);
    }
    if pem.len() > MAX_CSR_PEM_LEN {
        return Err(CsrError::TooLarge { len: pem.len() });
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CsrError::NotPem)?;
    let (rest, request) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|err| CsrError::Malformed(err.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    let info = &request.certification_request_info;
    let key = &info.subject_pki;
    let key_algorithm = &key.algorithm;
    let curve = key_algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if key_algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve.as_ref() != Some(&OID_EC_P256)
    {
        let found = match curve {
            Some(curve) => format!("{} on {curve}", key_algorithm.algorithm),
            None => key_algorithm.algorithm.to_string(),
        };
        return Err(CsrError::UnsupportedKey(found));
    }
    if request.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(CsrError::UnsupportedSignature(
            request.signature_algorithm.algorithm.to_string(),
        ));
    }
    request
        .verify_signature()
        .map_err(|_| CsrError::BadSignature)?;
    Ok(VerifiedCsr {
        public_key_der: key.raw.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384};

    fn csr_for(key: &KeyPair) -> String {
        let params = CertificateParams::new(vec!["spiffe://evil/ns/a/sa/b".to_owned()]).unwrap();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn accepts_a_p256_csr_and_keeps_only_the_key() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let verified = verify_csr(&csr_for(&key)).unwrap();
        assert!(verified.public_key_der.ends_with(key.public_key_raw()));
    }

    #[test]
    fn refuses_other_curves() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let err = verify_csr(&csr_for(&key)).unwrap_err();
        assert!(matches!(err, CsrError::UnsupportedKey(_)), "{err}");
    }

    #[test]
    fn refuses_garbage_with_a_reason() {
        assert_eq!(verify_csr(""), Err(CsrError::Empty));
        assert_eq!(verify_csr("hello"), Err(CsrError::NotPem));
        let not_a_csr =
            "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8=\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(verify_csr(not_a_csr), Err(CsrError::Malformed(_))));
        let huge = "A".repeat(MAX_CSR_PEM_LEN + 1);
        assert!(matches!(verify_csr(&huge), Err(CsrError::TooLarge { .. })));
    }
}
