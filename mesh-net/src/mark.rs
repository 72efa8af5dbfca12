//! The socket mark (`SO_MARK`) that keeps a mesh component's own connections
//! out of the redirect rules (WIRE.md §6: 0x539 = 1337). Setting one needs
//! `CAP_NET_ADMIN`; without it the error says which mark and how to do
//! without one.

use std::io;
use std::os::fd::AsFd;

use nix::sys::socket::{setsockopt, sockopt};

/// The mark on the data plane's own sockets (0x539), which the redirect rules
/// let pass.
pub const PROXY_MARK: u32 = 1337;

/// Marks `socket` with `mark`. `EPERM` (no `CAP_NET_ADMIN`) becomes an error
/// naming the mark and how to turn it off.
pub fn set_mark(socket: &impl AsFd, mark: u32) -> io::Result<()> {
    setsockopt(socket, sockopt::Mark, &mark).map_err(|errno| explain(io::Error::from(errno), mark))
}

/// `err` from setting `mark`, explained if it is a missing permission.
fn explain(err: io::Error, mark: u32) -> io::Error {
    if err.kind() != io::ErrorKind::PermissionDenied {
        return err;
    }
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "setting socket mark {mark} ({mark:#x}, SO_MARK) needs CAP_NET_ADMIN: run with \
             it, or turn the mark off (socket_mark(None)) where no redirect rules need it"
        ),
    )
}

/// Checks once, on a throwaway socket, that `mark` can be set: a component
/// that cannot mark its sockets fails at start rather than on every
/// connection.
pub fn check_mark(mark: u32) -> io::Result<()> {
    // Unbound: it needs no address, so a namespace whose loopback is down
    // does not fail the check for another reason.
    let probe = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    set_mark(&probe, mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_permission_names_the_mark_and_the_way_out() {
        let eperm = io::Error::from_raw_os_error(nix::libc::EPERM);
        let explained = explain(eperm, PROXY_MARK).to_string();
        assert!(explained.contains("mark 1337 (0x539"), "{explained}");
        assert!(explained.contains("CAP_NET_ADMIN"), "{explained}");
        assert!(explained.contains("socket_mark(None)"), "{explained}");
        let other = io::Error::from_raw_os_error(nix::libc::EBADF);
        assert_eq!(explain(other, 1).raw_os_error(), Some(nix::libc::EBADF));
    }

    #[test]
    fn a_mark_can_be_set_with_cap_net_admin() {
        // The tests run as root: setting the mark works.
        check_mark(PROXY_MARK).expect("root may mark sockets");
    }
}
