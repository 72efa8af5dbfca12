//! A container runtime's part, for the tests: network namespaces, a
//! conflist run as a runtime runs it (Debian's `bridge` and `host-local`,
//! then `podless-cni`) inside a node namespace, the node agent in this
//! process, and a ZDS peer standing for the node's data plane.
//!
//! Written for tests that use some of it each.
//! Also the node bench's (`benches/benches/node.rs`), which sets
//! [`Node::plugin`] to a release build of the plugin.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cni_plugin::agent::{
    DATAPLANE_MODE_LABEL, Labels, MemoryPods, NodeAgent, NodeAgentConfig, NodeAgentHandle, labels,
};
use cni_plugin::redirect::{IptablesRestore, Nftables, Redirection};
use mesh_api::zds::{
    Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request::Payload,
    workload_response,
};
use mesh_net::netns::{Netns, same_namespace};
use mesh_net::zds::{ZdsListener, ZdsSocket};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

/// The plugin cargo built with this package's tests (elsewhere: from `PATH`).
pub const PLUGIN: &str = match option_env!("CARGO_BIN_EXE_podless-cni") {
    Some(path) => path,
    None => "podless-cni",
};
pub const CNI_BIN: &str = "/usr/lib/cni";
pub const WAIT: Duration = Duration::from_secs(10);

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(role: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "plcni{}-{role}{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    pub fn open(&self) -> Netns {
        Netns::open(self.path()).expect("open netns")
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().expect("run");
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One plugin call's result.
#[derive(Debug)]
pub struct Called {
    pub exit_ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Called {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("{err}: {:?} / {:?}", self.stdout, self.stderr))
    }

    pub fn error_code(&self) -> u64 {
        assert!(!self.exit_ok, "expected a failure: {self:?}");
        self.json()["code"].as_u64().expect("code")
    }
}

/// Which backend a test runs with.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Nftables,
    Iptables,
}

impl Backend {
    pub fn redirection(self) -> Arc<dyn Redirection> {
        match self {
            Self::Nftables => Arc::new(Nftables::new()),
            Self::Iptables => Arc::new(IptablesRestore::new()),
        }
    }
}

/// What the data plane stand-in saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    Add {
        uid: String,
        namespace: String,
        name: String,
        service_account: String,
        /// The descriptor it got was the pod's network namespace.
        pod_netns: Option<String>,
    },
    Del(String),
    SnapshotSent,
}

/// A ZDS peer standing for the node's data plane: says hello, acks every
/// request, reports what it saw. Pod namespaces it may be handed are
/// recognised by comparing descriptors.
pub async fn data_plane(
    path: PathBuf,
    pods: Vec<(String, Netns)>,
) -> mpsc::UnboundedReceiver<Seen> {
    let (seen, events) = mpsc::unbounded_channel();
    let socket = ZdsSocket::connect(&path)
        .await
        .expect("connect to the agent");
    socket
        .send(
            &ZdsHello {
                version: Version::V1 as i32,
            },
            None,
        )
        .await
        .expect("hello");
    tokio::spawn(async move {
        while let Ok(received) = socket.recv::<WorkloadRequest>().await {
            let event = match received.message.payload {
                Some(Payload::Add(add)) => {
                    let info = add.workload_info.unwrap_or_default();
                    let pod_netns = received.fd.and_then(|fd| {
                        pods.iter()
                            .find(|(_, netns)| same_namespace(&fd, netns.fd()).unwrap_or(false))
                            .map(|(name, _)| name.clone())
                    });
                    Seen::Add {
                        uid: add.uid,
                        namespace: info.namespace,
                        name: info.name,
                        service_account: info.service_account,
                        pod_netns,
                    }
                }
                Some(Payload::Del(del)) => Seen::Del(del.uid),
                Some(Payload::SnapshotSent(_)) => Seen::SnapshotSent,
                other => panic!("unexpected {other:?}"),
            };
            let _ = seen.send(event);
            let ack = WorkloadResponse {
                payload: Some(workload_response::Payload::Ack(Ack {
                    error: String::new(),
                })),
            };
            if socket.send(&ack, None).await.is_err() {
                break;
            }
        }
    });
    events
}

pub async fn next(events: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("the data plane heard nothing")
        .expect("the data plane's socket closed")
}

/// A node: its namespace (where the runtime runs the plugins, and the
/// bridge lives), the agent's sockets, the pod source and the agent.
pub struct Node {
    pub netns: TestNetns,
    pub dir: tempfile::TempDir,
    pub pods: MemoryPods,
    pub backend: Backend,
    pub agent: Option<NodeAgentHandle>,
    /// Its pods' subnet: `10.85.<subnet>.0/24`.
    pub subnet: u8,
    /// The `podless-cni` program the runtime runs.
    pub plugin: PathBuf,
    /// How long each plugin call of the chains took (`ADD bridge`, ...).
    pub timings: Mutex<Vec<(String, Duration)>>,
}

impl Node {
    pub fn new(backend: Backend) -> Self {
        Self::with_subnet(backend, 0)
    }

    /// A node whose pods are on `10.85.<subnet>.0/24`.
    pub fn with_subnet(backend: Backend, subnet: u8) -> Self {
        let pods = MemoryPods::new();
        pods.set_namespace("default", labels([(DATAPLANE_MODE_LABEL, "ambient")]));
        pods.set_namespace("plain", Labels::new());
        pods.set_namespace("kube-system", Labels::new());
        Self {
            netns: TestNetns::new("node"),
            dir: tempfile::tempdir().expect("dir"),
            pods,
            backend,
            agent: None,
            subnet,
            plugin: PathBuf::from(PLUGIN),
            timings: Mutex::default(),
        }
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.dir.path().join("cni.sock")
    }

    pub fn zds_socket(&self) -> PathBuf {
        self.dir.path().join("ztunnel.sock")
    }

    pub fn start_agent(&mut self) {
        let _ = std::fs::remove_file(self.agent_socket());
        let _ = std::fs::remove_file(self.zds_socket());
        let agent = NodeAgent::builder()
            .config(NodeAgentConfig::default())
            .pods(self.pods.clone())
            .redirection(self.backend.redirection())
            .state_dir(self.dir.path().join("state"))
            .build()
            .expect("build")
            .spawn(
                UnixListener::bind(self.agent_socket()).expect("bind plugin socket"),
                ZdsListener::bind(self.zds_socket()).expect("bind ZDS socket"),
            )
            .expect("spawn");
        self.agent = Some(agent);
    }

    pub async fn stop_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.shutdown();
            agent.join().await;
        }
    }

    pub fn agent(&self) -> &NodeAgentHandle {
        self.agent.as_ref().expect("agent running")
    }

    pub async fn wait_for_data_planes(&self, count: usize) {
        let mut view = self.agent().watch();
        tokio::time::timeout(WAIT, view.wait_for(|view| view.data_planes == count))
            .await
            .expect("data planes in time")
            .expect("agent running");
    }

    /// The conflist's plugins: Debian's bridge and host-local, then ours.
    pub fn plugins(&self, version: &str) -> Vec<Value> {
        vec![
            json!({
                "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                "ipam": {"type": "host-local", "subnet": format!("10.85.{}.0/24", self.subnet),
                         "routes": [{"dst": "0.0.0.0/0"}],
                         "dataDir": self.dir.path().join("ipam")},
            }),
            json!({
                "type": "podless-cni",
                "agentSocket": self.agent_socket(),
                "agentTimeout": "10s",
                "excludeNamespaces": ["kube-system"],
                "cniVersion_is_the_lists": version,
            }),
        ]
    }

    /// Runs one plugin as a runtime does: `CNI_*` environment, the network
    /// configuration on stdin, inside the node's namespace.
    pub async fn call(&self, plugin: &str, env: &[(&str, &str)], stdin: &Value) -> Called {
        let program = if plugin == "podless-cni" {
            self.plugin.clone()
        } else {
            Path::new(CNI_BIN).join(plugin)
        };
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.netns.name])
            .arg(&program)
            .env_clear()
            .env("CNI_PATH", CNI_BIN)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn plugin");
        let mut input = child.stdin.take().expect("stdin");
        input
            .write_all(stdin.to_string().as_bytes())
            .await
            .expect("write stdin");
        drop(input);
        let output = child.wait_with_output().await.expect("plugin output");
        Called {
            exit_ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// A whole conflist command, as a runtime runs it: ADD in order with
    /// each result as the next `prevResult`, DEL in reverse, CHECK in order
    /// with the ADD's result. The last call's outcome, or the first failure.
    pub async fn chain(&self, command: &str, pod: &Pod, prev: Option<&Value>) -> Called {
        let version = "1.0.0";
        let mut plugins = self.plugins(version);
        if command == "DEL" {
            plugins.reverse();
        }
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.uid
        );
        let netns = pod.netns.path();
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", pod.container_id.as_str()),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args.as_str()),
        ];
        let mut result = prev.cloned();
        let mut last = None;
        for plugin in plugins {
            let mut conf = plugin.clone();
            let object = conf.as_object_mut().expect("object");
            object.remove("cniVersion_is_the_lists");
            object.insert("cniVersion".into(), version.into());
            object.insert("name".into(), "podnet".into());
            if let Some(result) = &result {
                object.insert("prevResult".into(), result.clone());
            }
            let kind = plugin["type"].as_str().expect("type").to_owned();
            let started = std::time::Instant::now();
            let called = self.call(&kind, &env, &conf).await;
            self.timings
                .lock()
                .expect("timings")
                .push((format!("{command} {kind}"), started.elapsed()));
            if !called.exit_ok {
                return called;
            }
            if command == "ADD" {
                result = Some(called.json());
            }
            last = Some(called);
        }
        last.expect("a plugin ran")
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Pod {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.pods.set_pod(namespace, name, name, Labels::new());
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{name}-{n}"),
            container_id: format!("container-{name}-{n}"),
            netns: TestNetns::new("pod"),
        }
    }

    pub fn captured(&self, pod: &Pod) -> bool {
        self.backend
            .redirection()
            .is_applied(&pod.netns.open())
            .expect("is_applied")
    }
}

pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container_id: String,
    pub netns: TestNetns,
}

impl Pod {
    pub fn seen_add(&self) -> Seen {
        Seen::Add {
            uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            service_account: self.name.clone(),
            pod_netns: Some(self.netns.name.clone()),
        }
    }

    pub fn for_data_plane(&self) -> (String, Netns) {
        (self.netns.name.clone(), self.netns.open())
    }
}

/// Every check below, once per backend.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod nftables {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Nftables).await })*
        }
        mod iptables {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Iptables).await })*
        }
    };
}

/// A process started inside a namespace, its output kept, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(
        netns: &str,
        dir: &Path,
        env: &[(&str, String)],
        program: &Path,
        args: &[String],
    ) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            .current_dir(dir)
            .env_clear()
            .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ztunnel");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().expect("lines").push(line);
                }
            });
        }
        Self { child, lines }
    }

    pub fn output(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A control plane in this process (xDS and the CA on one TLS port, its
/// store holding `manifest`), node agents authenticated by `tokens`
/// (`(token, node)`), impersonation checked against the store.
pub struct ControlPlaneParts {
    pub store: xds_server::Store,
    pub authority: Arc<mesh_ca::Authority>,
    pub address: std::net::SocketAddr,
    pub handle: xds_server::ControlPlaneHandle,
}

pub async fn control_plane(
    listener: tokio::net::TcpListener,
    manifest: &str,
    tokens: &[(&str, &str)],
) -> ControlPlaneParts {
    use xds_server::{Authenticators, ControlPlane, StoreNodeAuthorizer, XdsServer};
    let store = xds_server::Store::new(xds_server::MeshConfig::default());
    for object in xds_server::parse_manifest(manifest).expect("YAML").objects {
        store.apply(object).expect("valid");
    }
    let material = mesh_ca::CaMaterial::self_signed("cluster.local", Duration::from_secs(86400))
        .expect("CA material");
    let authority = Arc::new(
        mesh_ca::Authority::new(&material, "cluster.local", Default::default()).expect("authority"),
    );
    let agent = mesh_api::Identity::parse_uri("spiffe://cluster.local/ns/istio-system/sa/ztunnel")
        .expect("identity");
    let mut callers = mesh_ca::StaticTokens::new();
    for (token, node) in tokens {
        callers = callers.caller(
            token,
            mesh_ca::Authenticated {
                identity: agent.clone(),
                node: Some((*node).into()),
                pod: None,
            },
        );
    }
    let ca = mesh_ca::CaServer::builder()
        .authority(authority.clone())
        .authenticator(callers.clone())
        .node_agent(agent)
        .node_authorizer(StoreNodeAuthorizer::new(store.clone()))
        .build()
        .expect("CA");
    let xds = XdsServer::builder()
        .store(store.clone())
        .authenticators(Authenticators::new().with(callers))
        .build()
        .expect("xDS");
    let handle = ControlPlane::builder()
        .xds(xds)
        .ca(ca)
        .build()
        .expect("control plane")
        .spawn(listener)
        .expect("spawned");
    handle.ready(WAIT).await.expect("control plane ready");
    ControlPlaneParts {
        store,
        authority,
        address: handle.local_addr(),
        handle,
    }
}

impl ControlPlaneParts {
    /// Writes the mesh's root certificates to `path` (PEM).
    pub fn write_root(&self, path: &Path) {
        let pem: String = self
            .authority
            .roots()
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
            .collect();
        std::fs::write(path, pem).expect("root");
    }

    /// Applies `manifest` to the store.
    pub fn apply(&self, manifest: &str) {
        for object in xds_server::parse_manifest(manifest).expect("YAML").objects {
            self.store.apply(object).expect("valid");
        }
    }
}

/// A listener on the loopback of `netns` (where a node's data plane, run
/// inside it, finds a control plane of this process).
pub fn listener_in(netns: &Netns) -> tokio::net::TcpListener {
    let listener = netns
        .enter(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("enter")
        .expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    tokio::net::TcpListener::from_std(listener).expect("listener")
}

/// How long a connection from a pod may take to connect or to be echoed.
pub const ROUND_TRIP_WAIT: Duration = Duration::from_secs(20);

impl Node {
    /// A pod of this node (`node-a` for subnet 0, `node-b` for 1, ...) as a
    /// kubelet brings one up: scheduled (the control plane knows it, with no
    /// IP), its sandbox through the CNI chain, then its IP reported. The
    /// pod, its IP and the chain's result.
    pub async fn add_pod(
        &self,
        control: &ControlPlaneParts,
        namespace: &str,
        name: &str,
        app: &str,
    ) -> (Pod, std::net::IpAddr, Value) {
        let node_name = format!("node-{}", char::from(b'a' + self.subnet));
        let pod = self.pod(namespace, name);
        let object = format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}
spec: {{serviceAccountName: {name}, nodeName: {node_name}, containers: [{{name: c}}]}}
"
        );
        control.apply(&object);
        let added = self.chain("ADD", &pod, None).await;
        assert!(added.exit_ok, "{added:?}");
        let result = added.json();
        let ip: std::net::IpAddr = result["ips"][0]["address"]
            .as_str()
            .and_then(|cidr| cidr.split('/').next())
            .and_then(|ip| ip.parse().ok())
            .expect("an address");
        control.apply(&format!(
            "{object}status: {{podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}\n"
        ));
        (pod, ip, result)
    }
}

/// An echo server on 0.0.0.0:8080 inside `netns`.
pub fn echo_app(netns: &Netns) {
    use tokio::io::AsyncWriteExt;
    let listener = netns
        .enter(|| std::net::TcpListener::bind("0.0.0.0:8080"))
        .expect("enter")
        .expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
}

/// Connects from inside `netns` to `target`.
pub async fn connect_from(
    netns: &Netns,
    target: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = netns.enter(tokio::net::TcpSocket::new_v4).expect("enter")?;
    tokio::time::timeout(ROUND_TRIP_WAIT, socket.connect(target))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Sends `message` from `netns` to `target` and reads back the echo; the
/// error if the connection failed.
pub async fn round_trip(
    netns: &Netns,
    target: std::net::SocketAddr,
    message: &[u8],
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = connect_from(netns, target).await?;
    stream.write_all(message).await?;
    stream.shutdown().await?;
    let mut echoed = Vec::new();
    tokio::time::timeout(ROUND_TRIP_WAIT, stream.read_to_end(&mut echoed))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    Ok(echoed)
}

/// The environment of a real ztunnel in shared mode serving `node-a`: its
/// control plane and CA at `address` (root certificates in `root`), its
/// agent's ZDS socket at `zds`, logging at `log`.
pub fn real_ztunnel_env(
    address: std::net::SocketAddr,
    root: &str,
    zds: &str,
    log: &str,
) -> Vec<(&'static str, String)> {
    let url = format!("https://{address}");
    vec![
        ("XDS_ADDRESS", url.clone()),
        ("CA_ADDRESS", url),
        ("XDS_ROOT_CA", root.to_owned()),
        ("CA_ROOT_CA", root.to_owned()),
        ("NODE_NAME", "node-a".into()),
        ("POD_NAME", "ztunnel-node-a".into()),
        ("POD_NAMESPACE", "istio-system".into()),
        ("CLUSTER_ID", "Kubernetes".into()),
        ("PROXY_MODE", "shared".into()),
        ("INPOD_UDS", zds.to_owned()),
        ("RUST_LOG", log.to_owned()),
    ]
}
