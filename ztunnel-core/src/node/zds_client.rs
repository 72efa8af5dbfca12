//! The node proxy's side of ZDS (WIRE.md §5): it connects to the node
//! agent's socket (again, with backoff, whenever the connection ends), says
//! hello, and answers every request with an ack once it is done:
//! `AddWorkload` starts the pod (its listeners opened in the namespace the
//! request carried), `DelWorkload` drains it, `SnapshotSent` drains every
//! pod the snapshot did not list. Pods keep running while the agent is away.

use std::collections::HashSet;
use std::sync::Arc;

use mesh_api::zds::{
    Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request::Payload,
    workload_response,
};
use mesh_net::Backoff;
use mesh_net::netns::Netns;
use mesh_net::zds::{ZdsError, ZdsSocket};
use tokio_util::sync::CancellationToken;

use super::pod::Pod;
use super::{NodeProxyShared, Pods};

/// Connects and serves until `stop`.
pub(super) async fn run(shared: Arc<NodeProxyShared>, pods: Pods, stop: CancellationToken) {
    let mut backoff = Backoff::new(shared.config.reconnect_initial, shared.config.reconnect_max);
    loop {
        match serve(&shared, &pods, &stop, &mut backoff).await {
            Ok(()) => return,
            Err(err) => {
                shared.status.send_modify(|status| {
                    status.connected = false;
                    status.last_error = Some(err.clone());
                });
                tracing::warn!("ZDS: {err}");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// One connection; `Ok` when stopped.
async fn serve(
    shared: &NodeProxyShared,
    pods: &Pods,
    stop: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let path = &shared.config.zds_socket;
    let socket = ZdsSocket::connect(path)
        .await
        .map_err(|err| format!("connecting to the node agent: {err}"))?;
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    socket
        .send(&hello, None)
        .await
        .map_err(|err| err.to_string())?;
    shared.status.send_modify(|status| status.connected = true);
    let mut listed = HashSet::new();
    let mut in_snapshot = true;
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            received = socket.recv::<WorkloadRequest>() => received,
        };
        let error = match received {
            Ok(received) => {
                if matches!(received.message.payload, Some(Payload::SnapshotSent(_))) {
                    // A connection that got this far was a good one.
                    backoff.reset();
                }
                handle(
                    shared,
                    pods,
                    stop,
                    received.message,
                    received.fd,
                    &mut listed,
                    &mut in_snapshot,
                )
                .await
            }
            Err(
                err
                @ (ZdsError::Decode { .. } | ZdsError::UnexpectedControl(_) | ZdsError::TooLong),
            ) => err.to_string(),
            Err(ZdsError::Closed) => return Err("the node agent closed the connection".into()),
            Err(err) => return Err(err.to_string()),
        };
        if !error.is_empty() {
            tracing::warn!("ZDS: {error}");
        }
        let ack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error })),
        };
        socket
            .send(&ack, None)
            .await
            .map_err(|err| err.to_string())?;
    }
}

/// Does what a request asks; the ack's error (empty when done).
async fn handle(
    shared: &NodeProxyShared,
    pods: &Pods,
    stop: &CancellationToken,
    request: WorkloadRequest,
    fd: Option<std::os::fd::OwnedFd>,
    listed: &mut HashSet<String>,
    in_snapshot: &mut bool,
) -> String {
    match request.payload {
        Some(Payload::Add(add)) => {
            let Some(fd) = fd else {
                return format!("AddWorkload {}: no network namespace passed", add.uid);
            };
            let Some(info) = add.workload_info else {
                return format!("AddWorkload {}: no workload_info", add.uid);
            };
            if *in_snapshot {
                listed.insert(add.uid.clone());
            }
            let description = format!(
                "the network namespace of pod {}/{}",
                info.namespace, info.name
            );
            let netns = match Netns::from_fd(fd, description) {
                Ok(netns) => netns,
                Err(err) => return format!("AddWorkload {}: {err}", add.uid),
            };
            match pods.serves_in(&add.uid, &netns) {
                // Already served, in this namespace (a new snapshot).
                Some(true) => return String::new(),
                // The same uid in another namespace: a new sandbox.
                Some(false) => pods.remove_and_drain(&add.uid, shared.config.pod_drain),
                None => {}
            }
            match Pod::start(shared, info, netns) {
                Ok(pod) if stop.is_cancelled() => {
                    // The node proxy is stopping: it serves nothing new.
                    pod.shutdown();
                    "the node proxy is stopping".into()
                }
                Ok(pod) => {
                    tracing::info!(
                        "serving pod {}/{} ({})",
                        pod.info.namespace,
                        pod.info.name,
                        add.uid
                    );
                    pods.insert(add.uid, pod);
                    String::new()
                }
                Err(err) => format!("AddWorkload {}: {err}", add.uid),
            }
        }
        Some(Payload::Keep(keep)) => {
            if !*in_snapshot {
                return format!("KeepWorkload {} after SnapshotSent", keep.uid);
            }
            if !pods.contains(&keep.uid) {
                return format!("KeepWorkload {}: not served here", keep.uid);
            }
            listed.insert(keep.uid);
            String::new()
        }
        Some(Payload::Del(del)) => {
            pods.remove_and_drain(&del.uid, shared.config.pod_drain);
            String::new()
        }
        Some(Payload::SnapshotSent(_)) => {
            for uid in pods.uids() {
                if !listed.contains(&uid) {
                    pods.remove_and_drain(&uid, shared.config.pod_drain);
                }
            }
            *in_snapshot = false;
            listed.clear();
            shared.status.send_modify(|status| status.synced = true);
            String::new()
        }
        None => "a WorkloadRequest with no payload".into(),
    }
}
