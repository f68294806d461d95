//! `cargo xtask bench xdp`: installs what the comparison needs (xdp-tools for Debian's
//! `xdp-filter`, bpftool, netsniff-ng for `trafgen`, nftables), then runs the
//! `protobalance-user` bench `xdp` (see benches/xdp.rs for what it measures and how).

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{setup, util};

#[derive(Debug, Clone, Args)]
pub struct XdpArgs {
    /// Blocklist sizes (CIDRs), comma-separated.
    #[arg(long, default_value = "1,1000,100000,1000000")]
    sizes: String,
    /// BPF_PROG_TEST_RUN repetitions per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Seconds of each veth flood (0: no flood).
    #[arg(long, default_value_t = 5)]
    flood_seconds: u64,
}

pub fn run(args: &XdpArgs) -> Result<()> {
    if !util::is_root() {
        bail!("`bench xdp` loads BPF programs and creates namespaces: run it as root");
    }
    util::step("installing the comparison's tools (xdp-tools, bpftool, netsniff-ng, nftables)");
    setup::install_packages(&["xdp-tools", "bpftool", "netsniff-ng", "nftables"])?;
    util::step("cargo bench -p protobalance-user --bench xdp");
    util::run(
        util::cargo()
            .args(["bench", "-p", "protobalance-user", "--bench", "xdp", "--"])
            .args(["--sizes", &args.sizes])
            .args(["--repeat", &args.repeat.to_string()])
            .args(["--flood-seconds", &args.flood_seconds.to_string()]),
    )
    .context("the XDP bench")
}
