//! The ADS stream's wire format: requests decoded with prost, and responses
//! assembled from resources the store encoded once, written to HTTP/2 without
//! copying them again.
//!
//! A response is a gRPC message (a 5-byte length prefix, then the
//! `DeltaDiscoveryResponse`), and the message is its own fields (type URL, nonce,
//! removals) followed by already-framed `resources` entries: protobuf allows
//! fields in any order, so the concatenation is the message. Large pieces (the
//! store's snapshot chunks) go to HTTP/2 as they are; small ones are gathered
//! into one buffer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::Frame;
use mesh_api::discovery::DeltaDiscoveryRequest;
use mesh_api::prost::Message;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codec::{DecodeBuf, Decoder};

/// Pieces at least this large are sent without copying.
const ZERO_COPY_THRESHOLD: usize = 16 << 10;

/// A `DeltaDiscoveryResponse` in encoded form.
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

    /// The gRPC message as HTTP/2 data pieces.
    fn into_pieces(self, pieces: &mut VecDeque<Bytes>) {
        let len = self.len();
        let mut small = BytesMut::with_capacity(5 + self.head.len());
        small.put_u8(0); // not compressed
        small.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        small.put_slice(&self.head);
        for resource in self.resources {
            if resource.len() >= ZERO_COPY_THRESHOLD {
                if !small.is_empty() {
                    pieces.push_back(small.split().freeze());
                }
                pieces.push_back(resource);
            } else {
                small.put_slice(&resource);
            }
        }
        if !small.is_empty() {
            pieces.push_back(small.freeze());
        }
    }
}

/// Decodes `DeltaDiscoveryRequest`s.
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

/// The response body of one stream: responses as they are produced, then the
/// gRPC status in trailers.
#[derive(Debug)]
pub(crate) struct ResponseBody {
    responses: mpsc::Receiver<Result<EncodedResponse, Status>>,
    pieces: VecDeque<Bytes>,
    done: bool,
}

impl ResponseBody {
    pub(crate) fn new(responses: mpsc::Receiver<Result<EncodedResponse, Status>>) -> Self {
        Self {
            responses,
            pieces: VecDeque::new(),
            done: false,
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(piece) = self.pieces.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let status = match self.responses.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(response))) => {
                let this = &mut *self;
                response.into_pieces(&mut this.pieces);
                return match this.pieces.pop_front() {
                    Some(piece) => Poll::Ready(Some(Ok(Frame::data(piece)))),
                    None => Poll::Pending,
                };
            }
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::ok(""),
        };
        self.done = true;
        let mut trailers = HeaderMap::new();
        if let Err(err) = status.add_header(&mut trailers) {
            tracing::debug!(error = %err, "could not encode the stream's final status");
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}
