//! PROXY protocol version 2 headers (the binary form; haproxy's proxy-protocol.txt §2.2),
//! sent first on a backend connection when the backend is configured with
//! `proxy_protocol = true` (Dovecot: `haproxy = yes` on the listener, the edge in
//! `haproxy_trusted_networks`). Written by hand: it is a fixed 16-byte header plus the
//! addresses, and we only ever encode.

use std::net::{IpAddr, SocketAddr};

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const VERSION_2: u8 = 0x20;
const CMD_LOCAL: u8 = 0x00;
const CMD_PROXY: u8 = 0x01;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
const UNSPEC: u8 = 0x00;

/// The header announcing a proxied TCP connection from `client` to `local` (the address
/// the client connected to). Mixed families are sent as IPv6 (IPv4-mapped).
pub fn proxy(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut header = SIGNATURE.to_vec();
    header.push(VERSION_2 | CMD_PROXY);
    match (client.ip(), local.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            header.push(TCP4);
            header.extend_from_slice(&12u16.to_be_bytes());
            header.extend_from_slice(&src.octets());
            header.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            header.push(TCP6);
            header.extend_from_slice(&36u16.to_be_bytes());
            header.extend_from_slice(&v6(src));
            header.extend_from_slice(&v6(dst));
        }
    }
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&local.port().to_be_bytes());
    header
}

/// The header for the edge's own connections (health checks): no client behind them.
pub fn local() -> Vec<u8> {
    let mut header = SIGNATURE.to_vec();
    header.extend_from_slice(&[VERSION_2 | CMD_LOCAL, UNSPEC, 0, 0]);
    header
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_layout() {
        let h = proxy(
            "203.0.113.7:4711".parse().expect("addr"),
            "198.51.100.1:110".parse().expect("addr"),
        );
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12], 0x21, "version 2, PROXY");
        assert_eq!(h[13], 0x11, "TCP over IPv4");
        assert_eq!(&h[14..16], &[0, 12]);
        assert_eq!(&h[16..20], &[203, 0, 113, 7]);
        assert_eq!(&h[20..24], &[198, 51, 100, 1]);
        assert_eq!(&h[24..26], &4711u16.to_be_bytes());
        assert_eq!(&h[26..28], &110u16.to_be_bytes());
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn ipv6_and_mixed_families() {
        let h = proxy(
            "[2001:db8::7]:4711".parse().expect("addr"),
            "127.0.0.1:143".parse().expect("addr"),
        );
        assert_eq!(h[13], 0x21, "TCP over IPv6");
        assert_eq!(&h[14..16], &[0, 36]);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(
            &h[32..48],
            &"::ffff:127.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .expect("ip")
                .octets()
        );
    }

    #[test]
    fn local_header_has_no_addresses() {
        assert_eq!(
            local(),
            [b"\r\n\r\n\0\r\nQUIT\n".as_slice(), &[0x20, 0x00, 0, 0]].concat()
        );
    }
}
