//! The XDP program without a NIC: hand-built frames through `BPF_PROG_TEST_RUN`, verdicts and
//! counters checked: blocklist, allowlist, bans, parsing, the SYN limiter, `explain`, and the
//! per-list counters. Needs root (CAP_BPF + CAP_NET_ADMIN); skips loudly without it.

use std::{net::IpAddr, time::Duration};

use protobalance::filter::{
    blocklist::NamedList,
    cidr::Cidr,
    xdp::{BanMode, BanTarget, SynLimit, SynSource, XdpFilter, monotonic_ns},
};
use protobalance_common::{
    BanEntry, Counter, LISTS_MAX, SYN_BUCKETS_MAX_ENTRIES, SYN_PENALTY_MAX_ENTRIES,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn load() -> Option<XdpFilter> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIP xdp_test_run: not root, cannot load BPF programs (run as root: cargo xtask test)"
        );
        return None;
    }
    Some(XdpFilter::load(None).expect("load XDP program"))
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

fn tcp_syn(dst_port: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp
}

fn ipv4_tcp(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let tcp = tcp_syn(25);
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
    let total = (20 + tcp.len()) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(&tcp);
    ip
}

fn ipv6_tcp(src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    let tcp = tcp_syn(25);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[6, 64]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(&tcp);
    ip
}

fn frame_from(src: IpAddr) -> Vec<u8> {
    match src {
        IpAddr::V4(a) => [eth(0x0800), ipv4_tcp(a.octets(), [198, 51, 100, 1])].concat(),
        IpAddr::V6(a) => {
            let dst: std::net::Ipv6Addr = "2001:db8::1".parse().expect("ip");
            [eth(0x86DD), ipv6_tcp(a.octets(), dst.octets())].concat()
        }
    }
}

fn verdict(filter: &XdpFilter, frame: &[u8]) -> u32 {
    filter.test_run(frame, 1).expect("test run").0
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

fn cidr(s: &str) -> Cidr {
    s.parse().expect("cidr literal")
}

#[test]
fn blocklisted_sources_are_dropped_by_prefix() {
    let Some(mut filter) = load() else { return };
    for net in [
        "10.0.0.0/8",
        "203.0.113.0/24",
        "198.51.100.7/32",
        "2001:db8:bad::/48",
        "2001:db8::dead/128",
    ] {
        filter.block(cidr(net), 7).expect("block");
    }
    let cases = [
        ("10.200.1.2", XDP_DROP),
        ("11.0.0.1", XDP_PASS),
        ("203.0.113.200", XDP_DROP),
        ("203.0.114.1", XDP_PASS),
        ("198.51.100.7", XDP_DROP),
        ("198.51.100.8", XDP_PASS),
        ("2001:db8:bad:1::5", XDP_DROP),
        ("2001:db8:bae::5", XDP_PASS),
        ("2001:db8::dead", XDP_DROP),
        ("2001:db8::beef", XDP_PASS),
    ];
    for (src, want) in cases {
        assert_eq!(verdict(&filter, &frame_from(ip(src))), want, "source {src}");
    }
    filter.unblock(cidr("10.0.0.0/8")).expect("unblock");
    assert_eq!(
        verdict(&filter, &frame_from(ip("10.200.1.2"))),
        XDP_PASS,
        "after unblock"
    );
    assert_eq!(filter.blocklist_len().expect("len"), (2, 2));
}

#[test]
fn vlan_tagged_frames_are_parsed() {
    let Some(mut filter) = load() else { return };
    filter.block(cidr("203.0.113.0/24"), 1).expect("block");
    for tpid in [0x8100u16, 0x88A8] {
        let mut frame = eth(tpid);
        frame.extend_from_slice(&[0x00, 0x2a, 0x08, 0x00]); // VID 42, inner ethertype IPv4
        frame.extend_from_slice(&ipv4_tcp([203, 0, 113, 9], [198, 51, 100, 1]));
        assert_eq!(
            verdict(&filter, &frame),
            XDP_DROP,
            "tpid {tpid:#x} blocked source"
        );
        let mut ok = eth(tpid);
        ok.extend_from_slice(&[0x00, 0x2a, 0x08, 0x00]);
        ok.extend_from_slice(&ipv4_tcp([192, 0, 2, 9], [198, 51, 100, 1]));
        assert_eq!(
            verdict(&filter, &ok),
            XDP_PASS,
            "tpid {tpid:#x} allowed source"
        );
    }
}

#[test]
fn truncated_frames_never_abort_and_count_as_malformed_or_pass() {
    let Some(mut filter) = load() else { return };
    filter.block(cidr("203.0.113.0/24"), 1).expect("block");
    let frames = [
        frame_from(ip("198.51.100.9")),
        frame_from(ip("2001:db8::9")),
        frame_from(ip("203.0.113.9")),
    ];
    // The kernel refuses test frames shorter than an Ethernet header (EINVAL), so lengths
    // start at 14; from there every truncation must yield PASS or (blocked source) DROP.
    for full in &frames {
        for len in 14..=full.len() {
            let action = verdict(&filter, &full[..len]);
            assert!(
                action == XDP_PASS || action == XDP_DROP,
                "len {len}: action {action}"
            );
        }
    }
    // A blocked source whose TCP header is cut short is still dropped once the IP header
    // (which holds the source) is complete: 14 + 20 bytes.
    let blocked = &frames[2];
    assert_eq!(verdict(&filter, &blocked[..34]), XDP_DROP);
    assert_eq!(verdict(&filter, &blocked[..33]), XDP_PASS);
    let malformed = value(&filter, Counter::PassMalformed);
    assert!(malformed > 0, "truncated frames counted as malformed");
}

#[test]
fn counters_sum_every_verdict() {
    let Some(mut filter) = load() else { return };
    filter.block(cidr("203.0.113.0/24"), 1).expect("block");
    let arp = [eth(0x0806), vec![0u8; 28]].concat();
    let pass = frame_from(ip("198.51.100.9"));
    let drop = frame_from(ip("203.0.113.9"));
    let short = &pass[..20];
    for _ in 0..5 {
        verdict(&filter, &pass);
    }
    for _ in 0..3 {
        verdict(&filter, &drop);
    }
    verdict(&filter, &arp);
    verdict(&filter, &arp);
    verdict(&filter, short);
    assert_eq!(value(&filter, Counter::Pass), 5);
    assert_eq!(value(&filter, Counter::DropBlocklist), 3);
    assert_eq!(value(&filter, Counter::PassNonIp), 2);
    assert_eq!(value(&filter, Counter::PassMalformed), 1);
    let bytes: u64 = filter
        .counters()
        .expect("counters")
        .iter()
        .map(|(_, v)| v.bytes)
        .sum();
    let want = 5 * pass.len() + 3 * drop.len() + 2 * arp.len() + short.len();
    assert_eq!(bytes, want as u64, "byte counters");
    // `repeat` runs the program N times in the kernel: each run is counted.
    filter.test_run(&pass, 100).expect("repeat run");
    assert_eq!(value(&filter, Counter::Pass), 105);
}

fn value(filter: &XdpFilter, counter: Counter) -> u64 {
    filter
        .counters()
        .expect("counters")
        .into_iter()
        .find(|(c, _)| *c == counter)
        .map(|(_, v)| v.packets)
        .expect("counter present")
}

#[test]
fn replace_list_swaps_one_list_and_leaves_others() {
    let Some(mut filter) = load() else { return };
    filter.block(cidr("10.0.0.0/8"), 1).expect("block");
    filter.block(cidr("2001:db8:1::/48"), 1).expect("block");
    filter
        .block(cidr("192.0.2.0/24"), 2)
        .expect("block other list");
    let removed = filter
        .replace_list(1, &[cidr("2001:db8:1::/48"), cidr("203.0.113.0/24")])
        .expect("replace");
    assert_eq!(removed, 1, "only 10.0.0.0/8 was stale");
    let mut list1: Vec<String> = filter
        .list_entries(1)
        .expect("entries")
        .iter()
        .map(ToString::to_string)
        .collect();
    list1.sort();
    assert_eq!(list1, ["2001:db8:1::/48", "203.0.113.0/24"]);
    assert_eq!(
        filter.list_entries(2).expect("entries").len(),
        1,
        "list 2 untouched"
    );
    assert_eq!(verdict(&filter, &frame_from(ip("10.1.1.1"))), XDP_PASS);
    assert_eq!(verdict(&filter, &frame_from(ip("203.0.113.1"))), XDP_DROP);
    assert_eq!(verdict(&filter, &frame_from(ip("192.0.2.1"))), XDP_DROP);
    assert_eq!(verdict(&filter, &frame_from(ip("2001:db8:1::1"))), XDP_DROP);
}

/// A frame whose TCP flags are `flags` (0x02 SYN, 0x10 ACK).
fn frame_with_flags(src: IpAddr, flags: u8) -> Vec<u8> {
    let mut frame = frame_from(src);
    let tcp_flags = frame.len() - 20 + 13;
    frame[tcp_flags] = flags;
    frame
}

#[test]
fn allowlisted_sources_pass_before_blocklist_and_bans() {
    let Some(mut filter) = load() else { return };
    filter.block(cidr("203.0.113.0/24"), 1).expect("block");
    filter.allow(cidr("203.0.113.8/29"), 9).expect("allow");
    filter
        .bans()
        .ban(
            BanTarget::Address(ip("203.0.113.9")),
            Duration::from_secs(60),
            BanMode::All,
            3,
        )
        .expect("ban");
    assert_eq!(
        verdict(&filter, &frame_from(ip("203.0.113.9"))),
        XDP_PASS,
        "allowlist wins"
    );
    assert_eq!(
        verdict(&filter, &frame_from(ip("203.0.113.20"))),
        XDP_DROP,
        "rest of the /24 blocked"
    );
    assert_eq!(value(&filter, Counter::PassAllowlist), 1);
}

#[test]
fn bans_drop_while_unexpired_by_address_and_ipv6_64() {
    let Some(filter) = load() else { return };
    let hour = Duration::from_secs(3600);
    filter
        .bans()
        .ban(
            BanTarget::Address(ip("198.51.100.7")),
            hour,
            BanMode::All,
            1,
        )
        .expect("ban v4");
    filter
        .bans()
        .ban(BanTarget::Address(ip("2001:db8::7")), hour, BanMode::All, 1)
        .expect("ban v6");
    let net: std::net::Ipv6Addr = "2001:db8:1:2::".parse().expect("ip");
    filter
        .bans()
        .ban(BanTarget::Ipv6Net64(net), hour, BanMode::All, 1)
        .expect("ban /64");
    for (src, want) in [
        ("198.51.100.7", XDP_DROP),
        ("198.51.100.8", XDP_PASS),
        ("2001:db8::7", XDP_DROP),
        ("2001:db8::8", XDP_PASS),
        ("2001:db8:1:2:abcd::1", XDP_DROP),
        ("2001:db8:1:3::1", XDP_PASS),
    ] {
        assert_eq!(verdict(&filter, &frame_from(ip(src))), want, "{src}");
    }
    assert_eq!(value(&filter, Counter::DropBan), 3);
    filter
        .bans()
        .unban(BanTarget::Address(ip("198.51.100.7")))
        .expect("unban");
    assert_eq!(
        verdict(&filter, &frame_from(ip("198.51.100.7"))),
        XDP_PASS,
        "after unban"
    );
    assert_eq!(filter.bans().list().expect("bans").len(), 2);
    // Lifting a ban that is not there (lifted already, here or by another node) is not
    // an error, for addresses and /64s alike.
    filter
        .bans()
        .unban(BanTarget::Address(ip("198.51.100.7")))
        .expect("lifting an absent ban");
    filter
        .bans()
        .unban(BanTarget::Ipv6Net64("2001:db8:9::".parse().expect("v6")))
        .expect("lifting an absent /64 ban");
}

/// An address ban that does not cover the packet (expired, or SYN-only for a non-SYN) must
/// not hide a ban of the address's /64 (found by the model property test, `xdp_model.rs`).
#[test]
fn an_address_ban_never_hides_a_ban_of_its_64() {
    let Some(filter) = load() else { return };
    let src = ip("2001:db8:6:7::9");
    let net: std::net::Ipv6Addr = "2001:db8:6:7::".parse().expect("ip");
    let expired = BanEntry {
        expires_ns: monotonic_ns().saturating_sub(1_000_000_000),
        mode: 0,
        reason: 1,
    };
    filter
        .bans()
        .put(BanTarget::Address(src), expired)
        .expect("expired address ban");
    filter
        .bans()
        .ban(
            BanTarget::Ipv6Net64(net),
            Duration::from_secs(60),
            BanMode::All,
            2,
        )
        .expect("ban /64");
    assert_eq!(
        verdict(&filter, &frame_from(src)),
        XDP_DROP,
        "expired address ban"
    );
    filter
        .bans()
        .ban(
            BanTarget::Address(src),
            Duration::from_secs(60),
            BanMode::NewConnections,
            3,
        )
        .expect("SYN-only address ban");
    assert_eq!(
        verdict(&filter, &frame_with_flags(src, 0x10)),
        XDP_DROP,
        "an ACK is not covered by the SYN-only address ban, but by the /64 ban"
    );
    assert_eq!(value(&filter, Counter::DropBan), 2);
}

#[test]
fn expired_bans_pass_and_are_swept() {
    let Some(filter) = load() else { return };
    let past = BanEntry {
        expires_ns: monotonic_ns().saturating_sub(1_000_000_000),
        mode: 0,
        reason: 1,
    };
    filter
        .bans()
        .put(BanTarget::Address(ip("198.51.100.9")), past)
        .expect("put");
    filter
        .bans()
        .ban(
            BanTarget::Address(ip("198.51.100.10")),
            Duration::from_secs(60),
            BanMode::All,
            2,
        )
        .expect("ban");
    assert_eq!(
        verdict(&filter, &frame_from(ip("198.51.100.9"))),
        XDP_PASS,
        "expired ban passes"
    );
    assert_eq!(verdict(&filter, &frame_from(ip("198.51.100.10"))), XDP_DROP);
    assert_eq!(filter.bans().sweep().expect("sweep"), 1);
    let left = filter.bans().list().expect("bans");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].target, BanTarget::Address(ip("198.51.100.10")));
    assert!(left[0].remaining > Duration::from_secs(50));
}

#[test]
fn new_connection_bans_drop_only_syns() {
    let Some(filter) = load() else { return };
    let src = ip("198.51.100.11");
    filter
        .bans()
        .ban(
            BanTarget::Address(src),
            Duration::from_secs(60),
            BanMode::NewConnections,
            1,
        )
        .expect("ban");
    assert_eq!(
        verdict(&filter, &frame_with_flags(src, 0x02)),
        XDP_DROP,
        "SYN dropped"
    );
    assert_eq!(
        verdict(&filter, &frame_with_flags(src, 0x12)),
        XDP_PASS,
        "SYN+ACK passes"
    );
    assert_eq!(
        verdict(&filter, &frame_with_flags(src, 0x10)),
        XDP_PASS,
        "established ACK passes"
    );
    let v6 = ip("2001:db8::11");
    filter
        .bans()
        .ban(
            BanTarget::Address(v6),
            Duration::from_secs(60),
            BanMode::NewConnections,
            1,
        )
        .expect("ban");
    assert_eq!(verdict(&filter, &frame_with_flags(v6, 0x02)), XDP_DROP);
    assert_eq!(verdict(&filter, &frame_with_flags(v6, 0x18)), XDP_PASS);
}

#[test]
fn replacing_the_allowlist_removes_stale_entries() {
    let Some(mut filter) = load() else { return };
    filter.block(cidr("203.0.113.0/24"), 1).expect("block");
    let removed = filter
        .replace_allowlist(&[
            cidr("203.0.113.1"),
            cidr("203.0.113.2"),
            cidr("2001:db8::/32"),
        ])
        .expect("replace");
    assert_eq!(removed, 0);
    assert_eq!(verdict(&filter, &frame_from(ip("203.0.113.1"))), XDP_PASS);
    // The next configuration no longer allows .1: it is blocked again; .2 stays allowed.
    let removed = filter
        .replace_allowlist(&[cidr("203.0.113.2")])
        .expect("replace");
    assert_eq!(removed, 2, "203.0.113.1/32 and 2001:db8::/32 removed");
    assert_eq!(verdict(&filter, &frame_from(ip("203.0.113.1"))), XDP_DROP);
    assert_eq!(verdict(&filter, &frame_from(ip("203.0.113.2"))), XDP_PASS);
}

/// An IPv6 TCP SYN from `src` behind `ext` (extension header bytes, first byte = the next
/// header after them is set by the caller), with the fixed header's next header `first`.
fn ipv6_with_ext(src: &str, first: u8, ext: &[u8]) -> Vec<u8> {
    let src: std::net::Ipv6Addr = src.parse().expect("ip");
    let dst: std::net::Ipv6Addr = "2001:db8::1".parse().expect("ip");
    let tcp = tcp_syn(25);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&((ext.len() + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[first, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(ext);
    ip.extend_from_slice(&tcp);
    [eth(0x86DD), ip].concat()
}

#[test]
fn qinq_and_ipv6_extension_headers_are_walked() {
    let Some(mut filter) = load() else { return };
    filter.block(cidr("203.0.113.0/24"), 1).expect("block");
    // QinQ: 802.1ad outer tag, 802.1Q inner tag, then IPv4.
    let mut qinq = eth(0x88A8);
    qinq.extend_from_slice(&[0x00, 0x0a, 0x81, 0x00, 0x00, 0x2a, 0x08, 0x00]);
    qinq.extend_from_slice(&ipv4_tcp([203, 0, 113, 9], [198, 51, 100, 1]));
    assert_eq!(
        verdict(&filter, &qinq),
        XDP_DROP,
        "QinQ-tagged blocked source"
    );

    let src = "2001:db8:5::1";
    filter
        .bans()
        .ban(
            BanTarget::Address(ip(src)),
            Duration::from_secs(60),
            BanMode::NewConnections,
            1,
        )
        .expect("ban");
    // Hop-by-hop (8 bytes) then destination options (16 bytes) then TCP: the SYN is found.
    let hop = [60u8, 0, 1, 4, 0, 0, 0, 0];
    let dst_opts = [6u8, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let chained = ipv6_with_ext(src, 0, &[hop.as_slice(), &dst_opts].concat());
    assert_eq!(
        verdict(&filter, &chained),
        XDP_DROP,
        "SYN behind two extension headers"
    );
    // First fragment (offset 0, more fragments): TCP header present, SYN found.
    let first = ipv6_with_ext(src, 44, &[6, 0, 0x00, 0x01, 0, 0, 0, 7]);
    assert_eq!(
        verdict(&filter, &first),
        XDP_DROP,
        "first fragment carries the SYN"
    );
    // Non-first fragment (offset 8): never read as TCP, so a SYN-only ban lets it pass.
    let later = ipv6_with_ext(src, 44, &[6, 0, 0x00, 0x08, 0, 0, 0, 7]);
    assert_eq!(
        verdict(&filter, &later),
        XDP_PASS,
        "non-first fragment is not TCP"
    );
    // A chain longer than the bound is passed unjudged (not read as TCP).
    let long = [
        hop,
        [0, 0, 1, 4, 0, 0, 0, 0],
        [0, 0, 1, 4, 0, 0, 0, 0],
        [0, 0, 1, 4, 0, 0, 0, 0],
        [6, 0, 1, 4, 0, 0, 0, 0],
    ]
    .concat();
    let long: Vec<u8> = long
        .iter()
        .enumerate()
        .map(|(i, b)| if i == 0 { 0 } else { *b })
        .collect();
    assert_eq!(
        verdict(&filter, &ipv6_with_ext(src, 0, &long)),
        XDP_PASS,
        "over-long chain"
    );
    // Truncated at every length: never aborted.
    for frame in [&chained, &first, &qinq] {
        for len in 14..=frame.len() {
            let action = verdict(&filter, &frame[..len]);
            assert!(
                action == XDP_PASS || action == XDP_DROP,
                "len {len}: {action}"
            );
        }
    }
}

// ---- SYN limiter ---------------------------------------------------------------------------

const SMTP: u16 = 25;
const POP3: u16 = 110;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// A TCP segment from `src` to `dst_port` with `flags`, untagged.
fn segment(src: IpAddr, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut frame = frame_from(src);
    let tcp = frame.len() - 20;
    frame[tcp + 2..tcp + 4].copy_from_slice(&dst_port.to_be_bytes());
    frame[tcp + 13] = flags;
    frame
}

fn syn(src: &str, dst_port: u16) -> Vec<u8> {
    segment(ip(src), dst_port, SYN)
}

/// Limits SYNs to `ports` to `rate`/s with `burst`, penalty one minute.
fn limit(filter: &XdpFilter, rate: u32, burst: u32, ports: &[u16]) {
    let limit = SynLimit {
        rate_per_second: rate,
        burst,
        penalty: Duration::from_secs(60),
    };
    filter.set_syn_limit(limit, ports).expect("set SYN limit");
}

fn verdicts(filter: &XdpFilter, frame: &[u8], n: usize) -> Vec<u32> {
    (0..n).map(|_| verdict(filter, frame)).collect()
}

fn penalised(filter: &XdpFilter, source: &str) -> Option<Duration> {
    let source = SynSource::of(ip(source));
    filter
        .syn_limiter()
        .penalties()
        .expect("penalties")
        .into_iter()
        .find(|p| p.source == source)
        .map(|p| p.remaining)
}

#[test]
fn syn_limiter_drops_syns_over_the_burst_to_mail_ports_only() {
    let Some(filter) = load() else { return };
    limit(&filter, 1, 3, &[SMTP, POP3]);
    assert_eq!(
        filter.syn_limiter().ports().expect("ports"),
        [SMTP, POP3],
        "port set"
    );
    let src = "198.51.100.7";
    assert_eq!(
        verdicts(&filter, &syn(src, SMTP), 4),
        [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP],
        "burst 3, then dropped"
    );
    assert_eq!(value(&filter, Counter::DropSynLimit), 1);
    let remaining = penalised(&filter, src).expect("source in the penalty map");
    assert!(remaining > Duration::from_secs(55), "{remaining:?}");
    // In the penalty: every limited port, not the others; never established traffic.
    assert_eq!(verdict(&filter, &syn(src, SMTP)), XDP_DROP, "penalty, smtp");
    assert_eq!(verdict(&filter, &syn(src, POP3)), XDP_DROP, "penalty, pop3");
    assert_eq!(value(&filter, Counter::DropSynPenalty), 2);
    assert_eq!(
        verdict(&filter, &syn(src, 80)),
        XDP_PASS,
        "port 80 not limited"
    );
    let ack = segment(ip(src), SMTP, ACK);
    let syn_ack = segment(ip(src), SMTP, SYN | ACK);
    assert_eq!(verdicts(&filter, &ack, 5), [XDP_PASS; 5], "ACKs pass");
    assert_eq!(verdict(&filter, &syn_ack), XDP_PASS, "SYN+ACK passes");
    assert_eq!(
        verdicts(&filter, &syn("198.51.100.8", SMTP), 3),
        [XDP_PASS; 3],
        "another source has its own bucket"
    );
    assert_eq!(value(&filter, Counter::DropSynLimit), 1);
    assert_eq!(value(&filter, Counter::DropSynPenalty), 2);
    assert_eq!(value(&filter, Counter::SynPenaltyFull), 0);
    assert_eq!(value(&filter, Counter::Pass), 3 + 1 + 5 + 1 + 3);
}

#[test]
fn syn_limiter_keys_ipv6_sources_by_64() {
    let Some(filter) = load() else { return };
    limit(&filter, 1, 3, &[SMTP]);
    let (a, b, other) = ("2001:db8:1:2::a", "2001:db8:1:2:ffff::b", "2001:db8:1:3::a");
    assert_eq!(verdicts(&filter, &syn(a, SMTP), 2), [XDP_PASS; 2]);
    assert_eq!(
        verdict(&filter, &syn(b, SMTP)),
        XDP_PASS,
        "third of the /64"
    );
    assert_eq!(
        verdict(&filter, &syn(b, SMTP)),
        XDP_DROP,
        "same /64, same bucket"
    );
    assert_eq!(
        verdict(&filter, &syn(a, SMTP)),
        XDP_DROP,
        "the whole /64 penalised"
    );
    assert_eq!(
        verdicts(&filter, &syn(other, SMTP), 3),
        [XDP_PASS; 3],
        "the next /64 is another source"
    );
    let penalties = filter.syn_limiter().penalties().expect("penalties");
    assert_eq!(penalties.len(), 1, "{penalties:?}");
    assert_eq!(
        penalties[0].source,
        SynSource::V6Net64("2001:db8:1:2::".parse().expect("ip"))
    );
    // An IPv4 address never shares a bucket with an IPv6 /64 of the same leading bytes:
    // 2001:db8::/64 starts 20 01 0d b8 00 00 00 00, like 32.1.13.184 padded with zeros.
    let v6 = syn("2001:db8::1", SMTP);
    assert_eq!(
        verdicts(&filter, &v6, 4),
        [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]
    );
    assert_eq!(
        verdicts(&filter, &syn("32.1.13.184", SMTP), 3),
        [XDP_PASS; 3],
        "the IPv4 look-alike is another source"
    );
    assert_eq!(value(&filter, Counter::DropSynLimit), 2);
    assert_eq!(value(&filter, Counter::DropSynPenalty), 1);
}

#[test]
fn syn_penalties_expire_and_only_the_bucket_remains() {
    let Some(filter) = load() else { return };
    limit(&filter, 1, 3, &[SMTP]);
    let fresh = SynSource::of(ip("198.51.100.30"));
    let in_an_hour = monotonic_ns() + 3_600_000_000_000;
    let past = monotonic_ns() - 1_000_000_000;
    filter
        .syn_limiter()
        .penalise(fresh, in_an_hour)
        .expect("penalise");
    assert_eq!(
        verdict(&filter, &syn("198.51.100.30", SMTP)),
        XDP_DROP,
        "penalty"
    );
    filter.syn_limiter().penalise(fresh, past).expect("expire");
    assert_eq!(
        verdict(&filter, &syn("198.51.100.30", SMTP)),
        XDP_PASS,
        "an expired penalty passes"
    );

    // An exhausted source whose penalty expired is still held by its empty bucket, and
    // is penalised again (the expired entry replaced).
    let src = "198.51.100.31";
    let source = SynSource::of(ip(src));
    verdicts(&filter, &syn(src, SMTP), 4);
    filter.syn_limiter().penalise(source, past).expect("expire");
    assert_eq!(
        verdict(&filter, &syn(src, SMTP)),
        XDP_DROP,
        "bucket still empty"
    );
    assert!(penalised(&filter, src).is_some_and(|r| r > Duration::from_secs(55)));
    // Without penalty and bucket (an LRU eviction) it starts again with a full bucket.
    filter.syn_limiter().penalise(source, past).expect("expire");
    filter.syn_limiter().forget_bucket(source).expect("forget");
    assert_eq!(verdicts(&filter, &syn(src, SMTP), 3), [XDP_PASS; 3]);
    assert_eq!(value(&filter, Counter::DropSynLimit), 2);
    assert_eq!(value(&filter, Counter::DropSynPenalty), 1);

    // The sweeper removes the expired penalty and leaves the live one.
    let (swept, left) = filter.syn_limiter().sweep().expect("sweep");
    assert_eq!((swept, left), (2, 0), "both penalties had expired");
    filter
        .syn_limiter()
        .penalise(fresh, in_an_hour)
        .expect("penalise");
    filter.syn_limiter().penalise(source, past).expect("expire");
    assert_eq!(filter.syn_limiter().sweep().expect("sweep"), (1, 1));
    assert!(penalised(&filter, "198.51.100.30").is_some());
    assert!(penalised(&filter, src).is_none());
}

#[test]
fn syn_limiter_is_off_at_rate_zero_and_changes_without_reload() {
    let Some(filter) = load() else { return };
    let src = "198.51.100.40";
    let in_an_hour = monotonic_ns() + 3_600_000_000_000;
    filter
        .syn_limiter()
        .penalise(SynSource::of(ip(src)), in_an_hour)
        .expect("penalise");
    assert_eq!(
        verdicts(&filter, &syn(src, SMTP), 10),
        [XDP_PASS; 10],
        "never configured: off"
    );
    limit(&filter, 0, 3, &[SMTP]);
    assert_eq!(
        verdicts(&filter, &syn(src, SMTP), 10),
        [XDP_PASS; 10],
        "rate 0: off, penalties included"
    );
    limit(&filter, 1, 3, &[SMTP]);
    assert_eq!(verdict(&filter, &syn(src, SMTP)), XDP_DROP, "switched on");
    limit(&filter, 1, 3, &[POP3]);
    assert_eq!(
        verdict(&filter, &syn(src, SMTP)),
        XDP_PASS,
        "port no longer limited"
    );
    assert_eq!(filter.syn_limiter().ports().expect("ports"), [POP3]);
    assert_eq!(verdict(&filter, &syn(src, POP3)), XDP_DROP);
    limit(&filter, 0, 3, &[POP3]);
    assert_eq!(verdict(&filter, &syn(src, POP3)), XDP_PASS, "switched off");
    assert_eq!(value(&filter, Counter::DropSynPenalty), 2);
    assert_eq!(value(&filter, Counter::DropSynLimit), 0);
}

#[test]
fn vlan_tagged_syns_share_the_untagged_bucket() {
    let Some(filter) = load() else { return };
    limit(&filter, 1, 3, &[SMTP]);
    let tagged = |tags: &[u8]| {
        let mut frame = eth(0x8100);
        frame.truncate(12);
        frame.extend_from_slice(tags);
        let untagged = syn("198.51.100.50", SMTP);
        frame.extend_from_slice(&untagged[12..]);
        frame
    };
    let dot1q = tagged(&[0x81, 0x00, 0x00, 0x2a]);
    let qinq = tagged(&[0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x00, 0x2a]);
    assert_eq!(verdict(&filter, &dot1q), XDP_PASS);
    assert_eq!(verdict(&filter, &qinq), XDP_PASS);
    assert_eq!(verdict(&filter, &syn("198.51.100.50", SMTP)), XDP_PASS);
    assert_eq!(
        verdict(&filter, &dot1q),
        XDP_DROP,
        "802.1Q-tagged SYN limited"
    );
    assert_eq!(verdict(&filter, &qinq), XDP_DROP, "QinQ-tagged SYN limited");
    assert_eq!(value(&filter, Counter::DropSynLimit), 1);
    assert_eq!(value(&filter, Counter::DropSynPenalty), 1);
}

/// Spoofed sources churn the bucket LRU; a penalised source must stay dropped even after
/// its bucket was evicted, while an exhausted source without a penalty starts afresh.
#[test]
fn lru_churn_never_frees_a_penalised_source() {
    let Some(filter) = load() else { return };
    limit(&filter, 1, 3, &[SMTP]);
    let (held, control) = ("198.51.100.60", "198.51.100.61");
    verdicts(&filter, &syn(held, SMTP), 4);
    verdicts(&filter, &syn(control, SMTP), 4);
    filter
        .syn_limiter()
        .pardon(SynSource::of(ip(control)))
        .expect("pardon");
    assert_eq!(
        verdict(&filter, &syn(control, SMTP)),
        XDP_DROP,
        "the empty bucket alone still limits"
    );
    filter
        .syn_limiter()
        .pardon(SynSource::of(ip(control)))
        .expect("pardon");

    // Twice the LRU's capacity of spoofed sources (10.0.0.0/8), two SYNs each: the second
    // hits the bucket, so these count as used buckets, not a one-off scan the kernel's
    // LRU would evict first (a source seen only once never pushes out a reused bucket).
    let flood = 2 * SYN_BUCKETS_MAX_ENTRIES;
    let mut frame = syn("10.0.0.0", SMTP);
    let src_offset = 14 + 12;
    for i in 1..=flood {
        frame[src_offset..src_offset + 4].copy_from_slice(&(0x0a00_0000 | i).to_be_bytes());
        assert_eq!(
            verdicts(&filter, &frame, 2),
            [XDP_PASS; 2],
            "spoofed source {i}"
        );
    }
    for src in [held, control] {
        assert!(
            !filter
                .syn_limiter()
                .has_bucket(SynSource::of(ip(src)))
                .expect("lookup"),
            "{src}'s bucket was evicted by the churn"
        );
    }
    assert_eq!(
        verdict(&filter, &syn(control, SMTP)),
        XDP_PASS,
        "evicted without penalty: a fresh bucket"
    );
    assert_eq!(
        verdicts(&filter, &syn(held, SMTP), 5),
        [XDP_DROP; 5],
        "the penalty map still holds the limited source"
    );
    assert!(penalised(&filter, held).is_some_and(|r| r > Duration::from_secs(50)));
    assert_eq!(value(&filter, Counter::DropSynLimit), 3);
    assert_eq!(value(&filter, Counter::DropSynPenalty), 5);
}

#[test]
fn a_full_penalty_map_still_drops_and_says_so() {
    let Some(mut filter) = load() else { return };
    let mut kernel_log = filter.take_kernel_log().expect("the program's log");
    limit(&filter, 1, 3, &[SMTP]);
    let in_an_hour = monotonic_ns() + 3_600_000_000_000;
    {
        let mut syn_limiter = filter.syn_limiter();
        for i in 0..SYN_PENALTY_MAX_ENTRIES {
            let source = SynSource::V4(std::net::Ipv4Addr::from(0x0a00_0000 | i));
            syn_limiter.penalise(source, in_an_hour).expect("fill");
        }
        assert!(
            syn_limiter
                .penalise(SynSource::of(ip("192.0.2.1")), in_an_hour)
                .is_err(),
            "the penalty map is full"
        );
    }
    let src = "198.51.100.70";
    assert_eq!(
        verdicts(&filter, &syn(src, SMTP), 5),
        [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP],
        "dropped although it cannot be penalised"
    );
    assert!(penalised(&filter, src).is_none());
    // The SYN that ran the bucket dry found no room in the penalty map; the penalty it
    // earned is still kept in its bucket, which holds the next SYN (while the LRU keeps it).
    assert_eq!(value(&filter, Counter::DropSynLimit), 1);
    assert_eq!(value(&filter, Counter::SynPenaltyFull), 1);
    assert_eq!(value(&filter, Counter::DropSynPenalty), 1);
    let penalty_full_bytes = filter
        .counters()
        .expect("counters")
        .into_iter()
        .find(|(c, _)| *c == Counter::SynPenaltyFull)
        .map(|(_, v)| v.bytes);
    assert_eq!(penalty_full_bytes, Some(0), "an event, not traffic");
    let logged = capture_log(|| kernel_log.flush());
    assert!(
        logged.contains("SYN penalty map full: 198.51.100.70 held by its bucket only"),
        "the program logs the event: {logged}"
    );
}

/// What `f` writes into the log (tracing, as protobalance logs), as text.
fn capture_log(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buffer.0.lock().expect("buffer").clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn frames_the_parser_gives_up_on_are_logged_at_most_once_a_second() {
    let Some(mut filter) = load() else { return };
    let mut kernel_log = filter.take_kernel_log().expect("the program's log");
    // Ethernet + the first 6 bytes of an IPv4 header.
    let frame = &frame_from(ip("198.51.100.9"))[..20];
    // One run of 50 repetitions: one CPU, well within a second.
    let (action, _) = filter.test_run(frame, 50).expect("test run");
    assert_eq!(action, XDP_PASS, "an unreadable frame is passed");
    assert_eq!(value(&filter, Counter::PassMalformed), 50);
    let logged = capture_log(|| kernel_log.flush());
    assert_eq!(
        logged
            .matches("passed a 20 byte frame the parser could not read")
            .count(),
        1,
        "one line for 50 frames: {logged}"
    );
    assert!(logged.contains("protobalance::xdp::kernel"), "{logged}");
}

// ---- explain -------------------------------------------------------------------------------

/// What each explain case expects: the verdict counter and a phrase of the explanation.
fn explains(filter: &XdpFilter, src: &str, port: u16, counter: Counter, phrase: &str) {
    let got = filter.explain(ip(src), port).expect("explain");
    let text = got.to_string();
    assert_eq!(got.counter, counter, "{src}:{port}: {text}");
    assert_eq!(got.model_disagrees, None, "{src}:{port}: {text}");
    assert_eq!(
        got.dropped(),
        got.action == XDP_DROP,
        "{src}:{port}: {text}"
    );
    assert!(
        text.contains(phrase),
        "{src}:{port}: {text:?} lacks {phrase:?}"
    );
}

#[test]
fn explain_names_every_rule_and_changes_nothing() {
    let Some(mut filter) = load() else { return };
    for (net, list) in [
        ("203.0.113.0/24", 4),
        ("203.0.113.128/25", 6),
        ("2001:db8:bad::/48", 5),
    ] {
        filter.block(cidr(net), list).expect("block");
    }
    filter.allow(cidr("203.0.113.8/29"), 0).expect("allow");
    filter.allow(cidr("2001:db8:bad:1::/64"), 0).expect("allow");
    let hour = Duration::from_secs(3600);
    let mut bans = filter.bans();
    let v4 = BanTarget::Address(ip("198.51.100.7"));
    bans.ban(v4, hour, BanMode::All, 3).expect("ban");
    let v6 = BanTarget::Address(ip("2001:db8::7"));
    bans.ban(v6, hour, BanMode::NewConnections, 2).expect("ban");
    let net: std::net::Ipv6Addr = "2001:db8:1:2::".parse().expect("ip");
    bans.ban(BanTarget::Ipv6Net64(net), hour, BanMode::All, 1)
        .expect("ban");
    drop(bans);
    limit(&filter, 1, 2, &[SMTP]);
    let in_an_hour = monotonic_ns() + 3_600_000_000_000;
    for src in ["198.51.100.30", "2001:db8:3:4::1"] {
        let source = SynSource::of(ip(src));
        filter
            .syn_limiter()
            .penalise(source, in_an_hour)
            .expect("penalise");
    }
    let live_counters = filter.counters().expect("counters");
    let penalties = filter.syn_limiter().penalties().expect("penalties").len();

    use Counter::*;
    let cases = [
        (
            "203.0.113.9",
            PassAllowlist,
            "allowlist entry 203.0.113.8/29",
        ),
        (
            "2001:db8:bad:1::9",
            PassAllowlist,
            "allowlist entry 2001:db8:bad:1::/64",
        ),
        (
            "203.0.113.20",
            DropBlocklist,
            "blocklist entry 203.0.113.0/24 (list 4)",
        ),
        (
            "203.0.113.200",
            DropBlocklist,
            "blocklist entry 203.0.113.128/25 (list 6)",
        ),
        (
            "2001:db8:bad:2::9",
            DropBlocklist,
            "blocklist entry 2001:db8:bad::/48 (list 5)",
        ),
        (
            "198.51.100.7",
            DropBan,
            "ban of 198.51.100.7 (all packets, reason 3, 3",
        ),
        (
            "2001:db8::7",
            DropBan,
            "ban of 2001:db8::7 (new connections only, reason 2",
        ),
        (
            "2001:db8:1:2::abcd",
            DropBan,
            "ban of 2001:db8:1:2::/64 (all packets",
        ),
        (
            "198.51.100.30",
            DropSynPenalty,
            "SYN limiter penalty of 198.51.100.30 (3",
        ),
        (
            "2001:db8:3:4::99",
            DropSynPenalty,
            "penalty of 2001:db8:3:4::/64",
        ),
        (
            "198.51.100.99",
            Pass,
            "no rule matches (SYN-limited port; a new source, 2 tokens)",
        ),
        ("2001:db8:9::1", Pass, "no rule matches (SYN-limited port"),
    ];
    for (src, counter, phrase) in cases {
        explains(&filter, src, SMTP, counter, phrase);
    }
    explains(
        &filter,
        "2001:db8:3:4::99",
        80,
        Pass,
        "port 80 is not SYN-limited",
    );
    assert_eq!(
        filter.counters().expect("counters"),
        live_counters,
        "explain counted nothing in the live program"
    );

    // Two SYNs empty a bucket of 2 without a penalty yet; explained at once (the rate of
    // 1/s refills a token within a second).
    for (src, phrase) in [
        ("198.51.100.31", "198.51.100.31 has no token left"),
        ("2001:db8:5:6::1", "2001:db8:5:6::/64 has no token left"),
    ] {
        assert_eq!(verdicts(&filter, &syn(src, SMTP), 2), [XDP_PASS; 2]);
        let source = SynSource::of(ip(src));
        let emptied = filter.syn_limiter().bucket(source).expect("bucket");
        let counters = filter.counters().expect("counters");
        explains(&filter, src, SMTP, DropSynLimit, phrase);
        // Another port: the limiter does not apply, so the exhausted source passes.
        explains(&filter, src, 80, Pass, "port 80 is not SYN-limited");
        assert_eq!(filter.counters().expect("counters"), counters);
        let bucket = filter.syn_limiter().bucket(source).expect("bucket");
        assert_eq!(bucket, emptied, "the live bucket is untouched");
    }
    let limiter = filter.syn_limiter();
    let fresh = SynSource::of(ip("198.51.100.99"));
    assert_eq!(
        limiter.bucket(fresh).expect("bucket"),
        None,
        "no bucket created for an explained source"
    );
    assert_eq!(limiter.penalties().expect("penalties").len(), penalties);
    drop(limiter);
    let prefix = format!("protobalance-explain-{}-", std::process::id());
    let leftovers: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .expect("bpffs")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(leftovers.is_empty(), "temporary pins left: {leftovers:?}");
}

/// Removes a test's pin directory, also when the test fails.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn explain_works_on_pinned_maps_and_from_the_cli() {
    if load().is_none() {
        return;
    }
    let dir = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/pbt-{}-explain",
        std::process::id()
    )));
    let mut filter = XdpFilter::load(Some(&dir.0)).expect("load with pins");
    filter.block(cidr("203.0.113.0/24"), 2).expect("block");
    filter
        .bans()
        .ban(
            BanTarget::Address(ip("2001:db8::7")),
            Duration::from_secs(600),
            BanMode::All,
            9,
        )
        .expect("ban");
    let got = protobalance::filter::xdp::explain_pinned(&dir.0, ip("2001:db8::7"), 25)
        .expect("explain pinned");
    assert_eq!(got.counter, Counter::DropBan, "{got}");

    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_protobalance"))
            .args(["filter", "explain", "--pin-dir"])
            .arg(&dir.0)
            .args(args)
            .output()
            .expect("run protobalance")
    };
    let out = cli(&["203.0.113.9", "--port", "587"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout.trim(),
        "DROP SYN from 203.0.113.9 to port 587: blocklist entry 203.0.113.0/24 (list 2)"
    );
    let out = cli(&["198.51.100.1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("PASS SYN from 198.51.100.1 to port 25: no rule matches"),
        "{out:?}"
    );
    drop(filter);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_protobalance"))
        .args([
            "filter",
            "explain",
            "--pin-dir",
            "/sys/fs/bpf/pbt-nonexistent",
            "192.0.2.1",
        ])
        .output()
        .expect("run protobalance");
    assert!(!out.status.success(), "no pinned filter: an error");
    assert!(
        !std::path::Path::new("/sys/fs/bpf/pbt-nonexistent").exists(),
        "explain created nothing"
    );
}

// ---- per-list counters ---------------------------------------------------------------------

#[test]
fn blocklist_drops_are_counted_per_list() {
    let Some(mut filter) = load() else { return };
    for (net, list) in [
        ("203.0.113.0/24", 2),
        ("203.0.113.128/25", 5),
        ("2001:db8:bad::/48", 3),
        ("198.51.100.0/24", LISTS_MAX),
        ("192.0.2.0/24", 0),
    ] {
        filter.block(cidr(net), list).expect("block");
    }
    for src in [
        "203.0.113.1",
        "203.0.113.2",
        "203.0.113.129",
        "2001:db8:bad::1",
        "2001:db8:bad:ffff::2",
        "198.51.100.5",
        "192.0.2.1",
        "198.51.99.1",
    ] {
        verdict(&filter, &frame_from(ip(src)));
    }
    assert_eq!(
        filter.list_hits().expect("hits"),
        [(0, 1), (2, 2), (3, 2), (5, 1)],
        "the longest prefix's list is counted; ids from LISTS_MAX on are not"
    );
    assert_eq!(value(&filter, Counter::DropBlocklist), 7);
    let sizes = filter.list_sizes().expect("sizes");
    assert_eq!((sizes.v4, sizes.v6), (4, 1));
    assert_eq!(sizes.per_list.get(&2), Some(&1));
    assert_eq!(sizes.per_list.get(&LISTS_MAX), Some(&1));
}

fn named(name: &str, entries: &[&str]) -> NamedList {
    NamedList {
        name: name.to_owned(),
        entries: entries.iter().map(|s| cidr(s)).collect(),
    }
}

#[test]
fn named_lists_keep_their_ids_and_counters_across_restarts() {
    if load().is_none() {
        return;
    }
    let dir = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/pbt-{}-lists",
        std::process::id()
    )));
    let mut filter = XdpFilter::load(Some(&dir.0)).expect("load with pins");
    let replaced = filter
        .replace_named_lists(&[
            named("xdp.blocklist", &["10.0.0.0/8"]),
            named("a.txt", &["203.0.113.0/24"]),
            named("b.txt", &["2001:db8:bad::/48", "192.0.2.0/24"]),
        ])
        .expect("replace");
    let ids: Vec<u32> = replaced.ids.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, [1, 2, 3]);
    for src in [
        "10.1.1.1",
        "203.0.113.7",
        "2001:db8:bad::7",
        "2001:db8:bad::8",
    ] {
        assert_eq!(verdict(&filter, &frame_from(ip(src))), XDP_DROP, "{src}");
    }
    assert_eq!(filter.list_hits().expect("hits"), [(1, 1), (2, 1), (3, 2)]);
    drop(filter);

    // The next start: b.txt first among the files, a.txt gone, c.txt new and holding one
    // of b's networks (the later list wins it), nothing inline.
    let mut filter = XdpFilter::load(Some(&dir.0)).expect("load again");
    let replaced = filter
        .replace_named_lists(&[
            named("xdp.blocklist", &[]),
            named("b.txt", &["2001:db8:bad::/48", "192.0.2.0/24"]),
            named("c.txt", &["198.51.100.0/24", "192.0.2.0/24"]),
        ])
        .expect("replace");
    let ids: Vec<u32> = replaced.ids.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, [1, 3, 4], "b keeps its id, c gets one no list had");
    assert_eq!(replaced.dropped, ["a.txt"]);
    assert_eq!(replaced.removed, 2, "10.0.0.0/8 and a.txt's 203.0.113.0/24");
    assert_eq!(
        filter.list_names().expect("names"),
        [
            (1, "xdp.blocklist".to_owned()),
            (3, "b.txt".to_owned()),
            (4, "c.txt".to_owned())
        ]
    );
    assert_eq!(
        filter.list_hits().expect("hits"),
        [(1, 1), (3, 2)],
        "b's count survived the restart; a's went with it"
    );
    for (src, want) in [
        ("10.1.1.1", XDP_PASS),
        ("203.0.113.7", XDP_PASS),
        ("2001:db8:bad::9", XDP_DROP),
        ("192.0.2.9", XDP_DROP),
        ("198.51.100.9", XDP_DROP),
    ] {
        assert_eq!(verdict(&filter, &frame_from(ip(src))), want, "{src}");
    }
    assert_eq!(
        filter.list_hits().expect("hits"),
        [(1, 1), (3, 3), (4, 2)],
        "192.0.2.0/24 now counts for c.txt"
    );
    let explained = filter.explain(ip("192.0.2.9"), 25).expect("explain");
    assert!(
        explained
            .to_string()
            .ends_with("blocklist entry 192.0.2.0/24 (list c.txt, id 4)"),
        "{explained}"
    );
    let counts = filter.list_sizes().expect("sizes").per_list;
    assert_eq!((counts.get(&3), counts.get(&4)), (Some(&1), Some(&2)));
}
