//! Property test: random frames through the real XDP program (`BPF_PROG_TEST_RUN`) against
//! random rule sets loaded into its maps; for every frame the program's action and verdict
//! counter must equal the user-space reference model's (`filter::xdp::model`), the program
//! never returns `XDP_ABORTED`, and its per-list drop counters match the model's verdicts.
//!
//! Frames come from a grammar biased towards the interesting cases: sources inside, at the
//! edge of and outside the configured CIDRs and bans, 0–3 VLAN tags, IPv6 extension-header
//! chains around the walker's bound, fragments, odd header lengths and TCP flags, random
//! truncations and byte flips, and some random bytes. A seeded SplitMix64 drives it all:
//! `PROTOBALANCE_MODEL_SEED=N` replays a run, `PROTOBALANCE_MODEL_ROUNDS=N` changes its size.
//!
//! Time: the kernel reads its (coarse) clock inside the run, so the model judges each frame at the
//! instants just before and just after it and accepts either (they differ only when a token
//! refill crosses a whole token in between); afterwards the model's bucket and penalty of
//! that source are set to what the kernel stored, so rounding never accumulates.
//! Needs root; skips loudly without it.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use protobalance::filter::{
    cidr::Cidr,
    xdp::{
        BanTarget, SynLimit, SynSource, XdpFilter,
        model::{self, Decision, Rule, Rules, SynState, XDP_ABORTED},
        monotonic_coarse_ns, monotonic_ns,
    },
};
use protobalance_common::{BAN_ALL, BAN_SYN_ONLY, BanEntry, Counter, LISTS_MAX, SynLimitConfig};

const HOUR_NS: u64 = 3_600_000_000_000;
const FRAMES_PER_ROUND: usize = 400;
const DEFAULT_ROUNDS: usize = 24;
const MAIL_PORTS: [u16; 5] = [25, 110, 143, 587, 993];

/// SplitMix64: tiny, seedable, good enough to spread test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.below(hi_inclusive - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    /// Between `lo` and `hi` (inclusive) random bytes.
    fn bytes_between(&mut self, lo: u64, hi: u64) -> Vec<u8> {
        let n = self.range(lo, hi) as usize;
        self.bytes(n)
    }

    /// Index into `weights`, chosen in proportion to them.
    fn weighted(&mut self, weights: &[u64]) -> usize {
        let mut roll = self.below(weights.iter().sum());
        for (i, w) in weights.iter().enumerate() {
            if roll < *w {
                return i;
            }
            roll -= w;
        }
        weights.len() - 1
    }
}

/// A random rule set and what the frame grammar aims at.
struct World {
    rules: Rules,
    /// Addresses the rules were built around.
    anchors: Vec<IpAddr>,
    /// Penalties written before the first frame.
    penalties: Vec<(SynSource, u64)>,
    /// Banned addresses, and addresses in banned /64s.
    banned: Vec<IpAddr>,
    /// Sources already used, to send them again (buckets run dry).
    recent: Vec<IpAddr>,
}

fn random_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let mut a = (u128::from(rng.next()) << 64) | u128::from(rng.next());
        if rng.percent(60) {
            // Mostly inside 2001:db8::/32, and often sharing a few /64s.
            a = (0x2001_0db8u128 << 96) | (a & ((1u128 << 96) - 1));
            if rng.percent(50) {
                a = (a & !(0xffff_ffffu128 << 64)) | (u128::from(rng.below(3)) << 64);
            }
        }
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        let a = rng.next() as u32;
        let a = match rng.below(3) {
            0 => 0xc633_6400 | (a & 0xff), // 198.51.100.0/24
            1 => 0xcb00_7100 | (a & 0xff), // 203.0.113.0/24
            _ => a,
        };
        IpAddr::V4(Ipv4Addr::from(a))
    }
}

fn prefix_len(rng: &mut Rng, v6: bool) -> u8 {
    if v6 {
        match rng.below(6) {
            0 => rng.pick(&[32, 48, 64, 128]),
            1 => rng.pick(&[0, 1, 127]),
            _ => rng.range(16, 128) as u8,
        }
    } else {
        match rng.below(6) {
            0 => rng.pick(&[8, 16, 24, 32]),
            1 => rng.pick(&[0, 1, 31]),
            _ => rng.range(8, 32) as u8,
        }
    }
}

fn cidr_around(anchor: IpAddr, len: u8) -> Cidr {
    Cidr::new(anchor, len).expect("prefix fits").network()
}

fn ban_entry(rng: &mut Rng, now: u64) -> BanEntry {
    BanEntry {
        expires_ns: match rng.below(4) {
            0 => now - HOUR_NS,
            1 => 0,
            _ => now + HOUR_NS,
        },
        mode: rng.pick(&[BAN_ALL, BAN_ALL, BAN_SYN_ONLY, 7]),
        reason: rng.below(5) as u32,
    }
}

impl World {
    fn random(rng: &mut Rng, now: u64) -> World {
        let mut anchors: Vec<IpAddr> = (0..10).map(|i| random_addr(rng, i % 2 == 1)).collect();
        let mut rules = Rules::default();
        let mut banned = Vec::new();
        for _ in 0..rng.below(12) {
            let anchor = rng.pick(&anchors);
            let len = prefix_len(rng, anchor.is_ipv6());
            let list_id = rng.pick(&[0u32, 1, 2, 3, 7, 63, 64, 200]);
            rules.block.insert(cidr_around(anchor, len), list_id);
        }
        for _ in 0..rng.below(5) {
            let anchor = rng.pick(&anchors);
            let max = if anchor.is_ipv6() { 128 } else { 32 };
            // Often nested inside a blocked network: a hole in the blocklist.
            let len = match rules.block.keys().find(|c| c.contains(anchor)) {
                Some(outer) if rng.percent(70) => {
                    (outer.prefix_len() + rng.range(1, 8) as u8).min(max)
                }
                _ => prefix_len(rng, anchor.is_ipv6()),
            };
            rules.allow.insert(cidr_around(anchor, len), 0);
        }
        for _ in 0..rng.below(8) {
            let mut addr = rng.pick(&anchors);
            if rng.percent(30) {
                addr = random_addr(rng, addr.is_ipv6());
                anchors.push(addr);
            }
            let entry = ban_entry(rng, now);
            banned.push(addr);
            match addr {
                IpAddr::V4(a) => {
                    rules.bans_v4.insert(a, entry);
                }
                IpAddr::V6(a) => {
                    if rng.percent(50) {
                        rules.bans_v6.insert(a, entry);
                    }
                    if rng.percent(50) {
                        rules
                            .bans_v6_64
                            .insert(model::net64(a), ban_entry(rng, now));
                    }
                }
            }
        }
        rules.syn = match rng.below(10) {
            0..=5 => SynLimitConfig {
                rate_per_second: rng.range(1, 2) as u32,
                burst: rng.range(1, 3) as u32,
                penalty_ns: HOUR_NS,
            },
            6 => SynLimitConfig {
                rate_per_second: 0,
                burst: 3,
                penalty_ns: HOUR_NS,
            },
            _ => SynLimitConfig::default(),
        };
        let mut ports: BTreeSet<u16> = MAIL_PORTS
            .iter()
            .copied()
            .filter(|_| rng.percent(50))
            .collect();
        if rng.percent(30) {
            ports.insert(rng.next() as u16 | 1);
        }
        rules.syn_ports = ports;
        let penalties = (0..rng.below(4))
            .map(|_| {
                let source = SynSource::of(rng.pick(&anchors));
                let expires = if rng.percent(50) {
                    now - HOUR_NS
                } else {
                    now + HOUR_NS
                };
                (source, expires)
            })
            .collect();
        World {
            rules,
            anchors,
            penalties,
            banned,
            recent: Vec::new(),
        }
    }

    fn load_into(&self, filter: &mut XdpFilter) {
        for (cidr, id) in &self.rules.allow {
            filter.allow(*cidr, *id).expect("allow");
        }
        for (cidr, id) in &self.rules.block {
            filter.block(*cidr, *id).expect("block");
        }
        let mut bans = filter.bans();
        for (a, e) in &self.rules.bans_v4 {
            bans.put(BanTarget::Address(IpAddr::V4(*a)), *e)
                .expect("ban");
        }
        for (a, e) in &self.rules.bans_v6 {
            bans.put(BanTarget::Address(IpAddr::V6(*a)), *e)
                .expect("ban");
        }
        for (a, e) in &self.rules.bans_v6_64 {
            bans.put(BanTarget::Ipv6Net64(*a), *e).expect("ban");
        }
        drop(bans);
        let syn = self.rules.syn;
        if syn != SynLimitConfig::default() {
            let limit = SynLimit {
                rate_per_second: syn.rate_per_second,
                burst: syn.burst,
                penalty: Duration::from_nanos(syn.penalty_ns),
            };
            let ports: Vec<u16> = self.rules.syn_ports.iter().copied().collect();
            filter.set_syn_limit(limit, &ports).expect("SYN limit");
        }
        for (source, expires) in &self.penalties {
            filter
                .syn_limiter()
                .penalise(*source, *expires)
                .expect("penalise");
        }
    }

    /// A source aimed at the rules: inside or just outside a CIDR, a banned address or
    /// /64, one seen before, or anything.
    fn source(&mut self, rng: &mut Rng) -> IpAddr {
        let cidrs: Vec<Cidr> = self
            .rules
            .block
            .keys()
            .chain(self.rules.allow.keys())
            .copied()
            .collect();
        let src = match rng.weighted(&[35, 10, 15, 20, 20]) {
            0 if !cidrs.is_empty() => {
                let cidr = rng.pick(&cidrs);
                inside(rng, cidr)
            }
            1 if !cidrs.is_empty() => {
                let cidr = rng.pick(&cidrs);
                just_outside(rng, cidr)
            }
            2 => {
                let anchor = if self.banned.is_empty() || rng.percent(30) {
                    rng.pick(&self.anchors)
                } else {
                    rng.pick(&self.banned)
                };
                match anchor {
                    IpAddr::V6(a) if rng.percent(50) => {
                        inside(rng, Cidr::new(IpAddr::V6(a), 64).expect("/64").network())
                    }
                    _ => anchor,
                }
            }
            3 if !self.recent.is_empty() => rng.pick(&self.recent),
            _ => {
                let v6 = rng.percent(50);
                random_addr(rng, v6)
            }
        };
        if self.recent.len() < 16 {
            self.recent.push(src);
        } else if rng.percent(20) {
            let i = rng.below(16) as usize;
            self.recent[i] = src;
        }
        src
    }
}

/// A random address inside `cidr`.
fn inside(rng: &mut Rng, cidr: Cidr) -> IpAddr {
    let len = u32::from(cidr.prefix_len());
    match cidr.addr() {
        IpAddr::V4(net) => {
            let host = (rng.next() as u32).checked_shr(len).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(net) | host))
        }
        IpAddr::V6(net) => {
            let random = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            let host = random.checked_shr(len).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(net) | host))
        }
    }
}

/// An address that differs from `cidr` in its last prefix bit (inside the parent network).
fn just_outside(rng: &mut Rng, cidr: Cidr) -> IpAddr {
    let ip = inside(rng, cidr);
    let len = u32::from(cidr.prefix_len());
    if len == 0 {
        return ip;
    }
    match ip {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) ^ (1 << (32 - len)))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) ^ (1u128 << (128 - len)))),
    }
}

// ---- frame grammar --------------------------------------------------------------------------

fn random_frame(rng: &mut Rng, src: IpAddr, ports: &BTreeSet<u16>) -> Vec<u8> {
    if rng.percent(3) {
        let mut noise = rng.bytes_between(14, 90);
        if rng.percent(60) {
            let ethertype: u16 = rng.pick(&[0x0800, 0x86DD, 0x8100]);
            noise[12..14].copy_from_slice(&ethertype.to_be_bytes());
        }
        return noise;
    }
    let mut f = rng.bytes(12);
    for _ in 0..rng.weighted(&[60, 20, 15, 5]) {
        let tpid: u16 = if rng.percent(90) {
            rng.pick(&[0x8100, 0x88A8])
        } else {
            rng.next() as u16
        };
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&rng.bytes(2));
    }
    let family: u16 = if src.is_ipv4() { 0x0800 } else { 0x86DD };
    let ethertype: u16 = match rng.below(20) {
        0 => rng.pick(&[0x0806, 0x88CC, 0x0800, 0x86DD]),
        1 => rng.next() as u16,
        _ => family,
    };
    f.extend_from_slice(&ethertype.to_be_bytes());
    let l4 = if rng.percent(90) {
        tcp(rng, ports)
    } else {
        rng.bytes_between(0, 39)
    };
    match src {
        IpAddr::V4(a) => f.extend_from_slice(&ipv4(rng, a, &l4)),
        IpAddr::V6(a) => f.extend_from_slice(&ipv6(rng, a, &l4)),
    }
    mutate(rng, &mut f);
    f
}

fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
    if rng.percent(20) {
        let len = rng.range(14, f.len() as u64) as usize;
        f.truncate(len);
    }
    if rng.percent(5) {
        for _ in 0..rng.range(1, 4) {
            let i = rng.below(f.len() as u64) as usize;
            f[i] ^= 1 << rng.below(8);
        }
    }
}

fn ipv4(rng: &mut Rng, src: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
    let ihl = match rng.weighted(&[80, 15, 5]) {
        0 => 5,
        1 => rng.range(6, 15) as u8,
        _ => rng.below(5) as u8,
    };
    let version = if rng.percent(95) {
        4
    } else {
        rng.below(16) as u8
    };
    let frag: u16 = match rng.below(5) {
        0 | 1 => 0,
        2 => 0x4000,
        3 => 0x2000,
        _ => rng.next() as u16,
    };
    let protocol = match rng.weighted(&[85, 10, 5]) {
        0 => 6,
        1 => 17,
        _ => rng.byte(),
    };
    let mut h = vec![(version << 4) | ihl, 0];
    let total = (usize::from(ihl.max(5)) * 4 + l4.len()) as u16;
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&rng.bytes(2));
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, protocol, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&rng.bytes(4));
    if ihl > 5 {
        h.extend(rng.bytes(usize::from(ihl - 5) * 4));
    }
    h.extend_from_slice(l4);
    h
}

fn ipv6(rng: &mut Rng, src: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
    let mut chain: Vec<(u8, Vec<u8>)> = Vec::new();
    for _ in 0..rng.weighted(&[50, 20, 14, 8, 5, 3]) {
        let kind = if rng.percent(95) {
            rng.pick(&[0u8, 43, 60, 44])
        } else {
            rng.pick(&[50u8, 51, 135, 59])
        };
        let body = if kind == 44 {
            let offset_flags: u16 = match rng.below(5) {
                0 | 1 => 0,
                2 => 1,
                _ => rng.next() as u16,
            };
            let mut b = vec![0, 0];
            b.extend_from_slice(&offset_flags.to_be_bytes());
            b.extend(rng.bytes(4));
            b
        } else {
            let units = match rng.weighted(&[70, 25, 5]) {
                0 => 0,
                1 => rng.range(1, 2) as u8,
                _ => rng.byte(),
            };
            let mut b = vec![0, units];
            // A long header is only partly present: the walker must stop at the frame's end.
            let len = ((usize::from(units) + 1) * 8).min(40);
            b.extend(rng.bytes(len - 2));
            b
        };
        chain.push((kind, body));
    }
    let upper = match rng.weighted(&[85, 10, 5]) {
        0 => 6,
        1 => 17,
        _ => rng.byte(),
    };
    // Each header's first byte names the next one.
    let mut ext = Vec::new();
    for i in 0..chain.len() {
        let next = chain.get(i + 1).map_or(upper, |(kind, _)| *kind);
        let (_, body) = &mut chain[i];
        body[0] = next;
        ext.extend_from_slice(body);
    }
    let first = chain.first().map_or(upper, |(kind, _)| *kind);
    let version = if rng.percent(95) {
        6
    } else {
        rng.below(16) as u8
    };
    let mut h = vec![version << 4, rng.byte(), rng.byte(), rng.byte()];
    h.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[first, 64]);
    h.extend_from_slice(&src.octets());
    h.extend(rng.bytes(16));
    h.extend(ext);
    h.extend_from_slice(l4);
    h
}

fn tcp(rng: &mut Rng, ports: &BTreeSet<u16>) -> Vec<u8> {
    let ports: Vec<u16> = ports.iter().copied().collect();
    let dst_port = if !ports.is_empty() && rng.percent(60) {
        rng.pick(&ports)
    } else {
        let random = rng.next() as u16;
        rng.pick(&[25, 80, random])
    };
    let offset = match rng.weighted(&[80, 15, 5]) {
        0 => 5,
        1 => rng.range(6, 15) as u8,
        _ => rng.below(5) as u8,
    };
    let flags = match rng.weighted(&[40, 15, 20, 25]) {
        0 => 0x02,
        1 => 0x12,
        2 => 0x10,
        _ => rng.byte(),
    };
    let mut t = rng.bytes(2);
    t.extend_from_slice(&dst_port.to_be_bytes());
    t.extend(rng.bytes(8));
    t.extend_from_slice(&[offset << 4, flags]);
    t.extend(rng.bytes(6));
    if offset > 5 {
        t.extend(rng.bytes(usize::from(offset - 5) * 4));
    }
    if rng.percent(30) {
        t.extend(rng.bytes_between(0, 15));
    }
    t
}

// ---- the property ---------------------------------------------------------------------------

/// The verdict counter the last run incremented (event counters aside).
fn counted(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> Vec<Counter> {
    before
        .iter()
        .zip(after)
        .filter(|((c, b), (_, a))| a != b && c.labels().is_some())
        .map(|((c, _), _)| *c)
        .collect()
}

fn packets(filter: &XdpFilter) -> Vec<(Counter, u64)> {
    filter
        .counters()
        .expect("counters")
        .into_iter()
        .map(|(c, v)| (c, v.packets))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Sets the model's bucket and penalty of `source` to the kernel's (see the module comment).
fn sync_source(filter: &XdpFilter, state: &mut SynState, source: SynSource) {
    let limiter = filter.syn_limiter();
    match limiter.bucket(source).expect("bucket") {
        Some(bucket) => state.buckets.insert(source, bucket),
        None => state.buckets.remove(&source),
    };
    match limiter.penalty_expiry(source).expect("penalty") {
        Some(expires) => state.penalties.insert(source, expires),
        None => state.penalties.remove(&source),
    };
}

fn limiter_source(decision: &Decision) -> Option<SynSource> {
    match decision.rule {
        Rule::SynPenalty { source, .. } | Rule::SynLimit { source, .. } => Some(source),
        _ => None,
    }
}

fn syn_source_of(frame: &[u8]) -> Option<SynSource> {
    match model::parse(frame) {
        model::Parsed::Ip { source, .. } => Some(SynSource::of(source)),
        _ => None,
    }
}

#[test]
fn random_frames_get_the_models_verdict() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP random_frames_get_the_models_verdict: not root, cannot load BPF programs");
        return;
    }
    let seed = std::env::var("PROTOBALANCE_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| monotonic_ns() ^ u64::from(std::process::id()));
    let rounds = std::env::var("PROTOBALANCE_MODEL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    eprintln!("model property test: seed {seed} (PROTOBALANCE_MODEL_SEED={seed} replays it)");
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut seen = [0usize; Counter::COUNT as usize];
    for round in 0..rounds {
        let mut filter = XdpFilter::load(None).expect("load XDP program");
        let mut world = World::random(&mut rng, monotonic_ns());
        world.load_into(&mut filter);
        let mut state = SynState {
            penalties: world.penalties.iter().copied().collect(),
            ..SynState::default()
        };
        let mut before = packets(&filter);
        let mut list_hits = [0u64; LISTS_MAX as usize];
        let mut frame = Vec::new();
        for index in 0..FRAMES_PER_ROUND {
            // Sometimes the same frame again (a retransmitted SYN runs a bucket dry).
            if frame.is_empty() || rng.percent(85) {
                let src = world.source(&mut rng);
                frame = random_frame(&mut rng, src, &world.rules.syn_ports);
            }
            let (mut early, mut late) = (state.clone(), state.clone());
            let t0 = monotonic_coarse_ns();
            let (action, _) = filter.test_run(&frame, 1).expect("test run");
            let t1 = monotonic_coarse_ns();
            let after = packets(&filter);
            let kernel = counted(&before, &after);
            before = after;
            let d0 = model::judge(&world.rules, &mut early, &frame, t0);
            let d1 = model::judge(&world.rules, &mut late, &frame, t1);
            let agrees = |d: &Decision| action == d.action() && kernel == [d.counter];
            if action == XDP_ABORTED || !(agrees(&d0) || agrees(&d1)) {
                panic!(
                    "verdicts differ (seed {seed}, round {round}, frame {index})\n\
                     frame ({} bytes): {}\nparsed by the model: {:?}\n\
                     kernel: action {action}, counted {kernel:?}\n\
                     model: {d0:?} (at {t0}) / {d1:?} (at {t1})\nrules: {:#?}\n\
                     penalties seeded: {:?}\nlimiter state: {state:?}",
                    frame.len(),
                    hex(&frame),
                    model::parse(&frame),
                    world.rules,
                    world.penalties,
                );
            }
            seen[d1.counter as usize] += 1;
            if let Rule::Blocklist { list_id, .. } = d1.rule
                && list_id < LISTS_MAX
            {
                list_hits[list_id as usize] += 1;
            }
            state = late;
            if let Some(source) = limiter_source(&d1).or_else(|| {
                matches!(d1.rule, Rule::NoMatch { syn_limited: true })
                    .then(|| syn_source_of(&frame))
                    .flatten()
            }) {
                sync_source(&filter, &mut state, source);
            }
        }
        let expected: Vec<(u32, u64)> = (0..LISTS_MAX)
            .zip(list_hits)
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(
            filter.list_hits().expect("list hits"),
            expected,
            "per-list drops (seed {seed}, round {round}); rules: {:#?}",
            world.rules
        );
    }
    let frames = rounds * FRAMES_PER_ROUND;
    eprintln!(
        "{frames} frames in {rounds} rule sets agreed in {:.1?}; verdicts: {seen:?}",
        started.elapsed()
    );
    // The grammar must actually reach every verdict, or the property says little.
    for counter in Counter::ALL.iter().filter(|c| c.labels().is_some()) {
        assert!(
            seen[*counter as usize] > 0 || rounds < DEFAULT_ROUNDS,
            "no frame was counted as {counter:?}: {seen:?}"
        );
    }
}
