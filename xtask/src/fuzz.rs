//! `cargo xtask fuzz`: runs the cargo-fuzz targets in fuzz/ (one per protocol codec) for a
//! bounded time each. `cargo xtask test` runs them briefly as a smoke test.
//!
//! The fuzz build uses the pinned stable toolchain with RUSTC_BOOTSTRAP=1 (for
//! `-Zsanitizer=address`; the ASan runtime ships with rust-std) and AYA_BUILD_SKIP=1 (the
//! codecs never load the XDP object, so it is an empty placeholder there).

use anyhow::Result;

use crate::util::{self, step};

pub const TARGETS: &[&str] = &["pop3_codec", "imap_codec", "smtp_codec"];

/// Fuzzes `targets` (all when empty) for `seconds` each; a crash fails with its input kept
/// under fuzz/artifacts/.
pub fn run(targets: &[String], seconds: u32) -> Result<()> {
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for target in chosen {
        step(&format!(
            "fuzzing {target} for {seconds} s (cargo fuzz, ASan)"
        ));
        util::run(
            util::cargo()
                .env("RUSTC_BOOTSTRAP", "1")
                .env("AYA_BUILD_SKIP", "1")
                .args(["fuzz", "run", "--fuzz-dir", "fuzz", target, "--"])
                .arg(format!("-max_total_time={seconds}"))
                .arg("-print_final_stats=1"),
        )?;
    }
    Ok(())
}
