//! Workload certificates: fetched from a [`CertificateSource`] (the CA,
//! through `mesh_ca::CaClient`; certificates held in memory,
//! [`StaticCertificates`]; or the embedder's own) on first use, one renewal
//! task per identity (renewed at half-life, the old certificate kept until it
//! expires, as `mesh_ca::Renewal` does), shared by every connection of that
//! identity.
//!
//! Concurrent requests for one identity share one fetch; different identities
//! are fetched in parallel. A node agent serving several workloads fetches them
//! by impersonation.
//!
//! Who uses an identity holds a [`CertLease`] on it (a proxy instance leases
//! its served workload's identity while it runs): when the last lease of an
//! identity ends, its renewal stops and its certificate is dropped, so a node
//! agent whose pods come and go keeps only the certificates of the workloads
//! it still serves.
//!
//! The manager is a handle of the shape of [`mesh_net::lifecycle`]:
//! [`CertManager::shutdown`] and [`CertManager::drain`] stop every renewal,
//! [`CertManager::join`] waits for them to end.
//!
//! ```no_run
//! # fn example(ca: mesh_ca::CaClient) -> Result<(), ztunnel_core::certs::BuildError> {
//! use mesh_ca::RenewalConfig;
//! use ztunnel_core::CertManager;
//!
//! let certs = CertManager::builder()
//!     .client(ca)
//!     .impersonate(true) // a node agent, on behalf of its workloads
//!     .renewal(RenewalConfig::default())
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! Any other source is given with [`CertManagerBuilder::source`]:
//!
//! ```
//! # fn example(certificate: mesh_ca::WorkloadCertificate) -> Result<(), ztunnel_core::certs::BuildError> {
//! use ztunnel_core::{CertManager, StaticCertificates};
//!
//! let certs = CertManager::builder()
//!     .source(StaticCertificates::new().with(certificate))
//!     .build()?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_api::Identity;
use mesh_ca::{CaClient, Renewal, RenewalConfig, WorkloadCertificate};
use mesh_net::Drained;
use tokio_util::sync::CancellationToken;

pub use mesh_ca::source::{
    CertificateRequest, CertificateSource, Fetch, SourceError, StaticCertificates, StaticError,
};

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
    /// The manager was shut down or drained: it fetches nothing more.
    #[error("no certificate for {0}: the certificate manager has stopped")]
    Stopped(Identity),
}

/// Why a manager could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No certificate source was given.
    #[error("no certificate source: call CertManager::builder().client(..) or .source(..)")]
    NoSource,
}

/// A certificate manager's plain data, as configuration
/// ([`mesh_net::config`]): what [`CertManagerBuilder`] takes besides its
/// certificate source, which stays builder-only. Every field is optional;
/// [`Default`] gives the builder's defaults. In YAML:
///
/// ```yaml
/// impersonate: false
/// renewal: {ttl: null, initialBackoff: 1s, maxBackoff: 150s}  # ttl null: the CA's default
/// ```
///
/// ```
/// use std::time::Duration;
/// use ztunnel_core::CertManagerConfig;
///
/// let config: CertManagerConfig = mesh_net::config::from_yaml(
///     "impersonate: true\nrenewal: {ttl: 24h}\n",
///     "certificates.yaml",
/// )?;
/// assert!(config.impersonate);
/// assert_eq!(config.renewal.ttl, Some(Duration::from_secs(86400)));
/// # Ok::<(), mesh_net::config::ConfigError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
#[non_exhaustive]
pub struct CertManagerConfig {
    /// `impersonate`: ask for certificates on behalf of workloads (a node
    /// agent, whose credentials are its own) rather than as the caller itself
    /// (default `false`).
    pub impersonate: bool,
    /// `renewal`: validity asked for and retry backoff, a
    /// [`RenewalConfig`] (default: `ttl: null`, the CA's default;
    /// `initialBackoff: 1s`; `maxBackoff: 150s`).
    pub renewal: RenewalConfig,
}

impl From<CertManagerConfig> for CertManagerBuilder {
    fn from(config: CertManagerConfig) -> Self {
        Self::default().config(config)
    }
}

/// A builder of [`CertManager`].
#[derive(Debug, Default)]
pub struct CertManagerBuilder {
    source: Option<Arc<dyn CertificateSource>>,
    impersonate: bool,
    renewal: RenewalConfig,
}

impl CertManagerBuilder {
    /// Takes every field of `config` (each replaces what was set before):
    /// call it first, then the source and any overrides, e.g.
    /// `CertManager::builder().config(config).client(ca)`.
    pub fn config(mut self, config: CertManagerConfig) -> Self {
        let CertManagerConfig {
            impersonate,
            renewal,
        } = config;
        self.impersonate = impersonate;
        self.renewal = renewal;
        self
    }

    /// The CA to fetch from (`mesh-ca`, or istiod): the source (required:
    /// this or [`CertManagerBuilder::source`]).
    pub fn client(self, client: CaClient) -> Self {
        self.source(client)
    }

    /// Where certificates come from (required: this or
    /// [`CertManagerBuilder::client`]): any [`CertificateSource`], such as
    /// [`StaticCertificates`].
    pub fn source(mut self, source: impl CertificateSource) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Ask for certificates on behalf of workloads (a node agent, whose
    /// credentials are its own) rather than as the caller itself (default:
    /// `false`): [`CertificateRequest::impersonate`].
    pub fn impersonate(mut self, impersonate: bool) -> Self {
        self.impersonate = impersonate;
        self
    }

    /// How certificates are renewed: validity asked for, retry backoff
    /// (default: [`RenewalConfig::default`]).
    pub fn renewal(mut self, config: RenewalConfig) -> Self {
        self.renewal = config;
        self
    }

    /// Checks and assembles; fetches nothing and spawns nothing (renewals
    /// start on first use, on the runtime of that use).
    pub fn build(self) -> Result<CertManager, BuildError> {
        Ok(CertManager {
            inner: Arc::new(Inner {
                source: self.source.ok_or(BuildError::NoSource)?,
                impersonate: self.impersonate,
                config: self.renewal,
                shutdown: CancellationToken::new(),
                renewals: Mutex::new(HashMap::new()),
                stopped: Mutex::new(Vec::new()),
                stopping: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

/// Certificates by identity. Cheap to clone: clones share the certificates
/// and the renewals.
#[derive(Clone, Debug)]
pub struct CertManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    source: Arc<dyn CertificateSource>,
    impersonate: bool,
    config: RenewalConfig,
    /// Stops every renewal, and any new one.
    shutdown: CancellationToken,
    renewals: Mutex<HashMap<Identity, Entry>>,
    /// Renewals stopped by `shutdown`, for `join` and `drain` to wait for.
    stopped: Mutex<Vec<Renewal>>,
    /// Held while the renewals are being stopped, so every `join` returns
    /// only once they all ended.
    stopping: tokio::sync::Mutex<()>,
}

/// One identity's renewal and how many leases hold it.
#[derive(Debug)]
struct Entry {
    renewal: Renewal,
    leases: usize,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.renewals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `identity`'s entry, started if there is none; `None` once stopped.
    /// Runs `with` on it under the lock.
    fn entry<T>(&self, identity: &Identity, with: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let mut renewals = self.lock();
        // Checked under the lock: `shutdown` cancels, then empties the map
        // under it, so no renewal starts after it.
        if self.shutdown.is_cancelled() {
            return None;
        }
        let entry = renewals.entry(identity.clone()).or_insert_with(|| Entry {
            renewal: Renewal::spawn(
                self.source.clone(),
                identity.clone(),
                self.impersonate,
                self.config,
                &self.shutdown,
            ),
            leases: 0,
        });
        Some(with(entry))
    }
}

impl CertManager {
    /// A builder.
    pub fn builder() -> CertManagerBuilder {
        CertManagerBuilder::default()
    }

    /// Starts fetching `identity`'s certificate if nobody has yet (e.g. when a
    /// workload appears, before its first connection). Nothing once stopped.
    pub fn prefetch(&self, identity: &Identity) {
        self.inner.entry(identity, |_| ());
    }

    /// The current certificate of `identity`, waiting up to `wait` for the first.
    pub async fn certificate(
        &self,
        identity: &Identity,
        wait: Duration,
    ) -> Result<Arc<WorkloadCertificate>, CertError> {
        let Some(mut current) = self
            .inner
            .entry(identity, |entry| entry.renewal.subscribe())
        else {
            return Err(CertError::Stopped(identity.clone()));
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

    /// Keeps `identity`'s certificate fetched and renewed while the lease
    /// lives. When the last lease of an identity ends, its renewal stops and
    /// its certificate is dropped (however it was first fetched: through
    /// [`CertManager::certificate`] and [`CertManager::prefetch`] too).
    /// Identities never leased are kept until [`CertManager::forget`].
    pub fn lease(&self, identity: &Identity) -> Result<CertLease, CertError> {
        self.inner
            .entry(identity, |entry| entry.leases += 1)
            .ok_or_else(|| CertError::Stopped(identity.clone()))?;
        Ok(CertLease {
            manager: self.clone(),
            identity: identity.clone(),
        })
    }

    /// Stops renewing `identity` now and drops its certificate, unless a
    /// lease holds it (an instance still serves it: its lease ends that);
    /// whether it was dropped. A later use fetches it again.
    pub fn forget(&self, identity: &Identity) -> bool {
        let mut entries = self.inner.lock();
        if entries.get(identity).is_some_and(|entry| entry.leases > 0) {
            return false;
        }
        entries.remove(identity).is_some()
    }

    /// The identities kept fresh.
    pub fn identities(&self) -> Vec<Identity> {
        let mut identities: Vec<Identity> = self.inner.lock().keys().cloned().collect();
        identities.sort();
        identities
    }

    /// Stops every renewal and refuses new ones ([`CertError::Stopped`]); a
    /// renewal in the middle of a fetch ends when the fetch does. Idempotent;
    /// returns at once.
    pub fn shutdown(&self) {
        // Cancelled before the map is emptied, under its lock: no renewal
        // starts after (see `Inner::entry`).
        self.inner.shutdown.cancel();
        let renewals = std::mem::take(&mut *self.inner.lock());
        self.inner
            .stopped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(renewals.into_values().map(|entry| entry.renewal));
    }

    /// Stops as [`CertManager::shutdown`], then waits up to `deadline` for
    /// the renewals to end: [`Drained::TimedOut`] counts those still in the
    /// middle of a fetch at the deadline (left to end when their fetch does,
    /// with nothing published).
    pub async fn drain(&self, deadline: Duration) -> Drained {
        self.shutdown();
        let deadline = tokio::time::Instant::now() + deadline;
        self.stop_renewals(Some(deadline)).await
    }

    /// Waits until the manager has been stopped (by [`CertManager::shutdown`]
    /// or [`CertManager::drain`], through any clone) and its renewals ended.
    /// Never stops it. Nothing is fatal to a manager (failed fetches are
    /// retried), so this never fails.
    pub async fn join(self) {
        self.inner.shutdown.cancelled().await;
        let _ = self.stop_renewals(None).await;
    }

    /// Takes every renewal out and waits for each to end, until `deadline`
    /// if any; how that went.
    async fn stop_renewals(&self, deadline: Option<tokio::time::Instant>) -> Drained {
        let _stopping = self.inner.stopping.lock().await;
        let renewals = std::mem::take(
            &mut *self
                .inner
                .stopped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut left = 0;
        for renewal in renewals {
            match deadline {
                // Polled once even past the deadline: one already ended counts.
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, renewal.stop())
                        .await
                        .is_err()
                    {
                        left += 1;
                    }
                }
                None => renewal.stop().await,
            }
        }
        if left == 0 {
            Drained::Complete
        } else {
            Drained::TimedOut { left }
        }
    }
}

/// A claim on one identity's certificate: see [`CertManager::lease`].
#[derive(Debug)]
pub struct CertLease {
    manager: CertManager,
    identity: Identity,
}

impl CertLease {
    /// The leased identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Its current certificate, waiting up to `wait` for the first.
    pub async fn certificate(&self, wait: Duration) -> Result<Arc<WorkloadCertificate>, CertError> {
        self.manager.certificate(&self.identity, wait).await
    }
}

impl Drop for CertLease {
    fn drop(&mut self) {
        let mut renewals = self.manager.inner.lock();
        if let Some(entry) = renewals.get_mut(&self.identity) {
            entry.leases = entry.leases.saturating_sub(1);
            if entry.leases == 0 {
                // Dropping the renewal stops it.
                renewals.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builders compare by what they hold (no `PartialEq`: the source is a
    /// trait object).
    fn holds(builder: &CertManagerBuilder) -> String {
        format!("{builder:?}")
    }

    #[test]
    fn the_default_config_is_the_builders_default() {
        assert_eq!(
            holds(&CertManagerBuilder::from(CertManagerConfig::default())),
            holds(&CertManager::builder())
        );
    }

    #[test]
    fn config_applies_every_field_as_its_setter_does() {
        let renewal = RenewalConfig {
            ttl: Some(Duration::from_secs(3600)),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(20),
        };
        let config = CertManagerConfig {
            impersonate: true,
            renewal,
        };
        let by_setters = CertManager::builder().impersonate(true).renewal(renewal);
        assert_eq!(holds(&CertManagerBuilder::from(config)), holds(&by_setters));
        let default = CertManagerConfig::default();
        assert_ne!(config.impersonate, default.impersonate);
        assert_ne!(config.renewal, default.renewal);
    }
}
