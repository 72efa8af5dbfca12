//! The agent itself: one task that owns every pod it holds and handles, one
//! at a time, the plugin's requests, the pod source's changes and data
//! planes connecting. One at a time, so a pod's ADD, DEL and relabelling
//! never race; the slow steps (firewall programs, a data plane's ack) are
//! bounded.
//!
//! A pod is *held* from its ADD to its DEL (or GC), enrolled or not, so a
//! change of its labels can enrol or release it live; it is *captured* while
//! its redirection rules are in place and the data planes serve it. The
//! rules go in before the data plane is told, and come out before the data
//! plane lets go: an enrolled pod's traffic never leaves uncaptured. Stopping
//! the agent changes no pod: they stay captured for the next agent, which
//! reads them back from the state directory.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_api::zds::WorkloadInfo;
use mesh_net::netns::Netns;
use tokio::sync::{oneshot, watch};

use super::pods::{PodInfo, PodSource};
use super::records::{PodRecord, Records};
use super::zds_server::{AddError, DataPlanes, Workload};
use super::{AgentView, HeldPod};
use crate::plugin::PodRef;
use crate::protocol::{AgentRequest, AgentResponse, PodAttachment};
use crate::redirect::{RedirectSpec, Redirection};

/// What the agent task is told.
#[derive(Debug)]
pub(crate) enum Event {
    /// A request from the CNI plugin, and where its answer goes.
    Plugin(AgentRequest, oneshot::Sender<AgentResponse>),
    /// A data plane connected (its hello was read).
    DataPlane(mesh_net::zds::ZdsSocket),
}

/// A pod the agent holds.
#[derive(Debug)]
struct Held {
    record: PodRecord,
    netns: Arc<Netns>,
}

pub(crate) struct Agent {
    pub(crate) pods: Arc<dyn PodSource>,
    pub(crate) redirection: Arc<dyn Redirection>,
    pub(crate) spec: RedirectSpec,
    pub(crate) records: Records,
    pub(crate) data_planes: DataPlanes,
    pub(crate) view: watch::Sender<AgentView>,
    held: BTreeMap<String, Held>,
}

/// The uid the data plane knows a pod by: its Kubernetes uid, or
/// `namespace/name` when the runtime passed none.
fn uid_of(pod: &PodRef) -> String {
    if pod.uid.is_empty() {
        format!("{}/{}", pod.namespace, pod.name)
    } else {
        pod.uid.clone()
    }
}

impl Agent {
    pub(crate) fn new(
        pods: Arc<dyn PodSource>,
        redirection: Arc<dyn Redirection>,
        spec: RedirectSpec,
        records: Records,
        data_planes: DataPlanes,
        view: watch::Sender<AgentView>,
    ) -> Self {
        Self {
            pods,
            redirection,
            spec,
            records,
            data_planes,
            view,
            held: BTreeMap::new(),
        }
    }

    /// Reads back the pods of an earlier agent and reconciles them.
    pub(crate) async fn recover(&mut self) {
        let (records, problems) = self.records.load();
        for problem in problems {
            tracing::warn!("node agent state: {problem}");
        }
        for record in records {
            let netns = match Netns::open(&record.netns) {
                Ok(netns) => Arc::new(netns),
                Err(err) => {
                    tracing::info!(
                        "pod {}: its network namespace is gone ({err}): forgotten",
                        record.pod
                    );
                    self.forget(&record.uid);
                    continue;
                }
            };
            let mut record = record;
            if let Some(info) = self.pods.pod(&record.pod.namespace, &record.pod.name) {
                record.service_account = info.service_account;
            }
            if record.captured {
                // Idempotent: the rules are normally still there.
                if let Err(err) = self.apply_rules(&netns).await {
                    tracing::warn!("pod {}: reapplying its rules: {err}", record.pod);
                }
            }
            self.held.insert(record.uid.clone(), Held { record, netns });
        }
        self.reconcile().await;
    }

    /// Handles one event.
    pub(crate) async fn handle(&mut self, event: Event) {
        match event {
            Event::Plugin(request, reply) => {
                let response = self.request(request).await;
                // What the plugin was told is already visible.
                self.publish();
                let _ = reply.send(response);
            }
            Event::DataPlane(socket) => {
                let snapshot: Vec<Workload<'_>> = self
                    .held
                    .iter()
                    .filter(|(_, held)| held.record.captured)
                    .map(|(uid, held)| workload(uid, held))
                    .collect();
                let count = snapshot.len();
                match self.data_planes.join(socket, &snapshot).await {
                    Ok(()) => tracing::info!("node proxy connected; sent {count} pods"),
                    Err(err) => tracing::warn!("node proxy dropped: {err}"),
                }
            }
        }
        self.publish();
    }

    async fn request(&mut self, request: AgentRequest) -> AgentResponse {
        match request {
            AgentRequest::Add(pod) => self.add(pod).await,
            AgentRequest::Del(pod) => {
                let uid = uid_of(&pod.pod);
                if self
                    .held
                    .get(&uid)
                    .is_some_and(|held| held.record.attachment == pod.attachment)
                {
                    self.release(&uid).await;
                }
                AgentResponse::Ok
            }
            AgentRequest::Check(pod) => self.check(&pod).await,
            AgentRequest::Status => {
                if self.data_planes.count() > 0 {
                    AgentResponse::Ok
                } else {
                    AgentResponse::Unavailable {
                        message: "no node proxy is connected to the agent".into(),
                    }
                }
            }
            AgentRequest::Gc { network, valid } => {
                let stale: Vec<String> = self
                    .held
                    .iter()
                    .filter(|(_, held)| {
                        held.record.network == network && !valid.contains(&held.record.attachment)
                    })
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in stale {
                    self.release(&uid).await;
                }
                AgentResponse::Ok
            }
        }
    }

    async fn add(&mut self, pod: PodAttachment) -> AgentResponse {
        let uid = uid_of(&pod.pod);
        if let Some(held) = self.held.get(&uid) {
            if held.record.attachment == pod.attachment {
                // The runtime retried an ADD that went through.
                return if held.record.captured {
                    AgentResponse::Ok
                } else {
                    AgentResponse::NotEnrolled
                };
            }
            // A new sandbox of the same pod: the old one is gone.
            self.release(&uid).await;
        }
        let Some(info) = self.pods.pod(&pod.pod.namespace, &pod.pod.name) else {
            return AgentResponse::Unavailable {
                message: "not known to the node agent's pod source yet".into(),
            };
        };
        let Some(path) = pod.netns.clone() else {
            return AgentResponse::Failed {
                message: "no network namespace given".into(),
            };
        };
        let netns = match Netns::open(&path) {
            Ok(netns) => Arc::new(netns),
            Err(err) => {
                return AgentResponse::Failed {
                    message: format!("network namespace: {err}"),
                };
            }
        };
        let mut held = Held {
            record: PodRecord {
                uid: uid.clone(),
                network: pod.network,
                attachment: pod.attachment,
                pod: pod.pod,
                netns: path,
                service_account: info.service_account.clone(),
                captured: false,
            },
            netns,
        };
        if !info.enrolled {
            self.hold(uid, held);
            return AgentResponse::NotEnrolled;
        }
        if self.data_planes.count() == 0 {
            return AgentResponse::Unavailable {
                message: "no node proxy is connected to the agent".into(),
            };
        }
        if let Err(err) = self.apply_rules(&held.netns).await {
            // Whatever part went in comes out: the pod starts no half-captured.
            if let Err(remove) = self.remove_rules(&held.netns).await {
                tracing::warn!("pod {}: removing its rules: {remove}", held.record.pod);
            }
            return AgentResponse::Failed { message: err };
        }
        match self.data_planes.add(&workload(&uid, &held)).await {
            Ok(()) => {
                held.record.captured = true;
                self.hold(uid, held);
                AgentResponse::Ok
            }
            Err(err) => {
                // A data plane that took it lets go again (another refused).
                for failed in self.data_planes.del(&uid).await {
                    tracing::debug!("pod {}: {failed}", held.record.pod);
                }
                if let Err(remove) = self.remove_rules(&held.netns).await {
                    tracing::warn!("pod {}: removing its rules: {remove}", held.record.pod);
                }
                match err {
                    AddError::NoDataPlane(message) => AgentResponse::Unavailable { message },
                    AddError::Refused(message) => AgentResponse::Failed {
                        message: format!("the node proxy refused it: {message}"),
                    },
                }
            }
        }
    }

    async fn check(&self, pod: &PodAttachment) -> AgentResponse {
        let uid = uid_of(&pod.pod);
        match self.held.get(&uid) {
            Some(held) if held.record.captured => {
                let redirection = self.redirection.clone();
                let netns = held.netns.clone();
                match tokio::task::spawn_blocking(move || redirection.is_applied(&netns)).await {
                    Ok(Ok(true)) => AgentResponse::Ok,
                    Ok(Ok(false)) => AgentResponse::Failed {
                        message: "its redirection rules are missing".into(),
                    },
                    Ok(Err(err)) => AgentResponse::Failed {
                        message: err.to_string(),
                    },
                    Err(err) => AgentResponse::Failed {
                        message: err.to_string(),
                    },
                }
            }
            _ => match self.pods.pod(&pod.pod.namespace, &pod.pod.name) {
                Some(PodInfo { enrolled: true, .. }) => AgentResponse::Failed {
                    message: "enrolled, but not captured".into(),
                },
                _ => AgentResponse::NotEnrolled,
            },
        }
    }

    /// Enrols and releases held pods whose enrollment changed (a capture
    /// that failed is tried again), and forgets pods whose network
    /// namespace is gone (a DEL that never came).
    pub(crate) async fn reconcile(&mut self) {
        let gone: Vec<String> = self
            .held
            .iter()
            .filter(|(_, held)| !std::path::Path::new(&held.record.netns).exists())
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            tracing::info!("pod {uid}: its network namespace is gone: released");
            self.release(&uid).await;
        }
        let changed: Vec<(String, bool)> = self
            .held
            .iter()
            .filter_map(|(uid, held)| {
                let info = self
                    .pods
                    .pod(&held.record.pod.namespace, &held.record.pod.name)?;
                (info.enrolled != held.record.captured).then(|| (uid.clone(), info.enrolled))
            })
            .collect();
        for (uid, enrol) in changed {
            if enrol {
                self.capture_live(&uid).await;
            } else {
                self.uncapture(&uid).await;
            }
        }
        self.publish();
    }

    /// Captures a running pod that was enrolled: rules first (from now on
    /// its traffic goes to the data plane, or nowhere), then the data
    /// planes; one that joins later gets it in its snapshot.
    async fn capture_live(&mut self, uid: &str) {
        let Some(held) = self.held.get(uid) else {
            return;
        };
        let netns = held.netns.clone();
        let info = self
            .pods
            .pod(&held.record.pod.namespace, &held.record.pod.name);
        if let (Some(info), Some(held)) = (info, self.held.get_mut(uid)) {
            held.record.service_account = info.service_account;
        }
        if let Err(err) = self.apply_rules(&netns).await {
            // Left as it was (uncaptured, its traffic flowing); tried again
            // at the next reconcile.
            if let Err(remove) = self.remove_rules(&netns).await {
                tracing::warn!("pod {uid}: removing its rules: {remove}");
            }
            tracing::warn!("pod {uid}: enrolled, but its rules failed: {err}");
            return;
        }
        let Some(held) = self.held.get_mut(uid) else {
            return;
        };
        held.record.captured = true;
        let _ = self.records.save(&held.record);
        let held = &self.held[uid];
        match self.data_planes.add(&workload(uid, held)).await {
            Ok(()) => tracing::info!("pod {} enrolled live", held.record.pod),
            Err(AddError::NoDataPlane(err) | AddError::Refused(err)) => {
                tracing::warn!("pod {} enrolled; the node proxy: {err}", held.record.pod);
            }
        }
    }

    /// Releases a running pod that left the mesh: rules out first, then
    /// the data planes let go. It stays held, to be enrolled again.
    async fn uncapture(&mut self, uid: &str) {
        let Some(held) = self.held.get(uid) else {
            return;
        };
        let netns = held.netns.clone();
        if let Err(err) = self.remove_rules(&netns).await {
            tracing::warn!("pod {uid}: left the mesh, but removing its rules failed: {err}");
            return;
        }
        for err in self.data_planes.del(uid).await {
            tracing::warn!("pod {uid}: the node proxy: {err}");
        }
        if let Some(held) = self.held.get_mut(uid) {
            held.record.captured = false;
            let _ = self.records.save(&held.record);
            tracing::info!("pod {} released live", held.record.pod);
        }
    }

    /// Forgets a pod (DEL, GC): uncaptured if it was, then dropped.
    async fn release(&mut self, uid: &str) {
        if self.held.get(uid).is_some_and(|held| held.record.captured) {
            let netns = self.held[uid].netns.clone();
            // The namespace may be on its way out: best effort.
            if let Err(err) = self.remove_rules(&netns).await {
                tracing::debug!("pod {uid}: removing its rules: {err}");
            }
            for err in self.data_planes.del(uid).await {
                tracing::warn!("pod {uid}: the node proxy: {err}");
            }
        }
        self.held.remove(uid);
        self.forget(uid);
    }

    fn hold(&mut self, uid: String, held: Held) {
        if let Err(err) = self.records.save(&held.record) {
            tracing::warn!("pod {}: saving its state: {err}", held.record.pod);
        }
        self.held.insert(uid, held);
    }

    fn forget(&self, uid: &str) {
        if let Err(err) = self.records.remove(uid) {
            tracing::warn!("pod {uid}: removing its state: {err}");
        }
    }

    async fn apply_rules(&self, netns: &Arc<Netns>) -> Result<(), String> {
        let (redirection, netns, spec) =
            (self.redirection.clone(), netns.clone(), self.spec.clone());
        tokio::task::spawn_blocking(move || redirection.apply(&netns, &spec))
            .await
            .map_err(|err| err.to_string())?
            .map_err(|err| err.to_string())
    }

    async fn remove_rules(&self, netns: &Arc<Netns>) -> Result<(), String> {
        let (redirection, netns) = (self.redirection.clone(), netns.clone());
        tokio::task::spawn_blocking(move || redirection.remove(&netns))
            .await
            .map_err(|err| err.to_string())?
            .map_err(|err| err.to_string())
    }

    /// A data plane had something to say while idle (its close): dropped.
    pub(crate) async fn data_plane_spoke(&mut self, socket: &Arc<mesh_net::zds::ZdsSocket>) {
        if self.data_planes.spoke(socket).await {
            self.publish();
        }
    }

    pub(crate) fn publish(&self) {
        let pods = self
            .held
            .values()
            .map(|held| HeldPod {
                uid: held.record.uid.clone(),
                namespace: held.record.pod.namespace.clone(),
                name: held.record.pod.name.clone(),
                attachment: held.record.attachment.clone(),
                captured: held.record.captured,
            })
            .collect();
        self.view.send_replace(AgentView {
            pods,
            data_planes: self.data_planes.count(),
        });
    }
}

fn workload<'a>(uid: &'a str, held: &'a Held) -> Workload<'a> {
    Workload {
        uid,
        info: WorkloadInfo {
            name: held.record.pod.name.clone(),
            namespace: held.record.pod.namespace.clone(),
            service_account: held.record.service_account.clone(),
        },
        netns: &held.netns,
    }
}
