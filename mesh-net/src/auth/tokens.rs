//! Bearer tokens known in advance, mapped to callers (the reference
//! cluster's node tokens, tests).

use std::collections::HashMap;

use mesh_api::Identity;

use super::{Authenticated, Authenticator, BoxFuture, Caller};

/// Bearer tokens mapped to callers, e.g. for the reference cluster. Tokens are
/// kept only as SHA-256 digests.
#[derive(Clone, Debug, Default)]
pub struct StaticTokens {
    by_digest: HashMap<[u8; 32], Authenticated>,
}

fn digest(token: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl StaticTokens {
    /// No tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token for an identity.
    pub fn token(self, token: &str, identity: Identity) -> Self {
        self.caller(token, Authenticated::identity(identity))
    }

    /// Adds a token for a caller (identity and node, e.g. a node agent's).
    pub fn caller(mut self, token: &str, caller: Authenticated) -> Self {
        self.by_digest.insert(digest(token), caller);
        self
    }
}

impl Authenticator for StaticTokens {
    fn name(&self) -> &'static str {
        "bearer token"
    }

    fn authenticate<'a>(
        &'a self,
        caller: &'a Caller<'a>,
    ) -> BoxFuture<'a, Result<Option<Authenticated>, String>> {
        let result = match caller.bearer_token() {
            None => Ok(None),
            Some(token) => self
                .by_digest
                .get(&digest(token))
                .cloned()
                .map(Some)
                .ok_or_else(|| "the bearer token is not known".to_owned()),
        };
        Box::pin(std::future::ready(result))
    }
}
