//! bpffs pins: checking the pin directory, and removing what `filter load` pinned.

use std::path::Path;

use aya::{maps::MapInfo, programs::links::PinnedLink};
use protobalance_common::PINNED_MAPS;

use super::XdpError;

/// Creates the pin directory and checks it lives on bpffs (pins elsewhere fail obscurely).
pub(super) fn prepare_pin_dir(dir: &Path) -> Result<(), XdpError> {
    std::fs::create_dir_all(dir).map_err(|source| XdpError::Io {
        path: dir.to_owned(),
        source,
    })?;
    if !is_bpffs(dir) {
        return Err(XdpError::NotBpffs(dir.to_owned()));
    }
    retire_incompatible_pins(dir, super::XDP_OBJECT)
}

/// A map pinned by an older version may have another layout than this object's (a counter
/// array with fewer slots, a port set that was a hash and is now a bitmap, a bucket that
/// grew a field): the loader would reuse it as it is (aya does not compare definitions) and
/// the program would misread it, or fail to load. Such pins are removed so fresh maps are
/// created: counts restart from zero (Prometheus reads a counter reset), buckets and
/// penalties are forgotten, lists are rewritten from the config anyway. A program still
/// attached through a pinned link keeps its own reference to the old maps until the new
/// program replaces it.
fn retire_incompatible_pins(dir: &Path, object: &[u8]) -> Result<(), XdpError> {
    if object.is_empty() {
        return Ok(());
    }
    let parsed = aya_obj::Object::parse(object)
        .map_err(|e| XdpError::Log(format!("parsing the XDP object: {e}")))?;
    for name in PINNED_MAPS {
        let path = dir.join(name);
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        let Some(want) = parsed.maps.get(name) else {
            continue;
        };
        let pinned = (
            info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        );
        let wanted = (
            want.map_type(),
            want.key_size(),
            want.value_size(),
            want.max_entries(),
            want.map_flags(),
        );
        if pinned == wanted {
            continue;
        }
        tracing::warn!(
            path = %path.display(), ?pinned, ?wanted,
            "a pinned XDP map comes from another version with another layout \
             (type, key, value, entries, flags); replacing it (its contents start afresh)"
        );
        std::fs::remove_file(&path).map_err(|source| XdpError::Io { path, source })?;
    }
    Ok(())
}

#[allow(
    clippy::useless_conversion,
    reason = "statfs.f_type is i64 on x86_64 but narrower on other architectures"
)]
fn is_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is a plain C struct for which all-zero bytes are a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a valid out-pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && i64::from(stat.f_type) == BPF_FS_MAGIC
}

/// Removes what `filter load` pinned for `iface`: the link (which detaches the program)
/// and, when `remove_maps`, the map pins (blocklists and counters are then lost).
pub fn unload_pinned(pin_dir: &Path, iface: &str, remove_maps: bool) -> Result<bool, XdpError> {
    let link_path = pin_dir.join(format!("link-{iface}"));
    let had_link = link_path.exists();
    if had_link {
        let pinned = PinnedLink::from_pin(&link_path).map_err(|source| XdpError::Link {
            path: link_path.clone(),
            source,
        })?;
        pinned.unpin().map_err(|source| XdpError::Io {
            path: link_path.clone(),
            source,
        })?;
    }
    if remove_maps {
        for name in PINNED_MAPS {
            let path = pin_dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(XdpError::Io { path, source }),
            }
        }
        // Only removes the directory when nothing else is pinned there.
        let _ = std::fs::remove_dir(pin_dir);
    }
    Ok(had_link)
}

#[cfg(test)]
mod tests {
    use aya::maps::{HashMap, MapData, PerCpuArray};
    use protobalance_common::{Counter, CounterValue, MAP_COUNTERS, MAP_SYN_PORTS, SYN_PORT_WORDS};

    use super::*;
    use crate::filter::xdp::XdpFilter;

    /// Removes the test's pin directory, also when the test fails.
    struct PinDir(std::path::PathBuf);

    impl Drop for PinDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn maps_pinned_by_an_older_version_are_replaced() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP maps_pinned_by_an_older_version_are_replaced: not root");
            return;
        }
        let dir = PinDir(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/pbt-{}-old-counters",
            std::process::id()
        )));
        std::fs::create_dir_all(&dir.0).expect("pin dir");
        // What the first release pinned: six counter slots.
        let old = PerCpuArray::<MapData, CounterValue>::create(6, 0).expect("old counters");
        old.pin(dir.0.join(MAP_COUNTERS)).expect("pin old counters");
        // What releases before the port bitmap pinned: a hash of ports.
        let ports = HashMap::<MapData, u16, u8>::create(64, 0).expect("old ports");
        ports.pin(dir.0.join(MAP_SYN_PORTS)).expect("pin old ports");

        let filter = XdpFilter::load(Some(&dir.0)).expect("load over old pins");
        let counters = filter.counters().expect("every counter readable");
        assert_eq!(counters.len(), Counter::ALL.len());
        let info = MapInfo::from_pin(dir.0.join(MAP_COUNTERS)).expect("new pin");
        assert_eq!(info.max_entries(), Counter::COUNT);
        let ports = MapInfo::from_pin(dir.0.join(MAP_SYN_PORTS)).expect("ports pin");
        assert_eq!(
            (ports.max_entries(), ports.value_size()),
            (SYN_PORT_WORDS, 8),
            "the port bitmap replaced the old hash"
        );
        filter
            .set_syn_limit(
                crate::filter::xdp::SynLimit {
                    rate_per_second: 5,
                    burst: 5,
                    penalty: std::time::Duration::from_secs(1),
                },
                &[25, 587],
            )
            .expect("the limiter works on the new maps");
        assert_eq!(filter.syn_limiter().ports().expect("ports"), [25, 587]);
        drop(filter);
        // A current pin is reused as it is.
        let id = info.id();
        let _filter = XdpFilter::load(Some(&dir.0)).expect("load again");
        let again = MapInfo::from_pin(dir.0.join(MAP_COUNTERS)).expect("pin");
        assert_eq!(again.id(), id, "same map kept");
    }
}
