//! The node agent's side of ZDS (WIRE.md §5): each data plane that connects
//! says hello, gets the snapshot (an `AddWorkload` with its network
//! namespace for every captured pod, then `SnapshotSent`) and then every
//! change; every request waits for the data plane's ack, up to the ack
//! timeout (5 s). A data plane that fails to answer is dropped (it
//! reconnects and gets a fresh snapshot).

use std::time::Duration;

use mesh_api::zds::{
    AddWorkload, DelWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request::Payload, workload_response,
};
use std::sync::Arc;

use mesh_net::netns::Netns;
use mesh_net::zds::ZdsSocket;

/// A pod as the data plane is told of it.
#[derive(Debug)]
pub(crate) struct Workload<'a> {
    pub(crate) uid: &'a str,
    pub(crate) info: WorkloadInfo,
    pub(crate) netns: &'a Netns,
}

/// Why a data plane did not take a pod.
#[derive(Debug)]
pub(crate) enum AddError {
    /// No data plane is connected (or all that were failed to answer).
    NoDataPlane(String),
    /// A data plane refused it.
    Refused(String),
}

/// The connected data planes (normally one: a node proxy; two while one
/// replaces the other).
#[derive(Debug)]
pub(crate) struct DataPlanes {
    connected: Vec<Arc<ZdsSocket>>,
    ack_timeout: Duration,
}

impl DataPlanes {
    pub(crate) fn new(ack_timeout: Duration) -> Self {
        Self {
            connected: Vec::new(),
            ack_timeout,
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.connected.len()
    }

    /// Reads a new connection's hello (within the ack timeout).
    pub(crate) async fn hello(socket: &ZdsSocket, timeout: Duration) -> Result<(), String> {
        let hello = tokio::time::timeout(timeout, socket.recv::<ZdsHello>())
            .await
            .map_err(|_| format!("no ZdsHello within {timeout:?}"))?
            .map_err(|err| err.to_string())?;
        if hello.message.version != Version::V1 as i32 {
            return Err(format!(
                "ZdsHello with version {}: this agent speaks V1",
                hello.message.version
            ));
        }
        Ok(())
    }

    /// Sends a new data plane the snapshot; keeps it if it took it.
    pub(crate) async fn join(
        &mut self,
        socket: ZdsSocket,
        snapshot: &[Workload<'_>],
    ) -> Result<(), String> {
        for workload in snapshot {
            let message = add(workload);
            match request(&socket, &message, Some(workload.netns), self.ack_timeout).await {
                Ok(()) => {}
                // One pod the data plane cannot serve does not keep it from
                // the others: its traffic stays captured, and refused.
                Err(Failure::Refused(err)) => tracing::warn!(
                    "snapshot, pod {}: the node proxy refused it: {err}",
                    workload.uid
                ),
                Err(Failure::Lost(err)) => {
                    return Err(format!("snapshot, pod {}: {err}", workload.uid));
                }
            }
        }
        let sent = WorkloadRequest {
            payload: Some(Payload::SnapshotSent(SnapshotSent {})),
        };
        request(&socket, &sent, None, self.ack_timeout)
            .await
            .map_err(|err| format!("snapshot end: {err}"))?;
        self.connected.push(Arc::new(socket));
        Ok(())
    }

    /// The connected sockets, to watch while the agent is idle (see
    /// [`readable`], [`DataPlanes::spoke`]).
    pub(crate) fn sockets(&self) -> Vec<Arc<ZdsSocket>> {
        self.connected.clone()
    }

    /// `socket` looked readable while the agent was idle: either stale
    /// readiness (after the last ack; reading finds nothing and clears it),
    /// or its peer closed (or broke the protocol by speaking out of turn),
    /// and it is dropped (then `true`).
    pub(crate) async fn spoke(&mut self, socket: &Arc<ZdsSocket>) -> bool {
        // One read attempt, without waiting.
        let said = tokio::time::timeout(Duration::ZERO, socket.recv::<WorkloadResponse>()).await;
        match said {
            Err(_) => return false,
            Ok(Err(mesh_net::zds::ZdsError::Closed)) => tracing::info!("a node proxy disconnected"),
            Ok(other) => tracing::warn!("a node proxy spoke out of turn ({other:?}): dropped"),
        }
        self.connected
            .retain(|connected| !Arc::ptr_eq(connected, socket));
        true
    }

    /// Tells every data plane to serve a pod. Succeeds if at least one is
    /// connected and all that answer took it.
    pub(crate) async fn add(&mut self, workload: &Workload<'_>) -> Result<(), AddError> {
        let message = add(workload);
        let results = self.each(&message, Some(workload.netns)).await;
        if self.connected.is_empty() {
            return Err(AddError::NoDataPlane(
                match results.into_iter().find_map(Result::err) {
                    Some(err) => format!("no node proxy answered: {err}"),
                    None => "no node proxy is connected to the agent".into(),
                },
            ));
        }
        match results.into_iter().find_map(Result::err) {
            Some(err) => Err(AddError::Refused(err)),
            None => Ok(()),
        }
    }

    /// Tells every data plane to stop serving a pod (best effort: errors are
    /// returned for the log).
    pub(crate) async fn del(&mut self, uid: &str) -> Vec<String> {
        let message = WorkloadRequest {
            payload: Some(Payload::Del(DelWorkload {
                uid: uid.to_owned(),
            })),
        };
        self.each(&message, None)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect()
    }

    /// Sends to each; drops a data plane whose socket failed or that did not
    /// answer in time (a refusal keeps it).
    async fn each(
        &mut self,
        message: &WorkloadRequest,
        netns: Option<&Netns>,
    ) -> Vec<Result<(), String>> {
        let mut results = Vec::new();
        let mut kept = Vec::new();
        for socket in self.connected.drain(..) {
            match request(&socket, message, netns, self.ack_timeout).await {
                Ok(()) => {
                    kept.push(socket);
                    results.push(Ok(()));
                }
                Err(Failure::Refused(err)) => {
                    kept.push(socket);
                    results.push(Err(err));
                }
                Err(Failure::Lost(err)) => {
                    tracing::warn!("node proxy dropped from ZDS: {err}");
                    results.push(Err(err));
                }
            }
        }
        self.connected = kept;
        results
    }
}

fn add(workload: &Workload<'_>) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(Payload::Add(AddWorkload {
            uid: workload.uid.to_owned(),
            workload_info: Some(workload.info.clone()),
        })),
    }
}

/// Waits until one of `sockets` is readable; which one. Never returns for
/// none.
pub(crate) async fn readable(sockets: &[Arc<ZdsSocket>]) -> Arc<ZdsSocket> {
    if sockets.is_empty() {
        return std::future::pending().await;
    }
    let waits = sockets.iter().map(|socket| {
        Box::pin(async move {
            // An error reads as readable: the recv that follows says what.
            let _ = socket.readable().await;
            socket.clone()
        })
    });
    futures::future::select_all(waits).await.0
}

/// How a request failed.
#[derive(Debug)]
enum Failure {
    /// The data plane answered with an error.
    Refused(String),
    /// The socket failed or the answer did not come in time.
    Lost(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(err) | Self::Lost(err) => f.write_str(err),
        }
    }
}

async fn request(
    socket: &ZdsSocket,
    message: &WorkloadRequest,
    netns: Option<&Netns>,
    timeout: Duration,
) -> Result<(), Failure> {
    socket
        .send(message, netns.map(Netns::fd))
        .await
        .map_err(|err| Failure::Lost(err.to_string()))?;
    let answer = tokio::time::timeout(timeout, socket.recv::<WorkloadResponse>())
        .await
        .map_err(|_| Failure::Lost(format!("no ack within {timeout:?}")))?
        .map_err(|err| Failure::Lost(err.to_string()))?;
    match answer.message.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
        Some(workload_response::Payload::Ack(ack)) => Err(Failure::Refused(ack.error)),
        None => Err(Failure::Lost("an answer that is not an ack".into())),
    }
}
