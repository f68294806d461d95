//! Bounds-checked header parsing. Every read goes through [`ptr_at`], which proves to the
//! verifier (and to us) that `offset + size_of::<T>()` lies inside the frame.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const VLAN_HLEN: usize = 4;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers walked before giving up (real traffic carries one or two).
const MAX_IPV6_EXT_HEADERS: usize = 4;
const MAX_VLAN_TAGS: usize = 2;
const TCP_MIN_HLEN: usize = 20;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A frame too short for the headers it announces, or with impossible header fields.
pub struct Malformed;

#[derive(Clone, Copy)]
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// What the transport header says, as far as the rules care.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// Not TCP, or a non-first fragment (which carries no TCP header).
    Other,
    /// TCP opening a connection: SYN without ACK, to this destination port.
    TcpSyn { dst_port: u16 },
    /// Any other TCP segment.
    Tcp,
    /// Claims to be TCP but the header is cut off.
    Truncated,
}

pub enum Parsed {
    /// ARP, LLDP and every other non-IP ethertype.
    NotIp,
    Ip {
        source: Source,
        l4: L4,
    },
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Malformed> {
    let ptr = ptr_at::<T>(ctx, offset)?;
    // SAFETY: ptr_at checked that the whole T lies inside [data, data_end); the read is
    // unaligned because packet headers carry no alignment guarantee.
    Ok(unsafe { ptr.read_unaligned() })
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, offset: usize) -> Result<u16, Malformed> {
    Ok(u16::from_be(read::<u16>(ctx, offset)?))
}

pub fn packet(ctx: &XdpContext) -> Result<Parsed, Malformed> {
    let mut ethertype = read_be16(ctx, 12)?;
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags: 802.1Q, or 802.1ad (QinQ) outer + 802.1Q inner.
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = read_be16(ctx, l3 + 2)?;
        l3 += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IPV4 => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        _ => Ok(Parsed::NotIp),
    }
}

fn ipv4(ctx: &XdpContext, l3: usize) -> Result<Parsed, Malformed> {
    // Trust no field of a header that is not all there.
    ptr_at::<[u8; IPV4_MIN_HLEN]>(ctx, l3)?;
    let version_ihl: u8 = read(ctx, l3)?;
    let source: [u8; 4] = read(ctx, l3 + 12)?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN {
        return Err(Malformed);
    }
    let protocol: u8 = read(ctx, l3 + 9)?;
    let frag: u16 = read_be16(ctx, l3 + 6)?;
    // Only the first fragment (offset 0) carries the TCP header.
    let first_fragment = frag & 0x1fff == 0;
    let l4 = if protocol == IPPROTO_TCP && first_fragment {
        tcp(ctx, l3 + header_len)
    } else {
        L4::Other
    };
    Ok(Parsed::Ip {
        source: Source::V4(source),
        l4,
    })
}

fn ipv6(ctx: &XdpContext, l3: usize) -> Result<Parsed, Malformed> {
    ptr_at::<[u8; IPV6_HLEN]>(ctx, l3)?;
    let version: u8 = read(ctx, l3)?;
    let source: [u8; 16] = read(ctx, l3 + 8)?;
    if version >> 4 != 6 {
        return Err(Malformed);
    }
    let next_header: u8 = read(ctx, l3 + 6)?;
    let l4 = match extension_headers(ctx, next_header, l3 + IPV6_HLEN)? {
        Some((IPPROTO_TCP, l4)) => tcp(ctx, l4),
        Some(_) | None => L4::Other,
    };
    Ok(Parsed::Ip {
        source: Source::V6(source),
        l4,
    })
}

/// Walks IPv6 extension headers (hop-by-hop, routing, destination options, fragment) with
/// a fixed bound. Returns the upper-layer protocol and its offset, or `None` for a
/// non-first fragment (no TCP header in it) or a chain longer than the bound (passed
/// unjudged, like any unknown protocol).
fn extension_headers(
    ctx: &XdpContext,
    mut next: u8,
    mut offset: usize,
) -> Result<Option<(u8, usize)>, Malformed> {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let header: [u8; 2] = read(ctx, offset)?;
                next = header[0];
                offset += (usize::from(header[1]) + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let header: [u8; 4] = read(ctx, offset)?;
                let fragment_offset = u16::from_be_bytes([header[2], header[3]]) & 0xfff8;
                if fragment_offset != 0 {
                    return Ok(None);
                }
                next = header[0];
                offset += 8;
            }
            _ => return Ok(Some((next, offset))),
        }
    }
    Ok(None)
}

/// The TCP segment kind, or `Truncated` unless the whole header (options included, per
/// its data offset) is present.
fn tcp(ctx: &XdpContext, l4: usize) -> L4 {
    let (Ok(offset_byte), Ok(flags)) = (read::<u8>(ctx, l4 + 12), read::<u8>(ctx, l4 + 13)) else {
        return L4::Truncated;
    };
    let header_len = usize::from(offset_byte >> 4) * 4;
    if header_len < TCP_MIN_HLEN
        || ptr_at::<u8>(ctx, l4 + header_len - 1).is_err()
        || ptr_at::<[u8; TCP_MIN_HLEN]>(ctx, l4).is_err()
    {
        return L4::Truncated;
    }
    if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        // The whole header is present (checked above), so the port read cannot fail.
        match read_be16(ctx, l4 + 2) {
            Ok(dst_port) => L4::TcpSyn { dst_port },
            Err(Malformed) => L4::Truncated,
        }
    } else {
        L4::Tcp
    }
}
