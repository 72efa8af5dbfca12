//! Golden encodings: messages with every field set, against bytes computed by hand
//! from the field numbers in `shared/design/WIRE.md`. Each field's tag byte is
//! `(number << 3) | wire_type` (varint 0, length-delimited 2), written out below;
//! a wrong field number in a `.proto` file changes a tag and fails these tests.
//!
//! Both directions are checked: our encoder produces exactly these bytes, and these
//! bytes decode to the same message.

use std::collections::BTreeMap;

use mesh_api::prost::Message;
use mesh_api::prost_types::{Any, Struct, Value, value};
use mesh_api::security::{
    self, Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
    string_match,
};
use mesh_api::workload::{
    self, AppProtocol, ApplicationTunnel, Extension, GatewayAddress, IpFamilies, LoadBalancing,
    Locality, NamespacedHostname, NetworkAddress, NetworkMode, Port, PortList, Service,
    TunnelProtocol, Workload, WorkloadStatus, WorkloadType, application_tunnel, gateway_address,
    load_balancing,
};
use mesh_api::{ca, discovery, envoy_core, rpc, zds};

/// Concatenates byte pieces, so each field can be written on its own line.
fn bytes(pieces: &[&[u8]]) -> Vec<u8> {
    pieces.concat()
}

fn assert_golden<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M, golden: &[u8]) {
    assert_eq!(
        message.encode_to_vec(),
        golden,
        "encoding differs from the golden bytes"
    );
    assert_eq!(
        &M::decode(golden).expect("golden bytes decode"),
        message,
        "golden bytes decode to another message"
    );
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.into())),
    }
}

#[test]
fn workload_with_every_field() {
    let workload = Workload {
        uid: "u".into(),
        name: "n".into(),
        namespace: "ns".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        hostname: "h".into(),
        network: "net".into(),
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        trust_domain: "td".into(),
        service_account: "sa".into(),
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: String::new(),
                address: vec![10, 0, 0, 9],
                length: None,
            })),
            hbone_mtls_port: 15008,
        }),
        network_gateway: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: "g".into(),
                hostname: "gw".into(),
            })),
            hbone_mtls_port: 15008,
        }),
        node: "nd".into(),
        canonical_name: "cn".into(),
        canonical_revision: "cr".into(),
        workload_type: WorkloadType::Pod.into(),
        workload_name: "wn".into(),
        native_tunnel: true,
        application_tunnel: Some(ApplicationTunnel {
            protocol: application_tunnel::Protocol::Proxy.into(),
            port: 9,
        }),
        services: BTreeMap::from([(
            "ns/h".to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: AppProtocol::Http11.into(),
                }],
            },
        )]),
        authorization_policies: vec!["ns/p".into()],
        status: WorkloadStatus::Unhealthy.into(),
        cluster_id: "c".into(),
        locality: Some(Locality {
            region: "r".into(),
            zone: "z".into(),
            subzone: "s".into(),
        }),
        network_mode: NetworkMode::HostNetwork.into(),
        extensions: vec![Extension {
            name: "e".into(),
            config: Some(Any {
                type_url: "t".into(),
                value: vec![1],
            }),
        }],
        capacity: Some(3),
    };
    let golden = bytes(&[
        &[0x0a, 1, b'n'],                                     // name = 1
        &[0x12, 2, b'n', b's'],                               // namespace = 2
        &[0x1a, 4, 10, 0, 0, 1],                              // addresses = 3
        &[0x22, 3, b'n', b'e', b't'],                         // network = 4
        &[0x28, 1],                                           // tunnel_protocol = 5: HBONE = 1
        &[0x32, 2, b't', b'd'],                               // trust_domain = 6
        &[0x3a, 2, b's', b'a'],                               // service_account = 7
        &[0x42, 11],                      // waypoint = 8: GatewayAddress, 11 bytes
        &[0x12, 6, 0x12, 4, 10, 0, 0, 9], //   address = 2: NetworkAddress { address = 2 }
        &[0x18, 0xa0, 0x75],              //   hbone_mtls_port = 3: 15008
        &[0x4a, 2, b'n', b'd'],           // node = 9
        &[0x52, 2, b'c', b'n'],           // canonical_name = 10
        &[0x5a, 2, b'c', b'r'],           // canonical_revision = 11
        &[0x60, 2],                       // workload_type = 12: POD = 2
        &[0x6a, 2, b'w', b'n'],           // workload_name = 13
        &[0x70, 1],                       // native_tunnel = 14
        &[0x82, 0x01, 4, b'n', b's', b'/', b'p'], // authorization_policies = 16
        &[0x88, 0x01, 1],                 // status = 17: UNHEALTHY = 1
        &[0x92, 0x01, 1, b'c'],           // cluster_id = 18
        &[0x9a, 0x01, 12],                // network_gateway = 19: GatewayAddress, 12 bytes
        &[0x0a, 7, 0x0a, 1, b'g', 0x12, 2, b'g', b'w'], // hostname = 1: NamespacedHostname
        &[0x18, 0xa0, 0x75],              //   hbone_mtls_port = 3: 15008
        &[0xa2, 0x01, 1, b'u'],           // uid = 20
        &[0xaa, 0x01, 1, b'h'],           // hostname = 21
        &[0xb2, 0x01, 17],                // services = 22: one map entry, 17 bytes
        &[0x0a, 4, b'n', b's', b'/', b'h'], //   key = 1
        &[0x12, 9, 0x0a, 7],              //   value = 2: PortList { ports = 1: Port }
        &[0x08, 80, 0x10, 0x90, 0x3f, 0x18, 1], // service_port 80, target_port 8080, HTTP11
        &[0xba, 0x01, 4, 0x08, 1, 0x10, 9], // application_tunnel = 23: PROXY, port 9
        &[0xc2, 0x01, 9],                 // locality = 24
        &[0x0a, 1, b'r', 0x12, 1, b'z', 0x1a, 1, b's'], // region 1, zone 2, subzone 3
        &[0xc8, 0x01, 1],                 // network_mode = 25: HOST_NETWORK = 1
        &[0xd2, 0x01, 11],                // extensions = 26
        &[0x0a, 1, b'e', 0x12, 6, 0x0a, 1, b't', 0x12, 1, 1], // name = 1, config = 2: Any
        &[0xda, 0x01, 2, 0x08, 3],        // capacity = 27: UInt32Value { value = 1: 3 }
    ]);
    assert_golden(&workload, &golden);

    // Inside an Address, a workload is field 1 (its length needs two varint bytes).
    let mut in_address = vec![0x0a];
    encode_len(&mut in_address, golden.len());
    in_address.extend_from_slice(&golden);
    assert_golden(&workload::Address::from(workload), &in_address);
}

/// Writes a length as a protobuf varint (for the one place where a length is
/// computed rather than spelled out).
fn encode_len(out: &mut Vec<u8>, mut len: usize) {
    while len >= 0x80 {
        out.push(u8::try_from(len & 0x7f).unwrap() | 0x80);
        len >>= 7;
    }
    out.push(u8::try_from(len).unwrap());
}

#[test]
fn service_with_every_field() {
    let service = Service {
        name: "s".into(),
        namespace: "ns".into(),
        hostname: "h".into(),
        addresses: vec![NetworkAddress {
            network: "n".into(),
            address: vec![10, 96, 0, 1],
            length: Some(32),
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: 0,
            app_protocol: AppProtocol::Tcp.into(),
        }],
        subject_alt_names: vec!["san".into()],
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: "w".into(),
                hostname: "wp".into(),
            })),
            hbone_mtls_port: 15008,
        }),
        load_balancing: Some(LoadBalancing {
            routing_preference: vec![
                load_balancing::Scope::Zone.into(),
                load_balancing::Scope::Node.into(),
            ],
            mode: load_balancing::Mode::Failover.into(),
            health_policy: load_balancing::HealthPolicy::AllowAll.into(),
            dns_connect_strategy: load_balancing::DnsConnectStrategy::FirstHealthyRace.into(),
        }),
        ip_families: IpFamilies::Dual.into(),
        extensions: vec![Extension {
            name: "e".into(),
            config: None,
        }],
        canonical: true,
        ingress_use_waypoint: true,
    };
    let golden = bytes(&[
        &[0x0a, 1, b's'],                               // name = 1
        &[0x12, 2, b'n', b's'],                         // namespace = 2
        &[0x1a, 1, b'h'],                               // hostname = 3
        &[0x22, 11],                                    // addresses = 4: NetworkAddress
        &[0x0a, 1, b'n'],                               //   network = 1
        &[0x12, 4, 10, 96, 0, 1],                       //   address = 2
        &[0x18, 32],                                    //   length = 3
        &[0x2a, 4, 0x08, 80, 0x18, 4], // ports = 5: service_port 80, TCP (target 0 omitted)
        &[0x32, 3, b's', b'a', b'n'],  // subject_alt_names = 6
        &[0x3a, 12],                   // waypoint = 7
        &[0x0a, 7, 0x0a, 1, b'w', 0x12, 2, b'w', b'p'], //   hostname = 1
        &[0x18, 0xa0, 0x75],           //   hbone_mtls_port = 3: 15008
        &[0x42, 10],                   // load_balancing = 8
        &[0x0a, 2, 2, 4],              //   routing_preference = 1 (packed): ZONE, NODE
        &[0x10, 2],                    //   mode = 2: FAILOVER
        &[0x18, 1],                    //   health_policy = 3: ALLOW_ALL
        &[0x20, 1],                    //   dns_connect_strategy = 4: FIRST_HEALTHY_RACE
        &[0x48, 3],                    // ip_families = 9: DUAL
        &[0x52, 3, 0x0a, 1, b'e'],     // extensions = 10
        &[0x58, 1],                    // canonical = 11
        &[0x60, 1],                    // ingress_use_waypoint = 12
    ]);
    assert_golden(&service, &golden);

    // Inside an Address, a service is field 2.
    let mut in_address = vec![0x12, u8::try_from(golden.len()).unwrap()];
    in_address.extend_from_slice(&golden);
    assert_golden(&workload::Address::from(service), &in_address);
}

#[test]
fn authorization_with_every_field() {
    let string_match = |m| StringMatch {
        match_type: Some(m),
    };
    let range = |address: Vec<u8>, length| security::Address { address, length };
    let mut v6 = vec![0xfd, 0x00];
    v6.resize(16, 0);
    let policy = Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        scope: Scope::WorkloadSelector.into(),
        action: Action::Deny.into(),
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    namespaces: vec![string_match(string_match::MatchType::Exact("a".into()))],
                    not_namespaces: vec![string_match(string_match::MatchType::Prefix("b".into()))],
                    principals: vec![string_match(string_match::MatchType::Suffix("c".into()))],
                    not_principals: vec![string_match(string_match::MatchType::Presence(()))],
                    source_ips: vec![range(vec![10, 0, 0, 0], 8)],
                    not_source_ips: vec![range(vec![10, 0, 0, 1], 32)],
                    destination_ips: vec![range(v6.clone(), 8)],
                    not_destination_ips: vec![range(vec![192, 168, 0, 0], 16)],
                    destination_ports: vec![80, 443],
                    not_destination_ports: vec![22],
                    service_accounts: vec![ServiceAccountMatch {
                        namespace: "n".into(),
                        service_account: "s".into(),
                    }],
                    not_service_accounts: vec![ServiceAccountMatch {
                        namespace: "m".into(),
                        service_account: "t".into(),
                    }],
                }],
            }],
        }],
        dry_run: true,
    };
    let golden = bytes(&[
        &[0x0a, 1, b'p'],                           // name = 1
        &[0x12, 2, b'n', b's'],                     // namespace = 2
        &[0x18, 2],                                 // scope = 3: WORKLOAD_SELECTOR
        &[0x20, 1],                                 // action = 4: DENY
        &[0x2a, 99],                                // rules = 5: Rule, 99 bytes
        &[0x0a, 97],                                //   clauses = 1: Clause, 97 bytes
        &[0x12, 95],                                //     matches = 2: Match, 95 bytes
        &[0x0a, 3, 0x0a, 1, b'a'],                  //       namespaces = 1: exact = 1
        &[0x12, 3, 0x12, 1, b'b'],                  //       not_namespaces = 2: prefix = 2
        &[0x1a, 3, 0x1a, 1, b'c'],                  //       principals = 3: suffix = 3
        &[0x22, 2, 0x22, 0],                        //       not_principals = 4: presence = 4
        &[0x2a, 8, 0x0a, 4, 10, 0, 0, 0, 0x10, 8],  // source_ips = 5: address 1, length 2
        &[0x32, 8, 0x0a, 4, 10, 0, 0, 1, 0x10, 32], // not_source_ips = 6
        &[0x3a, 20, 0x0a, 16],                      //       destination_ips = 7: 16-byte address
        &v6,
        &[0x10, 8],
        &[0x42, 8, 0x0a, 4, 192, 168, 0, 0, 0x10, 16], // not_destination_ips = 8
        &[0x4a, 3, 80, 0xbb, 0x03], //       destination_ports = 9 (packed): 80, 443
        &[0x52, 1, 22],             //       not_destination_ports = 10 (packed): 22
        &[0x5a, 6, 0x0a, 1, b'n', 0x12, 1, b's'], // service_accounts = 11
        &[0x62, 6, 0x0a, 1, b'm', 0x12, 1, b't'], // not_service_accounts = 12
        &[0x30, 1],                 // dry_run = 6
    ]);
    assert_golden(&policy, &golden);
}

#[test]
fn delta_discovery_request_and_response() {
    let request = discovery::DeltaDiscoveryRequest {
        node: Some(envoy_core::Node {
            id: "i".into(),
            cluster: "c".into(),
            metadata: Some(Struct {
                fields: BTreeMap::from([("k".to_owned(), string_value("v"))]),
            }),
            locality: Some(envoy_core::Locality {
                region: "r".into(),
                zone: "z".into(),
                sub_zone: "s".into(),
            }),
        }),
        type_url: "t".into(),
        resource_names_subscribe: vec!["a".into()],
        resource_names_unsubscribe: vec!["b".into()],
        initial_resource_versions: BTreeMap::from([("a".to_owned(), "1".to_owned())]),
        response_nonce: "n".into(),
        error_detail: Some(rpc::Status {
            code: 3,
            message: "m".into(),
            details: vec![Any {
                type_url: "t".into(),
                value: Vec::new(),
            }],
        }),
    };
    let golden = bytes(&[
        &[0x0a, 29],                                             // node = 1: Node, 29 bytes
        &[0x0a, 1, b'i'],                                        //   id = 1
        &[0x12, 1, b'c'],                                        //   cluster = 2
        &[0x1a, 10, 0x0a, 8], //   metadata = 3: Struct { fields = 1 }
        &[0x0a, 1, b'k', 0x12, 3, 0x1a, 1, b'v'], //     key "k", Value { string_value = 3 }
        &[0x22, 9, 0x0a, 1, b'r', 0x12, 1, b'z', 0x1a, 1, b's'], // locality = 4
        &[0x12, 1, b't'],     // type_url = 2
        &[0x1a, 1, b'a'],     // resource_names_subscribe = 3
        &[0x22, 1, b'b'],     // resource_names_unsubscribe = 4
        &[0x2a, 6, 0x0a, 1, b'a', 0x12, 1, b'1'], // initial_resource_versions = 5
        &[0x32, 1, b'n'],     // response_nonce = 6
        &[0x3a, 10],          // error_detail = 7: Status
        &[0x08, 3, 0x12, 1, b'm'], //   code = 1, message = 2
        &[0x1a, 3, 0x0a, 1, b't'], //   details = 3
    ]);
    assert_golden(&request, &golden);

    let response = discovery::DeltaDiscoveryResponse {
        system_version_info: "v".into(),
        resources: vec![discovery::Resource {
            version: "1".into(),
            resource: Some(Any {
                type_url: "t".into(),
                value: Vec::new(),
            }),
            name: "n".into(),
            aliases: vec!["x".into()],
        }],
        type_url: "t".into(),
        nonce: "o".into(),
        removed_resources: vec!["r".into()],
    };
    let golden = bytes(&[
        &[0x0a, 1, b'v'],          // system_version_info = 1
        &[0x12, 14],               // resources = 2: Resource, 14 bytes
        &[0x0a, 1, b'1'],          //   version = 1
        &[0x12, 3, 0x0a, 1, b't'], //   resource = 2: Any
        &[0x1a, 1, b'n'],          //   name = 3
        &[0x22, 1, b'x'],          //   aliases = 4
        &[0x22, 1, b't'],          // type_url = 4
        &[0x2a, 1, b'o'],          // nonce = 5
        &[0x32, 1, b'r'],          // removed_resources = 6
    ]);
    assert_golden(&response, &golden);
}

#[test]
fn certificate_request_and_response() {
    let request = ca::IstioCertificateRequest {
        csr: "c".into(),
        validity_duration: 3600,
        metadata: Some(Struct {
            fields: BTreeMap::from([("ImpersonatedIdentity".to_owned(), string_value("s"))]),
        }),
    };
    let golden = bytes(&[
        &[0x0a, 1, b'c'],      // csr = 1
        &[0x18, 0x90, 0x1c],   // validity_duration = 3: 3600
        &[0x22, 29, 0x0a, 27], // metadata = 4: Struct { fields = 1: entry of 27 bytes }
        &[0x0a, 20],           //   key
        b"ImpersonatedIdentity",
        &[0x12, 3, 0x1a, 1, b's'], // value: Value { string_value = 3 }
    ]);
    assert_golden(&request, &golden);

    let response = ca::IstioCertificateResponse {
        cert_chain: vec!["a".into(), "b".into()],
    };
    assert_golden(&response, &[0x0a, 1, b'a', 0x0a, 1, b'b']);
}

#[test]
fn zds_messages() {
    use zds::workload_request::Payload;
    let request = |payload| zds::WorkloadRequest {
        payload: Some(payload),
    };
    assert_golden(
        &zds::ZdsHello {
            version: zds::Version::V1.into(),
        },
        &[0x08, 1],
    );
    assert_golden(
        &request(Payload::Add(zds::AddWorkload {
            uid: "u".into(),
            workload_info: Some(zds::WorkloadInfo {
                name: "n".into(),
                namespace: "s".into(),
                service_account: "a".into(),
            }),
        })),
        &bytes(&[
            &[0x0a, 14],                                    // add = 1
            &[0x0a, 1, b'u'],                               //   uid = 1
            &[0x12, 9],                                     //   workload_info = 2
            &[0x0a, 1, b'n', 0x12, 1, b's', 0x1a, 1, b'a'], //     name 1, namespace 2, service_account 3
        ]),
    );
    assert_golden(
        &request(Payload::Del(zds::DelWorkload { uid: "u".into() })),
        &[0x12, 3, 0x12, 1, b'u'], // del = 2: uid = 2
    );
    assert_golden(
        &request(Payload::SnapshotSent(zds::SnapshotSent {})),
        &[0x1a, 0], // snapshot_sent = 3
    );
    assert_golden(
        &request(Payload::Keep(zds::KeepWorkload { uid: "u".into() })),
        &[0x2a, 3, 0x0a, 1, b'u'], // keep = 5: uid = 1
    );
    assert_golden(
        &zds::WorkloadResponse {
            payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
                error: "e".into(),
            })),
        },
        &[0x0a, 3, 0x0a, 1, b'e'], // ack = 1: error = 1
    );
}
