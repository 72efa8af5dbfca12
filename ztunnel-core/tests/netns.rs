//! End to end in real network namespaces: a control-plane process
//! (`xds-serve` with its CA) in one namespace, and workload namespaces each
//! running `ztunnel-run` in dedicated mode behind nftables redirect rules.
//! The applications know nothing of the mesh: a client connects to a pod IP
//! or a service VIP, and an echo server answers.
//!
//! Needs root (namespaces, nftables), as CI runs.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::mesh::{ca, identity, round_trip};
use support::netns::{Process, Topology, example, install_redirect, ztunnel_run_args};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use ztunnel_core::hbone::{HbonePool, PoolKey};
use ztunnel_core::net::socket::PROXY_MARK;
use ztunnel_core::tls::WorkloadTls;

const WAIT: Duration = Duration::from_secs(30);
const CONTROL_PLANE: &str = "10.77.0.1:15012";
const VIP: &str = "10.96.0.10:80";
const AGENT_TOKEN: &str = "node-agent-token";

fn cluster_yaml() -> String {
    let pod = |namespace: &str, name: &str, account: &str, ip: &str, app: &str| {
        format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}
spec: {{serviceAccountName: {account}, nodeName: node-a, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}
"
        )
    };
    let mut yaml = String::from(
        "apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{port: 80, targetPort: http}]}
",
    );
    yaml += &pod(
        "default",
        "shell",
        "shell",
        &Topology::workload_ip(0),
        "shell",
    );
    yaml += &pod("default", "echo", "echo", &Topology::workload_ip(1), "echo");
    yaml += &pod(
        "other",
        "shell",
        "shell",
        &Topology::workload_ip(2),
        "shell",
    );
    yaml
}

const ALLOW_ONLY_DEFAULT_SHELL: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shell, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/shell]}}]}]
";

/// The whole scene: namespaces, control plane, proxies, echo server.
struct Scene {
    topology: Topology,
    manifests: tempfile::TempDir,
    ca_dir: tempfile::TempDir,
    control_plane: Option<Process>,
    proxies: Vec<Process>,
    echo_stop: CancellationToken,
}

const UIDS: [&str; 3] = [
    "Kubernetes//Pod/default/shell",
    "Kubernetes//Pod/default/echo",
    "Kubernetes//Pod/other/shell",
];

/// The scene; with `on_demand_client`, the client pod's proxy learns
/// addresses on demand instead of receiving them all.
async fn scene(test: &str, cert_ttl: Option<u64>, on_demand_client: bool) -> Scene {
    let xds_serve = example("podless-xds", "xds-serve", "dev");
    let ztunnel_run = example("ztunnel-core", "ztunnel-run", "dev");
    let topology = Topology::new(test, 3);
    let manifests = tempfile::tempdir().expect("tempdir");
    std::fs::write(manifests.path().join("cluster.yaml"), cluster_yaml()).expect("write");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let manifests_path = manifests.path().to_str().expect("utf-8").to_owned();
    let ca_path = ca_dir.path().to_str().expect("utf-8").to_owned();
    let agent = format!("{AGENT_TOKEN}=spiffe://cluster.local/ns/istio-system/sa/ztunnel@node-a");
    let control_plane = Process::start(
        &topology.control,
        &xds_serve,
        &[
            "--manifests",
            &manifests_path,
            "--listen",
            CONTROL_PLANE,
            "--ca-dir",
            &ca_path,
            "--node-agent",
            &agent,
        ],
        "listening on",
    );
    let root = ca_dir.path().join(mesh_ca::store::ROOT_CERT_FILE);
    let root = root.to_str().expect("utf-8").to_owned();

    // The echo server in the echo pod's namespace, on every address.
    let echo_stop = CancellationToken::new();
    let stop = echo_stop.clone();
    let listening = {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let echo_ns = &topology.workloads[1];
        let ns_runner = echo_ns.run(move || async move {
            let listener = TcpListener::bind("0.0.0.0:8080").await.expect("bind echo");
            let _ = tx.send(());
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => {
                        let Ok((mut stream, _)) = accepted else { return };
                        tokio::spawn(async move {
                            let (mut reader, mut writer) = stream.split();
                            let _ = tokio::io::copy(&mut reader, &mut writer).await;
                            let _ = writer.shutdown().await;
                        });
                    }
                }
            }
        });
        tokio::spawn(ns_runner);
        rx
    };
    listening.await.expect("echo server listening");

    let mut proxies = Vec::new();
    for (i, (netns, uid)) in topology.workloads.iter().zip(UIDS).enumerate() {
        install_redirect(netns);
        let mut args = ztunnel_run_args(CONTROL_PLANE, &root, AGENT_TOKEN, uid);
        let ttl = cert_ttl.map(|ttl| ttl.to_string());
        if let Some(ttl) = &ttl {
            args.extend(["--cert-ttl", ttl.as_str()]);
        }
        if on_demand_client && i == 0 {
            args.push("--on-demand");
        }
        proxies.push(Process::start(netns, &ztunnel_run, &args, "ready"));
    }
    Scene {
        topology,
        manifests,
        ca_dir,
        control_plane: Some(control_plane),
        proxies,
        echo_stop,
    }
}

/// Connects from workload `from`'s namespace to `to`, as an application that
/// knows nothing of the mesh, and round-trips `size` bytes.
async fn exchange(
    scene: &Scene,
    from: usize,
    to: SocketAddr,
    size: usize,
) -> std::io::Result<bool> {
    scene.topology.workloads[from]
        .run(move || async move {
            let stream = TcpStream::connect(to).await?;
            round_trip(stream, size).await
        })
        .await
}

fn echo_pod() -> SocketAddr {
    format!("{}:8080", Topology::workload_ip(1))
        .parse()
        .expect("addr")
}

fn vip() -> SocketAddr {
    VIP.parse().expect("vip")
}

/// Opens an HBONE stream to the echo pod through its proxy, presenting
/// `cert` as `source` (run inside a pod namespace).
async fn connect_to_echo(
    cert: Arc<mesh_ca::WorkloadCertificate>,
    source: mesh_api::Identity,
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = WorkloadTls::new(cert, &provider).expect("tls");
    let shutdown = CancellationToken::new();
    let pool = HbonePool::new(Some(PROXY_MARK), &shutdown);
    let key = PoolKey {
        source,
        expected: vec![identity("spiffe://cluster.local/ns/default/sa/echo")],
        address: format!("{}:15008", Topology::workload_ip(1))
            .parse()
            .expect("addr"),
        source_ip: None,
    };
    pool.connect(&tls, &key, echo_pod(), &[])
        .await
        .map(|_| ())
        .map_err(|err| err.to_string())
}

/// Polls `check` until it holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_traffic_policy_foreign_roots_and_a_lost_control_plane() {
    // The client's proxy learns addresses on demand.
    let scene = scene("traffic", None, true).await;

    // To a pod IP: 8 MiB both ways, intact, with half-close.
    assert!(
        exchange(&scene, 0, echo_pod(), 8 << 20)
            .await
            .expect("through the mesh to the pod IP"),
        "8 MiB echoed intact"
    );
    // To the service VIP.
    assert!(
        exchange(&scene, 0, vip(), 64 << 10)
            .await
            .expect("to the VIP")
    );
    // The server side saw the client's identity (its access log is written
    // in batches: within a moment).
    eventually("the echo side's access log names the client", || async {
        scene.proxies[1].stderr_lines().iter().any(|line| {
            line.contains("direction=\"inbound\"")
                && line.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/shell\"")
        })
    })
    .await;
    // The other namespace's shell may connect too, before any policy.
    assert!(
        exchange(&scene, 2, echo_pod(), 1024)
            .await
            .expect("other shell")
    );

    // An ALLOW policy admits default/shell only: other/shell is reset.
    std::fs::write(
        scene.manifests.path().join("policy.yaml"),
        ALLOW_ONLY_DEFAULT_SHELL,
    )
    .expect("write policy");
    eventually("other/shell is denied", || async {
        matches!(
            exchange(&scene, 2, echo_pod(), 1024).await,
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset
        )
    })
    .await;
    assert!(
        exchange(&scene, 0, echo_pod(), 1024)
            .await
            .expect("still allowed")
    );

    // A peer whose certificate comes from another root is refused by the
    // echo pod's HBONE server.
    let refused = scene.topology.workloads[0]
        .run(move || async move {
            let foreign = ca(&["spiffe://cluster.local/ns/default/sa/shell"]).await;
            let shell = identity("spiffe://cluster.local/ns/default/sa/shell");
            let cert = foreign
                .certs
                .certificate(&shell, WAIT)
                .await
                .expect("foreign cert");
            connect_to_echo(cert, shell).await.err()
        })
        .await;
    assert!(refused.is_some(), "a foreign certificate is refused");

    // The control plane stops: the proxies keep what they know.
    let mut scene = scene;
    drop(scene.control_plane.take());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        exchange(&scene, 0, echo_pod(), 1 << 20)
            .await
            .expect("without the control plane"),
        "existing config keeps working"
    );
    assert!(
        exchange(&scene, 0, vip(), 1024)
            .await
            .expect("VIP without the control plane")
    );
    scene.echo_stop.cancel();
}

/// Sends a ping every 200 ms on one connection until `stop`; how many came
/// back, or the first failure.
async fn keep_pinging(stream: &mut TcpStream, stop: CancellationToken) -> std::io::Result<u64> {
    use tokio::io::AsyncReadExt;
    let mut count = 0;
    loop {
        stream.write_all(b"ping").await?;
        let mut pong = [0u8; 4];
        stream.read_exact(&mut pong).await?;
        assert_eq!(&pong, b"ping");
        count += 1;
        tokio::select! {
            () = stop.cancelled() => return Ok(count),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// One step of a root rotation on the CA's files.
type RotationStep = fn(&Path) -> mesh_ca::store::CaMaterial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_keeps_flowing_through_a_root_rotation() {
    // Certificates live 6 s, so each step reaches every proxy within seconds.
    let scene = scene("rotate", Some(6), false).await;
    let renewals = Duration::from_secs(8);
    let ca_dir = scene.ca_dir.path().to_owned();

    // A connection that stays open through the whole rotation.
    let stop = CancellationToken::new();
    let stop_pinging = stop.clone();
    let lingering = scene.topology.workloads[0].run(move || async move {
        let mut stream = TcpStream::connect(echo_pod()).await?;
        keep_pinging(&mut stream, stop_pinging).await
    });
    let lingering = tokio::spawn(lingering);

    let steps: [(&str, RotationStep); 3] = [
        ("stage a new root", |dir| {
            mesh_ca::store::stage_new_root(dir, "cluster.local", Duration::from_secs(86400))
                .expect("staged")
        }),
        ("sign with the new root", |dir| {
            mesh_ca::store::promote_new_root(dir).expect("promoted")
        }),
        ("retire the old root", |dir| {
            mesh_ca::store::retire_old_roots(dir).expect("retired")
        }),
    ];
    for (step, apply) in steps {
        apply(&ca_dir);
        scene.control_plane.as_ref().expect("running").signal("HUP");
        tokio::time::sleep(renewals).await;
        assert!(
            exchange(&scene, 0, echo_pod(), 256 << 10)
                .await
                .unwrap_or_else(|err| panic!("after \"{step}\": {err}")),
            "after \"{step}\""
        );
        assert!(
            exchange(&scene, 0, vip(), 1024).await.is_ok(),
            "VIP after \"{step}\""
        );
    }

    // Only the new root is trusted now, and the echo pod's proxy presents a
    // certificate under it: a client trusting nothing else gets through.
    let new_root = std::fs::read(ca_dir.join(mesh_ca::store::ROOT_CERT_FILE)).expect("root");
    let connected = scene.topology.workloads[0]
        .run(move || async move {
            use rustls_pki_types::pem::PemObject;
            let roots: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&new_root)
                .collect::<Result<_, _>>()
                .expect("PEM");
            assert_eq!(roots.len(), 1, "one root left");
            let client = mesh_ca::CaClient::builder()
                .address(CONTROL_PLANE.parse().expect("addr"))
                .server_name("istiod.istio-system.svc")
                .roots(roots)
                .token(AGENT_TOKEN)
                .build()
                .expect("CA client");
            let shell = identity("spiffe://cluster.local/ns/default/sa/shell");
            let cert = client
                .certificate(&shell, true, None)
                .await
                .expect("a certificate under the new root");
            connect_to_echo(Arc::new(cert), shell).await
        })
        .await;
    assert_eq!(
        connected,
        Ok(()),
        "the echo proxy renewed under the new root"
    );

    stop.cancel();
    let pings = lingering
        .await
        .expect("pinger")
        .expect("the long-lived connection survived the rotation");
    assert!(
        pings > 10,
        "{pings} round trips on the long-lived connection"
    );
    scene.echo_stop.cancel();
}
