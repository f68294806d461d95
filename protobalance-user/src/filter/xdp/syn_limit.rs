//! The SYN limiter's maps: its settings (one-element array, changed without reloading the
//! program), the set of limited ports, the per-source token buckets (LRU) and the penalty
//! map (plain hash: source → expiry). See `protobalance-ebpf/src/syn_limit.rs` for the
//! kernel half and docs/operations.md for why the penalty map is not an LRU.
//!
//! Penalties expire in the kernel by themselves; [`SynLimiter::sweep`] only frees the slots
//! of expired ones. A sweep can race with the kernel re-penalising the same source the
//! moment its old penalty expired; then that one penalty is lost and the source is held
//! back by its (empty) bucket alone, which is what happens when the map is full anyway.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::{Array, HashMap, MapData, MapError};
use protobalance_common::{
    MAP_SYN_BUCKETS, MAP_SYN_LIMIT_CONFIG, MAP_SYN_PENALTY, MAP_SYN_PORTS, SYN_PORT_WORDS,
    SYN_PORTS_MAX_ENTRIES, SYN_SOURCE_V4, SYN_SOURCE_V6_64, SynBucket, SynLimitConfig,
    SynSourceKey,
};

use super::{XdpError, monotonic_ns};

/// The limiter's settings. `rate_per_second == 0` turns it off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynLimit {
    /// SYNs per second one source may open, on average.
    pub rate_per_second: u32,
    /// SYNs one source may open at once (the bucket's capacity).
    pub burst: u32,
    /// How long a source that exceeded the rate has all its SYNs to the ports dropped.
    pub penalty: Duration,
}

impl SynLimit {
    pub const OFF: SynLimit = SynLimit {
        rate_per_second: 0,
        burst: 0,
        penalty: Duration::ZERO,
    };

    fn to_kernel(self) -> SynLimitConfig {
        SynLimitConfig {
            rate_per_second: self.rate_per_second,
            burst: self.burst,
            penalty_ns: u64::try_from(self.penalty.as_nanos()).unwrap_or(u64::MAX),
        }
    }
}

/// Whom a bucket or penalty belongs to: an IPv4 address or an IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SynSource {
    V4(Ipv4Addr),
    /// The network address of the /64 (host bits zero).
    V6Net64(Ipv6Addr),
}

impl SynSource {
    /// The source `addr` is limited as: itself for IPv4, its /64 for IPv6.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(a) => Self::V4(a),
            IpAddr::V6(a) => {
                let mut net = a.octets();
                net[8..].fill(0);
                Self::V6Net64(Ipv6Addr::from(net))
            }
        }
    }

    pub(super) fn key(self) -> SynSourceKey {
        match self {
            Self::V4(a) => SynSourceKey::v4(a.octets()),
            Self::V6Net64(a) => SynSourceKey::v6(&a.octets()),
        }
    }

    fn from_key(key: SynSourceKey) -> Option<Self> {
        match key.family {
            SYN_SOURCE_V4 => {
                let [a, b, c, d, ..] = key.addr;
                Some(Self::V4(Ipv4Addr::new(a, b, c, d)))
            }
            SYN_SOURCE_V6_64 => {
                let mut net = [0u8; 16];
                net[..8].copy_from_slice(&key.addr);
                Some(Self::V6Net64(Ipv6Addr::from(net)))
            }
            _ => None,
        }
    }
}

impl fmt::Display for SynSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(a) => write!(f, "{a}"),
            Self::V6Net64(a) => write!(f, "{a}/64"),
        }
    }
}

/// A source in the penalty map as read back from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Penalty {
    pub source: SynSource,
    /// Time left; zero when expired but not yet swept.
    pub remaining: Duration,
}

/// The ports set in the limiter's port bitmap, sorted.
pub(super) fn read_ports(bitmap: &Array<MapData, u64>) -> Result<Vec<u16>, XdpError> {
    let mut out = Vec::new();
    for index in 0..SYN_PORT_WORDS {
        let word = bitmap.get(&index, 0)?;
        out.extend(
            (0..64u16)
                .filter(|bit| word >> bit & 1 == 1)
                .map(|bit| index as u16 * 64 + bit),
        );
    }
    Ok(out)
}

/// The four limiter maps, taken out of a loaded filter.
pub struct SynLimiter {
    config: Array<MapData, SynLimitConfig>,
    ports: Array<MapData, u64>,
    buckets: HashMap<MapData, SynSourceKey, SynBucket>,
    penalty: HashMap<MapData, SynSourceKey, u64>,
}

impl SynLimiter {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, XdpError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(XdpError::Missing(name));
        Ok(Self {
            config: Array::try_from(take(MAP_SYN_LIMIT_CONFIG)?)?,
            ports: Array::try_from(take(MAP_SYN_PORTS)?)?,
            buckets: HashMap::try_from(take(MAP_SYN_BUCKETS)?)?,
            penalty: HashMap::try_from(take(MAP_SYN_PENALTY)?)?,
        })
    }

    /// Sets the limit and makes the port set exactly `ports` (with pinned maps, ports a
    /// previous run limited must not linger). Buckets and penalties are kept.
    pub fn configure(&mut self, limit: SynLimit, ports: &[u16]) -> Result<(), XdpError> {
        let wanted: HashSet<u16> = ports.iter().copied().collect();
        if wanted.len() > SYN_PORTS_MAX_ENTRIES as usize {
            return Err(XdpError::TooManySynPorts(wanted.len()));
        }
        let mut words = [0u64; SYN_PORT_WORDS as usize];
        for port in &wanted {
            words[usize::from(*port) / 64] |= 1 << (port % 64);
        }
        // Each word is written whole, so a SYN sees a port either limited or not.
        for (index, word) in (0u32..).zip(words) {
            if self.ports.get(&index, 0)? != word {
                self.ports.set(index, word, 0)?;
            }
        }
        self.config.set(0, limit.to_kernel(), 0)?;
        Ok(())
    }

    /// The limit the kernel applies now.
    pub fn limit(&self) -> Result<SynLimit, XdpError> {
        let c = self.config.get(&0, 0)?;
        Ok(SynLimit {
            rate_per_second: c.rate_per_second,
            burst: c.burst,
            penalty: Duration::from_nanos(c.penalty_ns),
        })
    }

    /// The limited destination ports, sorted.
    pub fn ports(&self) -> Result<Vec<u16>, XdpError> {
        read_ports(&self.ports)
    }

    /// Puts `source` into the penalty map until `expires_ns` (CLOCK_MONOTONIC, see
    /// [`monotonic_ns`]); tests use expiries in the past.
    pub fn penalise(&mut self, source: SynSource, expires_ns: u64) -> Result<(), XdpError> {
        self.penalty.insert(source.key(), expires_ns, 0)?;
        self.set_bucket_penalty(source, expires_ns)
    }

    /// Takes `source` out of the penalty map; an absent source is not an error.
    pub fn pardon(&mut self, source: SynSource) -> Result<(), XdpError> {
        super::ignore_absent(self.penalty.remove(&source.key()))?;
        self.set_bucket_penalty(source, 0)
    }

    /// The program reads a source's penalty from its bucket when it has one (the map only
    /// otherwise): keep the copy in step. A SYN updating the bucket at this instant may
    /// undo it; the penalty map still holds the truth for when the bucket is evicted.
    fn set_bucket_penalty(&mut self, source: SynSource, expires_ns: u64) -> Result<(), XdpError> {
        let key = source.key();
        match self.buckets.get(&key, 0) {
            Ok(mut bucket) => {
                bucket.penalty_ns = expires_ns;
                // BPF_EXIST: never recreate a bucket the LRU evicted meanwhile (ENOENT).
                const BPF_EXIST: u64 = 2;
                match self.buckets.insert(key, bucket, BPF_EXIST) {
                    Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
                    {
                        Ok(())
                    }
                    Err(other) => Err(other.into()),
                }
            }
            Err(MapError::KeyNotFound) => Ok(()),
            Err(other) => Err(other.into()),
        }
    }

    /// Every source in the penalty map, expired ones included (remaining zero).
    pub fn penalties(&self) -> Result<Vec<Penalty>, XdpError> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        for item in self.penalty.iter() {
            let (key, expires_ns) = item?;
            if let Some(source) = SynSource::from_key(key) {
                out.push(Penalty {
                    source,
                    remaining: Duration::from_nanos(expires_ns.saturating_sub(now)),
                });
            }
        }
        Ok(out)
    }

    /// Whether `source` has a token bucket (it may have been evicted from the LRU).
    pub fn has_bucket(&self, source: SynSource) -> Result<bool, XdpError> {
        Ok(self.bucket(source)?.is_some())
    }

    /// `source`'s token bucket as the kernel last left it (a lookup from user space does
    /// not count as a use for the LRU).
    pub fn bucket(&self, source: SynSource) -> Result<Option<SynBucket>, XdpError> {
        absent_is_none(self.buckets.get(&source.key(), 0))
    }

    /// When `source`'s penalty ends (CLOCK_MONOTONIC ns, possibly in the past).
    pub fn penalty_expiry(&self, source: SynSource) -> Result<Option<u64>, XdpError> {
        absent_is_none(self.penalty.get(&source.key(), 0))
    }

    /// Removes `source`'s bucket, as an LRU eviction would; its next SYN starts a full one.
    pub fn forget_bucket(&mut self, source: SynSource) -> Result<(), XdpError> {
        super::ignore_absent(self.buckets.remove(&source.key()))
    }

    /// Removes expired penalties; returns how many were removed and how many are left.
    pub fn sweep(&mut self) -> Result<(usize, usize), XdpError> {
        let penalties = self.penalties()?;
        let expired: Vec<SynSource> = penalties
            .iter()
            .filter(|p| p.remaining.is_zero())
            .map(|p| p.source)
            .collect();
        for source in &expired {
            self.pardon(*source)?;
        }
        Ok((expired.len(), penalties.len() - expired.len()))
    }
}

fn absent_is_none<T>(result: Result<T, MapError>) -> Result<Option<T>, XdpError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(other) => Err(other.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_and_ipv6_64s() {
        let v6 = SynSource::of("2001:db8:1:2:aaaa::1".parse().expect("ip"));
        assert_eq!(
            v6,
            SynSource::V6Net64("2001:db8:1:2::".parse().expect("ip"))
        );
        assert_eq!(v6.to_string(), "2001:db8:1:2::/64");
        assert_eq!(SynSource::from_key(v6.key()), Some(v6));
        let v4 = SynSource::of("198.51.100.7".parse().expect("ip"));
        assert_eq!(SynSource::from_key(v4.key()), Some(v4));
        assert_eq!(v4.to_string(), "198.51.100.7");
    }

    #[test]
    fn limits_convert_to_kernel_units() {
        let limit = SynLimit {
            rate_per_second: 5,
            burst: 10,
            penalty: Duration::from_secs(60),
        };
        let c = limit.to_kernel();
        assert_eq!((c.rate_per_second, c.burst), (5, 10));
        assert_eq!(c.penalty_ns, 60_000_000_000);
        assert!(c.enabled());
        assert!(!SynLimit::OFF.to_kernel().enabled());
    }
}
