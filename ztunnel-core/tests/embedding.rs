//! What a k3s fork's author writes: the whole mesh embedded in one process,
//! with only the crates' root imports. The control plane (xDS and the CA on
//! one TLS port) serves a cluster; a node's parts (xDS client, certificate
//! manager, DNS, proxy instances) take their config and certificates from it;
//! a client resolves a service by name, reaches it through the mesh, and then
//! everything drains and stops cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dns_proxy::DnsProxy;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use mesh_api::Identity;
use mesh_ca::{Authenticated, Authority, CaClient, CaServer, RenewalConfig, StaticTokens};
use mesh_net::Drained;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use xds_server::{
    Authenticators, ControlPlane, MeshConfig, Store, StoreNodeAuthorizer, XdsServer, parse_manifest,
};
use ztunnel_core::{CertManager, Listeners, StateDns, XdsClient, Ztunnel, ZtunnelHandle};

/// A ceiling so a broken part fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);

/// The cluster: `echo` (its application on `app_port`) behind the service
/// `echo` (10.96.0.10:80), and `shell`; loopback addresses stand in for pod IPs.
fn cluster(app_port: u16) -> String {
    let pod = |name: &str, ip: &str| {
        format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}
spec: {{serviceAccountName: {name}, nodeName: node-a, containers: []}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}
"
        )
    };
    format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{clusterIP: 10.96.0.10, selector: {{app: echo}}, ports: [{{port: 80, targetPort: {app_port}}}]}}
{}{}",
        pod("echo", "127.0.0.2"),
        pod("shell", "127.0.0.3"),
    )
}

/// An application that echoes what it reads.
async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind app");
    let address = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    address
}

/// HBONE listeners on one port for both pods (127.0.0.2, 127.0.0.3).
async fn hbone_listeners() -> (TcpListener, TcpListener) {
    for _ in 0..20 {
        let echo = TcpListener::bind("127.0.0.2:0").await.expect("bind");
        let port = echo.local_addr().expect("addr").port();
        if let Ok(shell) = TcpListener::bind(("127.0.0.3", port)).await {
            return (echo, shell);
        }
    }
    panic!("no port free on both pod addresses");
}

/// A proxy instance for `uid`, its listeners on the pod's address.
async fn instance(
    state: &ztunnel_core::SharedState,
    certs: &CertManager,
    uid: &str,
    hbone: TcpListener,
) -> ZtunnelHandle {
    let address = hbone.local_addr().expect("addr");
    let bind = || async {
        TcpListener::bind((address.ip(), 0))
            .await
            .expect("bind listener")
    };
    let handle = Ztunnel::builder()
        .state(state.clone())
        .certificates(certs.clone())
        .workload_uid(uid)
        .hbone_port(address.port())
        .build()
        .expect("built")
        .spawn(Listeners {
            outbound: bind().await,
            inbound_plaintext: bind().await,
            hbone,
            socks5: Some(bind().await),
        })
        .expect("spawned");
    handle.ready(PATIENCE).await.expect("instance ready");
    handle
}

/// The service VIP `dns` answers for `name`.
async fn resolve(dns: SocketAddr, name: &str) -> std::net::IpAddr {
    let mut query = Message::query();
    query.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    query.metadata.recursion_desired = true;
    let socket = UdpSocket::bind("127.0.0.3:0").await.expect("bind");
    socket
        .send_to(&query.to_vec().expect("encode"), dns)
        .await
        .expect("send");
    let mut buffer = [0u8; 1500];
    let (len, _) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buffer))
        .await
        .expect("answered in time")
        .expect("receive");
    let answer = Message::from_vec(&buffer[..len]).expect("decode");
    answer
        .answers
        .iter()
        .find_map(|record| match &record.data {
            RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
            _ => None,
        })
        .expect("an A record")
}

/// Connects through `proxy`'s SOCKS5 listener to `target` (success answered
/// once the tunnel is up).
async fn socks5(proxy: &ZtunnelHandle, target: SocketAddr) -> TcpStream {
    let socks5 = proxy.socks5_addr().expect("a SOCKS5 listener");
    let (reply, stream) = test_support::socks5(socks5, target).await.expect("SOCKS5");
    assert_eq!(reply, 0, "SOCKS5 success");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_mesh_embedded_in_one_process() {
    // The server role: a store, the CA, and both served on one TLS port.
    let app = echo_app().await;
    let store = Store::new(MeshConfig::default());
    for object in parse_manifest(&cluster(app.port())).expect("YAML").objects {
        store.apply(object).expect("valid");
    }
    // The CA's material in memory only: nothing on disk.
    let material = mesh_ca::CaMaterial::self_signed("cluster.local", Duration::from_secs(86400))
        .expect("CA material");
    let authority = Arc::new(
        Authority::new(&material, "cluster.local", Default::default()).expect("authority"),
    );
    let agent =
        Identity::parse_uri("spiffe://cluster.local/ns/istio-system/sa/ztunnel").expect("identity");
    let tokens = StaticTokens::new().caller(
        "node-a-token",
        Authenticated {
            identity: agent.clone(),
            node: Some("node-a".into()),
            pod: None,
        },
    );
    let ca = CaServer::builder()
        .authority(authority.clone())
        .authenticator(tokens.clone())
        .node_agent(agent)
        .node_authorizer(StoreNodeAuthorizer::new(store.clone()))
        .build()
        .expect("CA");
    let xds = XdsServer::builder()
        .store(store.clone())
        .authenticators(Authenticators::new().with(tokens))
        .build()
        .expect("xDS");
    let control_plane = ControlPlane::builder()
        .xds(xds)
        .ca(ca)
        .build()
        .expect("control plane")
        .spawn(TcpListener::bind("127.0.0.1:0").await.expect("bind"))
        .expect("spawned");
    control_plane
        .ready(PATIENCE)
        .await
        .expect("control plane ready");

    // The agent role: config and certificates from the control plane.
    let ca_client = CaClient::builder()
        .address(control_plane.local_addr())
        .server_name("istiod.istio-system.svc")
        .roots(authority.roots().iter().cloned())
        .token("node-a-token")
        .build()
        .expect("CA client");
    let xds_client = XdsClient::builder()
        .channel(ca_client.channel())
        .node_id("ztunnel~127.0.0.3~ztunnel-node-a.istio-system~istio-system.svc.cluster.local")
        .token("node-a-token")
        .build()
        .expect("xDS client");
    let state = xds_client.state();
    let xds_client = xds_client.spawn();
    xds_client.ready(PATIENCE).await.expect("synced");
    let certs = CertManager::builder()
        .client(ca_client)
        .impersonate(true)
        .renewal(RenewalConfig::default())
        .build()
        .expect("certificate manager");
    let dns_udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let dns_tcp = TcpListener::bind(dns_udp.local_addr().expect("addr"))
        .await
        .expect("bind");
    let dns = DnsProxy::builder()
        .mesh(Arc::new(StateDns::new(state.clone())))
        .build()
        .expect("DNS")
        .spawn(dns_udp, dns_tcp)
        .expect("spawned");
    let (echo_hbone, shell_hbone) = hbone_listeners().await;
    let echo = instance(&state, &certs, "Kubernetes//Pod/default/echo", echo_hbone).await;
    let shell = instance(&state, &certs, "Kubernetes//Pod/default/shell", shell_hbone).await;

    // A client in the shell pod: the service by name, then through the mesh.
    let vip = resolve(dns.local_addr(), "echo.default.svc.cluster.local.").await;
    assert_eq!(vip, std::net::IpAddr::from([10, 96, 0, 10]));
    let mut stream = socks5(&shell, SocketAddr::new(vip, 80)).await;
    stream.write_all(b"through the mesh").await.expect("write");
    stream.shutdown().await.expect("half-close");
    let mut echoed = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut echoed))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(echoed, b"through the mesh");
    assert_eq!(echo.live_inbound(), 0, "the connection ended at both ends");

    // Stop, node first: every part drains with nothing left over.
    for (name, drained) in [
        ("shell", shell.drain(PATIENCE).await),
        ("echo", echo.drain(PATIENCE).await),
        ("dns", dns.drain(PATIENCE).await),
        ("xds client", xds_client.drain(PATIENCE).await),
        ("certificates", certs.drain(PATIENCE).await),
        ("control plane", control_plane.drain(PATIENCE).await),
    ] {
        assert_eq!(drained, Drained::Complete, "{name}");
    }
    shell.join().await.expect("shell stopped cleanly");
    echo.join().await.expect("echo stopped cleanly");
    dns.join().await.expect("DNS stopped cleanly");
    xds_client.join().await.expect("xDS client stopped cleanly");
    certs.join().await;
    control_plane
        .join()
        .await
        .expect("control plane stopped cleanly");
}
