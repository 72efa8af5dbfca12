//! Who may open an xDS stream, and the store's answer to the CA's impersonation
//! question.
//!
//! Clients authenticate the way they do with the CA, with `mesh-net`'s
//! [`Authenticators`](mesh_net::Authenticators): a mesh client certificate
//! ([`mesh_net::ClientCertificate`]), a bearer token
//! ([`mesh_net::StaticTokens`], [`mesh_net::JwtAuthenticator`]).
//! Unauthenticated streams are refused unless [`Authenticators::anonymous`](mesh_net::Authenticators::anonymous)
//! was chosen (plaintext local testing).

use mesh_api::Identity;
use mesh_net::auth::{Authenticated, BoxFuture, NodeAuthorizer};

use crate::store::Store;

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
