//! Who may open an xDS stream, and the store's answer to the CA's impersonation
//! question.
//!
//! Clients authenticate the way they do with the CA (`mesh-ca`'s
//! [`Authenticator`]s): a mesh client certificate ([`mesh_ca::ClientCertificate`]),
//! a bearer token ([`mesh_ca::StaticTokens`], [`mesh_ca::JwtAuthenticator`]).
//! Unauthenticated streams are refused unless [`ClientAuth::anonymous`] was
//! chosen (plaintext local testing).

use std::sync::Arc;

use mesh_api::Identity;
use mesh_ca::auth::{BoxFuture, Caller, RefusalLog};
use mesh_ca::{Authenticated, Authenticator, NodeAuthorizer};
use tonic::Status;

use crate::store::Store;

/// How xDS clients are authenticated.
#[derive(Clone)]
pub struct ClientAuth {
    authenticators: Vec<Arc<dyn Authenticator>>,
    anonymous: bool,
    refusals: Arc<RefusalLog>,
}

impl Default for ClientAuth {
    fn default() -> Self {
        Self {
            authenticators: Vec::new(),
            anonymous: false,
            refusals: Arc::new(RefusalLog::new("xDS")),
        }
    }
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field(
                "authenticators",
                &mesh_ca::auth::names(&self.authenticators),
            )
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

impl ClientAuth {
    /// No authenticator yet: every stream is refused until one is added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Streams need no credentials (plaintext local testing only).
    pub fn anonymous() -> Self {
        Self {
            anonymous: true,
            ..Self::default()
        }
    }

    /// Adds an authenticator; they are tried in order.
    pub fn with(mut self, authenticator: impl Authenticator) -> Self {
        self.authenticators.push(Arc::new(authenticator));
        self
    }

    /// Whether this accepts anything at all.
    pub(crate) fn is_configured(&self) -> bool {
        self.anonymous || !self.authenticators.is_empty()
    }

    /// The caller, or `None` for an anonymous stream; `Unauthenticated` when
    /// the credentials are missing or refused.
    pub(crate) async fn authenticate(
        &self,
        caller: &Caller<'_>,
    ) -> Result<Option<Authenticated>, Status> {
        match mesh_ca::auth::authenticate(&self.authenticators, caller).await {
            Ok(Some(authenticated)) => Ok(Some(authenticated)),
            Ok(None) if self.anonymous => Ok(None),
            Ok(None) => Err(self.refusals.refuse(caller, &[])),
            Err(refusals) => Err(self.refusals.refuse(caller, &refusals)),
        }
    }
}

/// Answers `mesh-ca`'s impersonation question from the store: a node agent may
/// obtain a certificate for an identity only if a workload with that identity
/// runs on the node the agent's credentials name.
#[derive(Clone, Debug)]
pub struct StoreNodeAuthorizer {
    store: Store,
}

impl StoreNodeAuthorizer {
    /// An authorizer over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl NodeAuthorizer for StoreNodeAuthorizer {
    fn authorize<'a>(
        &'a self,
        node_agent: &'a Authenticated,
        workload: &'a Identity,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let Some(node) = node_agent.node.as_deref() else {
                return Err("the node agent's credentials name no node".to_owned());
            };
            if self.store.has_identity_on_node(node, workload) {
                Ok(())
            } else {
                Err(format!(
                    "no workload with identity {workload} runs on node {node}"
                ))
            }
        })
    }
}
