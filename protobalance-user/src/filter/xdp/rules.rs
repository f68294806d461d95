//! The allowlist and timed bans in the kernel maps (the proxy's verdicts become drops).
//!
//! Bans expire in the kernel by themselves (the program compares `expires_ns` with
//! CLOCK_MONOTONIC); [`BanMaps::sweep`] only frees the map slots of expired entries.
//! With `xdp.pin_dir` the maps are pinned, so bans survive a restart of protobalance.

use std::{
    net::{IpAddr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use aya::maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key};
use protobalance_common::{
    BAN_ALL, BAN_SYN_ONLY, BanEntry, MAP_ALLOW_V4, MAP_ALLOW_V6, MAP_BANS_V4, MAP_BANS_V6,
    MAP_BANS_V6_64,
};

use super::{XdpError, XdpFilter};
use crate::filter::cidr::Cidr;

/// What a ban drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanMode {
    /// Every packet from the source.
    All,
    /// Only new connections (TCP SYN without ACK): sessions already open continue.
    NewConnections,
}

/// What a ban covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanTarget {
    Address(IpAddr),
    /// The IPv6 /64 around this address (one host typically owns a whole /64).
    Ipv6Net64(Ipv6Addr),
}

impl BanTarget {
    /// `198.51.100.7`, `2001:db8::7`, or `2001:db8:1:2::/64` (a whole IPv6 /64).
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(net) = text.strip_suffix("/64") {
            return net
                .parse()
                .map(|a: Ipv6Addr| Self::Ipv6Net64(net64_base(a)))
                .map_err(|_| format!("`{text}`: expected an IPv6 /64 like 2001:db8:1:2::/64"));
        }
        text.parse()
            .map(Self::Address)
            .map_err(|_| format!("`{text}` is not an IP address (or IPv6 /64)"))
    }
}

impl std::fmt::Display for BanTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address(a) => write!(f, "{a}"),
            Self::Ipv6Net64(a) => write!(f, "{}/64", net64_base(*a)),
        }
    }
}

/// The first address of `a`'s /64.
fn net64_base(a: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(a) & !((1u128 << 64) - 1))
}

/// A ban as read back from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ban {
    pub target: BanTarget,
    pub mode: BanMode,
    pub reason: u32,
    /// Time left; zero when expired but not yet swept.
    pub remaining: Duration,
}

impl XdpFilter {
    /// Adds (or replaces) an allowlist entry: matching sources pass before any other rule.
    pub fn allow(&mut self, cidr: Cidr, list_id: u32) -> Result<(), XdpError> {
        self.stage_allow(cidr, list_id)?;
        self.publish()?;
        Ok(())
    }

    /// The trie only; [`XdpFilter::publish`] makes it count.
    pub(super) fn stage_allow(&mut self, cidr: Cidr, list_id: u32) -> Result<(), XdpError> {
        if self.mirror.allow.get(&cidr.network()) == Some(&list_id) {
            return Ok(());
        }
        let len = u32::from(cidr.prefix_len());
        match cidr.network().addr() {
            IpAddr::V4(a) => {
                allow_v4(&mut self.ebpf)?.insert(&Key::new(len, a.octets()), list_id, 0)?
            }
            IpAddr::V6(a) => {
                allow_v6(&mut self.ebpf)?.insert(&Key::new(len, a.octets()), list_id, 0)?
            }
        }
        self.mirror.allow.insert(cidr.network(), list_id);
        Ok(())
    }

    /// Makes the allowlist hold exactly `wanted` (inserting first, then removing the rest:
    /// with pinned maps, entries a previous run allowed must not linger).
    pub fn replace_allowlist(&mut self, wanted: &[Cidr]) -> Result<usize, XdpError> {
        for cidr in wanted {
            self.stage_allow(*cidr, 0)?;
        }
        let wanted: std::collections::HashSet<Cidr> = wanted.iter().map(Cidr::network).collect();
        let mut stale = Vec::new();
        for key in allow_v4(&mut self.ebpf)?.keys() {
            let key = key?;
            stale.extend(stale_key(
                key.prefix_len(),
                IpAddr::from(key.data()),
                &wanted,
            ));
        }
        for key in allow_v6(&mut self.ebpf)?.keys() {
            let key = key?;
            stale.extend(stale_key(
                key.prefix_len(),
                IpAddr::from(key.data()),
                &wanted,
            ));
        }
        for cidr in &stale {
            let len = u32::from(cidr.prefix_len());
            self.mirror.allow.remove(cidr);
            let removed = match cidr.addr() {
                IpAddr::V4(a) => allow_v4(&mut self.ebpf)?.remove(&Key::new(len, a.octets())),
                IpAddr::V6(a) => allow_v6(&mut self.ebpf)?.remove(&Key::new(len, a.octets())),
            };
            super::ignore_absent(removed)?;
        }
        self.publish()?;
        Ok(stale.len())
    }
}

fn stale_key(
    prefix_len: u32,
    addr: IpAddr,
    wanted: &std::collections::HashSet<Cidr>,
) -> Option<Cidr> {
    let cidr = Cidr::new(addr, u8::try_from(prefix_len).ok()?).ok()?;
    (!wanted.contains(&cidr)).then_some(cidr)
}

/// The three ban maps, taken out of a loaded filter or opened from their pins (so
/// `protobalance filter ban` works on the filter a running protobalance owns).
pub struct BanMaps {
    v4: HashMap<MapData, [u8; 4], BanEntry>,
    v6: HashMap<MapData, [u8; 16], BanEntry>,
    v6_64: HashMap<MapData, [u8; 8], BanEntry>,
}

impl BanMaps {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, XdpError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(XdpError::Missing(name));
        Ok(Self {
            v4: HashMap::try_from(take(MAP_BANS_V4)?)?,
            v6: HashMap::try_from(take(MAP_BANS_V6)?)?,
            v6_64: HashMap::try_from(take(MAP_BANS_V6_64)?)?,
        })
    }

    /// The ban maps pinned under `pin_dir` by a running (or boot-loaded) filter.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, XdpError> {
        let open = |name: &str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path)
                .map(aya::maps::Map::HashMap)
                .map_err(|e| XdpError::Io {
                    path,
                    source: std::io::Error::other(e.to_string()),
                })
        };
        Ok(Self {
            v4: HashMap::try_from(open(MAP_BANS_V4)?)?,
            v6: HashMap::try_from(open(MAP_BANS_V6)?)?,
            v6_64: HashMap::try_from(open(MAP_BANS_V6_64)?)?,
        })
    }

    /// Bans `target` for `ttl` (replacing an existing ban of it).
    pub fn ban(
        &mut self,
        target: BanTarget,
        ttl: Duration,
        mode: BanMode,
        reason: u32,
    ) -> Result<(), XdpError> {
        let ttl_ns = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        let entry = BanEntry {
            expires_ns: monotonic_ns().saturating_add(ttl_ns),
            mode: match mode {
                BanMode::All => BAN_ALL,
                BanMode::NewConnections => BAN_SYN_ONLY,
            },
            reason,
        };
        self.put(target, entry)
    }

    /// Writes a ban entry as it is (tests use it for expiries in the past).
    pub fn put(&mut self, target: BanTarget, entry: BanEntry) -> Result<(), XdpError> {
        match target {
            BanTarget::Address(IpAddr::V4(a)) => self.v4.insert(a.octets(), entry, 0)?,
            BanTarget::Address(IpAddr::V6(a)) => self.v6.insert(a.octets(), entry, 0)?,
            BanTarget::Ipv6Net64(a) => self.v6_64.insert(net64(a), entry, 0)?,
        }
        Ok(())
    }

    /// Lifts a ban; lifting an absent ban is not an error.
    pub fn unban(&mut self, target: BanTarget) -> Result<(), XdpError> {
        let result = match target {
            BanTarget::Address(IpAddr::V4(a)) => self.v4.remove(&a.octets()),
            BanTarget::Address(IpAddr::V6(a)) => self.v6.remove(&a.octets()),
            BanTarget::Ipv6Net64(a) => self.v6_64.remove(&net64(a)),
        };
        super::ignore_absent(result)
    }

    /// Every ban in the kernel, expired ones included (remaining zero).
    pub fn list(&self) -> Result<Vec<Ban>, XdpError> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        for item in self.v4.iter() {
            let (key, entry) = item?;
            out.push(ban(BanTarget::Address(IpAddr::from(key)), entry, now));
        }
        for item in self.v6.iter() {
            let (key, entry) = item?;
            out.push(ban(BanTarget::Address(IpAddr::from(key)), entry, now));
        }
        for item in self.v6_64.iter() {
            let (key, entry) = item?;
            let mut addr = [0u8; 16];
            addr[..8].copy_from_slice(&key);
            out.push(ban(BanTarget::Ipv6Net64(Ipv6Addr::from(addr)), entry, now));
        }
        Ok(out)
    }

    /// The unexpired bans that cover `ip`: of the address itself and, for IPv6, of its /64.
    pub fn covering(&self, ip: IpAddr) -> Result<Vec<Ban>, XdpError> {
        let now = monotonic_ns();
        let found = |entry: Result<BanEntry, MapError>| match entry {
            Ok(entry) => Ok(Some(entry)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(other) => Err(XdpError::from(other)),
        };
        let mut out = Vec::new();
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                if let Some(e) = found(self.v4.get(&a.octets(), 0))? {
                    out.push(ban(BanTarget::Address(IpAddr::V4(a)), e, now));
                }
            }
            IpAddr::V6(a) => {
                if let Some(e) = found(self.v6.get(&a.octets(), 0))? {
                    out.push(ban(BanTarget::Address(IpAddr::V6(a)), e, now));
                }
                if let Some(e) = found(self.v6_64.get(&net64(a), 0))? {
                    out.push(ban(BanTarget::Ipv6Net64(net64_base(a)), e, now));
                }
            }
        }
        out.retain(|b| !b.remaining.is_zero());
        Ok(out)
    }

    /// Removes expired bans; returns how many.
    pub fn sweep(&mut self) -> Result<usize, XdpError> {
        let expired: Vec<BanTarget> = self
            .list()?
            .into_iter()
            .filter(|b| b.remaining.is_zero())
            .map(|b| b.target)
            .collect();
        for target in &expired {
            self.unban(*target)?;
        }
        Ok(expired.len())
    }
}

fn ban(target: BanTarget, entry: BanEntry, now: u64) -> Ban {
    Ban {
        target,
        mode: if entry.mode == BAN_SYN_ONLY {
            BanMode::NewConnections
        } else {
            BanMode::All
        },
        reason: entry.reason,
        remaining: Duration::from_nanos(entry.expires_ns.saturating_sub(now)),
    }
}

fn net64(addr: Ipv6Addr) -> [u8; 8] {
    let mut net = [0u8; 8];
    net.copy_from_slice(&addr.octets()[..8]);
    net
}

/// CLOCK_MONOTONIC in nanoseconds: the clock ban and penalty expiries are set in.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: what the program reads (`bpf_ktime_get_coarse_ns`),
/// CLOCK_MONOTONIC as of the last tick, so at most a tick behind [`monotonic_ns`].
pub fn monotonic_coarse_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; both monotonic clocks always exist on Linux.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn map<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, XdpError> {
    ebpf.map_mut(name).ok_or(XdpError::Missing(name))
}

fn allow_v4(ebpf: &mut aya::Ebpf) -> Result<LpmTrie<&mut MapData, [u8; 4], u32>, XdpError> {
    Ok(LpmTrie::try_from(map(ebpf, MAP_ALLOW_V4)?)?)
}

fn allow_v6(ebpf: &mut aya::Ebpf) -> Result<LpmTrie<&mut MapData, [u8; 16], u32>, XdpError> {
    Ok(LpmTrie::try_from(map(ebpf, MAP_ALLOW_V6)?)?)
}

/// Every allowlist entry (network → list id), both families.
pub(super) fn read_allowlist(
    ebpf: &mut aya::Ebpf,
) -> Result<std::collections::HashMap<Cidr, u32>, XdpError> {
    let mut out = std::collections::HashMap::new();
    for item in allow_v4(ebpf)?.iter() {
        let (key, id) = item?;
        out.extend(super::key_to_cidr(key.prefix_len(), IpAddr::from(key.data())).map(|c| (c, id)));
    }
    for item in allow_v6(ebpf)?.iter() {
        let (key, id) = item?;
        out.extend(super::key_to_cidr(key.prefix_len(), IpAddr::from(key.data())).map(|c| (c, id)));
    }
    Ok(out)
}
