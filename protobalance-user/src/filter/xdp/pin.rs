//! bpffs pins: checking the pin directory, and removing what `filter load` pinned.

use std::path::Path;

use aya::{maps::MapInfo, programs::links::PinnedLink};
use protobalance_common::{Counter, MAP_COUNTERS, PINNED_MAPS};

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
    retire_outgrown_counters(dir)
}

/// A counter map pinned by an older version has fewer slots than [`Counter::COUNT`]: the
/// loader would reuse it as it is (aya does not compare definitions), the new counters
/// would never count and reading them would fail. Unpin it so a fresh one is created; the
/// counts restart from zero, which Prometheus reads as an ordinary counter reset. A program
/// still attached through a pinned link keeps its own reference to the old map.
fn retire_outgrown_counters(dir: &Path) -> Result<(), XdpError> {
    let path = dir.join(MAP_COUNTERS);
    let Ok(info) = MapInfo::from_pin(&path) else {
        return Ok(());
    };
    if info.max_entries() >= Counter::COUNT {
        return Ok(());
    }
    tracing::warn!(
        path = %path.display(), slots = info.max_entries(), want = Counter::COUNT,
        "pinned XDP counters come from an older version; replacing them (counts restart at 0)"
    );
    std::fs::remove_file(&path).map_err(|source| XdpError::Io { path, source })
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
    use aya::maps::{MapData, PerCpuArray};
    use protobalance_common::CounterValue;

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
    fn counters_pinned_by_an_older_version_are_replaced() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP counters_pinned_by_an_older_version_are_replaced: not root");
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

        let filter = XdpFilter::load(Some(&dir.0)).expect("load over old pins");
        let counters = filter.counters().expect("every counter readable");
        assert_eq!(counters.len(), Counter::ALL.len());
        let info = MapInfo::from_pin(dir.0.join(MAP_COUNTERS)).expect("new pin");
        assert_eq!(info.max_entries(), Counter::COUNT);
        drop(filter);
        // A current pin is reused as it is.
        let id = info.id();
        let _filter = XdpFilter::load(Some(&dir.0)).expect("load again");
        let again = MapInfo::from_pin(dir.0.join(MAP_COUNTERS)).expect("pin");
        assert_eq!(again.id(), id, "same map kept");
    }
}
