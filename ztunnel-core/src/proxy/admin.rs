//! The admin server (HTTP/1.1, conventionally on 15000): `/healthz/ready`
//! (200 once the served workload is known and has a certificate, else 503),
//! `/config_dump` (the state and the instance as JSON), and `/metrics` or
//! `/stats/prometheus` (the caller's registry, if given, in the Prometheus
//! text format).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_api::names::ip_from_wire;
use mesh_api::workload::{TunnelProtocol, Workload, WorkloadStatus};
use mesh_net::{Acceptor, HandshakeLimits};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::context::Context;
use super::route::workload_identity;

/// The admin endpoints of one instance. Cheap to clone.
#[derive(Clone)]
pub struct Admin {
    ctx: Arc<Context>,
    registry: Option<Arc<Registry>>,
    /// The paths served; all when empty.
    paths: &'static [&'static str],
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("served", &self.ctx.served_uid)
            .finish_non_exhaustive()
    }
}

impl Admin {
    pub(super) fn new(ctx: Arc<Context>, registry: Option<Arc<Registry>>) -> Self {
        Self {
            ctx,
            registry,
            paths: &[],
        }
    }

    /// These endpoints with only `paths` served (others answer 404): e.g.
    /// `&["/metrics", "/stats/prometheus"]` for a metrics port open to the
    /// cluster, `&["/healthz/ready"]` for a readiness port. Empty: all.
    pub fn restricted_to(mut self, paths: &'static [&'static str]) -> Self {
        self.paths = paths;
        self
    }

    /// Serves on `listener` until `shutdown`. Connections come through
    /// [`mesh_net::Acceptor`]: a client must send its request within 10 s,
    /// and a process out of file descriptors backs off.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let mut acceptor = Acceptor::new(listener, "admin", HandshakeLimits::default());
        loop {
            let (stream, _, handshake) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = acceptor.accept() => accepted,
            };
            let admin = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.respond(&request).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                // A connection lasts at most the handshake deadline (10 s):
                // ample for a probe or a scrape, and a slow client cannot
                // hold its place longer.
                tokio::select! {
                    _ = handshake.within(connection) => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    }

    async fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if !self.paths.is_empty() && !self.paths.contains(&path) {
            return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
        }
        match path {
            "/healthz/ready" => self.ready().await,
            "/config_dump" => reply(
                StatusCode::OK,
                "application/json",
                self.config_dump().to_string(),
            ),
            "/metrics" | "/stats/prometheus" => self.metrics(),
            "/" => reply(StatusCode::OK, "text/plain", self.index()),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    /// What this listener serves, one path a line (as ztunnel's admin index).
    fn index(&self) -> String {
        const ALL: [(&str, &str); 4] = [
            ("/config_dump", "the proxy's state as JSON"),
            (
                "/healthz/ready",
                "200 once the served workload has its certificate",
            ),
            ("/metrics", "Prometheus metrics (also /stats/prometheus)"),
            ("/stats/prometheus", "Prometheus metrics"),
        ];
        ALL.iter()
            .filter(|(path, _)| self.paths.is_empty() || self.paths.contains(path))
            .map(|(path, what)| format!("{path}: {what}\n"))
            .collect()
    }

    async fn ready(&self) -> Response<Full<Bytes>> {
        let problem = match self.ctx.served_identity() {
            Ok(identity) => self
                .ctx
                .certificate(&identity, Duration::ZERO)
                .await
                .err()
                .map(|err| err.to_string()),
            Err(err) => Some(err.to_string()),
        };
        match problem {
            None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Some(problem) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {problem}\n"),
            ),
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let mut text = String::new();
        if let Some(registry) = &self.registry
            && let Err(err) = prometheus_client::encoding::text::encode(&mut text, registry)
        {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("encoding the metrics failed: {err}\n"),
            );
        }
        reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        )
    }

    /// The state and the instance as JSON.
    pub fn config_dump(&self) -> Value {
        let state = self.ctx.state.read();
        let mut workloads: Vec<Value> = state.workloads().map(|w| workload_json(w)).collect();
        workloads.sort_by(|a, b| a["uid"].as_str().cmp(&b["uid"].as_str()));
        let mut services: Vec<Value> = state
            .services()
            .map(|s| {
                json!({
                    "name": s.name,
                    "namespace": s.namespace,
                    "hostname": s.hostname,
                    "vips": s.addresses.iter().filter_map(|a| ip_from_wire(&a.address).ok().map(|ip| format!("{}/{ip}", a.network))).collect::<Vec<_>>(),
                    "ports": s.ports.iter().map(|p| json!({"port": p.service_port, "target_port": p.target_port})).collect::<Vec<_>>(),
                })
            })
            .collect();
        services.sort_by(|a, b| a["hostname"].as_str().cmp(&b["hostname"].as_str()));
        let certificates: Vec<Value> = self
            .ctx
            .certs
            .identities()
            .into_iter()
            .map(|identity| json!(identity.as_uri()))
            .collect();
        let certificate = self.ctx.tls.current().map(|tls| {
            let expires = tls
                .certificate
                .not_after
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            json!({
                "identity": tls.identity().as_uri(),
                "expires_unix": expires,
                "roots": tls.certificate.roots.len(),
            })
        });
        json!({
            "served_workload": self.ctx.served_uid,
            "generation": state.generation(),
            "workloads": workloads,
            "services": services,
            "policies": state.policies().len(),
            "certificates": certificates,
            "serving_certificate": certificate,
            "connections": {
                "inbound": self.ctx.live.len(),
                "pooled_outbound": self.ctx.pool.connection_count(),
            },
        })
    }
}

fn workload_json(workload: &Workload) -> Value {
    json!({
        "uid": workload.uid,
        "name": workload.name,
        "namespace": workload.namespace,
        "node": workload.node,
        "addresses": workload.addresses.iter().filter_map(|a| ip_from_wire(a).ok().map(|ip| ip.to_string())).collect::<Vec<_>>(),
        "identity": workload_identity(workload).map(|i| i.as_uri().to_owned()),
        "protocol": if workload.tunnel_protocol == TunnelProtocol::Hbone as i32 { "HBONE" } else { "TCP" },
        "status": if workload.status == WorkloadStatus::Healthy as i32 { "Healthy" } else { "Unhealthy" },
        "services": workload.services.keys().collect::<Vec<_>>(),
        "authorization_policies": workload.authorization_policies,
    })
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
