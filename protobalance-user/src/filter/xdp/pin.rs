//! bpffs pins: checking the pin directory, and removing what `filter load` pinned.

use std::path::Path;

use aya::programs::links::PinnedLink;
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
