//! Arbitrary bytes as a DNS question: parsed as the server parses it, then every
//! question resolved against mesh state by the proxy's decision core. Never a
//! panic, and a mesh answer only ever holds addresses of the asked family.

#![no_main]

use std::sync::OnceLock;

use dns_proxy::{InMemoryMeshDns, Resolution, ServiceRecord, resolve};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use libfuzzer_sys::fuzz_target;

fn mesh() -> &'static InMemoryMeshDns {
    static MESH: OnceLock<InMemoryMeshDns> = OnceLock::new();
    MESH.get_or_init(|| {
        let mesh = InMemoryMeshDns::new();
        for (namespace, hostname) in [
            ("default", "echo.default.svc.cluster.local"),
            ("other", "echo.other.svc.cluster.local"),
            ("default", "api.example.com"),
        ] {
            mesh.upsert_service(ServiceRecord {
                namespace: namespace.into(),
                hostname: hostname.into(),
                vips: vec!["10.96.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
                endpoints: Vec::new(),
                canonical: false,
            });
        }
        mesh
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::from_vec(data) else {
        return;
    };
    for query in &message.queries {
        let name = query.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let record_type = query.query_type();
        for namespace in [Some("default"), Some("other"), None] {
            if let Resolution::Answer { addresses, .. } =
                resolve(mesh(), "cluster.local", namespace, &name, record_type)
            {
                let v4 = record_type == RecordType::A;
                assert!(addresses.iter().all(|ip| ip.is_ipv4() == v4));
            }
        }
    }
});
