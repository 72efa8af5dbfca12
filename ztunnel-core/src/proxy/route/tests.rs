use std::collections::BTreeMap;

use mesh_api::names::ip_to_wire;
use mesh_api::workload::address::Type;
use mesh_api::workload::load_balancing::{HealthPolicy, Mode, Scope};
use mesh_api::workload::{
    Address, LoadBalancing, Locality, NetworkAddress, Port, PortList, Service, TunnelProtocol,
    Workload, WorkloadStatus,
};

use super::*;

const KEY: &str = "default/echo.default.svc.cluster.local";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

fn endpoint(name: &str, address: &str, zone: &str) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![ip_to_wire(ip(address))],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".into(),
        service_account: "echo".into(),
        node: "node-1".into(),
        status: WorkloadStatus::Healthy as i32,
        locality: Some(Locality {
            region: "r".into(),
            zone: zone.into(),
            subzone: String::new(),
        }),
        services: BTreeMap::from([(
            KEY.to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        )]),
        ..Workload::default()
    }
}

fn service(load_balancing: Option<LoadBalancing>) -> Service {
    Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: ip_to_wire(ip("10.96.0.10")),
            length: None,
        }],
        ports: vec![
            Port {
                service_port: 80,
                target_port: 0,
                app_protocol: 0,
            },
            Port {
                service_port: 90,
                target_port: 9090,
                app_protocol: 0,
            },
        ],
        load_balancing,
        ..Service::default()
    }
}

fn state(workloads: Vec<Workload>, service: Service) -> ProxyState {
    let mut state = ProxyState::new();
    for workload in workloads {
        let name = workload.uid.clone();
        state
            .apply_address(
                &name,
                Address {
                    r#type: Some(Type::Workload(workload)),
                },
            )
            .expect("workload");
    }
    state
        .apply_address(
            KEY,
            Address {
                r#type: Some(Type::Service(service)),
            },
        )
        .expect("service");
    state
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(ip("10.96.0.10"), port)
}

/// Routes `n` times with a spread of random numbers; the endpoints chosen.
fn picks(state: &ProxyState, source: Option<&Workload>, n: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut random = |bound: u64| i % bound;
            match route(state, source, "", vip(80), &mut random).expect("routed") {
                Route::Mesh(upstream) => upstream.workload.name.clone(),
                Route::Passthrough(address) => panic!("passthrough to {address}"),
            }
        })
        .collect()
}

#[test]
fn a_vip_is_balanced_to_endpoints_with_their_target_port() {
    let state = state(
        vec![
            endpoint("a", "10.0.0.1", "z1"),
            endpoint("b", "10.0.0.2", "z2"),
        ],
        service(None),
    );
    let mut random = |_| 1;
    let Route::Mesh(upstream) = route(&state, None, "", vip(80), &mut random).expect("routed")
    else {
        panic!("not a mesh route");
    };
    assert_eq!(upstream.address.port(), 8080, "the pod's own mapping");
    assert!(upstream.hbone);
    assert_eq!(
        upstream.identity.expect("identity").as_uri(),
        "spiffe://cluster.local/ns/default/sa/echo"
    );
    let Route::Mesh(upstream) = route(&state, None, "", vip(90), &mut random).expect("routed")
    else {
        panic!("not a mesh route");
    };
    assert_eq!(upstream.address.port(), 9090, "the service's target port");
    assert_eq!(
        route(&state, None, "", vip(91), &mut random).unwrap_err(),
        RouteError::UnknownPort {
            service: KEY.into(),
            port: 91
        }
    );
    let mut chosen = picks(&state, None, 10);
    chosen.sort();
    chosen.dedup();
    assert_eq!(chosen, ["a", "b"], "both endpoints are used");
}

#[test]
fn unhealthy_endpoints_are_skipped_unless_the_service_allows_all() {
    let mut sick = endpoint("sick", "10.0.0.3", "z1");
    sick.status = WorkloadStatus::Unhealthy as i32;
    let only_sick = state(vec![sick.clone()], service(None));
    let mut random = |_| 0;
    assert_eq!(
        route(&only_sick, None, "", vip(80), &mut random).unwrap_err(),
        RouteError::NoEndpoint {
            service: KEY.into(),
            port: 80
        }
    );
    let allow_all = state(
        vec![sick],
        service(Some(LoadBalancing {
            health_policy: HealthPolicy::AllowAll as i32,
            ..LoadBalancing::default()
        })),
    );
    assert_eq!(picks(&allow_all, None, 3), ["sick", "sick", "sick"]);
}

#[test]
fn capacity_weights_the_choice() {
    let mut heavy = endpoint("heavy", "10.0.0.1", "z1");
    heavy.capacity = Some(3);
    let state = state(
        vec![heavy, endpoint("light", "10.0.0.2", "z1")],
        service(None),
    );
    let chosen = picks(&state, None, 4);
    assert_eq!(chosen.iter().filter(|n| *n == "heavy").count(), 3);
    assert_eq!(chosen.iter().filter(|n| *n == "light").count(), 1);
}

#[test]
fn locality_strict_and_failover() {
    let client = endpoint("client", "10.0.1.1", "z1");
    let endpoints = vec![
        endpoint("near", "10.0.0.1", "z1"),
        endpoint("far", "10.0.0.2", "z2"),
    ];
    let lb = |mode: Mode| {
        Some(LoadBalancing {
            routing_preference: vec![Scope::Region as i32, Scope::Zone as i32],
            mode: mode as i32,
            ..LoadBalancing::default()
        })
    };
    let failover = state(endpoints.clone(), service(lb(Mode::Failover)));
    assert_eq!(picks(&failover, Some(&client), 4), ["near"; 4]);
    let strict = state(endpoints.clone(), service(lb(Mode::Strict)));
    assert_eq!(picks(&strict, Some(&client), 4), ["near"; 4]);

    // Only the far endpoint left: failover uses it, strict refuses.
    let far_only = vec![endpoint("far", "10.0.0.2", "z2")];
    let failover = state(far_only.clone(), service(lb(Mode::Failover)));
    assert_eq!(picks(&failover, Some(&client), 2), ["far"; 2]);
    let strict = state(far_only, service(lb(Mode::Strict)));
    let mut random = |_| 0;
    assert!(route(&strict, Some(&client), "", vip(80), &mut random).is_err());
}

#[test]
fn workload_ips_route_directly_and_others_pass_through() {
    let mut plain = endpoint("plain", "10.0.0.5", "z1");
    plain.tunnel_protocol = TunnelProtocol::None as i32;
    let state = state(vec![endpoint("a", "10.0.0.1", "z1"), plain], service(None));
    let mut random = |_| 0;
    let to = |address: &str| SocketAddr::new(ip(address), 7000);
    match route(&state, None, "", to("10.0.0.1"), &mut random).expect("routed") {
        Route::Mesh(upstream) => {
            assert_eq!(upstream.address, to("10.0.0.1"));
            assert!(upstream.hbone);
            assert!(upstream.service.is_none());
        }
        Route::Passthrough(_) => panic!("a mesh workload"),
    }
    match route(&state, None, "", to("10.0.0.5"), &mut random).expect("routed") {
        Route::Mesh(upstream) => assert!(!upstream.hbone, "no HBONE for it"),
        Route::Passthrough(_) => panic!("a known workload"),
    }
    assert!(matches!(
        route(&state, None, "", to("192.0.2.1"), &mut random).expect("routed"),
        Route::Passthrough(address) if address == to("192.0.2.1")
    ));
}
