//! Helpers shared by the crate's unit tests.

use tokio::net::{TcpListener, TcpStream};

/// A loopback TCP connection: the accepted end (the proxy's), then the
/// connecting one (its peer's).
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (peer, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
    (accepted.unwrap().0, peer.unwrap())
}
