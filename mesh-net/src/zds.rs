//! The ZDS transport (WIRE.md §5): between a CNI node agent and a node's data
//! plane, over an `AF_UNIX` `SOCK_SEQPACKET` socket, one protobuf message per
//! datagram; an `AddWorkload` carries the pod's network namespace as one file
//! descriptor (`SCM_RIGHTS`).
//!
//! This module moves messages; what they mean (the agent's snapshot, the data
//! plane's acks) belongs to the two ends: `cni_plugin`'s ZDS server and
//! `ztunnel_core`'s node mode.
//!
//! ```
//! # async fn example() -> Result<(), mesh_net::zds::ZdsError> {
//! use mesh_api::zds::{Version, ZdsHello};
//! use mesh_net::zds::ZdsSocket;
//!
//! let (agent, data_plane) = ZdsSocket::pair()?;
//! data_plane.send(&ZdsHello { version: Version::V1 as i32 }, None).await?;
//! let hello = agent.recv::<ZdsHello>().await?;
//! assert_eq!(hello.message.version, Version::V1 as i32);
//! assert!(hello.fd.is_none());
//! # Ok(()) }
//! ```

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

/// The largest datagram either end accepts. ZDS messages are a uid, three
/// names and a few tags: far below this.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024;

/// Room for the control message of one descriptor (and then some: a peer
/// sending more is detected, not silently truncated).
const ANCILLARY_SIZE: usize = 128;

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZdsError {
    /// The socket failed.
    #[error("ZDS socket: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("ZDS peer closed the connection")]
    Closed,
    /// A datagram was longer than [`MAX_MESSAGE_SIZE`].
    #[error("ZDS datagram longer than {MAX_MESSAGE_SIZE} bytes")]
    TooLong,
    /// A datagram carried more than one file descriptor, or other control
    /// data (all of it is closed).
    #[error("ZDS datagram with unexpected control data: {0}")]
    UnexpectedControl(String),
    /// A datagram was not the expected protobuf message.
    #[error("ZDS datagram is not a valid {message}: {reason}")]
    Decode {
        /// The message type expected.
        message: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// A received message and the descriptor it carried, if any.
#[derive(Debug)]
pub struct Received<M> {
    /// The message.
    pub message: M,
    /// The file descriptor passed with it (at most one).
    pub fd: Option<OwnedFd>,
}

/// One end of a ZDS connection.
#[derive(Debug)]
pub struct ZdsSocket {
    socket: UnixSeqpacket,
}

impl ZdsSocket {
    /// Connects to a listening node agent at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        UnixSeqpacket::connect(path)
            .await
            .map(|socket| Self { socket })
            .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))
    }

    /// A connected pair (tests; an agent and data plane in one process).
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = UnixSeqpacket::pair()?;
        Ok((Self { socket: a }, Self { socket: b }))
    }

    /// Sends `message` in one datagram, with `fd` passed along if given.
    pub async fn send<M: prost::Message>(
        &self,
        message: &M,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ZdsError> {
        let bytes = message.encode_to_vec();
        if bytes.len() > MAX_MESSAGE_SIZE {
            return Err(ZdsError::TooLong);
        }
        let sent = match fd {
            None => self.socket.send(&bytes).await?,
            Some(fd) => {
                let mut buffer = [0; ANCILLARY_SIZE];
                let mut ancillary = AncillaryMessageWriter::new(&mut buffer);
                ancillary
                    .add_fds([fd])
                    .map_err(|_| io::Error::other("no room for a file descriptor"))?;
                self.socket
                    .send_with_ancillary(&bytes, &mut ancillary)
                    .await?
            }
        };
        if sent != bytes.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of a {}-byte datagram",
                bytes.len()
            ))
            .into());
        }
        Ok(())
    }

    /// Receives one datagram as an `M`, with the descriptor it carried. A
    /// datagram that is too long, carries more than one descriptor or is not
    /// an `M` is an error (its descriptors are closed); the connection stays
    /// usable.
    pub async fn recv<M: prost::Message + Default>(&self) -> Result<Received<M>, ZdsError> {
        let mut bytes = vec![0; MAX_MESSAGE_SIZE + 1];
        let mut buffer = [0; ANCILLARY_SIZE];
        let (info, ancillary) = self
            .socket
            .recv_with_ancillary(&mut bytes, &mut buffer)
            .await?;
        let truncated = ancillary.is_truncated();
        let mut fds = Vec::new();
        let mut other = 0;
        for control in ancillary.into_messages() {
            match control {
                OwnedAncillaryMessage::FileDescriptors(received) => fds.extend(received),
                _ => other += 1,
            }
        }
        let size = info.bytes_read();
        if size == 0 && fds.is_empty() {
            return Err(ZdsError::Closed);
        }
        if info.truncated() || size > MAX_MESSAGE_SIZE {
            return Err(ZdsError::TooLong);
        }
        if truncated || other > 0 || fds.len() > 1 {
            return Err(ZdsError::UnexpectedControl(format!(
                "{} file descriptors, {other} other control messages{}",
                fds.len(),
                if truncated { ", truncated" } else { "" }
            )));
        }
        let message = M::decode(&bytes[..size]).map_err(|err| ZdsError::Decode {
            message: short_type_name::<M>(),
            reason: err.to_string(),
        })?;
        Ok(Received {
            message,
            fd: fds.pop(),
        })
    }
}

impl ZdsSocket {
    /// Waits until the socket has something to read: a message, or the
    /// peer's close (for a side that expects nothing unprompted, that its
    /// peer went away).
    pub async fn readable(&self) -> io::Result<()> {
        let mut guard = self.socket.as_async_fd().readable().await?;
        guard.retain_ready();
        Ok(())
    }
}

impl AsFd for ZdsSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// A node agent's listening ZDS socket.
#[derive(Debug)]
pub struct ZdsListener {
    listener: UnixSeqpacketListener,
}

impl ZdsListener {
    /// Binds `path` (which must not exist: a stale socket file is the
    /// caller's to remove).
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        UnixSeqpacketListener::bind(path)
            .map(|listener| Self { listener })
            .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))
    }

    /// Takes a listening `SOCK_SEQPACKET` socket the caller made (e.g.
    /// inherited).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        UnixSeqpacketListener::try_from(fd).map(|listener| Self { listener })
    }

    /// The next data plane's connection.
    pub async fn accept(&mut self) -> io::Result<ZdsSocket> {
        self.listener
            .accept()
            .await
            .map(|socket| ZdsSocket { socket })
    }

    /// Where it listens.
    pub fn local_path(&self) -> io::Result<std::path::PathBuf> {
        self.listener.local_addr()
    }
}

/// `mesh_api::...::WorkloadRequest` → `WorkloadRequest`.
fn short_type_name<M>() -> &'static str {
    let full = std::any::type_name::<M>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Seek, Write};

    use mesh_api::zds::{
        AddWorkload, Version, WorkloadInfo, WorkloadRequest, ZdsHello, workload_request,
    };

    use prost::Message;

    use super::*;

    fn add(uid: &str) -> WorkloadRequest {
        WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: uid.into(),
                workload_info: Some(WorkloadInfo {
                    name: "shell".into(),
                    namespace: "default".into(),
                    service_account: "shell".into(),
                }),
            })),
        }
    }

    #[tokio::test]
    async fn a_message_and_its_descriptor_arrive_together() {
        let (agent, data_plane) = ZdsSocket::pair().expect("pair");
        let mut file = tempfile_with("the namespace stands in");
        agent
            .send(&add("uid-1"), Some(file.as_fd()))
            .await
            .expect("send");
        let received = data_plane.recv::<WorkloadRequest>().await.expect("recv");
        assert_eq!(received.message, add("uid-1"));
        let mut passed = File::from(received.fd.expect("a descriptor"));
        passed.rewind().expect("rewind");
        let mut text = String::new();
        passed.read_to_string(&mut text).expect("read");
        assert_eq!(text, "the namespace stands in");
        file.rewind().expect("rewind");
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error_naming_the_message_and_the_socket_goes_on() {
        let (agent, data_plane) = ZdsSocket::pair().expect("pair");
        agent.socket.send(&[0xff, 0xff, 0xff]).await.expect("send");
        let err = data_plane.recv::<WorkloadRequest>().await.unwrap_err();
        assert!(
            matches!(
                err,
                ZdsError::Decode {
                    message: "WorkloadRequest",
                    ..
                }
            ),
            "{err}"
        );
        agent
            .send(
                &ZdsHello {
                    version: Version::V1 as i32,
                },
                None,
            )
            .await
            .expect("send");
        assert_eq!(
            data_plane
                .recv::<ZdsHello>()
                .await
                .expect("recv")
                .message
                .version,
            Version::V1 as i32
        );
    }

    #[tokio::test]
    async fn two_descriptors_in_one_datagram_are_refused_and_closed() {
        let (agent, data_plane) = ZdsSocket::pair().expect("pair");
        let (a, b) = (tempfile_with("a"), tempfile_with("b"));
        let mut buffer = [0; ANCILLARY_SIZE];
        let mut ancillary = AncillaryMessageWriter::new(&mut buffer);
        ancillary.add_fds([a.as_fd(), b.as_fd()]).expect("room");
        agent
            .socket
            .send_with_ancillary(&add("x").encode_to_vec(), &mut ancillary)
            .await
            .expect("send");
        let err = data_plane.recv::<WorkloadRequest>().await.unwrap_err();
        assert!(
            matches!(&err, ZdsError::UnexpectedControl(text) if text.contains("2 file descriptors")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_oversized_datagram_is_refused() {
        let (agent, data_plane) = ZdsSocket::pair().expect("pair");
        agent
            .socket
            .send(&vec![0; MAX_MESSAGE_SIZE + 10])
            .await
            .expect("send");
        assert!(matches!(
            data_plane.recv::<WorkloadRequest>().await,
            Err(ZdsError::TooLong)
        ));
    }

    #[tokio::test]
    async fn a_closed_peer_is_reported_as_closed() {
        let (agent, data_plane) = ZdsSocket::pair().expect("pair");
        drop(agent);
        assert!(matches!(
            data_plane.recv::<WorkloadRequest>().await,
            Err(ZdsError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_listener_accepts_a_data_plane() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("ztunnel.sock");
        let mut listener = ZdsListener::bind(&path).expect("bind");
        let (connected, accepted) = tokio::join!(ZdsSocket::connect(&path), listener.accept());
        let (data_plane, agent) = (connected.expect("connect"), accepted.expect("accept"));
        data_plane
            .send(
                &ZdsHello {
                    version: Version::V1 as i32,
                },
                None,
            )
            .await
            .expect("send");
        assert!(agent.recv::<ZdsHello>().await.is_ok());
        let missing = ZdsSocket::connect(dir.path().join("nobody.sock"))
            .await
            .unwrap_err();
        assert!(missing.to_string().contains("nobody.sock"), "{missing}");
    }

    proptest::proptest! {
        /// Any request goes through a socket unchanged, with its descriptor.
        #[test]
        fn any_request_arrives_as_sent(
            uid in ".{0,200}",
            name in "[a-z0-9.-]{0,63}",
            namespace in "[a-z0-9-]{0,63}",
            service_account in "[a-z0-9-]{0,63}",
            with_fd in proptest::bool::ANY,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .expect("runtime");
            let request = WorkloadRequest {
                payload: Some(workload_request::Payload::Add(AddWorkload {
                    uid,
                    workload_info: Some(WorkloadInfo { name, namespace, service_account }),
                })),
            };
            let file = tempfile_with("namespace");
            let received = runtime.block_on(async {
                let (agent, data_plane) = ZdsSocket::pair().expect("pair");
                agent
                    .send(&request, with_fd.then(|| file.as_fd()))
                    .await
                    .expect("send");
                data_plane.recv::<WorkloadRequest>().await.expect("recv")
            });
            proptest::prop_assert_eq!(&received.message, &request);
            proptest::prop_assert_eq!(received.fd.is_some(), with_fd);
        }
    }

    fn tempfile_with(text: &str) -> File {
        let mut file = tempfile::tempfile().expect("file");
        file.write_all(text.as_bytes()).expect("write");
        file
    }
}
