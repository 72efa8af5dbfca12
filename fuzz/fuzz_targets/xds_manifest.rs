//! Arbitrary text as a Kubernetes manifest: read as the manifest directory reads
//! files, and every object read applied to a store. Never a panic; whatever was
//! applied is published consistently (every workload's uid is a resource).

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::ResourceType;
use xds_server::{MeshConfig, Store, parse_manifest};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(manifest) = parse_manifest(text) else {
        return;
    };
    for error in &manifest.errors {
        assert!(!error.to_string().is_empty());
    }
    let store = Store::new(MeshConfig::default());
    for object in manifest.objects {
        let _ = store.apply(object);
    }
    let stats = store.stats();
    let addresses = store.versions(ResourceType::Address).len();
    assert_eq!(addresses, stats.addresses);
});
