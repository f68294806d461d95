//! The compiled rule tables the program reads, and their atomic replacement.
//!
//! **What the program computes.** The reference model (`model`) says: a source inside any
//! allowlist entry passes; otherwise the longest blocklist entry containing it drops it and
//! names the list. User space compiles both lists into *one* longest-prefix-match function
//! with three classes (none, allow, list k): the allowlist entries, plus the blocklist
//! entries that no allowlist entry covers (an entry covered by an allowlist entry can never
//! decide: every address in it is allowed; an allowlist entry wins over a blocklist entry of
//! the same prefix). Longest match over that set equals the model: if some allowlist entry
//! A contains the source, every surviving blocklist entry containing it is shorter than A
//! (a longer one would lie inside A and was dropped), so the longest match is an allowlist
//! entry; if none does, it is the longest blocklist entry.
//!
//! **How it is looked up** (the ≈75 ns/packet of `xdp-filter` cannot be met by a kernel LPM
//! trie at a million entries, whose walk grows with the list):
//! * IPv4: a DIR-24 array, one byte per /24 (16 MiB): the class of the longest entry of
//!   length ≤ 24 containing the /24, painted shortest first; plus two flags, "a /32 entry lies
//!   in this /24" and "a /25–/31 entry lies in this /24". The program reads the byte (an
//!   array lookup the verifier inlines), then only when flagged the /32 hash and the
//!   /25–/31 trie, longest first. Most packets cost one memory read, whatever the list size.
//! * IPv6: a hash of /128 entries, then an LPM trie of the rest, each skipped while empty.
//!
//! **Atomic replacement.** There are two generations of these maps and a selector
//! (`PB_LIST_GEN`) the program reads once per packet. A publish fills the spare generation
//! with the new tables, flips the selector, waits until no program run can still be using
//! the old generation (an RCU grace period: every XDP run is an RCU read-side section, and
//! `membarrier(MEMBARRIER_CMD_GLOBAL)` returns only after `synchronize_rcu()`), then brings
//! the old generation up to the same content. A packet therefore sees the old rules or the
//! new ones, never a mix, and a generation is never written while a packet reads it. Both
//! generations hold the same tables between publishes, so the next publish writes only the
//! difference (the DIR array is written whole: 16 MiB through an mmap of the map, a few ms).
//!
//! The maps are pinned with the others so `explain`'s probe and a restarted protobalance
//! share them. A restart cannot know what a previous run left in them: its first publish
//! rewrites each generation from scratch (still spare first, then flip), so a pinned link
//! keeps filtering with the old tables until the new ones are complete.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    time::Duration,
};

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use protobalance_common::{
    CLASS_ALLOW, DIR_CLASS_MASK, DIR_ENTRIES, DIR_HAS_EXACT, DIR_HAS_LONG, DIR_SLOTS_PER_VALUE,
    GEN_NUMBER, GEN_V6_EXACT, GEN_V6_PREFIX, ListGen, MAP_LIST_GEN, MAP_V4_DIR, MAP_V4_EXACT,
    MAP_V4_LONG, MAP_V6_EXACT, MAP_V6_PREFIX, class_of_list,
};

use super::XdpError;
use crate::filter::cidr::Cidr;

/// Bytes of one DIR-24 table: one per /24.
const DIR_BYTES: usize = DIR_ENTRIES as usize * DIR_SLOTS_PER_VALUE;

/// The rule tables of one generation, as user space computes them.
#[derive(Clone, PartialEq, Eq)]
pub struct Compiled {
    /// One byte per /24, indexed by the top 24 bits of the address.
    pub dir: Vec<u8>,
    pub v4_exact: HashMap<[u8; 4], u8>,
    pub v4_long: HashMap<(u8, [u8; 4]), u8>,
    pub v6_exact: HashMap<[u8; 16], u8>,
    pub v6_prefix: HashMap<(u8, [u8; 16]), u8>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("v4_exact", &self.v4_exact.len())
            .field("v4_long", &self.v4_long.len())
            .field("v6_exact", &self.v6_exact.len())
            .field("v6_prefix", &self.v6_prefix.len())
            .finish_non_exhaustive()
    }
}

impl Compiled {
    /// Compiles the allowlist and blocklist entries (each with its list id) into tables.
    pub fn new(allow: &HashMap<Cidr, u32>, block: &HashMap<Cidr, u32>) -> Self {
        let allow_lengths: Vec<u8> = {
            let mut lengths: Vec<u8> = allow.keys().map(Cidr::prefix_len).collect();
            lengths.sort_unstable();
            lengths.dedup();
            lengths
        };
        let covered = |cidr: &Cidr| {
            allow_lengths
                .iter()
                .take_while(|len| **len <= cidr.prefix_len())
                .any(|len| {
                    Cidr::new(cidr.addr(), *len)
                        .map(|c| allow.contains_key(&c.network()))
                        .unwrap_or(false)
                })
        };
        let rules = allow.keys().map(|c| (*c, CLASS_ALLOW)).chain(
            block
                .iter()
                .filter(|(c, _)| !covered(c))
                .map(|(c, id)| (*c, class_of_list(*id))),
        );
        let mut out = Compiled {
            dir: vec![0; DIR_BYTES],
            v4_exact: HashMap::new(),
            v4_long: HashMap::new(),
            v6_exact: HashMap::new(),
            v6_prefix: HashMap::new(),
        };
        let mut short: Vec<(u8, u32, u8)> = Vec::new();
        for (cidr, class) in rules {
            let len = cidr.prefix_len();
            match cidr.addr() {
                IpAddr::V4(a) if len <= 24 => short.push((len, u32::from(a), class)),
                IpAddr::V4(a) if len < 32 => {
                    out.v4_long.insert((len, a.octets()), class);
                }
                IpAddr::V4(a) => {
                    out.v4_exact.insert(a.octets(), class);
                }
                IpAddr::V6(a) if len == 128 => {
                    out.v6_exact.insert(a.octets(), class);
                }
                IpAddr::V6(a) => {
                    out.v6_prefix.insert((len, a.octets()), class);
                }
            }
        }
        // Shortest first, so a longer entry paints over the shorter ones containing it.
        short.sort_unstable_by_key(|(len, addr, _)| (*len, *addr));
        for (len, addr, class) in short {
            let first = (addr >> 8) as usize;
            let count = 1usize << (24 - len);
            out.dir[first..first + count].fill(class);
        }
        for (_, addr) in out.v4_long.keys() {
            out.dir[(u32::from_be_bytes(*addr) >> 8) as usize] |= DIR_HAS_LONG;
        }
        for addr in out.v4_exact.keys() {
            out.dir[(u32::from_be_bytes(*addr) >> 8) as usize] |= DIR_HAS_EXACT;
        }
        out
    }

    /// What the program would find for `addr`: the class of the longest matching rule.
    pub fn class(&self, addr: IpAddr) -> u8 {
        match addr {
            IpAddr::V4(a) => {
                let byte = self.dir[(u32::from(a) >> 8) as usize];
                if byte & DIR_HAS_EXACT != 0
                    && let Some(class) = self.v4_exact.get(&a.octets())
                {
                    return *class;
                }
                if byte & DIR_HAS_LONG != 0
                    && let Some(class) = (25..32).rev().find_map(|len| {
                        let net = Cidr::new(addr, len).ok()?.network();
                        let IpAddr::V4(n) = net.addr() else {
                            return None;
                        };
                        self.v4_long.get(&(len, n.octets()))
                    })
                {
                    return *class;
                }
                byte & DIR_CLASS_MASK
            }
            IpAddr::V6(a) => {
                if let Some(class) = self.v6_exact.get(&a.octets()) {
                    return *class;
                }
                (0..128)
                    .rev()
                    .find_map(|len| {
                        let net = Cidr::new(addr, len).ok()?.network();
                        let IpAddr::V6(n) = net.addr() else {
                            return None;
                        };
                        self.v6_prefix.get(&(len, n.octets()))
                    })
                    .copied()
                    .unwrap_or_default()
            }
        }
    }

    fn flags(&self) -> u32 {
        let mut flags = 0;
        if !self.v6_exact.is_empty() {
            flags |= GEN_V6_EXACT;
        }
        if !self.v6_prefix.is_empty() {
            flags |= GEN_V6_PREFIX;
        }
        flags
    }
}

/// A DIR-24 map mapped into our memory (the map is `BPF_F_MMAPABLE`).
struct DirMap {
    /// Keeps the map (and so the mapping's backing) alive.
    _map: MapData,
    base: NonNull<u8>,
}

// SAFETY: the mapping is plain shared memory owned by this value; access goes through
// `&mut self`.
unsafe impl Send for DirMap {}

impl DirMap {
    fn new(map: MapData) -> Result<Self, XdpError> {
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a shared read-write mapping of DIR_BYTES of an mmap-able array map,
        // which is exactly max_entries × value_size bytes, page aligned.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                DIR_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(XdpError::Io {
                path: "mmap of the DIR-24 map".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(base.cast()).ok_or(XdpError::Missing("DIR-24 mapping"))?;
        Ok(Self { _map: map, base })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is DIR_BYTES long and lives as long as self.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), DIR_BYTES) }
    }
}

impl Drop for DirMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), DIR_BYTES) };
    }
}

struct Generation {
    dir: DirMap,
    v4_exact: BpfHashMap<MapData, [u8; 4], u32>,
    v4_long: LpmTrie<MapData, [u8; 4], u32>,
    v6_exact: BpfHashMap<MapData, [u8; 16], u32>,
    v6_prefix: LpmTrie<MapData, [u8; 16], u32>,
}

/// The selector and both generations, with what they hold.
pub struct Generations {
    selector: Array<MapData, ListGen>,
    generations: [Generation; 2],
    /// The tables both generations hold; `None` until the first publish (pinned maps may
    /// hold anything a previous run left).
    current: Option<Compiled>,
    state: ListGen,
}

/// What one publish did, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub serial: u64,
    /// Map entries written or removed in each generation (DIR bytes not counted).
    pub changes: usize,
    pub took: Duration,
}

impl Generations {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, XdpError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(XdpError::Missing(name));
        let selector: Array<MapData, ListGen> = Array::try_from(take(MAP_LIST_GEN)?)?;
        let mut generation = |g: usize| -> Result<Generation, XdpError> {
            let dir = match take(MAP_V4_DIR[g])? {
                Map::Array(data) => data,
                _ => return Err(XdpError::Missing(MAP_V4_DIR[g])),
            };
            Ok(Generation {
                dir: DirMap::new(dir)?,
                v4_exact: BpfHashMap::try_from(take(MAP_V4_EXACT[g])?)?,
                v4_long: LpmTrie::try_from(take(MAP_V4_LONG[g])?)?,
                v6_exact: BpfHashMap::try_from(take(MAP_V6_EXACT[g])?)?,
                v6_prefix: LpmTrie::try_from(take(MAP_V6_PREFIX[g])?)?,
            })
        };
        let generations = [generation(0)?, generation(1)?];
        let state = selector.get(&0, 0)?;
        Ok(Self {
            selector,
            generations,
            current: None,
            state,
        })
    }

    /// The live generation (0 or 1) and the number of publishes since the maps were made.
    pub fn state(&self) -> ListGen {
        self.state
    }

    /// Makes `new` the live tables (see the module comment for the protocol).
    pub fn publish(&mut self, new: Compiled) -> Result<Published, XdpError> {
        let started = std::time::Instant::now();
        if self.current.as_ref() == Some(&new) {
            return Ok(Published {
                serial: self.state.serial,
                changes: 0,
                took: started.elapsed(),
            });
        }
        let old_live = (self.state.live & GEN_NUMBER) as usize;
        let spare = 1 - old_live;
        // A write that fails half-way leaves a generation holding neither the old tables
        // nor the new: forget what both hold, so the next publish rewrites from scratch.
        let known = self.current.take();
        let changes = write(&mut self.generations[spare], known.as_ref(), &new)?;
        let state = ListGen {
            live: spare as u32 | new.flags(),
            reserved: 0,
            serial: self.state.serial + 1,
        };
        self.selector.set(0, state, 0)?;
        self.state = state;
        // From here the old live generation is spare, but packets that read the selector
        // before the flip may still be reading it.
        wait_for_readers();
        // The new tables are live whatever happens now: a failure here only leaves the
        // spare generation to be rewritten from scratch next time (`current` stays None).
        match write(&mut self.generations[old_live], known.as_ref(), &new) {
            Ok(_) => self.current = Some(new),
            Err(error) => tracing::error!(
                %error,
                "XDP rule tables: the new generation is live, but bringing the spare one up \
                 to date failed; the next change rewrites it"
            ),
        }
        Ok(Published {
            serial: state.serial,
            changes,
            took: started.elapsed(),
        })
    }
}

/// Waits for an RCU grace period: every XDP program run that started before has ended.
fn wait_for_readers() {
    // SAFETY: membarrier takes plain integers; MEMBARRIER_CMD_GLOBAL calls synchronize_rcu().
    let done = unsafe { libc::syscall(libc::SYS_membarrier, libc::MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if done != 0 {
        // Refused (a nohz_full kernel): a program run takes microseconds; wait far longer.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Brings one (spare) generation from `old` (None: unknown) to `new`.
fn write(g: &mut Generation, old: Option<&Compiled>, new: &Compiled) -> Result<usize, XdpError> {
    g.dir.bytes().copy_from_slice(&new.dir);
    let mut changes = 0;
    changes += sync_map(
        old.map(|o| &o.v4_exact),
        &new.v4_exact,
        |k| *k,
        &mut g.v4_exact,
    )?;
    changes += sync_trie(old.map(|o| &o.v4_long), &new.v4_long, &mut g.v4_long)?;
    changes += sync_map(
        old.map(|o| &o.v6_exact),
        &new.v6_exact,
        |k| *k,
        &mut g.v6_exact,
    )?;
    changes += sync_trie(old.map(|o| &o.v6_prefix), &new.v6_prefix, &mut g.v6_prefix)?;
    Ok(changes)
}

fn sync_map<K: aya::Pod + Eq + std::hash::Hash>(
    old: Option<&HashMap<K, u8>>,
    new: &HashMap<K, u8>,
    key: impl Fn(&K) -> K,
    map: &mut BpfHashMap<MapData, K, u32>,
) -> Result<usize, XdpError> {
    let mut changes = 0;
    match old {
        Some(old) => {
            for k in old.keys().filter(|k| !new.contains_key(k)) {
                super::ignore_absent(map.remove(&key(k)))?;
                changes += 1;
            }
        }
        None => {
            let stale: Vec<K> = map.keys().collect::<Result<_, _>>()?;
            for k in &stale {
                super::ignore_absent(map.remove(k))?;
            }
            changes += stale.len();
        }
    }
    for (k, class) in new {
        if old.and_then(|o| o.get(k)) != Some(class) {
            map.insert(key(k), u32::from(*class), 0)?;
            changes += 1;
        }
    }
    Ok(changes)
}

fn sync_trie<const N: usize>(
    old: Option<&HashMap<(u8, [u8; N]), u8>>,
    new: &HashMap<(u8, [u8; N]), u8>,
    trie: &mut LpmTrie<MapData, [u8; N], u32>,
) -> Result<usize, XdpError> {
    let mut changes = 0;
    let key = |(len, addr): &(u8, [u8; N])| Key::new(u32::from(*len), *addr);
    match old {
        Some(old) => {
            for k in old.keys().filter(|k| !new.contains_key(k)) {
                super::ignore_absent(trie.remove(&key(k)))?;
                changes += 1;
            }
        }
        None => {
            let stale: Vec<Key<[u8; N]>> = trie.keys().collect::<Result<_, _>>()?;
            for k in &stale {
                super::ignore_absent(trie.remove(k))?;
            }
            changes += stale.len();
        }
    }
    for (k, class) in new {
        if old.and_then(|o| o.get(k)) != Some(class) {
            trie.insert(&key(k), u32::from(*class), 0)?;
            changes += 1;
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::xdp::model;

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("cidr")
    }

    fn set(entries: &[(&str, u32)]) -> HashMap<Cidr, u32> {
        entries
            .iter()
            .map(|(c, id)| (cidr(c).network(), *id))
            .collect()
    }

    /// The model's verdict as a class.
    fn reference(allow: &HashMap<Cidr, u32>, block: &HashMap<Cidr, u32>, addr: IpAddr) -> u8 {
        if model::longest_prefix(allow, addr).is_some() {
            return CLASS_ALLOW;
        }
        model::longest_prefix(block, addr).map_or(0, |(_, id)| class_of_list(id))
    }

    #[test]
    fn compiled_tables_agree_with_the_model() {
        let allow = set(&[
            ("203.0.113.8/29", 0),
            ("10.1.0.0/16", 0),
            ("198.51.100.77/32", 0),
            ("2001:db8:1::/48", 0),
        ]);
        let block = set(&[
            ("10.0.0.0/8", 1),
            ("10.1.2.0/24", 2), // inside an allowed /16: dead
            ("203.0.113.0/24", 3),
            ("203.0.113.0/28", 4), // contains the allowed /29
            ("203.0.113.128/25", 5),
            ("203.0.113.200/32", 6),
            ("198.51.100.0/24", 7),
            ("198.51.100.77/32", 8), // same as an allowed entry
            ("0.0.0.0/1", 9),
            ("2001:db8::/32", 1),
            ("2001:db8::5/128", 2),
            ("2001:db8:1:2::/64", 3), // inside an allowed /48
            ("2001:db8:ff::/48", 70), // an id past LISTS_MAX
        ]);
        let compiled = Compiled::new(&allow, &block);
        let probes = [
            "10.0.0.1",
            "10.1.2.3",
            "10.2.0.0",
            "203.0.113.1",
            "203.0.113.9",
            "203.0.113.20",
            "203.0.113.130",
            "203.0.113.200",
            "203.0.113.201",
            "198.51.100.77",
            "198.51.100.78",
            "127.0.0.1",
            "192.0.2.1",
            "2001:db8::5",
            "2001:db8::6",
            "2001:db8:1:2::1",
            "2001:db8:ff::1",
            "2001:db9::1",
        ];
        for probe in probes {
            let addr: IpAddr = probe.parse().expect("ip");
            assert_eq!(
                compiled.class(addr),
                reference(&allow, &block, addr),
                "{probe}"
            );
        }
        assert!(!compiled.v4_long.contains_key(&(24, [10, 1, 2, 0])));
        assert_eq!(
            compiled.v4_exact.get(&[198, 51, 100, 77]),
            Some(&CLASS_ALLOW)
        );
    }

    #[test]
    fn random_lists_agree_with_the_model() {
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20 {
            let mut allow = HashMap::new();
            let mut block = HashMap::new();
            // Addresses crowd into 10.0.0.0/16 so that entries nest and overlap.
            let random_v4 = |next: &mut dyn FnMut() -> u64| {
                let addr = 0x0a00_0000 | (next() as u32 & 0xffff);
                let len = (next() % 33) as u8;
                Cidr::new(IpAddr::from(addr.to_be_bytes()), len.max(8))
                    .expect("cidr")
                    .network()
            };
            for _ in 0..(next() % 5) {
                allow.insert(random_v4(&mut next), 0);
            }
            for _ in 0..(next() % 40) {
                block.insert(random_v4(&mut next), (next() % 70) as u32);
            }
            let compiled = Compiled::new(&allow, &block);
            for _ in 0..2000 {
                let addr = IpAddr::from((0x0a00_0000 | (next() as u32 & 0x1ffff)).to_be_bytes());
                assert_eq!(
                    compiled.class(addr),
                    reference(&allow, &block, addr),
                    "{addr} with allow {allow:?} block {block:?}"
                );
            }
        }
    }
}
