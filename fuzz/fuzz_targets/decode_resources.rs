//! Decodes `istio.workload.Address` and `istio.security.Authorization` resources
//! from arbitrary bytes, as a data plane does with what a control plane sends.
//! Decoding must never panic; whatever decodes must survive its own round trip,
//! and the names and aliases derived from it must be computable without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::prost::Message;
use mesh_api::security::Authorization;
use mesh_api::workload::Address;

fn round_trips<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M) {
    let again = M::decode(message.encode_to_vec().as_slice()).expect("re-encoding decodes");
    assert_eq!(&again, message);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(address) = Address::decode(data) {
        round_trips(&address);
        let _ = address.resource_name();
        let _ = address.aliases();
    }
    if let Ok(policy) = Authorization::decode(data) {
        round_trips(&policy);
        let _ = policy.resource_name().to_string();
    }
});
