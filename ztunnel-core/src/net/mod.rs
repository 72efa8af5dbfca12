//! What both sides of the proxy stand on: the sockets (the original
//! destination of a redirected connection, the socket mark, `TCP_NODELAY`,
//! resets) and the byte copies, between a TCP connection and an HBONE stream
//! ([`copy`]) and between two TCP connections ([`plain`]), each counting what
//! it moved into a [`copy::Progress`].
//!
//! Nothing here knows about workloads, policy or HBONE's connection pool:
//! [`crate::hbone`]'s client and server and [`crate::proxy`]'s listeners
//! build on it.

pub mod copy;
pub mod plain;
pub mod socket;
