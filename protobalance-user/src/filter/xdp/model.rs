//! A user-space reference model of the XDP program's verdict: the rules (allowlist,
//! blocklist, bans, SYN limiter) and a frame's bytes in, the verdict counter and the rule that
//! decided out. Pure code, no aya, no kernel.
//!
//! It is written from the program's contract (docs/operations.md, `protobalance-ebpf`), not
//! translated from its code, and parses with the same limits: two VLAN tags, four IPv6
//! extension headers, non-first fragments never read as TCP, headers cut short → pass as
//! malformed, non-IP → pass. The property test (`tests/xdp_test_run.rs`) runs random frames
//! through both and demands the same verdict; `explain` uses it to name the rule.
//!
//! The SYN limiter's state (buckets, penalties) is [`SynState`]; a source without a bucket
//! starts with a full one, as in the kernel. The model never evicts buckets (the kernel's
//! LRU does, beyond `SYN_BUCKETS_MAX_ENTRIES` sources).

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use protobalance_common::{
    BAN_ALL, BanEntry, Counter, SYN_PENALTY_MAX_ENTRIES, SynBucket, SynLimitConfig,
};

use super::{BanTarget, SynSource};
use crate::filter::cidr::Cidr;

/// XDP actions as `BPF_PROG_TEST_RUN` reports them.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

const ETH_HLEN: usize = 14;
const VLAN_TPIDS: [u16; 2] = [0x8100, 0x88A8];
const MAX_VLAN_TAGS: usize = 2;
const MAX_IPV6_EXT_HEADERS: usize = 4;
const TCP: u8 = 6;

/// The rules the program judges by, as user space wrote them into the maps.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Allowlist entry (host bits cleared) → list id.
    pub allow: HashMap<Cidr, u32>,
    /// Blocklist entry (host bits cleared) → list id.
    pub block: HashMap<Cidr, u32>,
    pub bans_v4: HashMap<Ipv4Addr, BanEntry>,
    pub bans_v6: HashMap<Ipv6Addr, BanEntry>,
    /// Keyed by the /64's network address (host bits zero).
    pub bans_v6_64: HashMap<Ipv6Addr, BanEntry>,
    pub syn: SynLimitConfig,
    pub syn_ports: BTreeSet<u16>,
}

/// The SYN limiter's mutable state: token buckets and penalty expiries (CLOCK_MONOTONIC ns).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SynState {
    pub buckets: HashMap<SynSource, SynBucket>,
    pub penalties: HashMap<SynSource, u64>,
}

/// What the transport header says, as far as the rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// Not TCP, a non-first fragment, or an IPv6 extension chain over the bound.
    Other,
    /// SYN without ACK to this port.
    TcpSyn {
        dst_port: u16,
    },
    Tcp,
    /// TCP whose header (options included) is cut off or has a data offset below 5.
    Truncated,
}

/// A frame as the program sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    NotIp,
    /// Ethernet, VLAN, IP or extension headers cut short or impossible.
    Malformed,
    Ip {
        source: IpAddr,
        l4: L4,
    },
}

/// The rule that decided a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    NonIp,
    Malformed,
    Allowlist {
        cidr: Cidr,
        list_id: u32,
    },
    Blocklist {
        cidr: Cidr,
        list_id: u32,
    },
    Ban {
        target: BanTarget,
        entry: BanEntry,
    },
    /// The source is in the penalty map until `expires_ns`.
    SynPenalty {
        source: SynSource,
        expires_ns: u64,
    },
    /// The source's bucket is empty; `penalised` unless the penalty map was full.
    SynLimit {
        source: SynSource,
        penalised: bool,
    },
    /// Nothing matched. `syn_limited`: a SYN the limiter judged and let through.
    NoMatch {
        syn_limited: bool,
    },
}

/// A verdict: the counter slot it is counted in (which implies pass or drop) and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub counter: Counter,
    pub rule: Rule,
}

impl Decision {
    /// The XDP action: [`XDP_DROP`] or [`XDP_PASS`] (never [`XDP_ABORTED`]).
    pub const fn action(&self) -> u32 {
        action(self.counter)
    }
}

/// The XDP action the program returns for a packet counted in `counter`.
pub const fn action(counter: Counter) -> u32 {
    match counter {
        Counter::DropBlocklist
        | Counter::DropBan
        | Counter::DropSynLimit
        | Counter::DropSynPenalty => XDP_DROP,
        Counter::Pass
        | Counter::PassNonIp
        | Counter::PassMalformed
        | Counter::PassAllowlist
        | Counter::SynPenaltyFull => XDP_PASS,
    }
}

/// Judges `frame` at `now_ns` (CLOCK_MONOTONIC), updating the limiter's `state` as the
/// kernel would.
pub fn judge(rules: &Rules, state: &mut SynState, frame: &[u8], now_ns: u64) -> Decision {
    let decide = |counter, rule| Decision { counter, rule };
    let (source, l4) = match parse(frame) {
        Parsed::NotIp => return decide(Counter::PassNonIp, Rule::NonIp),
        Parsed::Malformed => return decide(Counter::PassMalformed, Rule::Malformed),
        Parsed::Ip { source, l4 } => (source, l4),
    };
    if let Some((cidr, list_id)) = longest_prefix(&rules.allow, source) {
        return decide(Counter::PassAllowlist, Rule::Allowlist { cidr, list_id });
    }
    if let Some((cidr, list_id)) = longest_prefix(&rules.block, source) {
        return decide(Counter::DropBlocklist, Rule::Blocklist { cidr, list_id });
    }
    let opens_connection = matches!(l4, L4::TcpSyn { .. });
    if let Some((target, entry)) = ban_covering(rules, source, opens_connection, now_ns) {
        return decide(Counter::DropBan, Rule::Ban { target, entry });
    }
    match l4 {
        L4::Truncated => decide(Counter::PassMalformed, Rule::Malformed),
        L4::Other | L4::Tcp => decide(Counter::Pass, Rule::NoMatch { syn_limited: false }),
        L4::TcpSyn { dst_port } => syn_limit(rules, state, source, dst_port, now_ns),
    }
}

/// The longest prefix in `entries` that contains `addr`, with its list id.
pub fn longest_prefix(entries: &HashMap<Cidr, u32>, addr: IpAddr) -> Option<(Cidr, u32)> {
    entries
        .iter()
        .filter(|(cidr, _)| cidr.contains(addr))
        .max_by_key(|(cidr, _)| cidr.prefix_len())
        .map(|(cidr, id)| (*cidr, *id))
}

/// An unexpired ban that covers this packet: of the address, or (IPv6) of its /64. Both are
/// consulted: an expired or SYN-only ban of the address never hides a ban of its /64.
pub fn ban_covering(
    rules: &Rules,
    source: IpAddr,
    opens_connection: bool,
    now_ns: u64,
) -> Option<(BanTarget, BanEntry)> {
    let covers =
        |entry: &BanEntry| entry.expires_ns > now_ns && (entry.mode == BAN_ALL || opens_connection);
    let candidates: [Option<(BanTarget, BanEntry)>; 2] = match source {
        IpAddr::V4(a) => [
            rules
                .bans_v4
                .get(&a)
                .map(|e| (BanTarget::Address(source), *e)),
            None,
        ],
        IpAddr::V6(a) => {
            let net = net64(a);
            [
                rules
                    .bans_v6
                    .get(&a)
                    .map(|e| (BanTarget::Address(source), *e)),
                rules
                    .bans_v6_64
                    .get(&net)
                    .map(|e| (BanTarget::Ipv6Net64(net), *e)),
            ]
        }
    };
    candidates.into_iter().flatten().find(|(_, e)| covers(e))
}

fn syn_limit(
    rules: &Rules,
    state: &mut SynState,
    source: IpAddr,
    dst_port: u16,
    now_ns: u64,
) -> Decision {
    let pass = Decision {
        counter: Counter::Pass,
        rule: Rule::NoMatch { syn_limited: false },
    };
    if !rules.syn.enabled() || !rules.syn_ports.contains(&dst_port) {
        return pass;
    }
    let key = SynSource::of(source);
    let in_penalty = |expires_ns: u64| Decision {
        counter: Counter::DropSynPenalty,
        rule: Rule::SynPenalty {
            source: key,
            expires_ns,
        },
    };
    let passed = Decision {
        counter: Counter::Pass,
        rule: Rule::NoMatch { syn_limited: true },
    };
    // A source with a bucket carries its penalty in it; the penalty map speaks only for a
    // source without one (new, or evicted from the LRU).
    let Some(bucket) = state.buckets.get_mut(&key) else {
        if let Some(&expires_ns) = state.penalties.get(&key)
            && expires_ns > now_ns
        {
            return in_penalty(expires_ns);
        }
        state
            .buckets
            .insert(key, SynBucket::first(&rules.syn, now_ns));
        return passed;
    };
    if bucket.penalty_ns > now_ns {
        return in_penalty(bucket.penalty_ns);
    }
    if bucket.take(&rules.syn, now_ns) {
        return passed;
    }
    bucket.penalty_ns = now_ns.saturating_add(rules.syn.penalty_ns);
    // An existing key is always replaced; a new one needs a free slot.
    let penalised = state.penalties.contains_key(&key)
        || state.penalties.len() < SYN_PENALTY_MAX_ENTRIES as usize;
    if penalised {
        state
            .penalties
            .insert(key, now_ns.saturating_add(rules.syn.penalty_ns));
    }
    Decision {
        counter: Counter::DropSynLimit,
        rule: Rule::SynLimit {
            source: key,
            penalised,
        },
    }
}

/// Parses `frame` like the program: Ethernet, up to two VLAN tags, IPv4 or IPv6, TCP.
pub fn parse(frame: &[u8]) -> Parsed {
    parse_l2(frame).unwrap_or(Parsed::Malformed)
}

/// `None` = malformed.
fn parse_l2(frame: &[u8]) -> Option<Parsed> {
    let mut ethertype = be16(frame, 12)?;
    let mut l3 = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if !VLAN_TPIDS.contains(&ethertype) {
            break;
        }
        ethertype = be16(frame, l3 + 2)?;
        l3 += 4;
    }
    match ethertype {
        0x0800 => ipv4(frame, l3),
        0x86DD => ipv6(frame, l3),
        _ => Some(Parsed::NotIp),
    }
}

fn ipv4(frame: &[u8], l3: usize) -> Option<Parsed> {
    let header = frame.get(l3..l3 + 20)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header[0] >> 4 != 4 || header_len < 20 {
        return None;
    }
    let source = IpAddr::from([header[12], header[13], header[14], header[15]]);
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    let l4 = if header[9] == TCP && fragment_offset == 0 {
        tcp(frame, l3 + header_len)
    } else {
        L4::Other
    };
    Some(Parsed::Ip { source, l4 })
}

fn ipv6(frame: &[u8], l3: usize) -> Option<Parsed> {
    let header = frame.get(l3..l3 + 40)?;
    if header[0] >> 4 != 6 {
        return None;
    }
    let mut source = [0u8; 16];
    source.copy_from_slice(&header[8..24]);
    let l4 = match upper_layer(frame, header[6], l3 + 40)? {
        Some((TCP, offset)) => tcp(frame, offset),
        Some(_) | None => L4::Other,
    };
    Some(Parsed::Ip {
        source: IpAddr::from(source),
        l4,
    })
}

/// Walks at most [`MAX_IPV6_EXT_HEADERS`] extension headers. `None`: one is cut short
/// (malformed); `Some(None)`: a non-first fragment or a chain over the bound.
fn upper_layer(frame: &[u8], mut next: u8, mut offset: usize) -> Option<Option<(u8, usize)>> {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units, minus one.
            0 | 43 | 60 => {
                let header = frame.get(offset..offset + 2)?;
                next = header[0];
                offset += (usize::from(header[1]) + 1) * 8;
            }
            // Fragment: 8 octets; the offset field is the top 13 bits of bytes 2..4.
            44 => {
                let header = frame.get(offset..offset + 4)?;
                if u16::from_be_bytes([header[2], header[3]]) & 0xfff8 != 0 {
                    return Some(None);
                }
                next = header[0];
                offset += 8;
            }
            _ => return Some(Some((next, offset))),
        }
    }
    Some(None)
}

fn tcp(frame: &[u8], l4: usize) -> L4 {
    let Some(&[offset_byte, flags]) = frame.get(l4 + 12..l4 + 14) else {
        return L4::Truncated;
    };
    let header_len = usize::from(offset_byte >> 4) * 4;
    if header_len < 20 || frame.len() < l4 + header_len {
        return L4::Truncated;
    }
    let (syn, ack) = (flags & 0x02 != 0, flags & 0x10 != 0);
    match (syn, ack, be16(frame, l4 + 2)) {
        (true, false, Some(dst_port)) => L4::TcpSyn { dst_port },
        _ => L4::Tcp,
    }
}

fn be16(frame: &[u8], offset: usize) -> Option<u16> {
    let bytes = frame.get(offset..offset + 2)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// The network address of the /64 around `addr`.
pub fn net64(addr: Ipv6Addr) -> Ipv6Addr {
    let mut octets = addr.octets();
    octets[8..].fill(0);
    Ipv6Addr::from(octets)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use protobalance_common::BAN_SYN_ONLY;

    use super::*;

    const NOW: u64 = 1_000_000_000_000;

    fn syn_v4(src: [u8; 4], port: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[192, 0, 2, 1]);
        let mut tcp = [0u8; 20];
        tcp[2..4].copy_from_slice(&port.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02;
        f.extend_from_slice(&tcp);
        f
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("cidr")
    }

    #[test]
    fn rules_apply_in_order_with_longest_prefix() {
        let mut rules = Rules::default();
        rules.block.insert(cidr("203.0.113.0/24"), 1);
        rules.block.insert(cidr("203.0.113.128/25"), 2);
        rules.allow.insert(cidr("203.0.113.8/29"), 0);
        let mut state = SynState::default();
        let mut at = |src| judge(&rules, &mut state, &syn_v4(src, 25), NOW);
        assert_eq!(at([203, 0, 113, 9]).counter, Counter::PassAllowlist);
        let d = at([203, 0, 113, 200]);
        assert_eq!(
            d.rule,
            Rule::Blocklist {
                cidr: cidr("203.0.113.128/25"),
                list_id: 2
            }
        );
        assert_eq!(d.action(), XDP_DROP);
        assert_eq!(at([203, 0, 113, 20]).counter, Counter::DropBlocklist);
        assert_eq!(at([198, 51, 100, 1]).counter, Counter::Pass);
    }

    #[test]
    fn a_64_ban_is_not_hidden_by_an_address_ban() {
        let mut rules = Rules::default();
        let addr: Ipv6Addr = "2001:db8:1:2::9".parse().expect("ip");
        let expired = BanEntry {
            expires_ns: NOW - 1,
            mode: BAN_ALL,
            reason: 0,
        };
        let live = BanEntry {
            expires_ns: NOW + 1,
            mode: BAN_ALL,
            reason: 4,
        };
        rules.bans_v6.insert(addr, expired);
        rules.bans_v6_64.insert(net64(addr), live);
        let got = ban_covering(&rules, IpAddr::V6(addr), false, NOW);
        assert_eq!(got, Some((BanTarget::Ipv6Net64(net64(addr)), live)));
        rules.bans_v6_64.insert(
            net64(addr),
            BanEntry {
                mode: BAN_SYN_ONLY,
                ..live
            },
        );
        assert_eq!(ban_covering(&rules, IpAddr::V6(addr), false, NOW), None);
    }

    #[test]
    fn syn_limiter_penalises_the_source_that_runs_dry() {
        let mut rules = Rules {
            syn: SynLimitConfig {
                rate_per_second: 1,
                burst: 2,
                penalty_ns: Duration::from_secs(60).as_nanos() as u64,
            },
            ..Rules::default()
        };
        rules.syn_ports.insert(25);
        let mut state = SynState::default();
        let frame = syn_v4([198, 51, 100, 7], 25);
        let counters: Vec<Counter> = (0..4)
            .map(|_| judge(&rules, &mut state, &frame, NOW).counter)
            .collect();
        assert_eq!(
            counters,
            [
                Counter::Pass,
                Counter::Pass,
                Counter::DropSynLimit,
                Counter::DropSynPenalty
            ]
        );
        let other_port = syn_v4([198, 51, 100, 7], 80);
        assert_eq!(
            judge(&rules, &mut state, &other_port, NOW).counter,
            Counter::Pass
        );
    }

    #[test]
    fn parsing_limits_match_the_program() {
        let full = syn_v4([198, 51, 100, 7], 25);
        assert_eq!(parse(&full[..13]), Parsed::Malformed);
        assert_eq!(parse(&full[..33]), Parsed::Malformed, "IPv4 header cut");
        assert!(matches!(
            parse(&full[..34]),
            Parsed::Ip {
                l4: L4::Truncated,
                ..
            }
        ));
        let mut arp = full.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(parse(&arp), Parsed::NotIp);
        // Three VLAN tags: the third is an unknown ethertype to a two-tag parser.
        let mut tagged = full[..12].to_vec();
        for _ in 0..3 {
            tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x01]);
        }
        tagged.extend_from_slice(&full[12..]);
        assert_eq!(parse(&tagged), Parsed::NotIp);
        // A non-first fragment is not TCP.
        let mut fragment = full.clone();
        fragment[20..22].copy_from_slice(&[0x00, 0x01]);
        assert!(matches!(parse(&fragment), Parsed::Ip { l4: L4::Other, .. }));
    }
}
