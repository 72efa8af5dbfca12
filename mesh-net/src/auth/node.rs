//! A fixed table of which workloads run on which node, answering the
//! impersonation question without a store.

use std::collections::{HashMap, HashSet};

use mesh_api::Identity;

use super::{Authenticated, BoxFuture, NodeAuthorizer};

/// A fixed table of which workload identities run on which node, for the
/// reference cluster and tests. A node agent authenticated with a node name may
/// impersonate the identities listed for that node.
#[derive(Clone, Debug, Default)]
pub struct StaticNodeAuthorizer {
    by_node: HashMap<String, HashSet<Identity>>,
}

impl StaticNodeAuthorizer {
    /// An empty table: every impersonation is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that a workload with `identity` runs on `node`.
    pub fn workload(mut self, node: impl Into<String>, identity: Identity) -> Self {
        self.by_node
            .entry(node.into())
            .or_default()
            .insert(identity);
        self
    }
}

impl NodeAuthorizer for StaticNodeAuthorizer {
    fn authorize<'a>(
        &'a self,
        node_agent: &'a Authenticated,
        workload: &'a Identity,
    ) -> BoxFuture<'a, Result<(), String>> {
        let result = match &node_agent.node {
            None => Err(format!("{} is not bound to a node", node_agent.identity)),
            Some(node)
                if self
                    .by_node
                    .get(node)
                    .is_some_and(|ids| ids.contains(workload)) =>
            {
                Ok(())
            }
            Some(node) => Err(format!(
                "no workload with identity {workload} runs on node {node:?}"
            )),
        };
        Box::pin(std::future::ready(result))
    }
}
