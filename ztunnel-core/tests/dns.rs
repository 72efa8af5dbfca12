//! DNS answered from the data plane's state (synced from `xds-server`) through
//! `dns-proxy`'s resolver: search expansion by the client's namespace, VIPs,
//! headless services' healthy endpoints, and answers following changes.

use std::net::IpAddr;
use std::time::Duration;

use dns_proxy::{MeshDns, Resolution, resolve};
use hickory_proto::rr::RecordType;
use tokio::net::TcpListener;
use xds_server::{Authenticators, Kind, MeshConfig, ObjectKey, Store, XdsServer, parse_manifest};
use ztunnel_core::{StateDns, XdsClient};

const PATIENCE: Duration = Duration::from_secs(20);

fn pod(namespace: &str, name: &str, app: &str, ip: &str, ready: bool) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}
spec: {{serviceAccountName: {name}, nodeName: node-a, containers: [{{name: c}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: '{}'}}]}}
---
",
        if ready { "True" } else { "False" }
    )
}

fn service(namespace: &str, name: &str, cluster_ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec: {{clusterIP: {cluster_ip}, selector: {{app: {name}}}, ports: [{{port: 80}}]}}
---
"
    )
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("IP")
}

fn ask(dns: &StateDns, client: &str, name: &str) -> Resolution {
    let namespace = dns.client_namespace(ip(client));
    resolve(
        dns,
        "cluster.local",
        namespace.as_deref(),
        name,
        RecordType::A,
    )
}

fn addresses(resolution: &Resolution) -> Vec<IpAddr> {
    match resolution {
        Resolution::Answer { addresses, .. } => addresses.clone(),
        Resolution::Forward => Vec::new(),
    }
}

#[tokio::test]
async fn dns_answers_from_the_synced_state() {
    let store = Store::new(MeshConfig::default());
    let yaml = [
        service("default", "echo", "10.96.0.10"),
        service("other", "echo", "10.96.0.20"),
        service("default", "db", "None"),
        pod("default", "shell", "shell", "10.0.0.3", true),
        pod("other", "shell", "shell", "10.0.1.3", true),
        pod("default", "db-0", "db", "10.0.0.7", true),
        pod("default", "db-1", "db", "10.0.0.8", true),
        pod("default", "db-2", "db", "10.0.0.9", false),
    ]
    .concat();
    for object in parse_manifest(&yaml).expect("YAML").objects {
        store.apply(object).expect("valid");
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _server = XdsServer::builder()
        .store(store.clone())
        .authenticators(Authenticators::anonymous())
        .build()
        .expect("server")
        .spawn(listener)
        .expect("spawn");
    let client = XdsClient::builder()
        .channel(
            tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect_lazy(),
        )
        .node_id("ztunnel~10.0.0.9~ztunnel-x.istio-system~istio-system.svc.cluster.local")
        .build()
        .expect("client");
    let state = client.state();
    let client = client.spawn();
    client.ready(PATIENCE).await.expect("synced");
    let dns = StateDns::new(state.clone());

    assert_eq!(
        dns.client_namespace(ip("10.0.0.3")).as_deref(),
        Some("default")
    );
    let answer = ask(&dns, "10.0.0.3", "echo");
    assert_eq!(
        answer,
        Resolution::Answer {
            alias_of: Some("echo.default.svc.cluster.local".into()),
            addresses: vec![ip("10.96.0.10")],
        }
    );
    assert_eq!(
        addresses(&ask(&dns, "10.0.1.3", "echo")),
        [ip("10.96.0.20")]
    );
    assert_eq!(
        addresses(&ask(&dns, "10.0.1.3", "echo.default")),
        [ip("10.96.0.10")]
    );
    let mut db = addresses(&ask(&dns, "10.0.0.3", "db"));
    db.sort();
    assert_eq!(
        db,
        [ip("10.0.0.7"), ip("10.0.0.8")],
        "healthy endpoints only"
    );
    assert_eq!(ask(&dns, "10.0.0.3", "example.com"), Resolution::Forward);

    // A change reaches the answers.
    store.delete(&ObjectKey::new(Kind::Pod, "default", "db-0"));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while addresses(&ask(&dns, "10.0.0.3", "db")) != [ip("10.0.0.8")] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the answer never changed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.shutdown();
    client.join().await.expect("join");
}
