//! `explain(ip, port)`: which rule would decide a new connection from `ip` to `port`.
//!
//! A synthetic TCP SYN goes through `BPF_PROG_TEST_RUN`. Not through the live program,
//! though: that would count the SYN and take a token from the source's bucket (or give it a
//! new bucket, or even a penalty). Instead a second copy of the same object — the probe —
//! is loaded, unattached, sharing the live rule maps by their pins (allowlist, blocklist,
//! bans, SYN settings and ports: read-only for the program) and with private counters,
//! buckets and penalties, seeded with the live bucket and penalty of this one source. So
//! the probe decides exactly as the live program would, and nothing live changes: explain
//! has no side effects beyond a short-lived program and map or two in the kernel.
//!
//! The probe's verdict counter says which check decided. The rule itself (the matching
//! CIDR, the ban, the penalty) is named from user-space reads of the maps through the
//! reference model (`model`), whose verdict is also compared with the probe's.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{TestRun, TestRunOptions, Xdp},
};
use protobalance_common::{
    BAN_SYN_ONLY, BanEntry, BlockEntry, Counter, CounterValue, GENERATION_MAPS, LISTS_MAX,
    ListName, MAP_ALLOW_V4, MAP_ALLOW_V6, MAP_BANS_V4, MAP_BANS_V6, MAP_BANS_V6_64, MAP_BLOCK_V4,
    MAP_BLOCK_V6, MAP_COUNTERS, MAP_LIST_NAMES, MAP_SYN_BUCKETS, MAP_SYN_LIMIT_CONFIG,
    MAP_SYN_PENALTY, MAP_SYN_PORTS, PINNED_MAPS, PROG_XDP, SYN_TOKEN, SynBucket, SynLimitConfig,
    SynSourceKey, concat_names,
};

use super::{
    BanTarget, SynSource, XDP_OBJECT, XdpError, XdpFilter,
    model::{self, Rule, Rules, SynState},
    monotonic_coarse_ns,
};
use crate::filter::cidr::Cidr;

/// Maps the probe shares with the live program: the program only reads them.
const SHARED_MAPS: [&str; 16] = concat_names(
    GENERATION_MAPS,
    [
        MAP_BANS_V4,
        MAP_BANS_V6,
        MAP_BANS_V6_64,
        MAP_SYN_LIMIT_CONFIG,
        MAP_SYN_PORTS,
    ],
);

/// The probe's private buckets and penalties hold one source; keep them small.
const PROBE_STATE_ENTRIES: u32 = 16;

/// What explain found out about a SYN from `source` to `port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub source: IpAddr,
    pub port: u16,
    /// What the program returned: `model::XDP_DROP` or `model::XDP_PASS`.
    pub action: u32,
    /// The verdict counter the program counted the SYN in.
    pub counter: Counter,
    /// The rule that decided, named from the maps.
    pub rule: Rule,
    /// The name of the blocklist whose entry decided, when that list has one.
    pub list_name: Option<String>,
    /// The reference model's verdict when it differs from the program's: a bug in one of
    /// them (or a bucket refilling to a whole token in the microseconds between the two).
    pub model_disagrees: Option<Counter>,
    /// The SYN limiter as it applies to this source and port.
    pub syn: SynContext,
    /// CLOCK_MONOTONIC ns when the maps were read (for the time left on bans, penalties).
    pub now_ns: u64,
}

/// The SYN limiter's view of the explained SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynContext {
    /// The limiter is on and judges SYNs to this port.
    pub limited_port: bool,
    pub burst: u32,
    pub penalty: Duration,
    /// Whole tokens in the source's bucket before this SYN (`None`: no bucket yet, a new
    /// source starts with `burst`).
    pub tokens: Option<u64>,
}

impl Explanation {
    pub const fn dropped(&self) -> bool {
        self.action == model::XDP_DROP
    }

    fn remaining(&self, expires_ns: u64) -> Duration {
        Duration::from_nanos(expires_ns.saturating_sub(self.now_ns))
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.dropped() { "DROP" } else { "PASS" };
        write!(
            f,
            "{verdict} SYN from {} to port {}: ",
            self.source, self.port
        )?;
        match self.rule {
            Rule::Allowlist { cidr, .. } => write!(f, "allowlist entry {cidr}")?,
            Rule::Blocklist { cidr, list_id } => match &self.list_name {
                Some(name) => write!(f, "blocklist entry {cidr} (list {name}, id {list_id})")?,
                None => write!(f, "blocklist entry {cidr} (list {list_id})")?,
            },
            Rule::Ban { target, entry } => {
                let target = match target {
                    BanTarget::Address(a) => a.to_string(),
                    BanTarget::Ipv6Net64(net) => format!("{net}/64"),
                };
                let mode = if entry.mode == BAN_SYN_ONLY {
                    "new connections only"
                } else {
                    "all packets"
                };
                let left = self.remaining(entry.expires_ns).as_secs();
                write!(
                    f,
                    "ban of {target} ({mode}, reason {}, {left} s left)",
                    entry.reason
                )?;
            }
            Rule::SynPenalty { source, expires_ns } => write!(
                f,
                "SYN limiter penalty of {source} ({} s left)",
                self.remaining(expires_ns).as_secs()
            )?,
            Rule::SynLimit { source, .. } => write!(
                f,
                "SYN limiter: {source} has no token left (this SYN would put it into the \
                 penalty for {} s)",
                self.syn.penalty.as_secs()
            )?,
            Rule::NoMatch { .. } => {
                write!(f, "no rule matches")?;
                match (self.syn.limited_port, self.syn.tokens) {
                    (false, _) => write!(f, " (port {} is not SYN-limited)", self.port)?,
                    (true, Some(t)) => write!(
                        f,
                        " (SYN-limited port; {t} of {} tokens left)",
                        self.syn.burst
                    )?,
                    (true, None) => write!(
                        f,
                        " (SYN-limited port; a new source, {} tokens)",
                        self.syn.burst
                    )?,
                }
            }
            Rule::NonIp | Rule::Malformed => write!(f, "{:?}", self.rule)?,
        }
        if let Some(model) = self.model_disagrees {
            write!(
                f,
                "\nwarning: the reference model says {model:?}, the program {:?}",
                self.counter
            )?;
        }
        Ok(())
    }
}

impl XdpFilter {
    /// Which rule would decide a new connection (TCP SYN) from `source` to `port`; see the
    /// module comment for why this changes nothing in the live maps.
    pub fn explain(&self, source: IpAddr, port: u16) -> Result<Explanation, XdpError> {
        if let Some(dir) = &self.pin_dir {
            return explain_pinned(dir, source, port);
        }
        // Private maps: pin them for a moment so the probe can share them.
        let pins = TempPins::new()?;
        for (name, id) in &self.map_ids {
            let map = MapData::from_id(*id)?;
            let path = pins.0.join(name);
            map.pin(&path)
                .map_err(|source| XdpError::Pin { path, source })?;
        }
        explain_pinned(&pins.0, source, port)
    }
}

/// [`XdpFilter::explain`] for the filter whose maps are pinned under `pin_dir` (by a
/// running protobalance with `xdp.pin_dir`, or by `protobalance filter load`).
pub fn explain_pinned(pin_dir: &Path, source: IpAddr, port: u16) -> Result<Explanation, XdpError> {
    for name in SHARED_MAPS {
        let path = pin_dir.join(name);
        if !path.exists() {
            // The probe's loader would create and pin an empty map there: refuse instead.
            return Err(XdpError::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no pinned map: is a filter with this pin directory loaded?",
                ),
            });
        }
    }
    let key = SynSource::of(source);
    let live = LiveState::read(pin_dir, key)?;
    let frame = syn_frame(source, port);
    let (action, counter) = probe(pin_dir, &live, &frame)?;
    // The program's clock, so a ban expiring in this very tick is judged alike.
    let now_ns = monotonic_coarse_ns();
    let rules = rules_for(pin_dir, source)?;
    let mut state = SynState::default();
    if let Some(bucket) = live.bucket {
        state.buckets.insert(key, bucket);
    }
    if let Some(expires) = live.penalty {
        state.penalties.insert(key, expires);
    }
    let decision = model::judge(&rules, &mut state, &frame, now_ns);
    let limited_port = rules.syn.enabled() && rules.syn_ports.contains(&port);
    let tokens = live.bucket.map(|mut bucket| {
        // Refilled up to now; `take` removes the token it grants, so add it back.
        let granted = bucket.take(&rules.syn, now_ns);
        bucket.tokens / SYN_TOKEN + u64::from(granted)
    });
    let list_name = match decision.rule {
        Rule::Blocklist { list_id, .. } => list_name(pin_dir, list_id)?,
        _ => None,
    };
    Ok(Explanation {
        source,
        port,
        action,
        counter,
        rule: decision.rule,
        list_name,
        model_disagrees: (decision.counter != counter).then_some(decision.counter),
        syn: SynContext {
            limited_port,
            burst: rules.syn.burst,
            penalty: Duration::from_nanos(rules.syn.penalty_ns),
            tokens,
        },
        now_ns,
    })
}

/// A TCP SYN from `source` to `port` (to a documentation address), untagged.
pub fn syn_frame(source: IpAddr, port: u16) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    match source {
        IpAddr::V4(src) => {
            frame.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
            frame.extend_from_slice(&src.octets());
            frame.extend_from_slice(&Ipv4Addr::new(192, 0, 2, 1).octets());
        }
        IpAddr::V6(src) => {
            frame.extend_from_slice(&[0x86, 0xDD, 0x60, 0, 0, 0, 0, 20, 6, 64]);
            frame.extend_from_slice(&src.octets());
            let dst = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
            frame.extend_from_slice(&dst.octets());
        }
    }
    frame.extend_from_slice(&tcp);
    frame
}

/// The live bucket and penalty of the explained source.
struct LiveState {
    key: SynSourceKey,
    bucket: Option<SynBucket>,
    penalty: Option<u64>,
}

impl LiveState {
    fn read(pin_dir: &Path, source: SynSource) -> Result<Self, XdpError> {
        let key = source.key();
        // Lookups from user space do not touch the LRU's recency.
        let buckets: BpfHashMap<MapData, SynSourceKey, SynBucket> =
            BpfHashMap::try_from(open(pin_dir, MAP_SYN_BUCKETS)?)?;
        let penalties: BpfHashMap<MapData, SynSourceKey, u64> =
            BpfHashMap::try_from(open(pin_dir, MAP_SYN_PENALTY)?)?;
        Ok(Self {
            key,
            bucket: found(buckets.get(&key, 0))?,
            penalty: found(penalties.get(&key, 0))?,
        })
    }
}

/// Loads the probe, seeds its private limiter state and runs `frame` through it once.
/// Returns the action and the verdict counter it was counted in.
fn probe(pin_dir: &Path, live: &LiveState, frame: &[u8]) -> Result<(u32, Counter), XdpError> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = SHARED_MAPS
        .iter()
        .map(|name| (*name, pin_dir.join(name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.map_max_entries(MAP_SYN_BUCKETS, PROBE_STATE_ENTRIES);
    loader.map_max_entries(MAP_SYN_PENALTY, PROBE_STATE_ENTRIES);
    let mut ebpf = loader.load(XDP_OBJECT)?;
    let program: &mut Xdp = ebpf
        .program_mut(PROG_XDP)
        .ok_or(XdpError::Missing("program `protobalance`"))?
        .try_into()?;
    program.load()?;
    let take = |ebpf: &mut aya::Ebpf, name: &'static str| {
        ebpf.take_map(name).ok_or(XdpError::Missing(name))
    };
    if let Some(bucket) = live.bucket {
        let mut buckets: BpfHashMap<MapData, SynSourceKey, SynBucket> =
            BpfHashMap::try_from(take(&mut ebpf, MAP_SYN_BUCKETS)?)?;
        buckets.insert(live.key, bucket, 0)?;
    }
    if let Some(expires) = live.penalty {
        let mut penalties: BpfHashMap<MapData, SynSourceKey, u64> =
            BpfHashMap::try_from(take(&mut ebpf, MAP_SYN_PENALTY)?)?;
        penalties.insert(live.key, expires, 0)?;
    }
    let program: &Xdp = ebpf
        .program(PROG_XDP)
        .ok_or(XdpError::Missing("program `protobalance`"))?
        .try_into()?;
    let mut out = vec![0u8; frame.len() + 256];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    })?;
    let counters: PerCpuArray<MapData, CounterValue> =
        PerCpuArray::try_from(take(&mut ebpf, MAP_COUNTERS)?)?;
    let mut counted = None;
    for counter in Counter::ALL.into_iter().filter(|c| c.labels().is_some()) {
        let packets: u64 = counters
            .get(&(counter as u32), 0)?
            .iter()
            .map(|v| v.packets)
            .sum();
        if packets > 0 {
            counted = Some(counter);
        }
    }
    let counter = counted.ok_or(XdpError::Missing("verdict counter of the probe run"))?;
    Ok((result.return_value, counter))
}

/// The rules that can apply to `source`, read from the pinned maps: the longest allowlist
/// and blocklist entries containing it (if any), its bans, the limiter's settings.
fn rules_for(pin_dir: &Path, source: IpAddr) -> Result<Rules, XdpError> {
    let mut rules = Rules::default();
    let (allow, block) = match source {
        IpAddr::V4(a) => (
            longest_v4::<u32>(pin_dir, MAP_ALLOW_V4, a)?,
            longest_v4::<BlockEntry>(pin_dir, MAP_BLOCK_V4, a)?.map(|(c, e)| (c, e.list_id)),
        ),
        IpAddr::V6(a) => (
            longest_v6::<u32>(pin_dir, MAP_ALLOW_V6, a)?,
            longest_v6::<BlockEntry>(pin_dir, MAP_BLOCK_V6, a)?.map(|(c, e)| (c, e.list_id)),
        ),
    };
    rules.allow.extend(allow);
    rules.block.extend(block);
    match source {
        IpAddr::V4(a) => {
            let bans: BpfHashMap<MapData, [u8; 4], BanEntry> =
                BpfHashMap::try_from(open(pin_dir, MAP_BANS_V4)?)?;
            rules
                .bans_v4
                .extend(found(bans.get(&a.octets(), 0))?.map(|e| (a, e)));
        }
        IpAddr::V6(a) => {
            let bans: BpfHashMap<MapData, [u8; 16], BanEntry> =
                BpfHashMap::try_from(open(pin_dir, MAP_BANS_V6)?)?;
            rules
                .bans_v6
                .extend(found(bans.get(&a.octets(), 0))?.map(|e| (a, e)));
            let net = model::net64(a);
            let mut key = [0u8; 8];
            key.copy_from_slice(&net.octets()[..8]);
            let bans: BpfHashMap<MapData, [u8; 8], BanEntry> =
                BpfHashMap::try_from(open(pin_dir, MAP_BANS_V6_64)?)?;
            rules
                .bans_v6_64
                .extend(found(bans.get(&key, 0))?.map(|e| (net, e)));
        }
    }
    let config: Array<MapData, SynLimitConfig> =
        Array::try_from(open(pin_dir, MAP_SYN_LIMIT_CONFIG)?)?;
    rules.syn = config.get(&0, 0)?;
    let ports: Array<MapData, u64> = Array::try_from(open(pin_dir, MAP_SYN_PORTS)?)?;
    rules.syn_ports = super::syn_limit::read_ports(&ports)?.into_iter().collect();
    Ok(rules)
}

fn longest_v4<V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
    addr: Ipv4Addr,
) -> Result<Option<(Cidr, V)>, XdpError> {
    let trie: LpmTrie<MapData, [u8; 4], V> = LpmTrie::try_from(open(pin_dir, name)?)?;
    longest(&trie, addr.octets(), 32, IpAddr::from)
}

fn longest_v6<V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
    addr: Ipv6Addr,
) -> Result<Option<(Cidr, V)>, XdpError> {
    let trie: LpmTrie<MapData, [u8; 16], V> = LpmTrie::try_from(open(pin_dir, name)?)?;
    longest(&trie, addr.octets(), 128, IpAddr::from)
}

/// The longest entry of `trie` containing `addr`. The kernel's own lookup says whether
/// one exists (cheaply); only then are the entries walked to name it, since a lookup
/// returns the value but not the prefix that matched.
fn longest<const N: usize, V: aya::Pod>(
    trie: &LpmTrie<MapData, [u8; N], V>,
    addr: [u8; N],
    bits: u32,
    to_ip: impl Fn([u8; N]) -> IpAddr,
) -> Result<Option<(Cidr, V)>, XdpError> {
    if found(trie.get(&Key::new(bits, addr), 0))?.is_none() {
        return Ok(None);
    }
    let ip = to_ip(addr);
    let mut entries: HashMap<Cidr, u32> = HashMap::new();
    let mut values = Vec::new();
    for item in trie.iter() {
        let (key, value) = item?;
        let Ok(len) = u8::try_from(key.prefix_len()) else {
            continue;
        };
        if let Ok(cidr) = Cidr::new(to_ip(key.data()), len)
            && cidr.contains(ip)
        {
            entries.insert(cidr, values.len() as u32);
            values.push(value);
        }
    }
    Ok(model::longest_prefix(&entries, ip).map(|(cidr, i)| (cidr, values[i as usize])))
}

/// The name of list `id`, if the names map is pinned (older pins lack it) and it has one.
fn list_name(pin_dir: &Path, id: u32) -> Result<Option<String>, XdpError> {
    if id >= LISTS_MAX || !pin_dir.join(MAP_LIST_NAMES).exists() {
        return Ok(None);
    }
    let names: Array<MapData, ListName> = Array::try_from(open(pin_dir, MAP_LIST_NAMES)?)?;
    let raw = names.get(&id, 0)?;
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    Ok((end > 0).then(|| String::from_utf8_lossy(&raw[..end]).into_owned()))
}

fn open(pin_dir: &Path, name: &str) -> Result<Map, XdpError> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| XdpError::Io {
        path,
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(Map::from_map_data(data)?)
}

fn found<T>(result: Result<T, aya::maps::MapError>) -> Result<Option<T>, XdpError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(other) => Err(other.into()),
    }
}

/// A pin directory of its own for one explain call; removed (pins and all) on drop.
struct TempPins(PathBuf);

impl TempPins {
    fn new() -> Result<Self, XdpError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/protobalance-explain-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let pins = TempPins(dir);
        super::pin::prepare_pin_dir(&pins.0)?;
        Ok(pins)
    }
}

impl Drop for TempPins {
    fn drop(&mut self) {
        for name in PINNED_MAPS {
            let _ = std::fs::remove_file(self.0.join(name));
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}
