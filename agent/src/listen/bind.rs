//! Binding the listening sockets: one `SO_REUSEPORT` socket per worker.

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
