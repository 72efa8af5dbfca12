//! Keeping a workload certificate fresh: fetch it, renew at half-life, and on
//! failure retry with exponential backoff and jitter (capped at 150 s, as Istio's
//! agents do; [`mesh_net::Backoff`])
//! while the old certificate stays in use until it expires.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_api::Identity;
use mesh_net::Backoff;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::WorkloadCertificate;
use crate::source::{CertificateRequest, CertificateSource, SourceError};

/// How a [`Renewal`] behaves. As configuration ([`mesh_net::config`]):
/// `ttl`, `initialBackoff`, `maxBackoff`, durations as text (`"24h"`), each
/// optional.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RenewalConfig {
    /// Validity to ask for (`None`: the CA's default).
    #[serde(with = "mesh_net::config::duration")]
    pub ttl: Option<Duration>,
    /// First retry delay after a failure.
    #[serde(with = "mesh_net::config::duration")]
    pub initial_backoff: Duration,
    /// Longest retry delay.
    #[serde(with = "mesh_net::config::duration")]
    pub max_backoff: Duration,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        Self {
            ttl: None,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(150),
        }
    }
}

/// A certificate kept fresh by a background task on the caller's runtime.
#[derive(Debug)]
pub struct Renewal {
    current: watch::Receiver<Option<Arc<WorkloadCertificate>>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Renewal {
    /// Starts fetching `identity`'s certificate from `source` (e.g. a
    /// [`crate::CaClient`]; impersonating it with `impersonate`) and renewing
    /// it, until `shutdown` is cancelled or the renewal is dropped.
    pub fn spawn(
        source: Arc<dyn CertificateSource>,
        identity: Identity,
        impersonate: bool,
        config: RenewalConfig,
        shutdown: &CancellationToken,
    ) -> Self {
        let (publish, current) = watch::channel(None);
        let shutdown = shutdown.child_token();
        let request = CertificateRequest {
            identity,
            impersonate,
            ttl: config.ttl,
        };
        let task = tokio::spawn(renew(source, request, config, publish, shutdown.clone()));
        Self {
            current,
            shutdown,
            task,
        }
    }

    /// The certificate in use: `None` before the first one, and after the last
    /// one expired without a successful renewal.
    pub fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        self.current.borrow().clone()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<WorkloadCertificate>>> {
        self.current.clone()
    }

    /// Stops renewing and waits for the task.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The shortest wait before asking the source again after a success.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

/// What a source answered, if it can be used for `request`: for the identity
/// asked (both the answer's `identity` and its leaf's SPIFFE URI: a source
/// is not trusted to name its certificates right) and not expired. Anything
/// else is a failed renewal, retried with backoff.
fn usable(
    request: &CertificateRequest,
    certificate: WorkloadCertificate,
) -> Result<WorkloadCertificate, SourceError> {
    let asked = &request.identity;
    if &certificate.identity != asked {
        return Err(format!(
            "the source answered for {}, not {asked}",
            certificate.identity
        )
        .into());
    }
    let leaf = certificate
        .chain
        .first()
        .ok_or("the source answered with an empty chain")?;
    let named = mesh_net::spiffe_identity(leaf)
        .map_err(|err| format!("the source's certificate for {asked}: {err}"))?;
    if &named != asked {
        return Err(format!("the source's certificate for {asked} names {named}").into());
    }
    if certificate.not_after <= SystemTime::now() {
        return Err(format!("the source's certificate for {asked} has expired").into());
    }
    Ok(certificate)
}

/// Time from now until `at` (zero if past).
fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now()).unwrap_or_default()
}

async fn renew(
    source: Arc<dyn CertificateSource>,
    request: CertificateRequest,
    config: RenewalConfig,
    publish: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(config.initial_backoff, config.max_backoff);
    let identity = &request.identity;
    loop {
        // A fetch under way is not cut short by a stop: it ends first (a
        // drain counts it as left).
        let fetched = source
            .fetch(&request)
            .await
            .and_then(|certificate| usable(&request, certificate));
        let delay = match fetched {
            Ok(certificate) => {
                backoff.reset();
                // At half-life, but never sooner than half of what is left
                // (a backdated short-lived certificate is past its half-life
                // on arrival), nor sooner than a second (a source that keeps
                // answering with the same ageing certificate is not asked in a
                // loop).
                let renew_in = until(certificate.half_life())
                    .max(until(certificate.not_after) / 2)
                    .max(MIN_RENEWAL_INTERVAL);
                let unchanged = publish
                    .borrow()
                    .as_ref()
                    .is_some_and(|current| current.chain.first() == certificate.chain.first());
                if unchanged {
                    tracing::debug!(%identity, ?renew_in, "the source has no newer certificate yet");
                } else {
                    tracing::debug!(%identity, ?renew_in, "certificate renewed");
                    publish.send_replace(Some(Arc::new(certificate)));
                }
                renew_in
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(%identity, error = %err, retry_in = ?delay, "certificate renewal failed");
                delay
            }
        };
        // Wait for the next attempt; drop the certificate if it expires meanwhile.
        let expiry = publish
            .borrow()
            .as_ref()
            .map(|certificate| until(certificate.not_after));
        let expired = async {
            match expiry {
                Some(expiry) if expiry < delay => tokio::time::sleep(expiry).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
            () = expired => {
                tracing::warn!(%identity, "certificate expired before it could be renewed");
                publish.send_replace(None);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay.saturating_sub(expiry.unwrap_or_default())) => {}
                }
            }
        }
    }
}
