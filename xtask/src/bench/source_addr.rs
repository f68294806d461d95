//! TCP connections from a chosen loopback source address, for `bench abuse`: every
//! 127.0.0.0/8 address is local on Linux, so one process can look like a thousand clients
//! to the edge's per-address reputation. The standard library cannot bind a socket before
//! it connects: socket2 does (bind, then a connect bounded by the timeout). Each source
//! address has its own ephemeral port range, so a thousand of them do not run short.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A blocking TCP connection from `source` (any port) to `to`, the connect bounded by
/// `timeout`; the stream has no read or write timeout yet.
pub fn connect_from(
    source: Ipv4Addr,
    to: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SockAddr::from(SocketAddr::V4(SocketAddrV4::new(
        source, 0,
    ))))?;
    socket.connect_timeout(&SockAddr::from(SocketAddr::V4(to)), timeout)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        net::{SocketAddr, TcpListener},
    };

    use super::*;

    #[test]
    fn connects_from_the_chosen_address() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let SocketAddr::V4(to) = listener.local_addr()? else {
            anyhow::bail!("not IPv4");
        };
        let source = Ipv4Addr::new(127, 1, 2, 3);
        let mut client = connect_from(source, to, Duration::from_secs(2))?;
        let (server, peer) = listener.accept()?;
        assert_eq!(peer.ip(), source);
        assert_eq!(client.local_addr()?.ip(), source);
        drop(server);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest)?;
        assert!(rest.is_empty(), "the server closed without a word");
        Ok(())
    }
}
