//! Binding the listening sockets: one `SO_REUSEPORT` socket per worker, and the extra ones a
//! successor needs when it inherited fewer sockets than it has workers ([`super::handoff`]).

use std::net::SocketAddr;

/// Binds `n` listeners on `addr` with `SO_REUSEPORT`, one per worker.
///
/// `SO_REUSEPORT` would also let a second agent (or anything else of the same user) bind the
/// same address and silently take a share of the connections, so the address is first probed
/// with an exclusive bind: a port already in use is an error, as operators expect.
pub fn bind_listeners(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())?;
    probe.listen(1)?;
    drop(probe);
    bind_more(addr, n)
}

/// Binds `n` more `SO_REUSEPORT` listeners on `addr`, without the exclusive probe: for an
/// agent that already holds sockets of that address (inherited in a hand-off), so the port
/// is known to be its own.
pub(crate) fn bind_more(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    (0..n)
        .map(|_| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
        .collect()
}
