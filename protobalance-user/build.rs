//! Builds the eBPF objects of `protobalance-ebpf` for bpfel-unknown-none and leaves them in
//! OUT_DIR: `protobalance` (the XDP filter, embedded by `filter::xdp`) and
//! `protobalance-splice` (the kernel splice, embedded by `proxy::kernel_splice`).
//!
//! The toolchain is pinned: rustc 1.95.0 with `RUSTC_BOOTSTRAP=1` for `-Z build-std=core`
//! (see docs/development.md). Prerequisites (rust-src, bpf-linker built against LLVM 22) are
//! installed by `cargo xtask setup`; when they are missing this script says so.
use std::process::Command;

use anyhow::{Context as _, bail};

/// The toolchain the eBPF object is built with; kept in step with xtask's setup.
const EBPF_TOOLCHAIN: &str = "1.95.0";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PROTOBALANCE_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1") {
        // Fuzzing and other builds that never load the filter: an empty object, which
        // filter::xdp refuses to load with a message saying how to rebuild.
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
        for object in ["protobalance", "protobalance-splice"] {
            std::fs::write(out.join(object), [])
                .with_context(|| format!("writing the placeholder eBPF object {object}"))?;
        }
        println!("cargo:warning=AYA_BUILD_SKIP=1: the XDP object is an empty placeholder");
        return Ok(());
    }
    let toolchain =
        std::env::var("PROTOBALANCE_EBPF_TOOLCHAIN").unwrap_or_else(|_| EBPF_TOOLCHAIN.into());
    check_prerequisites(&toolchain)?;
    // SAFETY: build scripts are single-threaded at this point; the variable is read by
    // aya-build and inherited by the nested cargo that builds the eBPF crate only (it has its
    // own target dir, so the outer build's fingerprints are not affected).
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let package = aya_build::Package {
        name: "protobalance-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../protobalance-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
        .context("building the XDP program (protobalance-ebpf) failed")
}

fn check_prerequisites(toolchain: &str) -> anyhow::Result<()> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|out| out.status.success()) {
        bail!(
            "bpf-linker is not installed (or cannot load libLLVM 22). \
             Run `cargo xtask setup` once; it installs llvm-22-dev and bpf-linker 0.13.0."
        );
    }
    let sysroot = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
        .context("running rustup")?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout);
    let rust_src = std::path::Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library");
    if !rust_src.is_dir() {
        bail!(
            "rust-src for toolchain {toolchain} is missing (needed for -Z build-std=core). \
             Run `cargo xtask setup`, or `rustup component add rust-src --toolchain {toolchain}`."
        );
    }
    Ok(())
}
