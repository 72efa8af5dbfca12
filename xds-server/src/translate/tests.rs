//! The translation table: Kubernetes objects in, workload-API fields out, as
//! istiod builds them for ambient.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use mesh_api::workload::{
    IpFamilies, NetworkMode, TunnelProtocol, WorkloadStatus, load_balancing::HealthPolicy,
    load_balancing::Mode,
};

use super::pod::{PodFacts, Share, WorkloadContext, pod_facts, workload};
use super::service::{ServiceFacts, service_facts};
use super::{Labels, MeshConfig};
use crate::object::{Object, parse_manifest};

struct NoSharing;

impl Share for NoSharing {
    fn name(&mut self, name: &str) -> Arc<str> {
        name.into()
    }
    fn labels(&mut self, labels: &Labels) -> Arc<Labels> {
        Arc::new(labels.clone())
    }
    fn ports(&mut self, ports: Vec<(Box<str>, u32)>) -> Arc<super::pod::NamedPorts> {
        ports.into()
    }
}

fn one(yaml: &str) -> Object {
    let mut manifest = parse_manifest(yaml).expect("YAML");
    assert!(manifest.errors.is_empty(), "{:?}", manifest.errors);
    manifest.objects.pop().expect("an object")
}

fn kube_pod(yaml: &str) -> Pod {
    match one(yaml) {
        Object::Pod(pod) => *pod,
        other => panic!("not a pod: {other:?}"),
    }
}

fn kube_service(yaml: &str) -> KubeService {
    match one(yaml) {
        Object::Service(service) => *service,
        other => panic!("not a service: {other:?}"),
    }
}

fn facts(yaml: &str) -> Option<PodFacts> {
    pod_facts(&kube_pod(yaml), &mut NoSharing).expect("valid pod")
}

fn service(yaml: &str) -> ServiceFacts {
    service_facts(&kube_service(yaml), "default", &MeshConfig::default())
        .expect("valid service")
        .expect("carried")
}

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: echo-7d9f-abcde
  namespace: default
  labels: {app: echo, version: v2, pod-template-hash: 7d9f}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: echo-7d9f, uid: x, controller: true}
spec:
  serviceAccountName: echo
  nodeName: node-a
  containers:
  - name: app
    ports:
    - {name: http, containerPort: 8080}
    - {name: dns, containerPort: 5353, protocol: UDP}
status:
  podIPs: [{ip: 10.0.0.5}, {ip: fd00::5}]
  conditions: [{type: Ready, status: 'True'}]
";

fn build(
    pod: &PodFacts,
    namespace_labels: Option<&Labels>,
    services: Vec<&ServiceFacts>,
) -> mesh_api::workload::Workload {
    workload(
        pod,
        &WorkloadContext {
            config: &MeshConfig::default(),
            name: "echo-7d9f-abcde",
            namespace: "default",
            namespace_labels,
            services,
            policies: vec!["default/allow".into()],
        },
    )
}

#[test]
fn a_pod_becomes_a_workload() {
    let pod = facts(POD).expect("a workload");
    let workload = build(&pod, None, Vec::new());
    assert_eq!(workload.uid, "Kubernetes//Pod/default/echo-7d9f-abcde");
    assert_eq!(
        workload.addresses,
        vec![
            vec![10, 0, 0, 5],
            "fd00::5"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
                .to_vec()
        ]
    );
    assert_eq!(
        workload.workload_name, "echo",
        "a Deployment's pods carry its name"
    );
    assert_eq!(workload.canonical_name, "echo");
    assert_eq!(workload.canonical_revision, "v2");
    assert_eq!(workload.service_account, "echo");
    assert_eq!(
        workload.trust_domain, "",
        "cluster.local is implied, as istiod sends it"
    );
    assert_eq!(workload.status, WorkloadStatus::Healthy as i32);
    assert_eq!(
        workload.tunnel_protocol,
        TunnelProtocol::None as i32,
        "not enrolled"
    );
    assert_eq!(workload.authorization_policies, vec!["default/allow"]);
    assert_eq!(workload.network_mode, NetworkMode::Standard as i32);
}

#[test]
fn enrollment_comes_from_the_namespace_or_the_pod_and_the_pod_can_opt_out() {
    let ambient: Labels = [("istio.io/dataplane-mode".to_owned(), "ambient".to_owned())].into();
    let pod = facts(POD).expect("a workload");
    assert_eq!(
        build(&pod, Some(&ambient), Vec::new()).tunnel_protocol,
        TunnelProtocol::Hbone as i32
    );
    let opted_out = facts(&POD.replace("app: echo,", "app: echo, istio.io/dataplane-mode: none,"))
        .expect("a workload");
    assert_eq!(
        build(&opted_out, Some(&ambient), Vec::new()).tunnel_protocol,
        TunnelProtocol::None as i32
    );
    let opted_in =
        facts(&POD.replace("app: echo,", "app: echo, istio.io/dataplane-mode: ambient,"))
            .expect("a workload");
    assert_eq!(
        build(&opted_in, None, Vec::new()).tunnel_protocol,
        TunnelProtocol::Hbone as i32
    );
}

#[test]
fn health_follows_readiness_and_deletion() {
    let unready = facts(&POD.replace("status: 'True'", "status: 'False'")).expect("a workload");
    assert_eq!(
        build(&unready, None, Vec::new()).status,
        WorkloadStatus::Unhealthy as i32
    );
    let terminating = facts(&POD.replace(
        "  namespace: default\n",
        "  namespace: default\n  deletionTimestamp: '2026-01-01T00:00:00Z'\n",
    ))
    .expect("a workload");
    assert_eq!(
        build(&terminating, None, Vec::new()).status,
        WorkloadStatus::Unhealthy as i32
    );
}

#[test]
fn pods_without_an_ip_or_finished_are_no_workloads() {
    assert!(facts(&POD.replace("  podIPs: [{ip: 10.0.0.5}, {ip: fd00::5}]\n", "")).is_none());
    assert!(facts(&POD.replace("status:\n", "status:\n  phase: Succeeded\n")).is_none());
    assert!(facts(&POD.replace("status:\n", "status:\n  phase: Failed\n")).is_none());
}

#[test]
fn a_bad_pod_ip_is_an_error_naming_the_field() {
    let pod = kube_pod(&POD.replace("{ip: 10.0.0.5}", "{ip: ten}"));
    let (path, message) = pod_facts(&pod, &mut NoSharing).expect_err("bad IP");
    assert_eq!(path, "status.podIPs");
    assert!(message.contains("\"ten\""), "{message}");
}

#[test]
fn named_target_ports_resolve_per_pod_and_unresolvable_ports_are_left_out() {
    let service = service(
        "apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports:
  - {name: web, port: 80, targetPort: http}
  - {name: metrics, port: 9090, targetPort: metrics}
  - {name: raw, port: 81, targetPort: 7070}
  - {name: same, port: 82}
",
    );
    assert_eq!(
        service
            .wire
            .ports
            .iter()
            .map(|p| (p.service_port, p.target_port))
            .collect::<Vec<_>>(),
        [(80, 0), (9090, 0), (81, 7070), (82, 82)],
        "the service itself carries 0 for named ports"
    );
    let pod = facts(POD).expect("a workload");
    let workload = build(&pod, None, vec![&service]);
    let ports = &workload.services["default/echo.default.svc.cluster.local"].ports;
    assert_eq!(
        ports
            .iter()
            .map(|p| (p.service_port, p.target_port))
            .collect::<Vec<_>>(),
        [(80, 8080), (81, 7070), (82, 82)],
        "metrics is not a port of this pod"
    );
}

#[test]
fn services_translate_vips_headless_families_and_load_balancing() {
    let service = service(
        "apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
  annotations: {networking.istio.io/traffic-distribution: PreferClose}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, fd00::10]
  ipFamilies: [IPv4, IPv6]
  externalIPs: [192.0.2.1]
  publishNotReadyAddresses: true
  selector: {app: echo}
  ports: [{port: 80, appProtocol: http}]
",
    );
    assert_eq!(service.wire.hostname, "echo.default.svc.cluster.local");
    assert_eq!(service.wire.addresses.len(), 3);
    assert_eq!(service.wire.ip_families, IpFamilies::Dual as i32);
    let lb = service.wire.load_balancing.expect("load balancing");
    assert_eq!(lb.mode, Mode::Failover as i32);
    assert_eq!(lb.health_policy, HealthPolicy::AllowAll as i32);
    assert_eq!(service.wire.ports[0].app_protocol, 1, "HTTP11");

    let headless = self::service(
        "apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
",
    );
    assert!(headless.wire.addresses.is_empty());

    let external = kube_service(
        "apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: example.com}
",
    );
    assert!(
        service_facts(&external, "default", &MeshConfig::default())
            .expect("valid")
            .is_none()
    );
}

#[test]
fn a_service_without_selector_selects_nothing() {
    let service = service(
        "apiVersion: v1
kind: Service
metadata: {name: manual, namespace: default}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
",
    );
    let labels: BTreeMap<String, String> = [("app".to_owned(), "echo".to_owned())].into();
    assert!(!service.selects(&labels));
}

#[test]
fn host_network_pods_say_so() {
    let pod = facts(&POD.replace(
        "  nodeName: node-a\n",
        "  nodeName: node-a\n  hostNetwork: true\n",
    ))
    .expect("a workload");
    assert_eq!(
        build(&pod, None, Vec::new()).network_mode,
        NetworkMode::HostNetwork as i32
    );
}
