//! Arbitrary bytes as a ZDS datagram, decoded as each side decodes them: a
//! `WorkloadRequest` (the data plane), a `WorkloadResponse` and a `ZdsHello`
//! (the node agent). Never a panic; what decodes encodes to bytes that
//! decode to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::zds::{WorkloadRequest, WorkloadResponse, ZdsHello};
use prost::Message;

fn round_trips<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(message) = M::decode(data) {
        let again = M::decode(message.encode_to_vec().as_slice()).expect("re-encoded");
        assert_eq!(again, message);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trips::<WorkloadRequest>(data);
    round_trips::<WorkloadResponse>(data);
    round_trips::<ZdsHello>(data);
});
