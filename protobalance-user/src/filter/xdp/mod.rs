//! The XDP loader: the only module that touches aya.
//!
//! It embeds the object built from `protobalance-ebpf` (see build.rs), loads it, optionally
//! pins its maps under bpffs, attaches it to an interface and feeds the blocklist tries,
//! the allowlist and bans (`rules`) and the SYN limiter (`syn_limit`).
//!
//! Two ways of owning the attachment:
//! * **owned** — `protobalance run` attaches and the attachment lives as long as the process
//!   (a bpf_link held by an fd: it is detached on shutdown, and by the kernel if we crash);
//! * **pinned** — `protobalance filter load` pins the link as `<pin_dir>/link-<iface>`, so the
//!   filter stays after the loader exits (a box that loads it at boot). A later `run` that
//!   finds the pinned link swaps its own program into it atomically (`bpf_link_update`) and
//!   leaves it pinned on exit; `protobalance filter unload` removes link and map pins.

use std::{
    collections::HashSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use protobalance_common::{
    BlockEntry, Counter, CounterValue, MAP_BLOCK_V4, MAP_BLOCK_V6, MAP_COUNTERS, PINNED_MAPS,
    PROG_XDP,
};

use crate::filter::cidr::Cidr;

mod explain;
pub mod generations;
mod kernel_log;
mod lists;
pub mod model;
mod pin;
mod rules;
mod syn_limit;
pub use explain::{Explanation, SynContext, explain_pinned, syn_frame};
pub use generations::Published;
use generations::{Compiled, Generations};
pub use kernel_log::KernelLog;
pub use lists::{INLINE_LIST_ID, ListMaps, ListSizes, ListsReplaced};
use pin::prepare_pin_dir;
pub use pin::unload_pinned;
pub use rules::{Ban, BanMaps, BanMode, BanTarget, monotonic_coarse_ns, monotonic_ns};
pub use syn_limit::{Penalty, SynLimit, SynLimiter, SynSource};

/// The XDP object, built by build.rs from the protobalance-ebpf crate.
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/protobalance"));

/// How to attach: `auto` tries driver (native) mode and falls back to SKB (generic) mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    #[default]
    Auto,
    Driver,
    Skb,
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(
        "the embedded XDP object is empty: this binary was built with AYA_BUILD_SKIP; \
         rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error("loading the XDP object failed (are you root, with a BPF-capable kernel?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no {0}; the object and this binary are out of step")]
    Missing(&'static str),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("XDP map: {0}")]
    Map(#[from] MapError),
    #[error("the XDP program's log: {0}")]
    Log(String),
    #[error("XDP link: {0}")]
    LinkConversion(#[from] LinkError),
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "interface {iface}: XDP attach failed in driver mode ({driver}) and in SKB mode ({skb})"
    )]
    Attach {
        iface: String,
        driver: Box<ProgramError>,
        skb: Box<ProgramError>,
    },
    #[error("{0} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs(PathBuf),
    #[error(
        "{0} SYN-limited ports, but the kernel map holds at most {max}; \
         list fewer in `xdp.syn_limited_ports`",
        max = protobalance_common::SYN_PORTS_MAX_ENTRIES
    )]
    TooManySynPorts(usize),
    #[error(
        "{0} blocklists (`xdp.blocklist` and `xdp.blocklist_files`), but list ids hold at \
         most {max}; merge some files",
        max = protobalance_common::LISTS_MAX - 1
    )]
    TooManyLists(usize),
}

/// Which mode an attachment ended up in, for logs and the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Driver,
    Skb,
    /// Swapped into an existing pinned link; the mode is the one that link was created with.
    PinnedLink,
}

/// A loaded XDP filter with its maps.
pub struct XdpFilter {
    ebpf: Ebpf,
    counters: Arc<Mutex<PerCpuArray<MapData, CounterValue>>>,
    pin_dir: Option<PathBuf>,
    bans: Arc<Mutex<BanMaps>>,
    syn: Arc<Mutex<SynLimiter>>,
    lists: Arc<Mutex<ListMaps>>,
    /// The compiled rule tables the program reads (two generations).
    generations: Generations,
    /// What the live tables hold, for the metrics collector.
    tables: Arc<Mutex<TableStats>>,
    /// The program's diagnostic records, until [`Self::take_kernel_log`].
    kernel_log: Option<KernelLog>,
    /// What the allowlist and blocklist tries hold, kept in memory: the tries are the
    /// source of truth (pinned, listed, explained from), and this copy is what each
    /// publish compiles from without reading a million entries back from the kernel.
    mirror: Mirror,
    /// The attachment this filter owns (detached when the filter is dropped).
    link: Option<XdpLinkId>,
    /// Kernel ids of the maps in [`PINNED_MAPS`], to reopen them after they were taken
    /// apart into typed handles (`explain` pins them for its probe).
    map_ids: Vec<(&'static str, u32)>,
}

impl XdpFilter {
    /// Loads the program. With `pin_dir`, maps are pinned there (or reused when already
    /// pinned, so blocklists and counters survive restarts); without it they are private.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, XdpError> {
        if XDP_OBJECT.is_empty() {
            return Err(XdpError::NoObject);
        }
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => {
                prepare_pin_dir(dir)?;
                PINNED_MAPS
                    .into_iter()
                    .map(|name| (name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(XDP_OBJECT)?;
        program(&mut ebpf)?.load()?;
        let map_ids = map_ids(&ebpf)?;
        let counters = ebpf
            .take_map(MAP_COUNTERS)
            .ok_or(XdpError::Missing(MAP_COUNTERS))?;
        let counters = Arc::new(Mutex::new(PerCpuArray::try_from(counters)?));
        let bans = Arc::new(Mutex::new(BanMaps::take(&mut ebpf)?));
        let syn = Arc::new(Mutex::new(SynLimiter::take(&mut ebpf)?));
        let lists = Arc::new(Mutex::new(ListMaps::take(&mut ebpf)?));
        let generations = Generations::take(&mut ebpf)?;
        let kernel_log = match KernelLog::take(&mut ebpf) {
            Ok(log) => Some(log),
            Err(error) => {
                tracing::warn!(%error, "the XDP program's diagnostics will not be logged");
                None
            }
        };
        let mirror = Mirror::read(&mut ebpf)?;
        let mut filter = Self {
            ebpf,
            counters,
            bans,
            syn,
            lists,
            generations,
            tables: Arc::default(),
            kernel_log,
            mirror,
            pin_dir: pin_dir.map(Path::to_owned),
            link: None,
            map_ids,
        };
        // Pinned tries from a previous run: the tables must match them before we attach.
        filter.publish()?;
        Ok(filter)
    }

    /// Compiles the tries' entries into the spare generation and makes it live (see
    /// `generations`): the program sees the old rules or the new ones, never a mix.
    pub fn publish(&mut self) -> Result<Published, XdpError> {
        let compiled = Compiled::new(&self.mirror.allow, &self.mirror.block);
        let published = self.generations.publish(compiled)?;
        let sizes = self.list_sizes()?;
        *self
            .tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = TableStats {
            generation: self.generations.state(),
            sizes,
            publish: published.took,
        };
        tracing::debug!(
            serial = published.serial,
            changes = published.changes,
            took_ms = published.took.as_millis() as u64,
            "XDP rule tables published"
        );
        Ok(published)
    }

    /// The program's diagnostic records (aya-log), to be read by a task: see
    /// [`KernelLog::run`]. `None` after the first call.
    pub fn take_kernel_log(&mut self) -> Option<KernelLog> {
        self.kernel_log.take()
    }

    /// The live generation of the rule tables and how many were published.
    pub fn list_generation(&self) -> protobalance_common::ListGen {
        self.generations.state()
    }

    /// Attaches to `iface`. When a pinned link for `iface` exists under the pin dir, the
    /// program is swapped into it atomically instead (no moment without a filter).
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, XdpError> {
        if let Some(path) = self.link_pin_path(iface).filter(|p| p.exists()) {
            let pinned = PinnedLink::from_pin(&path).map_err(|source| XdpError::Link {
                path: path.clone(),
                source,
            })?;
            let link = XdpLink::try_from(FdLink::from(pinned))?;
            self.link = Some(program(&mut self.ebpf)?.attach_to_link(link)?);
            return Ok(Attached::PinnedLink);
        }
        let prog = program(&mut self.ebpf)?;
        let (link, attached) = match mode {
            AttachMode::Driver => (prog.attach(iface, XdpMode::Driver)?, Attached::Driver),
            AttachMode::Skb => (prog.attach(iface, XdpMode::Skb)?, Attached::Skb),
            AttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
                Ok(link) => (link, Attached::Driver),
                Err(driver) => {
                    tracing::warn!(
                        %iface, error = %driver,
                        "native (driver) XDP is not available on this interface; \
                         falling back to SKB (generic) mode, which filters later and costs more"
                    );
                    let link =
                        prog.attach(iface, XdpMode::Skb)
                            .map_err(|skb| XdpError::Attach {
                                iface: iface.to_owned(),
                                driver: Box::new(driver),
                                skb: Box::new(skb),
                            })?;
                    (link, Attached::Skb)
                }
            },
        };
        self.link = Some(link);
        Ok(attached)
    }

    /// Pins the attachment on `iface` so it outlives this process (`filter load`).
    pub fn pin_attachment(&mut self, iface: &str) -> Result<PathBuf, XdpError> {
        let path = self
            .link_pin_path(iface)
            .ok_or(XdpError::Missing("pin directory (pin_dir)"))?;
        let link_id = self
            .link
            .take()
            .ok_or(XdpError::Missing("attachment to pin"))?;
        let link = program(&mut self.ebpf)?.take_link(link_id)?;
        let fd_link = FdLink::try_from(link)?;
        fd_link.pin(&path).map_err(|source| XdpError::Pin {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    fn link_pin_path(&self, iface: &str) -> Option<PathBuf> {
        self.pin_dir
            .as_ref()
            .map(|dir| dir.join(format!("link-{iface}")))
    }

    /// Adds (or replaces) a blocklist entry: packets from inside `cidr` are dropped.
    pub fn block(&mut self, cidr: Cidr, list_id: u32) -> Result<(), XdpError> {
        self.stage_block(cidr, list_id)?;
        self.publish()?;
        Ok(())
    }

    /// Removes a blocklist entry; removing an absent entry is not an error.
    pub fn unblock(&mut self, cidr: Cidr) -> Result<(), XdpError> {
        self.stage_unblock(cidr)?;
        self.publish()?;
        Ok(())
    }

    /// Adds allowlist and blocklist entries (with their list ids) and publishes once.
    pub fn add_rules(
        &mut self,
        allow: &[(Cidr, u32)],
        block: &[(Cidr, u32)],
    ) -> Result<(), XdpError> {
        for (cidr, id) in allow {
            self.stage_allow(*cidr, *id)?;
        }
        for (cidr, id) in block {
            self.stage_block(*cidr, *id)?;
        }
        self.publish()?;
        Ok(())
    }

    /// The tries only; [`Self::publish`] makes it count.
    fn stage_block(&mut self, cidr: Cidr, list_id: u32) -> Result<(), XdpError> {
        if self.mirror.block.get(&cidr.network()) == Some(&list_id) {
            // Already there: a reload of an unchanged million-line list writes nothing.
            return Ok(());
        }
        let entry = BlockEntry { list_id, flags: 0 };
        let len = u32::from(cidr.prefix_len());
        match cidr.network().addr() {
            IpAddr::V4(addr) => {
                trie_v4(&mut self.ebpf)?.insert(&Key::new(len, addr.octets()), entry, 0)?
            }
            IpAddr::V6(addr) => {
                trie_v6(&mut self.ebpf)?.insert(&Key::new(len, addr.octets()), entry, 0)?
            }
        }
        self.mirror.block.insert(cidr.network(), list_id);
        Ok(())
    }

    fn stage_unblock(&mut self, cidr: Cidr) -> Result<(), XdpError> {
        self.mirror.block.remove(&cidr.network());
        let len = u32::from(cidr.prefix_len());
        let result = match cidr.network().addr() {
            IpAddr::V4(addr) => trie_v4(&mut self.ebpf)?.remove(&Key::new(len, addr.octets())),
            IpAddr::V6(addr) => trie_v6(&mut self.ebpf)?.remove(&Key::new(len, addr.octets())),
        };
        ignore_absent(result)
    }

    /// Makes list `list_id` hold exactly `wanted`: inserts first, then removes entries of
    /// that list that are no longer wanted, so a kept entry never disappears in between.
    /// Needed with pinned maps, where the previous run's entries are still present.
    /// Returns how many stale entries were removed.
    pub fn replace_list(&mut self, list_id: u32, wanted: &[Cidr]) -> Result<usize, XdpError> {
        for cidr in wanted {
            self.stage_block(*cidr, list_id)?;
        }
        let wanted: HashSet<Cidr> = wanted.iter().map(Cidr::network).collect();
        let stale: Vec<Cidr> = self
            .list_entries(list_id)?
            .into_iter()
            .filter(|cidr| !wanted.contains(cidr))
            .collect();
        for cidr in &stale {
            self.stage_unblock(*cidr)?;
        }
        self.publish()?;
        Ok(stale.len())
    }

    /// Every entry of list `list_id`, both families.
    pub fn list_entries(&mut self, list_id: u32) -> Result<Vec<Cidr>, XdpError> {
        Ok(self
            .mirror
            .block
            .iter()
            .filter(|(_, id)| **id == list_id)
            .map(|(cidr, _)| *cidr)
            .collect())
    }

    /// The ban maps (ban, unban, list, sweep), locked for the caller.
    pub fn bans(&self) -> std::sync::MutexGuard<'_, BanMaps> {
        self.bans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Shared access to the ban maps for tasks that outlive a borrow (the sweeper, and the
    /// reputation engine later).
    pub fn ban_handle(&self) -> Arc<Mutex<BanMaps>> {
        Arc::clone(&self.bans)
    }

    /// Sets the SYN limiter (rate 0 turns it off) and the destination ports it watches.
    /// Takes effect at once, also in a running program; buckets and penalties are kept.
    pub fn set_syn_limit(&self, limit: SynLimit, ports: &[u16]) -> Result<(), XdpError> {
        self.syn_limiter().configure(limit, ports)
    }

    /// The SYN limiter's maps (penalties, buckets, settings), locked for the caller.
    pub fn syn_limiter(&self) -> std::sync::MutexGuard<'_, SynLimiter> {
        self.syn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Shared access to the SYN limiter for the sweeper.
    pub fn syn_limiter_handle(&self) -> Arc<Mutex<SynLimiter>> {
        Arc::clone(&self.syn)
    }

    /// Number of entries in the (v4, v6) blocklists.
    pub fn blocklist_len(&mut self) -> Result<(usize, usize), XdpError> {
        let v4 = self
            .mirror
            .block
            .keys()
            .filter(|c| c.addr().is_ipv4())
            .count();
        Ok((v4, self.mirror.block.len() - v4))
    }

    /// Verdict counters summed over all CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Counter, CounterValue)>, XdpError> {
        read_counters(&self.counters)
    }

    /// A handle for the metrics collector; reads the maps at scrape time.
    pub fn counter_handle(&self) -> CounterHandle {
        CounterHandle {
            counters: Arc::clone(&self.counters),
            lists: Arc::clone(&self.lists),
            tables: Arc::clone(&self.tables),
        }
    }

    /// Runs the program once on `frame` with `BPF_PROG_TEST_RUN` and returns the XDP action
    /// (1 = drop, 2 = pass). For tests and benchmarks; the kernel rejects frames shorter
    /// than an Ethernet header (14 bytes) with EINVAL.
    pub fn test_run(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), XdpError> {
        let prog: &Xdp = self
            .ebpf
            .program(PROG_XDP)
            .ok_or(XdpError::Missing("program `protobalance`"))?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..Default::default()
        })?;
        Ok((result.return_value, result.duration))
    }
}

/// The allowlist and blocklist entries (network → list id), as in the tries.
#[derive(Default)]
struct Mirror {
    allow: std::collections::HashMap<Cidr, u32>,
    block: std::collections::HashMap<Cidr, u32>,
}

impl Mirror {
    /// Reads the tries (pinned ones keep a previous run's entries).
    fn read(ebpf: &mut Ebpf) -> Result<Self, XdpError> {
        let mut mirror = Mirror::default();
        for item in trie_v4(ebpf)?.iter() {
            let (key, entry) = item?;
            mirror.block.extend(
                key_to_cidr(key.prefix_len(), IpAddr::from(key.data())).map(|c| (c, entry.list_id)),
            );
        }
        for item in trie_v6(ebpf)?.iter() {
            let (key, entry) = item?;
            mirror.block.extend(
                key_to_cidr(key.prefix_len(), IpAddr::from(key.data())).map(|c| (c, entry.list_id)),
            );
        }
        mirror.allow = rules::read_allowlist(ebpf)?;
        Ok(mirror)
    }
}

fn key_to_cidr(prefix_len: u32, addr: IpAddr) -> Option<Cidr> {
    Cidr::new(addr, u8::try_from(prefix_len).ok()?).ok()
}

/// Shared read access to the per-CPU verdict counters and the per-list hit counters.
#[derive(Clone)]
pub struct CounterHandle {
    counters: Arc<Mutex<PerCpuArray<MapData, CounterValue>>>,
    lists: Arc<Mutex<ListMaps>>,
    tables: Arc<Mutex<TableStats>>,
}

/// The live rule tables as of the last publish.
#[derive(Clone, Debug, Default)]
pub struct TableStats {
    pub generation: protobalance_common::ListGen,
    pub sizes: ListSizes,
    /// How long the last publish took (both generations written).
    pub publish: std::time::Duration,
}

impl CounterHandle {
    pub fn read(&self) -> Result<Vec<(Counter, CounterValue)>, XdpError> {
        read_counters(&self.counters)
    }

    /// The live tables' generation and sizes.
    pub fn tables(&self) -> TableStats {
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Entries per list, labelled like [`Self::list_hits`].
    pub fn list_entries(&self) -> Result<Vec<(String, u64)>, XdpError> {
        let names = self
            .lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .names()?;
        let counts: Vec<(u32, u64)> = self
            .tables()
            .sizes
            .per_list
            .iter()
            .map(|(id, n)| (*id, *n as u64))
            .collect();
        Ok(label_by_list(&names, &counts))
    }

    /// Drops per list, labelled with the list's name (`#<id>` for an unnamed id), for every
    /// named list and every id with drops.
    pub fn list_hits(&self) -> Result<Vec<(String, u64)>, XdpError> {
        let lists = self
            .lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let names = lists.names()?;
        let hits = lists.hits()?;
        Ok(label_by_list(&names, &hits))
    }
}

/// `(label, value)` for every named list (0 when absent from `values`) and every other id
/// in `values`; the label is the list's name, or `#<id>`.
pub fn label_by_list(names: &[(u32, String)], values: &[(u32, u64)]) -> Vec<(String, u64)> {
    let value = |id: u32| values.iter().find(|(i, _)| *i == id).map_or(0, |(_, v)| *v);
    let mut out: Vec<(String, u64)> = names
        .iter()
        .map(|(id, n)| (n.clone(), value(*id)))
        .collect();
    for (id, v) in values {
        if !names.iter().any(|(named, _)| named == id) {
            out.push((format!("#{id}"), *v));
        }
    }
    out
}

fn read_counters(
    map: &Mutex<PerCpuArray<MapData, CounterValue>>,
) -> Result<Vec<(Counter, CounterValue)>, XdpError> {
    let map = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = Vec::with_capacity(Counter::ALL.len());
    for counter in Counter::ALL {
        let per_cpu = map.get(&(counter as u32), 0)?;
        let total = per_cpu
            .iter()
            .fold(CounterValue::default(), |acc, v| CounterValue {
                packets: acc.packets + v.packets,
                bytes: acc.bytes + v.bytes,
            });
        out.push((counter, total));
    }
    Ok(out)
}

fn map_ids(ebpf: &Ebpf) -> Result<Vec<(&'static str, u32)>, XdpError> {
    let mut ids = Vec::with_capacity(PINNED_MAPS.len());
    for name in PINNED_MAPS {
        let data = match ebpf.map(name) {
            Some(
                Map::Array(data)
                | Map::PerCpuArray(data)
                | Map::HashMap(data)
                | Map::LruHashMap(data)
                | Map::LpmTrie(data),
            ) => data,
            _ => return Err(XdpError::Missing(name)),
        };
        ids.push((name, data.info()?.id()));
    }
    Ok(ids)
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let prog = ebpf
        .program_mut(PROG_XDP)
        .ok_or(XdpError::Missing("program `protobalance`"))?;
    Ok(prog.try_into()?)
}

fn trie_v4(ebpf: &mut Ebpf) -> Result<LpmTrie<&mut MapData, [u8; 4], BlockEntry>, XdpError> {
    let map = ebpf
        .map_mut(MAP_BLOCK_V4)
        .ok_or(XdpError::Missing(MAP_BLOCK_V4))?;
    Ok(LpmTrie::try_from(map)?)
}

fn trie_v6(ebpf: &mut Ebpf) -> Result<LpmTrie<&mut MapData, [u8; 16], BlockEntry>, XdpError> {
    let map = ebpf
        .map_mut(MAP_BLOCK_V6)
        .ok_or(XdpError::Missing(MAP_BLOCK_V6))?;
    Ok(LpmTrie::try_from(map)?)
}

/// A map delete whose key was not there is not an error: aya reports it as `KeyNotFound`
/// from some calls and as the syscall's `ENOENT` from `bpf_map_delete_elem`.
pub(crate) fn ignore_absent(result: Result<(), MapError>) -> Result<(), XdpError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(other) => Err(other.into()),
    }
}
