//! The protobuf codec of the generated gRPC stubs: prost's, except that a
//! message that does not decode is `InvalidArgument`, not `Internal`. On a
//! server that is the right answer (the caller sent bad bytes), and the CA
//! and xDS servers answer an undecodable request alike. The clients' stubs
//! share the codec (tonic's generator takes one per build), so a client that
//! cannot decode a server's response sees `InvalidArgument` too: there it
//! means the response was bad, not the request.

use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// prost's codec with [`Codec::decoder`](tonic::codec::Codec::decoder)
/// answering undecodable messages with `InvalidArgument`.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = InvalidArgumentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder {
            inner: self.inner.decoder(),
        }
    }
}

/// prost's decoder, failing with `InvalidArgument` and prost's reason.
#[derive(Debug)]
pub struct InvalidArgumentDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: prost::Message + Default> Decoder for InvalidArgumentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| {
            Status::invalid_argument(format!("undecodable message: {}", status.message()))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
