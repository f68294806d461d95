//! `cargo xtask setup`: installs what the build, the demo and the tests need, idempotently.
//! Each step checks first and prints `ok` or what it installs; a second run changes nothing.
//!
//! The recipe (shared/TESTBED.md): LLVM 22 from Debian (bookworm-security) for bpf-linker,
//! the pinned rustc 1.95.0 with rust-src (the eBPF crate is built with `-Z build-std=core`
//! under RUSTC_BOOTSTRAP=1), bpf-linker 0.13.0 built against LLVM 22, real mail servers.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::util::{self, output, step};

/// The toolchain the eBPF object is built with (must match protobalance-user/build.rs).
pub const EBPF_TOOLCHAIN: &str = "1.95.0";
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.1";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Debian packages: the eBPF toolchain's LLVM, network tools, and the real servers/clients
/// the tests and the demo run.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "dovecot-core",
    "dovecot-pop3d",
    "dovecot-imapd",
    "dovecot-lmtpd",
    "postfix",
    "swaks",
    "python3",
    "curl",
    // xmllint: the API tests validate every response against docs/api.xsd.
    "libxml2-utils",
    // dnsmasq (the binary only, no service): the DNS server of the DNSBL tests.
    "dnsmasq-base",
    // The content scanners of the [scan] tests (their services are not started: the tests
    // run their own instances, clamd with its own tiny signature database).
    "rspamd",
    "clamav-daemon",
    // The shared directory of multi-node edges: the tests start their own throw-away
    // clusters with this server's initdb/postgres (the package's own cluster is not used).
    "postgresql",
];

pub fn run() -> Result<()> {
    step("checking prerequisites (cargo xtask setup)");
    apt_packages()?;
    system_postfix_stopped()?;
    rust_toolchain()?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    println!("  prerequisites: ok");
    Ok(())
}

fn apt_packages() -> Result<()> {
    install_packages(APT_PACKAGES)
}

/// Installs the Debian packages of `packages` that are missing (as root), idempotently.
pub fn install_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        println!("  apt packages: ok ({})", packages.join(" "));
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "missing Debian packages: {}. Run `cargo xtask setup` as root, or install them: \
             apt-get install {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    println!("  apt packages: installing {}", missing.join(" "));
    util::run(Command::new("apt-get").args(["update", "-q"]))?;
    // Debian starts a package's default service on install (Dovecot would listen on all
    // addresses). A temporary policy-rc.d forbids that; our instances use their own configs.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let created_policy = !policy.exists();
    if created_policy {
        std::fs::write(
            policy,
            "#!/bin/sh\n# written by cargo xtask setup\nexit 101\n",
        )?;
        util::run(Command::new("chmod").args(["755", "/usr/sbin/policy-rc.d"]))?;
    }
    if missing.contains(&"postfix") {
        preseed_postfix()?;
    }
    let result = util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q"])
            .args(&missing),
    );
    if created_policy {
        let _ = std::fs::remove_file(policy);
    }
    result
}

/// Postfix's install asks which kind of mail server this is; "No configuration" installs
/// it without a main.cf (tests run their own instances with their own `-c` directory).
fn preseed_postfix() -> Result<()> {
    const ANSWER: &str = "postfix postfix/main_mailer_type select No configuration\n";
    let mut child = Command::new("debconf-set-selections")
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot start debconf-set-selections")?;
    child
        .stdin
        .take()
        .context("debconf-set-selections stdin")?
        .write_all(ANSWER.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("debconf-set-selections failed ({status})");
    }
    Ok(())
}

/// The system Postfix must not run: it would listen on port 25 of every address. Debian
/// installs it unconfigured (no /etc/postfix/main.cf, so it cannot start) and
/// policy-rc.d kept it from starting; stop it if someone configured and started it since.
fn system_postfix_stopped() -> Result<()> {
    let configured = Path::new("/etc/postfix/main.cf").exists();
    // `postfix status` exits 0 only when the default instance's master runs.
    let running = configured && output(Command::new("postfix").arg("status")).is_some();
    if !running {
        println!("  system postfix not running: ok");
        return Ok(());
    }
    if !util::is_root() {
        bail!("the system Postfix is running; stop it as root: postfix stop");
    }
    println!("  system postfix: stopping (tests run their own instances)");
    util::run(Command::new("postfix").arg("stop"))
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|status| status.contains("install ok installed"))
}

fn rust_toolchain() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN)) {
        println!("  rust {EBPF_TOOLCHAIN}: installing (profile minimal)");
        util::run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
    .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        println!("  rust {EBPF_TOOLCHAIN} with rust-src: ok");
        return Ok(());
    }
    println!("  rust {EBPF_TOOLCHAIN}: adding rust-src (for -Z build-std=core)");
    util::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
}

fn bpf_linker() -> Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        println!("  bpf-linker {BPF_LINKER_VERSION}: ok");
        return Ok(());
    }
    println!("  bpf-linker {BPF_LINKER_VERSION}: building against LLVM 22 (takes about 2 minutes)");
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    util::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )
}

/// cargo-fuzz drives the codec fuzz targets (`cargo xtask fuzz`, and the smoke run of
/// `cargo xtask test`).
fn cargo_fuzz() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let version = output(Command::new(&cargo).args(["fuzz", "--version"])).unwrap_or_default();
    if version.contains(CARGO_FUZZ_VERSION) {
        println!("  cargo-fuzz {CARGO_FUZZ_VERSION}: ok");
        return Ok(());
    }
    println!("  cargo-fuzz {CARGO_FUZZ_VERSION}: installing (about 30 s)");
    util::run(Command::new(&cargo).args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// Pins (kept blocklists, `filter load`) need a bpffs at /sys/fs/bpf.
fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        println!("  bpffs on /sys/fs/bpf: ok");
        return Ok(());
    }
    if !util::is_root() {
        println!("  bpffs on /sys/fs/bpf: not mounted (needs root: mount -t bpf bpf /sys/fs/bpf)");
        return Ok(());
    }
    println!("  bpffs on /sys/fs/bpf: mounting");
    util::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
