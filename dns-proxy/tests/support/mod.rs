//! Helpers shared by the integration tests: sockets to serve on, questions as
//! bytes, one UDP or TCP exchange with the proxy, and the addresses of an
//! answer. Each test binary uses some of them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A UDP socket and a TCP listener on one port of 127.0.0.1. A port free for
/// UDP may be taken for TCP (by another test's connection): then another.
pub(crate) async fn bind_pair() -> (UdpSocket, TcpListener) {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        match TcpListener::bind(udp.local_addr().unwrap()).await {
            Ok(tcp) => return (udp, tcp),
            Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(err) => panic!("binding TCP: {err}"),
        }
    }
}

/// A recursive question for `name` as bytes, with EDNS (1232 bytes) if asked.
pub(crate) fn question(name: &str, record_type: RecordType, edns: bool) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        message.set_edns(e);
    }
    message.to_vec().unwrap()
}

/// Sends `packet` to `to` from a socket of its own on address `from`, and
/// waits up to `wait` for the reply's bytes (`None` when none came). A late
/// reply goes to a closed socket, never to the next exchange.
pub(crate) async fn exchange(
    from: &str,
    to: SocketAddr,
    packet: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(format!("{from}:0")).await.unwrap();
    socket.send_to(packet, to).await.unwrap();
    let mut buffer = vec![0u8; 65535];
    let (len, _) = tokio::time::timeout(wait, socket.recv_from(&mut buffer))
        .await
        .ok()?
        .ok()?;
    buffer.truncate(len);
    Some(buffer)
}

/// One message over a TCP connection of its own, and the reply.
pub(crate) async fn tcp_exchange(to: SocketAddr, packet: &[u8]) -> Message {
    let mut stream = TcpStream::connect(to).await.unwrap();
    stream
        .write_all(&u16::try_from(packet.len()).unwrap().to_be_bytes())
        .await
        .unwrap();
    stream.write_all(packet).await.unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut body).await.unwrap();
    Message::from_vec(&body).unwrap()
}

/// The A addresses of an answer, in order.
pub(crate) fn addresses(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// Asks `to` for `name` over UDP from 127.0.0.1: the answer (panics after
/// `wait` without one).
pub(crate) async fn ask_udp(
    to: SocketAddr,
    name: &str,
    record_type: RecordType,
    wait: Duration,
) -> Message {
    let reply = exchange("127.0.0.1", to, &question(name, record_type, false), wait)
        .await
        .expect("an answer over UDP");
    Message::from_vec(&reply).unwrap()
}
