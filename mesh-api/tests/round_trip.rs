//! Round trips: every message of every package, populated (each oneof variant at
//! least once), encodes and decodes back to itself; and arbitrary bytes either fail
//! to decode cleanly or decode to a message that survives its own round trip.

use std::collections::BTreeMap;
use std::fmt::Debug;

use mesh_api::prost::Message;
use mesh_api::prost_types::{Any, Struct, Value, value};
use mesh_api::security::{self, string_match};
use mesh_api::workload::{self, application_tunnel, gateway_address, load_balancing};
use mesh_api::{ca, discovery, envoy_core, rpc, zds};
use proptest::prelude::*;

fn round_trip<M: Message + Default + PartialEq + Debug>(message: &M) {
    let encoded = message.encode_to_vec();
    assert_eq!(encoded.len(), message.encoded_len());
    let decoded = M::decode(encoded.as_slice()).expect("our own encoding decodes");
    assert_eq!(&decoded, message);
    // Length-delimited framing too (used for ZDS datagrams and gRPC bodies alike).
    let delimited = message.encode_length_delimited_to_vec();
    assert_eq!(
        &M::decode_length_delimited(delimited.as_slice()).unwrap(),
        message
    );
}

fn sample_any() -> Any {
    Any {
        type_url: "type.googleapis.com/x.Y".into(),
        value: vec![1, 2, 3],
    }
}

fn metadata() -> Struct {
    Struct {
        fields: BTreeMap::from([
            (
                "NAME".to_owned(),
                Value {
                    kind: Some(value::Kind::StringValue("ztunnel".into())),
                },
            ),
            (
                "N".to_owned(),
                Value {
                    kind: Some(value::Kind::NumberValue(1.5)),
                },
            ),
        ]),
    }
}

fn network_address() -> workload::NetworkAddress {
    workload::NetworkAddress {
        network: "net".into(),
        address: vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        length: Some(128),
    }
}

fn gateway(destination: gateway_address::Destination) -> workload::GatewayAddress {
    workload::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: 15008,
    }
}

fn namespaced_hostname() -> workload::NamespacedHostname {
    workload::NamespacedHostname {
        namespace: "istio-system".into(),
        hostname: "waypoint.istio-system.svc.cluster.local".into(),
    }
}

fn port() -> workload::Port {
    workload::Port {
        service_port: 80,
        target_port: 8080,
        app_protocol: workload::AppProtocol::Grpc.into(),
    }
}

fn sample_workload() -> workload::Workload {
    workload::Workload {
        uid: "Kubernetes//Pod/default/echo-0".into(),
        name: "echo-0".into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 42, 0, 7], network_address().address],
        hostname: "echo-0.echo.default.svc.cluster.local".into(),
        network: "net".into(),
        tunnel_protocol: workload::TunnelProtocol::LegacyIstioMtls.into(),
        trust_domain: "cluster.local".into(),
        service_account: "echo".into(),
        waypoint: Some(gateway(gateway_address::Destination::Hostname(
            namespaced_hostname(),
        ))),
        network_gateway: Some(gateway(gateway_address::Destination::Address(
            network_address(),
        ))),
        node: "node-a".into(),
        canonical_name: "echo".into(),
        canonical_revision: "v1".into(),
        workload_type: workload::WorkloadType::Job.into(),
        workload_name: "echo".into(),
        native_tunnel: true,
        application_tunnel: Some(workload::ApplicationTunnel {
            protocol: application_tunnel::Protocol::Proxy.into(),
            port: 15088,
        }),
        services: BTreeMap::from([
            (
                "default/echo.default.svc.cluster.local".to_owned(),
                workload::PortList {
                    ports: vec![port(), port()],
                },
            ),
            (
                "default/other.default.svc.cluster.local".to_owned(),
                workload::PortList::default(),
            ),
        ]),
        authorization_policies: vec!["default/allow-shell".into()],
        status: workload::WorkloadStatus::Unhealthy.into(),
        cluster_id: "Kubernetes".into(),
        locality: Some(workload::Locality {
            region: "eu".into(),
            zone: "eu-1".into(),
            subzone: "rack-3".into(),
        }),
        network_mode: workload::NetworkMode::HostNetwork.into(),
        extensions: vec![workload::Extension {
            name: "ext".into(),
            config: Some(sample_any()),
        }],
        capacity: Some(4),
    }
}

fn sample_service() -> workload::Service {
    workload::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![network_address()],
        ports: vec![port()],
        subject_alt_names: vec!["spiffe://cluster.local/ns/default/sa/echo".into()],
        waypoint: Some(gateway(gateway_address::Destination::Address(
            network_address(),
        ))),
        load_balancing: Some(workload::LoadBalancing {
            routing_preference: vec![
                load_balancing::Scope::Region.into(),
                load_balancing::Scope::Network.into(),
            ],
            mode: load_balancing::Mode::Strict.into(),
            health_policy: load_balancing::HealthPolicy::AllowAll.into(),
            dns_connect_strategy: load_balancing::DnsConnectStrategy::FirstHealthyRace.into(),
        }),
        ip_families: workload::IpFamilies::Ipv6Only.into(),
        extensions: vec![workload::Extension {
            name: "ext".into(),
            config: None,
        }],
        canonical: true,
        ingress_use_waypoint: true,
    }
}

#[test]
fn workload_package() {
    round_trip(&workload::Address::from(sample_workload()));
    round_trip(&workload::Address::from(sample_service()));
    round_trip(&workload::Address::default());
    round_trip(&sample_workload());
    round_trip(&sample_service());
    round_trip(&sample_service().load_balancing.unwrap());
    round_trip(&sample_workload().locality.unwrap());
    round_trip(&workload::PortList {
        ports: vec![port()],
    });
    round_trip(&port());
    round_trip(&sample_workload().application_tunnel.unwrap());
    round_trip(&sample_workload().waypoint.unwrap());
    round_trip(&sample_workload().network_gateway.unwrap());
    round_trip(&network_address());
    round_trip(&namespaced_hostname());
    round_trip(&sample_workload().extensions[0]);
}

fn sample_match() -> security::Match {
    let string_match = |m| security::StringMatch {
        match_type: Some(m),
    };
    let range = |address: Vec<u8>, length| security::Address { address, length };
    security::Match {
        namespaces: vec![string_match(string_match::MatchType::Exact(
            "default".into(),
        ))],
        not_namespaces: vec![string_match(string_match::MatchType::Prefix(
            "kube-".into(),
        ))],
        principals: vec![string_match(string_match::MatchType::Suffix(
            "/sa/shell".into(),
        ))],
        not_principals: vec![string_match(string_match::MatchType::Presence(()))],
        source_ips: vec![range(vec![10, 0, 0, 0], 8)],
        not_source_ips: vec![range(vec![10, 1, 0, 0], 16)],
        destination_ips: vec![range(network_address().address, 64)],
        not_destination_ips: vec![range(vec![10, 2, 0, 1], 32)],
        destination_ports: vec![80, 8080, 65535],
        not_destination_ports: vec![22],
        service_accounts: vec![security::ServiceAccountMatch {
            namespace: "default".into(),
            service_account: "shell".into(),
        }],
        not_service_accounts: vec![security::ServiceAccountMatch {
            namespace: "other".into(),
            service_account: "shell".into(),
        }],
    }
}

#[test]
fn security_package() {
    let policy = security::Authorization {
        name: "allow-shell".into(),
        namespace: "default".into(),
        scope: security::Scope::Namespace.into(),
        action: security::Action::Deny.into(),
        rules: vec![
            security::Rule {
                clauses: vec![security::Clause {
                    matches: vec![sample_match(), security::Match::default()],
                }],
            },
            security::Rule::default(),
        ],
        dry_run: true,
    };
    round_trip(&policy);
    round_trip(&policy.rules[0]);
    round_trip(&policy.rules[0].clauses[0]);
    round_trip(&sample_match());
    round_trip(&sample_match().service_accounts[0]);
    round_trip(&sample_match().source_ips[0]);
    for matcher in [
        sample_match().namespaces,
        sample_match().not_namespaces,
        sample_match().principals,
        sample_match().not_principals,
    ] {
        round_trip(&matcher[0]);
    }
}

#[test]
fn ca_package() {
    round_trip(&ca::IstioCertificateRequest {
        csr: "-----BEGIN CERTIFICATE REQUEST-----\n...\n".into(),
        validity_duration: 86_400,
        metadata: Some(metadata()),
    });
    round_trip(&ca::IstioCertificateResponse {
        cert_chain: vec!["leaf\n".into(), "root\n".into()],
    });
}

#[test]
fn zds_package() {
    use zds::workload_request::Payload;
    let info = zds::WorkloadInfo {
        name: "shell".into(),
        namespace: "default".into(),
        service_account: "shell".into(),
    };
    let add = zds::AddWorkload {
        uid: "uid-1".into(),
        workload_info: Some(info.clone()),
    };
    round_trip(&zds::ZdsHello {
        version: zds::Version::V1.into(),
    });
    round_trip(&info);
    round_trip(&add);
    round_trip(&zds::KeepWorkload { uid: "u".into() });
    round_trip(&zds::DelWorkload { uid: "u".into() });
    round_trip(&zds::SnapshotSent {});
    round_trip(&zds::Ack {
        error: "no such netns".into(),
    });
    for payload in [
        Payload::Add(add),
        Payload::Del(zds::DelWorkload { uid: "u".into() }),
        Payload::SnapshotSent(zds::SnapshotSent {}),
        Payload::Keep(zds::KeepWorkload { uid: "u".into() }),
    ] {
        round_trip(&zds::WorkloadRequest {
            payload: Some(payload),
        });
    }
    round_trip(&zds::WorkloadResponse {
        payload: Some(zds::workload_response::Payload::Ack(zds::Ack::default())),
    });
}

#[test]
fn discovery_packages() {
    let node = envoy_core::Node {
        id: "ztunnel~10.0.0.1~ztunnel-x.istio-system~istio-system.svc.cluster.local".into(),
        cluster: "Kubernetes".into(),
        metadata: Some(metadata()),
        locality: Some(envoy_core::Locality {
            region: "r".into(),
            zone: "z".into(),
            sub_zone: "s".into(),
        }),
    };
    let status = rpc::Status {
        code: 3,
        message: "could not decode resource".into(),
        details: vec![sample_any()],
    };
    round_trip(&node);
    round_trip(&node.locality.clone().unwrap());
    round_trip(&status);
    round_trip(&discovery::DeltaDiscoveryRequest {
        node: Some(node),
        type_url: mesh_api::type_url::ADDRESS.into(),
        resource_names_subscribe: vec!["*".into(), "/10.0.0.5".into()],
        resource_names_unsubscribe: vec!["*".into()],
        initial_resource_versions: BTreeMap::from([("a".to_owned(), "v1".to_owned())]),
        response_nonce: "nonce-1".into(),
        error_detail: Some(status),
    });
    let resource = discovery::Resource {
        version: "v2".into(),
        resource: Some(mesh_api::any::pack(&workload::Address::from(
            sample_workload(),
        ))),
        name: "Kubernetes//Pod/default/echo-0".into(),
        aliases: vec!["net/10.42.0.7".into()],
    };
    round_trip(&resource);
    round_trip(&discovery::DeltaDiscoveryResponse {
        system_version_info: "7".into(),
        resources: vec![resource],
        type_url: mesh_api::type_url::ADDRESS.into(),
        nonce: "nonce-2".into(),
        removed_resources: vec!["default/gone.default.svc.cluster.local".into()],
    });
}

/// Decoding outside input either fails with an error or yields a message that
/// survives its own round trip; it never panics.
fn decode_is_total<M: Message + Default + PartialEq + Debug>(bytes: &[u8]) {
    if let Ok(message) = M::decode(bytes) {
        round_trip(&message);
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_decode_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_is_total::<workload::Address>(&bytes);
        decode_is_total::<security::Authorization>(&bytes);
        decode_is_total::<discovery::DeltaDiscoveryRequest>(&bytes);
        decode_is_total::<discovery::DeltaDiscoveryResponse>(&bytes);
        decode_is_total::<ca::IstioCertificateRequest>(&bytes);
        decode_is_total::<zds::WorkloadRequest>(&bytes);
    }

    #[test]
    fn mutated_encodings_decode_cleanly(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        // Start from a valid, rich encoding so mutations reach deep fields.
        let mut bytes = workload::Address::from(sample_workload()).encode_to_vec();
        for (index, value) in flips {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        decode_is_total::<workload::Address>(&bytes);
    }
}
