//! One client's delta ADS session, without I/O: what it subscribed to, what it
//! has been sent, and the next response to send. The stream task feeds it
//! requests and asks it for responses when the client can take one, so changes
//! that pile up while a client is slow coalesce (only the latest version of a
//! resource is ever sent) and memory stays bounded by the store's size.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use mesh_api::ResourceType;
use mesh_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_api::prost::Message;
use tonic::Status;

use super::codec::EncodedResponse;
use crate::store::table::{Entry, Table};
use crate::store::{Snapshot, State, Store};

/// Unanswered responses remembered per type.
const MAX_IN_FLIGHT: usize = 64;

/// The subscription name meaning "everything".
const WILDCARD: &str = "*";

/// The session fell so far behind that the store forgot changes it needed; the
/// client must reconnect (its `initial_resource_versions` then resync it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this stream fell too far behind the store's changes: reconnect")]
pub struct FellBehind;

/// What a request did.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// A subscription request (initial or later).
    Subscribed,
    /// An ACK of a response built at `revision`.
    Ack {
        /// The type.
        kind: ResourceType,
        /// The store revision the accepted response was built at.
        revision: u64,
    },
    /// A NACK, with the client's error.
    Nack {
        /// The type.
        kind: ResourceType,
        /// The rejected response's nonce.
        nonce: String,
        /// The client's error message.
        error: String,
    },
    /// A response to a nonce this session never sent (or already answered).
    Stale,
}

/// One client's delta ADS session, without I/O (the stream task of
/// [`AdsService`](super::AdsService) drives one per stream; tests and tools can
/// drive one directly): feed it requests, ask it for responses.
#[derive(Debug)]
pub struct Session {
    types: [Option<TypeState>; 2],
    next_nonce: u64,
    /// Which type the last response was for: types take turns.
    last_served: usize,
}

/// A client's state for one resource type.
#[derive(Debug)]
struct TypeState {
    kind: ResourceType,
    wildcard: bool,
    /// Names subscribed explicitly, as the client wrote them.
    names: BTreeSet<String>,
    /// A full pass over the table in progress (wildcard).
    full_sync: Option<FullSync>,
    /// Every change up to this revision has been taken into `pending`.
    synced_revision: u64,
    /// Resource names to (re)send or withdraw (wildcard).
    pending: BTreeSet<Arc<str>>,
    /// What explicit names resolved to when last sent: the resource's hash, or
    /// `None` when the client was told the name does not exist.
    sent: HashMap<String, Option<u64>>,
    /// Explicit names whose state must be re-checked.
    names_dirty: bool,
    /// Responses sent and not yet answered: nonce and the revision built at.
    in_flight: VecDeque<(String, u64)>,
    /// The revision of the last response the client accepted.
    acked_revision: Option<u64>,
    /// The first request of a type is answered even when there is nothing to
    /// send (clients such as ztunnel wait for it to call themselves ready).
    answer_owed: bool,
}

/// A pass over a whole table: resources after `cursor` are still to be sent,
/// except those the client says it has (`known`).
#[derive(Debug, Default)]
struct FullSync {
    cursor: Option<Arc<str>>,
    known: BTreeMap<String, String>,
    /// A client that has nothing is sent the store's shared snapshot, chunk by
    /// chunk (the next one's index).
    snapshot: Option<(Arc<Snapshot>, usize)>,
}

impl Session {
    /// A session that has received nothing yet.
    pub fn new() -> Self {
        Self {
            types: [None, None],
            next_nonce: 0,
            last_served: 1,
        }
    }

    fn index(kind: ResourceType) -> usize {
        match kind {
            ResourceType::Address => 0,
            ResourceType::Authorization => 1,
        }
    }

    /// The store revision of the last response of `kind` the client accepted
    /// (ACKed); a NACK leaves it where it was.
    pub fn acked_revision(&self, kind: ResourceType) -> Option<u64> {
        self.types[Self::index(kind)]
            .as_ref()
            .and_then(|state| state.acked_revision)
    }

    /// Applies a request from the client. An error ends the stream with that
    /// status (unknown type URL).
    pub fn handle_request(
        &mut self,
        request: &DeltaDiscoveryRequest,
        store: &Store,
    ) -> Result<Outcome, Status> {
        self.handle(request, &store.read())
    }

    /// The next response, split at about `max_bytes`, or `None` when the client
    /// is up to date.
    pub fn poll_response(
        &mut self,
        store: &Store,
        max_bytes: usize,
    ) -> Result<Option<EncodedResponse>, FellBehind> {
        self.next_response(&store.read(), max_bytes)
    }

    /// Applies a request from the client.
    pub(crate) fn handle(
        &mut self,
        request: &DeltaDiscoveryRequest,
        store: &State,
    ) -> Result<Outcome, Status> {
        let kind: ResourceType = request.type_url.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "unknown type URL {:?}: this server serves {} and {}",
                request.type_url,
                mesh_api::type_url::ADDRESS,
                mesh_api::type_url::AUTHORIZATION
            ))
        })?;
        let slot = &mut self.types[Self::index(kind)];

        // (A nonce for a type not yet subscribed on this stream is from an
        // earlier stream: the request is read as a first request.)
        if !request.response_nonce.is_empty()
            && let Some(state) = slot.as_mut()
        {
            let outcome = state.answer(request);
            let subscribes = !request.resource_names_subscribe.is_empty()
                || !request.resource_names_unsubscribe.is_empty();
            if subscribes {
                state.subscribe(request, store);
            }
            return Ok(outcome);
        }

        match slot {
            Some(state) => state.subscribe(request, store),
            None => {
                // The first request for this type: empty subscriptions mean wildcard.
                let mut state = TypeState {
                    kind,
                    wildcard: request.resource_names_subscribe.is_empty(),
                    names: BTreeSet::new(),
                    full_sync: None,
                    synced_revision: store.revision,
                    pending: BTreeSet::new(),
                    sent: HashMap::new(),
                    names_dirty: false,
                    in_flight: VecDeque::new(),
                    acked_revision: None,
                    answer_owed: true,
                };
                state.subscribe(request, store);
                if state.wildcard {
                    state.full_sync = Some(FullSync {
                        cursor: None,
                        known: request.initial_resource_versions.clone(),
                        snapshot: None,
                    });
                } else {
                    state.remember_initial(&request.initial_resource_versions, store);
                }
                *slot = Some(state);
            }
        }
        Ok(Outcome::Subscribed)
    }

    /// The next response, at most about `max_bytes` (a single larger resource is
    /// still sent), or `None` when the client is up to date.
    pub(crate) fn next_response(
        &mut self,
        store: &State,
        max_bytes: usize,
    ) -> Result<Option<EncodedResponse>, FellBehind> {
        for turn in 1..=self.types.len() {
            let index = (self.last_served + turn) % self.types.len();
            let Some(state) = self.types[index].as_mut() else {
                continue;
            };
            let Some(body) = state.build(store, max_bytes)? else {
                continue;
            };
            self.last_served = index;
            self.next_nonce += 1;
            let nonce = self.next_nonce.to_string();
            // A client that never answers must not grow this without bound: an
            // answer to a forgotten nonce is then merely stale.
            if state.in_flight.len() >= MAX_IN_FLIGHT {
                state.in_flight.pop_front();
            }
            state.in_flight.push_back((nonce.clone(), store.revision));
            let (resources, removed) = body.into_resources();
            let head = DeltaDiscoveryResponse {
                system_version_info: store.revision.to_string(),
                type_url: state.kind.type_url().to_owned(),
                nonce,
                removed_resources: removed,
                resources: Vec::new(),
            }
            .encode_to_vec();
            return Ok(Some(EncodedResponse { head, resources }));
        }
        Ok(None)
    }
}

/// A response being assembled.
#[derive(Default)]
struct Body {
    resources: Vec<Bytes>,
    /// Framed resources not yet in `resources`.
    small: BytesMut,
    removed: Vec<String>,
    bytes: usize,
}

impl Body {
    fn full(&self, max_bytes: usize) -> bool {
        self.bytes >= max_bytes
    }

    fn add(&mut self, table: &Table, name: &str, entry: &Entry) {
        let before = self.small.len();
        table.frame(name, entry, &mut self.small);
        self.bytes += self.small.len() - before;
    }

    fn add_bytes(&mut self, framed: Bytes) {
        self.bytes += framed.len();
        if !self.small.is_empty() {
            self.resources.push(self.small.split().freeze());
        }
        self.resources.push(framed);
    }

    /// The framed resources, in order.
    fn into_resources(mut self) -> (Vec<Bytes>, Vec<String>) {
        if !self.small.is_empty() {
            self.resources.push(self.small.split().freeze());
        }
        (self.resources, self.removed)
    }

    fn remove(&mut self, name: &str) {
        self.bytes += name.len() + 2;
        self.removed.push(name.to_owned());
    }

    fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.small.is_empty() && self.removed.is_empty()
    }
}

impl TypeState {
    /// An ACK or NACK.
    fn answer(&mut self, request: &DeltaDiscoveryRequest) -> Outcome {
        let Some(position) = self
            .in_flight
            .iter()
            .position(|(nonce, _)| *nonce == request.response_nonce)
        else {
            return Outcome::Stale;
        };
        // Responses are answered in order; earlier unanswered ones are superseded.
        let (_, revision) = self
            .in_flight
            .drain(..=position)
            .next_back()
            .unwrap_or_default();
        match &request.error_detail {
            Some(error) => Outcome::Nack {
                kind: self.kind,
                nonce: request.response_nonce.clone(),
                error: error.message.clone(),
            },
            None => {
                self.acked_revision = Some(revision);
                Outcome::Ack {
                    kind: self.kind,
                    revision,
                }
            }
        }
    }

    fn subscribe(&mut self, request: &DeltaDiscoveryRequest, store: &State) {
        for name in &request.resource_names_subscribe {
            if name == WILDCARD {
                if !self.wildcard {
                    self.wildcard = true;
                    self.full_sync = Some(FullSync::default());
                    self.pending.clear();
                    self.synced_revision = store.revision;
                }
            } else if self.names.insert(name.clone()) {
                self.names_dirty = true;
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
                self.full_sync = None;
                self.pending.clear();
            } else {
                self.names.remove(name);
                self.sent.remove(name);
            }
        }
    }

    /// On-demand reconnect: what the client says it has.
    /// On-demand reconnect: the resources the client kept stay subscribed; those
    /// it has at the current version are not sent again, those gone are removed.
    fn remember_initial(&mut self, initial: &BTreeMap<String, String>, store: &State) {
        let table = store.table(self.kind);
        for (name, version) in initial {
            self.names.insert(name.clone());
            if let Some((_, entry)) = table.lookup(name)
                && entry.has_version(version)
            {
                self.sent.insert(name.clone(), Some(entry.hash));
            }
        }
        self.names_dirty = true;
    }

    fn build(&mut self, store: &State, max_bytes: usize) -> Result<Option<Body>, FellBehind> {
        let table = store.table(self.kind);
        let mut body = Body::default();

        // Take in what changed since the last look.
        if self.synced_revision < store.revision {
            let changes = store
                .changes_since(self.synced_revision)
                .ok_or(FellBehind)?;
            let mut names_touched = false;
            for change in changes.filter(|change| change.kind == self.kind) {
                if self.wildcard {
                    self.pending.insert(change.name.clone());
                }
                names_touched = true;
            }
            if names_touched && !self.names.is_empty() {
                self.names_dirty = true;
            }
            self.synced_revision = store.revision;
        }

        let mut snapshot_done = false;
        if let Some(sync) = &mut self.full_sync
            && sync.known.is_empty()
            && sync.cursor.is_none()
        {
            let (snapshot, next) = match &mut sync.snapshot {
                Some(taken) => taken,
                None => {
                    let snapshot = store.snapshot(self.kind, max_bytes);
                    // The snapshot is of the revision just caught up with, so it
                    // holds every pending change; later ones are added to `pending`
                    // as the chunks go out, and sent after.
                    debug_assert_eq!(snapshot.revision, self.synced_revision);
                    self.pending.clear();
                    sync.snapshot.insert((snapshot, 0))
                }
            };
            if let Some(chunk) = snapshot.chunks.get(*next) {
                body.add_bytes(chunk.clone());
                *next += 1;
            }
            snapshot_done = *next >= snapshot.chunks.len();
        } else if let Some(sync) = &mut self.full_sync {
            let mut last = None;
            for (name, entry) in table.after(sync.cursor.as_deref()) {
                last = Some(name.clone());
                if !sync.known.is_empty()
                    && sync
                        .known
                        .remove(name.as_ref())
                        .is_some_and(|version| entry.has_version(&version))
                {
                    continue;
                }
                body.add(table, name, entry);
                if body.full(max_bytes) {
                    break;
                }
            }
            match last {
                Some(name) if body.full(max_bytes) => sync.cursor = Some(name),
                _ => {
                    // The pass is over: what the client has and the store does
                    // not is gone.
                    let gone = std::mem::take(&mut sync.known).into_keys();
                    for name in gone {
                        body.remove(&name);
                    }
                    self.full_sync = None;
                }
            }
        }

        let in_full_sync = self.full_sync.is_some() || snapshot_done || !body.is_empty();
        if snapshot_done {
            self.full_sync = None;
        }

        // Changes are sent once a full pass is over (the pass sends current
        // versions anyway), and never in the response that ends it: a snapshot
        // may hold a resource that a pending change removes, and one response
        // must not both send and remove a name.
        while !in_full_sync && !body.full(max_bytes) {
            let Some(name) = self.pending.pop_first() else {
                break;
            };
            match table.get(&name) {
                Some(entry) => body.add(table, &name, entry),
                None => body.remove(&name),
            }
        }

        if self.names_dirty && !body.full(max_bytes) {
            self.names_dirty = false;
            for name in &self.names {
                let now = table.lookup(name);
                let before = self.sent.get(name).copied();
                match (now, before) {
                    (Some((_, entry)), Some(Some(hash))) if hash == entry.hash => {}
                    (Some((resource, entry)), _) => {
                        if !self.wildcard {
                            body.add(table, resource, entry);
                        }
                        self.sent.insert(name.clone(), Some(entry.hash));
                    }
                    (None, Some(None)) => {}
                    (None, _) => {
                        if !self.wildcard || before.is_none() {
                            body.remove(name);
                        }
                        self.sent.insert(name.clone(), None);
                    }
                }
            }
        }

        if body.is_empty() && !std::mem::take(&mut self.answer_owed) {
            return Ok(None);
        }
        self.answer_owed = false;
        Ok(Some(body))
    }
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use mesh_api::rpc::Status as RpcStatus;

    use super::*;
    use crate::{MeshConfig, parse_manifest};

    fn store() -> Store {
        let store = Store::new(MeshConfig::default());
        let manifest = parse_manifest(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: default}
spec: {}
",
        )
        .expect("YAML");
        for object in manifest.objects {
            store.apply(object).expect("valid");
        }
        store
    }

    fn answer(nonce: &str, error: Option<&str>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: mesh_api::type_url::AUTHORIZATION.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|message| RpcStatus {
                code: 3,
                message: message.into(),
                details: Vec::new(),
            }),
            ..DeltaDiscoveryRequest::default()
        }
    }

    fn nonce(response: &EncodedResponse) -> String {
        DeltaDiscoveryResponse::decode(response.to_bytes().as_slice())
            .expect("decodes")
            .nonce
    }

    fn decode(response: &EncodedResponse) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse::decode(response.to_bytes().as_slice()).expect("decodes")
    }

    fn apply_yaml(store: &Store, yaml: &str) {
        for object in parse_manifest(yaml).expect("YAML").objects {
            store.apply(object).expect("valid");
        }
    }

    const POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: default, labels: {app: echo}}
spec: {containers: []}
status: {podIP: 10.0.0.1}
";

    #[test]
    fn an_on_demand_client_reconnecting_keeps_what_it_holds_subscribed() {
        let store = store();
        apply_yaml(&store, POD);
        let uid = "Kubernetes//Pod/default/echo";
        let on_demand = |initial: BTreeMap<String, String>| DeltaDiscoveryRequest {
            type_url: mesh_api::type_url::ADDRESS.into(),
            resource_names_subscribe: vec![WILDCARD.into()],
            resource_names_unsubscribe: vec![WILDCARD.into()],
            initial_resource_versions: initial,
            ..DeltaDiscoveryRequest::default()
        };

        // First stream: look the pod up by IP.
        let mut first = Session::new();
        first
            .handle_request(&on_demand(BTreeMap::new()), &store)
            .expect("ok");
        let empty = decode(
            &first
                .poll_response(&store, 1 << 20)
                .expect("ok")
                .expect("answer"),
        );
        assert!(empty.resources.is_empty());
        let lookup = DeltaDiscoveryRequest {
            type_url: mesh_api::type_url::ADDRESS.into(),
            resource_names_subscribe: vec!["/10.0.0.1".into()],
            ..DeltaDiscoveryRequest::default()
        };
        first.handle_request(&lookup, &store).expect("ok");
        let found = decode(
            &first
                .poll_response(&store, 1 << 20)
                .expect("ok")
                .expect("answer"),
        );
        assert_eq!(found.resources[0].name, uid);
        let version = found.resources[0].version.clone();

        // Second stream: the client says what it holds; nothing is resent.
        let mut second = Session::new();
        second
            .handle_request(&on_demand([(uid.to_owned(), version)].into()), &store)
            .expect("ok");
        let answer = decode(
            &second
                .poll_response(&store, 1 << 20)
                .expect("ok")
                .expect("answer"),
        );
        assert!(answer.resources.is_empty() && answer.removed_resources.is_empty());
        assert!(second.poll_response(&store, 1 << 20).expect("ok").is_none());

        // What it holds stays subscribed: a change is pushed, a removal announced.
        apply_yaml(&store, &POD.replace("app: echo", "app: echo-v2"));
        let pushed = decode(
            &second
                .poll_response(&store, 1 << 20)
                .expect("ok")
                .expect("push"),
        );
        assert_eq!(pushed.resources[0].name, uid);
        store.delete(&crate::ObjectKey::new(crate::Kind::Pod, "default", "echo"));
        let removed = decode(
            &second
                .poll_response(&store, 1 << 20)
                .expect("ok")
                .expect("removal"),
        );
        assert_eq!(removed.removed_resources, vec![uid.to_owned()]);
    }

    #[test]
    fn a_client_that_never_answers_does_not_grow_the_session() {
        let store = store();
        let mut session = Session::new();
        let subscribe = DeltaDiscoveryRequest {
            type_url: mesh_api::type_url::AUTHORIZATION.into(),
            ..DeltaDiscoveryRequest::default()
        };
        session.handle_request(&subscribe, &store).expect("ok");
        let mut nonces = Vec::new();
        for index in 0..(MAX_IN_FLIGHT + 10) {
            let yaml = format!(
                "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p{index}, namespace: default}}
spec: {{}}
"
            );
            for object in parse_manifest(&yaml).expect("YAML").objects {
                store.apply(object).expect("valid");
            }
            while let Some(response) = session.poll_response(&store, 1 << 20).expect("ok") {
                nonces.push(nonce(&response));
            }
        }
        let in_flight = session.types[Session::index(ResourceType::Authorization)]
            .as_ref()
            .expect("subscribed")
            .in_flight
            .len();
        assert_eq!(in_flight, MAX_IN_FLIGHT);
        let oldest = session
            .handle_request(&answer(&nonces[0], None), &store)
            .expect("ok");
        assert_eq!(oldest, Outcome::Stale, "forgotten");
        let newest = session
            .handle_request(&answer(nonces.last().expect("some"), None), &store)
            .expect("ok");
        assert!(matches!(newest, Outcome::Ack { .. }));
    }

    #[test]
    fn a_nack_is_reported_and_not_recorded_as_accepted() {
        let store = store();
        let mut session = Session::new();
        let subscribe = DeltaDiscoveryRequest {
            type_url: mesh_api::type_url::AUTHORIZATION.into(),
            ..DeltaDiscoveryRequest::default()
        };
        assert_eq!(
            session.handle_request(&subscribe, &store).expect("ok"),
            Outcome::Subscribed
        );
        let first = session
            .poll_response(&store, 1 << 20)
            .expect("ok")
            .expect("a response");
        let outcome = session
            .handle_request(&answer(&nonce(&first), Some("cannot parse")), &store)
            .expect("ok");
        assert_eq!(
            outcome,
            Outcome::Nack {
                kind: ResourceType::Authorization,
                nonce: nonce(&first),
                error: "cannot parse".into(),
            }
        );
        assert_eq!(session.acked_revision(ResourceType::Authorization), None);

        // The next version is accepted.
        let manifest = parse_manifest(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: default}
spec: {rules: [{}]}
",
        )
        .expect("YAML");
        for object in manifest.objects {
            store.apply(object).expect("valid");
        }
        let second = session
            .poll_response(&store, 1 << 20)
            .expect("ok")
            .expect("a response");
        let outcome = session
            .handle_request(&answer(&nonce(&second), None), &store)
            .expect("ok");
        let revision = store.stats().revision;
        assert_eq!(
            outcome,
            Outcome::Ack {
                kind: ResourceType::Authorization,
                revision
            }
        );
        assert_eq!(
            session.acked_revision(ResourceType::Authorization),
            Some(revision)
        );
        assert_eq!(
            session
                .handle_request(&answer("no-such-nonce", None), &store)
                .expect("ok"),
            Outcome::Stale
        );
    }
}
