//! The gRPC codec of the ADS stream: requests are decoded with prost; responses
//! are assembled from resources encoded once in the store, so sending one costs
//! a copy, not an encoding.

use bytes::{BufMut, Bytes};
use mesh_api::discovery::DeltaDiscoveryRequest;
use mesh_api::prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// A `DeltaDiscoveryResponse` in encoded form: its own fields (type URL, nonce,
/// removals) followed by already-framed `resources` entries. Protobuf allows
/// fields in any order, so the concatenation is the message.
#[derive(Clone, Debug, Default)]
pub struct EncodedResponse {
    pub(crate) head: Vec<u8>,
    pub(crate) resources: Vec<Bytes>,
}

impl EncodedResponse {
    /// The encoded length.
    pub fn len(&self) -> usize {
        self.head.len() + self.resources.iter().map(Bytes::len).sum::<usize>()
    }

    /// Whether the message is empty (never, for a response that was sent).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message's bytes (for tests and tools: one copy).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.len());
        bytes.extend_from_slice(&self.head);
        for resource in &self.resources {
            bytes.extend_from_slice(resource);
        }
        bytes
    }
}

/// Decodes `DeltaDiscoveryRequest`s, encodes [`EncodedResponse`]s.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AdsCodec;

impl Codec for AdsCodec {
    type Encode = EncodedResponse;
    type Decode = DeltaDiscoveryRequest;
    type Encoder = ResponseEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ResponseEncoder;

impl Encoder for ResponseEncoder {
    type Item = EncodedResponse;
    type Error = Status;

    fn encode(&mut self, item: EncodedResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        dst.put_slice(&item.head);
        for resource in &item.resources {
            dst.put_slice(resource);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = DeltaDiscoveryRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        DeltaDiscoveryRequest::decode(src).map(Some).map_err(|err| {
            Status::invalid_argument(format!("malformed DeltaDiscoveryRequest: {err}"))
        })
    }
}
