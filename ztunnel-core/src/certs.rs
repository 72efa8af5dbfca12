//! Workload certificates: fetched from the CA on first use, one renewal task per
//! identity (renewed at half-life, the old certificate kept until it expires:
//! `mesh_ca::Renewal`), shared by every connection of that identity.
//!
//! Concurrent requests for one identity share one fetch; different identities
//! are fetched in parallel. A node agent serving several workloads fetches them
//! by impersonation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_api::Identity;
use mesh_ca::{CaClient, Renewal, RenewalConfig, WorkloadCertificate};
use tokio_util::sync::CancellationToken;

/// Why a certificate is not available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// None arrived in time (the CA refused, or is unreachable; the renewal
    /// task keeps trying and logs why).
    #[error("no certificate for {identity} within {waited:?}")]
    Unavailable {
        /// The identity asked for.
        identity: Identity,
        /// How long the caller waited.
        waited: Duration,
    },
}

/// Certificates by identity.
#[derive(Debug)]
pub struct CertManager {
    client: CaClient,
    impersonate: bool,
    config: RenewalConfig,
    shutdown: CancellationToken,
    renewals: Mutex<HashMap<Identity, Renewal>>,
}

impl CertManager {
    /// A manager fetching through `client`; with `impersonate`, certificates
    /// are asked for on behalf of workloads (a node agent). Renewals stop when
    /// `shutdown` is cancelled.
    pub fn new(
        client: CaClient,
        impersonate: bool,
        config: RenewalConfig,
        shutdown: &CancellationToken,
    ) -> Self {
        Self {
            client,
            impersonate,
            config,
            shutdown: shutdown.child_token(),
            renewals: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Renewal>> {
        self.renewals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts fetching `identity`'s certificate if nobody has yet (e.g. when a
    /// workload appears, before its first connection).
    pub fn prefetch(&self, identity: &Identity) {
        self.lock().entry(identity.clone()).or_insert_with(|| {
            Renewal::spawn(
                self.client.clone(),
                identity.clone(),
                self.impersonate,
                self.config,
                &self.shutdown,
            )
        });
    }

    /// The current certificate of `identity`, waiting up to `wait` for the first.
    pub async fn certificate(
        &self,
        identity: &Identity,
        wait: Duration,
    ) -> Result<Arc<WorkloadCertificate>, CertError> {
        self.prefetch(identity);
        let mut current = match self.lock().get(identity) {
            Some(renewal) => renewal.subscribe(),
            None => {
                return Err(CertError::Unavailable {
                    identity: identity.clone(),
                    waited: Duration::ZERO,
                });
            }
        };
        let unavailable = || CertError::Unavailable {
            identity: identity.clone(),
            waited: wait,
        };
        let arrived = tokio::time::timeout(wait, current.wait_for(Option::is_some))
            .await
            .map_err(|_| unavailable())?
            .map_err(|_| unavailable())?;
        arrived.clone().ok_or_else(unavailable)
    }

    /// Stops renewing `identity` (its workloads are gone); whether it was kept.
    pub fn forget(&self, identity: &Identity) -> bool {
        self.lock().remove(identity).is_some()
    }

    /// The identities kept fresh.
    pub fn identities(&self) -> Vec<Identity> {
        let mut identities: Vec<Identity> = self.lock().keys().cloned().collect();
        identities.sort();
        identities
    }
}
