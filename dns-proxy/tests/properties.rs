//! Property tests: the decision core finds a service under every name a pod's
//! resolver may ask, and never answers with the wrong family; the running
//! proxy survives any datagram, answers each readable question with its own
//! ID, and keeps answering real questions afterwards.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dns_proxy::{DnsProxy, InMemoryMeshDns, Resolution, ServiceRecord, resolve};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use proptest::prelude::*;

mod support;
use support::{bind_pair, exchange, question};

const DOMAIN: &str = "cluster.local";

fn label() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,14}[a-z0-9]"
}

fn mesh_with(service: &str, namespace: &str, vips: Vec<IpAddr>) -> InMemoryMeshDns {
    let mesh = InMemoryMeshDns::new();
    mesh.upsert_service(ServiceRecord {
        namespace: namespace.into(),
        hostname: format!("{service}.{namespace}.svc.{DOMAIN}"),
        vips,
        endpoints: Vec::new(),
        canonical: false,
    });
    mesh
}

proptest! {
    /// Every form a Kubernetes resolver may ask for a service (short names
    /// from the service's own namespace, with or without a search suffix) is
    /// answered with the service's addresses of the asked family.
    #[test]
    fn every_search_form_finds_the_service(
        service in label(),
        namespace in label(),
        v4 in any::<[u8; 4]>(),
        v6 in any::<[u16; 8]>(),
    ) {
        let v4 = IpAddr::from(v4);
        let v6 = IpAddr::from(v6);
        let mesh = mesh_with(&service, &namespace, vec![v4, v6]);
        let full = format!("{service}.{namespace}.svc.{DOMAIN}");
        let forms = [
            full.clone(),
            service.clone(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.{namespace}.svc.{DOMAIN}"),
            format!("{service}.{namespace}.svc.svc.{DOMAIN}"),
            format!("{service}.{namespace}.svc.{DOMAIN}.{namespace}.svc.{DOMAIN}"),
        ];
        for asked in &forms {
            for (record_type, ip) in [(RecordType::A, v4), (RecordType::AAAA, v6)] {
                let resolution = resolve(&mesh, DOMAIN, Some(&namespace), asked, record_type);
                let Resolution::Answer { alias_of, addresses } = resolution else {
                    return Err(TestCaseError::fail(format!("{asked} {record_type} was forwarded")));
                };
                prop_assert_eq!(addresses, vec![ip]);
                let answered = alias_of.unwrap_or_else(|| asked.clone());
                prop_assert_eq!(&answered, &full);
            }
        }
    }

    /// Any name and type: never a panic, and a mesh answer only holds
    /// addresses of the asked family.
    #[test]
    fn any_question_is_decided_without_mixing_families(
        name in "[a-zA-Z0-9.-]{0,80}",
        record_type in any::<u16>(),
        namespace in proptest::option::of(label()),
    ) {
        let mesh = mesh_with("echo", "default", vec![
            "10.96.0.1".parse().unwrap(),
            "fd00::1".parse().unwrap(),
        ]);
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let record_type = RecordType::from(record_type);
        if let Resolution::Answer { addresses, .. } =
            resolve(&mesh, DOMAIN, namespace.as_deref(), &name, record_type)
        {
            prop_assert!(matches!(record_type, RecordType::A | RecordType::AAAA));
            let v4 = record_type == RecordType::A;
            prop_assert!(addresses.iter().all(|ip| ip.is_ipv4() == v4));
        }
    }
}

/// A proxy on loopback answering `echo.default.svc.cluster.local`.
async fn start_proxy() -> (SocketAddr, dns_proxy::DnsHandle) {
    let mesh = mesh_with("echo", "default", vec!["10.96.0.1".parse().unwrap()]);
    mesh.set_client_namespace("127.0.0.1".parse().unwrap(), Some("default".into()));
    let (udp, tcp) = bind_pair().await;
    let proxy = DnsProxy::builder()
        .mesh(Arc::new(mesh))
        .build()
        .unwrap()
        .spawn(udp, tcp)
        .unwrap();
    (proxy.udp_addr(), proxy)
}

/// The question for `echo.default.svc.cluster.local` A, with ID `id`.
fn echo_question(id: u16) -> Vec<u8> {
    let mut packet = question("echo.default.svc.cluster.local.", RecordType::A, false);
    packet[..2].copy_from_slice(&id.to_be_bytes());
    packet
}

/// Random datagrams, and real questions with random bytes flipped: every reply
/// is a response carrying the datagram's ID, and the proxy still answers a
/// real question after each batch (answers it has kept are not disturbed).
#[test]
fn the_proxy_survives_any_datagram() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (to, proxy) = runtime.block_on(start_proxy());
    let datagram = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        (
            any::<u16>(),
            proptest::collection::vec((0usize..64, any::<u8>()), 1..6)
        )
            .prop_map(|(id, flips)| {
                let mut packet = echo_question(id);
                for (at, byte) in flips {
                    let at = at % packet.len();
                    packet[at] = byte;
                }
                packet
            }),
    ];
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |(packets in proptest::collection::vec(datagram, 1..6), id in any::<u16>())| {
        runtime.block_on(async {
            for packet in &packets {
                if let Some(reply) = exchange("127.0.0.1", to, packet, Duration::from_millis(20)).await {
                    let reply = Message::from_vec(&reply).expect("replies are well formed");
                    prop_assert_eq!(reply.metadata.message_type, MessageType::Response);
                    prop_assert_eq!(&reply.metadata.id.to_be_bytes()[..], &packet[..2]);
                }
            }
            let reply = exchange("127.0.0.1", to, &echo_question(id), Duration::from_secs(5))
                .await
                .expect("still answering");
            let reply = Message::from_vec(&reply).unwrap();
            prop_assert_eq!(reply.metadata.id, id);
            prop_assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
            let addresses: Vec<_> = reply
                .answers
                .iter()
                .filter_map(|record| match &record.data {
                    RData::A(a) => Some(a.0.to_string()),
                    _ => None,
                })
                .collect();
            prop_assert_eq!(addresses, ["10.96.0.1"]);
            Ok(())
        })?;
    });
    proxy.shutdown();
    runtime.block_on(proxy.join()).unwrap();
}
