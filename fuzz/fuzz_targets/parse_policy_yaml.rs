//! Feeds arbitrary text to the AuthorizationPolicy YAML loader (parse, validate)
//! and converts and indexes whatever loads: never a panic, and every loaded
//! policy converts and is accepted by the engine.

#![no_main]

use authz::{Engine, load_policies};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(policies) = load_policies(text, "default") else {
        return;
    };
    let built = Engine::builder()
        .policies(policies)
        .build()
        .expect("validated policies convert and compile");
    assert!(built.engine.len() <= text.len());
});
