//! Packing messages into `google.protobuf.Any` and unpacking them with a type check.

use prost::Name;
use prost_types::Any;

/// Why an `Any` could not be unpacked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    /// The `Any` holds another type.
    #[error("expected a {expected} resource, got type URL {found:?}")]
    WrongType {
        /// The type URL asked for.
        expected: String,
        /// The type URL found.
        found: String,
    },
    /// The bytes are not a valid encoding of the type.
    #[error("malformed {type_url} resource: {source}")]
    Decode {
        /// The type URL.
        type_url: String,
        /// What the decoder found wrong.
        source: prost::DecodeError,
    },
}

/// Wraps a message in an `Any` with its `type.googleapis.com/...` URL.
pub fn pack<M: Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// Unwraps an `Any`, checking that it holds an `M`.
pub fn unpack<M: Name + Default>(any: &Any) -> Result<M, UnpackError> {
    let expected = M::type_url();
    if any.type_url != expected {
        return Err(UnpackError::WrongType {
            expected,
            found: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(|source| UnpackError::Decode {
        type_url: expected,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::Authorization;
    use crate::workload::{Address, Workload};

    #[test]
    fn pack_then_unpack_gives_the_message_back() {
        let address = Address::from(Workload {
            uid: "u".into(),
            ..Default::default()
        });
        let any = pack(&address);
        assert_eq!(any.type_url, crate::type_url::ADDRESS);
        assert_eq!(unpack::<Address>(&any), Ok(address));
    }

    #[test]
    fn unpack_names_the_wrong_type() {
        let any = pack(&Authorization::default());
        let err = unpack::<Address>(&any).unwrap_err();
        assert!(matches!(err, UnpackError::WrongType { .. }));
        assert!(err.to_string().contains("istio.security.Authorization"));
    }

    #[test]
    fn unpack_reports_malformed_bytes() {
        let any = Any {
            type_url: crate::type_url::ADDRESS.into(),
            value: vec![0x0a, 0x05, 0x01],
        };
        let err = unpack::<Address>(&any).unwrap_err();
        assert!(matches!(err, UnpackError::Decode { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("malformed type.googleapis.com/istio.workload.Address")
        );
    }
}
