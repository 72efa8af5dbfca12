//! A gRPC client channel over TLS to one address, connected lazily, its
//! sockets marked (so a data plane's own connections pass its redirect
//! rules) and with `TCP_NODELAY`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The server name is not a valid DNS name or IP address.
    #[error("server name {name:?}: {problem}")]
    ServerName {
        /// The name given.
        name: String,
        /// What was wrong with it.
        problem: String,
    },
    /// The endpoint could not be built from the name.
    #[error("endpoint https://{name}: {problem}")]
    Endpoint {
        /// The name given.
        name: String,
        /// What was wrong.
        problem: String,
    },
}

/// Where and how a [`tls_channel`] connects.
#[derive(Clone, Debug)]
pub struct TlsChannel {
    /// The server's address (no name resolution happens).
    pub address: SocketAddr,
    /// The name its certificate must carry (DNS name or IP address).
    pub server_name: String,
    /// The client's TLS configuration; its ALPN is set to `h2`.
    pub tls: rustls::ClientConfig,
    /// `SO_MARK` on the sockets ([`crate::set_mark`]), if any.
    pub mark: Option<u32>,
    /// Limit on connecting and on each call.
    pub timeout: Duration,
}

/// A channel that connects on first use (and again after a failure).
pub fn tls_channel(settings: TlsChannel) -> Result<Channel, ChannelError> {
    let TlsChannel {
        address,
        server_name,
        mut tls,
        mark,
        timeout,
    } = settings;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let name =
        ServerName::try_from(server_name.clone()).map_err(|err| ChannelError::ServerName {
            name: server_name.clone(),
            problem: err.to_string(),
        })?;
    let connector = TlsConnector::from(Arc::new(tls));
    let connect = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        let name = name.clone();
        async move {
            let socket = if address.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(mark) = mark {
                crate::set_mark(&socket, mark)?;
            }
            let tcp = socket.connect(address).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let endpoint = Endpoint::from_shared(format!("https://{server_name}"))
        .map_err(|err| ChannelError::Endpoint {
            name: server_name.clone(),
            problem: err.to_string(),
        })?
        .timeout(timeout)
        .connect_timeout(timeout);
    Ok(endpoint.connect_with_connector_lazy(connect))
}
