//! `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! Order of checks: authenticate the caller (else `Unauthenticated`, whatever the
//! request holds); read the CSR (else `InvalidArgument`); with impersonation,
//! check that the caller is a trusted node agent and that the node authorizer
//! agrees (else `Unauthenticated`, as Istio's CA answers); sign for the
//! resulting identity.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::Identity;
use mesh_api::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use mesh_api::ca::{IstioCertificateRequest, IstioCertificateResponse};
use prost_types::value::Kind;
use tonic::{Request, Response, Status};

use crate::authority::{Authority, IssueError};
use crate::csr::{MAX_CSR_PEM_LEN, verify_csr};
use mesh_net::PeerInfo;
use mesh_net::auth::{Authenticated, Authenticators, Caller, NodeAuthorizer};

/// The metadata key under which a node agent names the workload identity it
/// asks a certificate for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Largest request accepted on the wire.
/// Larger than any CSR accepted, so oversized CSRs get a clear `InvalidArgument`.
const MAX_REQUEST_BYTES: usize = 16 * MAX_CSR_PEM_LEN;

/// The CreateCertificate service.
#[derive(Clone)]
pub struct CaService {
    authority: Arc<Authority>,
    authenticators: Authenticators,
    node_agents: Arc<HashSet<Identity>>,
    node_authorizer: Option<Arc<dyn NodeAuthorizer>>,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("authority", &self.authority)
            .field("authenticators", &self.authenticators.names())
            .field("node_agents", &self.node_agents)
            .finish_non_exhaustive()
    }
}

impl CaService {
    pub(crate) fn new(
        authority: Arc<Authority>,
        authenticators: Authenticators,
        node_agents: HashSet<Identity>,
        node_authorizer: Option<Arc<dyn NodeAuthorizer>>,
    ) -> Self {
        Self {
            authority,
            authenticators: authenticators.for_service("CA"),
            node_agents: Arc::new(node_agents),
            node_authorizer,
        }
    }

    /// The tonic service, for mounting on a server shared with other services
    /// (e.g. xDS on one port).
    pub fn into_service(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The identity to sign for: the caller's own, or one it may impersonate.
    async fn identity_for(
        &self,
        caller: &Authenticated,
        request: &IstioCertificateRequest,
    ) -> Result<Identity, Status> {
        let Some(asked) = impersonated_identity(request)? else {
            return Ok(caller.identity.clone());
        };
        if !self.node_agents.contains(&caller.identity) {
            return Err(Status::unauthenticated(format!(
                "{} is not a trusted node agent and may not request certificates for {asked}",
                caller.identity
            )));
        }
        let Some(authorizer) = &self.node_authorizer else {
            return Err(Status::unauthenticated(
                "impersonation is not enabled on this CA (no node authorizer)",
            ));
        };
        authorizer
            .authorize(caller, &asked)
            .await
            .map_err(|reason| {
                Status::unauthenticated(format!(
                    "{} may not request a certificate for {asked}: {reason}",
                    caller.identity
                ))
            })?;
        Ok(asked)
    }
}

/// The `ImpersonatedIdentity` metadata value, if present.
fn impersonated_identity(request: &IstioCertificateRequest) -> Result<Option<Identity>, Status> {
    let Some(value) = request
        .metadata
        .as_ref()
        .and_then(|metadata| metadata.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(uri)) => uri
            .parse()
            .map(Some)
            .map_err(|err| Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {err}"))),
        _ => Err(Status::invalid_argument(format!(
            "{IMPERSONATED_IDENTITY} must be a string SPIFFE identity"
        ))),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = Caller::new(request.metadata(), request.extensions().get::<PeerInfo>());
        let authenticated = self.authenticators.require(&caller).await?;
        let body = request.get_ref();
        let csr = verify_csr(&body.csr).map_err(|err| Status::invalid_argument(err.to_string()))?;
        let identity = self.identity_for(&authenticated, body).await?;
        let requested = u64::try_from(body.validity_duration)
            .ok()
            .filter(|seconds| *seconds > 0)
            .map(Duration::from_secs);
        let issued = self
            .authority
            .issue(&csr, &identity, requested)
            .map_err(|err| match err {
                IssueError::WrongTrustDomain { .. } => Status::permission_denied(err.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        tracing::info!(
            caller = %authenticated.identity,
            identity = %identity,
            not_after = %issued.not_after,
            remote = ?caller.remote,
            "issued workload certificate"
        );
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: issued.chain_pem,
        }))
    }
}
