//! The XDP program's cost, side by side with Debian's `xdp-filter` (xdp-tools) in one run.
//!
//! 1. ns/packet through `BPF_PROG_TEST_RUN` (repeat N: the kernel's own average; best of 3)
//!    for 64-byte IPv4 TCP SYN frames to port 25 — pass (limiter off), pass through the SYN
//!    limiter (the default configuration: a source under its budget), blocklisted by a /24
//!    entry, blocklisted by a /32 entry, banned, SYN-limited — with 1, 1 k, 100 k and 1 M
//!    blocklist CIDRs loaded; the time to load each list (`replace_named_lists`, what a
//!    start-up takes); and `xdp-filter` on the same pass and drop frames (`bpftool prog run`,
//!    same repeat, best of 3), loaded in a namespace of its own with the dropped address in
//!    its list. `xdp-filter` matches exact addresses in a hash, so its cost does not grow with
//!    a list (nor can it hold CIDRs): it is the bar, measured again next to every size.
//! 2. A veth flood (`--flood`, on by default): netsniff-ng's `trafgen` sends SYNs from a
//!    blocklisted source into a namespace's veth for a few seconds; drops/s of our program
//!    (driver mode on the host end) vs an nftables netdev-ingress rule with the same list in
//!    an interval set. On veth the kernel copies every frame before XDP runs, so this favours
//!    nftables; the ns/packet figure is the one the program is built to win.
//!
//! The lists: deterministic pseudo-random distinct prefixes, 70 % /32, 25 % /24, 5 % /16–/23,
//! none inside 192.0.0.0/8 (where the test sources are): a real feed's mix (mostly single bot
//! addresses, some networks).
//!
//! Needs root. Run: `cargo xtask bench xdp`, or `cargo bench -p protobalance-user --bench xdp
//! [-- --sizes 1,1000 --repeat 1000000 --flood-seconds 5 --no-flood]`.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use protobalance::filter::{
    blocklist::NamedList,
    cidr::Cidr,
    xdp::{AttachMode, BanMode, BanTarget, SynLimit, XdpFilter, syn_frame},
};
use protobalance_common::Counter;
use protobalance_tests::{NetNs, Veth, process::output_with_timeout};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

struct Args {
    sizes: Vec<usize>,
    repeat: u32,
    flood_seconds: u64,
}

fn args() -> Result<Args> {
    let mut out = Args {
        sizes: vec![1, 1_000, 100_000, 1_000_000],
        repeat: 1_000_000,
        flood_seconds: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sizes" => {
                let list = it.next().context("--sizes needs a list, e.g. 1,1000")?;
                out.sizes = list
                    .split(',')
                    .map(|s| s.trim().parse().context("--sizes: not a number"))
                    .collect::<Result<_>>()?;
            }
            "--repeat" => {
                out.repeat = it
                    .next()
                    .context("--repeat needs a number")?
                    .parse()
                    .context("--repeat: not a number")?;
            }
            "--flood-seconds" => {
                out.flood_seconds = it
                    .next()
                    .context("--flood-seconds needs a number")?
                    .parse()
                    .context("--flood-seconds: not a number")?;
            }
            "--no-flood" => out.flood_seconds = 0,
            "--bench" => {}
            other => bail!(
                "unknown argument {other}; use --sizes a,b,c, --repeat N, --flood-seconds N \
                 or --no-flood"
            ),
        }
    }
    Ok(out)
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// `n` distinct CIDRs (see the module comment), plus one /24 and one /32 entry the frames
/// hit, which are part of the `n`.
pub fn make_list(n: usize) -> (Vec<Cidr>, Ipv4Addr, Ipv4Addr) {
    let hit24 = Ipv4Addr::new(203, 0, 113, 7);
    let hit32 = Ipv4Addr::new(198, 51, 100, 9);
    let mut seen: HashSet<Cidr> = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    let mut push = |c: Cidr, out: &mut Vec<Cidr>| {
        if seen.insert(c) {
            out.push(c);
        }
    };
    push(
        Cidr::new(IpAddr::V4(hit24), 24).expect("cidr").network(),
        &mut out,
    );
    if n > 1 {
        push(Cidr::new(IpAddr::V4(hit32), 32).expect("cidr"), &mut out);
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    while out.len() < n {
        let r = rng.next();
        let addr = Ipv4Addr::from((r >> 32) as u32);
        if addr.octets()[0] == 192 {
            continue;
        }
        let len = match r % 100 {
            0..70 => 32,
            70..95 => 24,
            x => 16 + (x % 8) as u8,
        };
        let cidr = Cidr::new(IpAddr::V4(addr), len).expect("cidr").network();
        if cidr.contains(IpAddr::V4(hit32)) && len != 32 || cidr.contains(IpAddr::V4(hit24)) {
            continue;
        }
        push(cidr, &mut out);
    }
    (out, hit24, hit32)
}

fn ns(filter: &XdpFilter, frame: &[u8], repeat: u32, want: u32, what: &str) -> Result<f64> {
    let (action, _) = filter.test_run(frame, 1)?;
    ensure!(action == want, "{what}: verdict {action}, expected {want}");
    // Best of three: the other core's noise only ever adds time.
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let (action, took) = filter.test_run(frame, repeat)?;
        ensure!(action == want, "{what}: verdict {action}, expected {want}");
        best = best.min(took);
    }
    Ok(best.as_nanos() as f64)
}

/// Our figures for one list size.
struct Row {
    n: usize,
    load: Duration,
    pass: f64,
    pass_lim: f64,
    drop24: f64,
    drop32: f64,
    banned: f64,
    limited: f64,
    /// xdp-filter's pass and drop, measured right after.
    baseline: (f64, f64),
}

fn main() -> Result<()> {
    let args = args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the XDP bench loads BPF programs: run it as root (cargo xtask bench xdp)");
    }
    for tool in ["xdp-filter", "bpftool"] {
        ensure!(
            which(tool),
            "{tool} is missing: `cargo xtask bench xdp` installs xdp-tools and bpftool \
             (apt-get install xdp-tools bpftool)"
        );
    }
    println!(
        "BPF_PROG_TEST_RUN, 64-byte IPv4 TCP SYN to port 25, repeat {} (best of 3), ns/packet",
        args.repeat
    );
    let mut rows = Vec::new();
    for &n in &args.sizes {
        let row = measure(n, args.repeat)?;
        println!(
            "  {n:>9} CIDRs: loaded in {:.2}s; pass {:.0}, through the SYN limiter {:.0}, \
             drop /24 {:.0}, drop /32 {:.0}, banned {:.0}, SYN-limited {:.0}; \
             xdp-filter pass {:.0}, drop {:.0}",
            row.load.as_secs_f64(),
            row.pass,
            row.pass_lim,
            row.drop24,
            row.drop32,
            row.banned,
            row.limited,
            row.baseline.0,
            row.baseline.1
        );
        rows.push(row);
    }
    println!();
    println!(
        "{:>9} {:>8} | {:>6} {:>8} {:>7} {:>7} {:>6} {:>7} | {:>9} {:>9} | {:>10} {:>10}",
        "CIDRs",
        "load",
        "pass",
        "pass-lim",
        "drop/24",
        "drop/32",
        "banned",
        "syn-lim",
        "xf pass",
        "xf drop",
        "pass ratio",
        "drop ratio"
    );
    for r in &rows {
        // Ratios: ours / xdp-filter's, below 1 is faster. Pass: through the limiter (the
        // default configuration). Drop: the slower of our two blocklist paths.
        let drop = if r.drop32.is_nan() {
            r.drop24
        } else {
            r.drop24.max(r.drop32)
        };
        println!(
            "{:>9} {:>7.2}s | {:>6.0} {:>8.0} {:>7.0} {:>7.0} {:>6.0} {:>7.0} | {:>9.0} {:>9.0} | \
             {:>10.2} {:>10.2}",
            r.n,
            r.load.as_secs_f64(),
            r.pass,
            r.pass_lim,
            r.drop24,
            r.drop32,
            r.banned,
            r.limited,
            r.baseline.0,
            r.baseline.1,
            r.pass_lim / r.baseline.0,
            drop / r.baseline.1
        );
    }
    if args.flood_seconds > 0 {
        let n = args.sizes.iter().copied().max().unwrap_or(1);
        flood(n, Duration::from_secs(args.flood_seconds))?;
    }
    Ok(())
}

fn measure(n: usize, repeat: u32) -> Result<Row> {
    let pass_src = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
    let banned_src = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 66));
    let limited_src = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
    let mut filter = XdpFilter::load(None).context("loading the XDP program")?;
    let (list, hit24, hit32) = make_list(n);
    let started = Instant::now();
    filter.replace_named_lists(&[NamedList {
        name: "bench".into(),
        entries: list,
    }])?;
    let load = started.elapsed();
    filter.bans().ban(
        BanTarget::Address(banned_src),
        Duration::from_secs(3600),
        BanMode::All,
        1,
    )?;
    // Pass with no SYN limiter; then through a limiter that never runs dry; then one that
    // has run dry (the source sits in the penalty map).
    filter.set_syn_limit(SynLimit::OFF, &[])?;
    let pass_frame = syn_frame(pass_src, 25);
    let pass = ns(&filter, &pass_frame, repeat, XDP_PASS, "pass")?;
    let drop24 = ns(
        &filter,
        &syn_frame(IpAddr::V4(hit24), 25),
        repeat,
        XDP_DROP,
        "drop/24",
    )?;
    let drop32_frame = syn_frame(IpAddr::V4(hit32), 25);
    let drop32 = if n > 1 {
        ns(&filter, &drop32_frame, repeat, XDP_DROP, "drop/32")?
    } else {
        f64::NAN
    };
    let banned = ns(
        &filter,
        &syn_frame(banned_src, 25),
        repeat,
        XDP_DROP,
        "banned",
    )?;
    filter.set_syn_limit(
        SynLimit {
            rate_per_second: u32::MAX / 2,
            burst: u32::MAX / 2,
            penalty: Duration::from_secs(1),
        },
        &[25, 110, 143, 465, 587, 993, 995],
    )?;
    let pass_lim = ns(&filter, &pass_frame, repeat, XDP_PASS, "pass-lim")?;
    filter.set_syn_limit(
        SynLimit {
            rate_per_second: 1,
            burst: 1,
            penalty: Duration::from_secs(3600),
        },
        &[25],
    )?;
    let frame = syn_frame(limited_src, 25);
    filter.test_run(&frame, 3)?;
    let limited = ns(&filter, &frame, repeat, XDP_DROP, "syn-lim")?;
    drop(filter);
    let baseline = xdp_filter_ns(&pass_frame, &drop32_frame, hit32, repeat)?;
    Ok(Row {
        n,
        load,
        pass,
        pass_lim,
        drop24,
        drop32,
        banned,
        limited,
        baseline,
    })
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file())
            || ["/usr/sbin", "/sbin"]
                .iter()
                .any(|d| std::path::Path::new(d).join(tool).is_file())
    })
}

/// xdp-filter's ns/packet for the pass and drop frames: loaded on a veth inside a namespace
/// of its own (with a private bpffs, so its pins vanish with the namespace), the dropped
/// address added to its list, each frame run through `bpftool prog run` three times.
fn xdp_filter_ns(pass: &[u8], drop: &[u8], dropped: Ipv4Addr, repeat: u32) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let pass_file = dir.path().join("pass.bin");
    let drop_file = dir.path().join("drop.bin");
    std::fs::write(&pass_file, pad64(pass))?;
    std::fs::write(&drop_file, pad64(drop))?;
    let ns = NetNs::new("xdpfilter")?;
    let script = format!(
        "set -e
mount -t bpf bpf /sys/fs/bpf
ip link add xf0 type veth peer name xf1
ip link set xf0 up
ip link set xf1 up
xdp-filter load -m skb xf0 >/dev/null 2>&1
xdp-filter ip {dropped} -m src
id=$(bpftool net show dev xf0 | sed -n 's/.* id \\([0-9]*\\).*/\\1/p' | head -n 1)
test -n \"$id\"
for f in {pass} {pass} {pass} {drop} {drop} {drop}; do
  bpftool prog run id \"$id\" data_in \"$f\" repeat {repeat}
done
",
        pass = pass_file.display(),
        drop = drop_file.display(),
    );
    let output = output_with_timeout(
        &mut ns.command("sh", ["-c", &script]),
        Duration::from_secs(300),
    )?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "xdp-filter baseline failed: {text}"
    );
    // "Return value: 2, duration (average): 146ns"
    let runs: Vec<(u32, f64)> = text
        .lines()
        .filter_map(|line| {
            let action = line.split("Return value: ").nth(1)?.split(',').next()?;
            let ns = line
                .split("(average): ")
                .nth(1)?
                .trim()
                .strip_suffix("ns")?;
            Some((action.parse().ok()?, ns.parse().ok()?))
        })
        .collect();
    ensure!(runs.len() == 6, "unexpected bpftool output: {text}");
    let best = |want: u32| -> Result<f64> {
        ensure!(
            runs.iter().filter(|(a, _)| *a == want).count() == 3,
            "xdp-filter gave unexpected verdicts: {runs:?}"
        );
        Ok(runs
            .iter()
            .filter(|(a, _)| *a == want)
            .map(|(_, ns)| *ns)
            .fold(f64::INFINITY, f64::min))
    };
    Ok((best(XDP_PASS)?, best(XDP_DROP)?))
}

/// Ethernet minimum frame: our SYN frames are 54 bytes.
fn pad64(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    out.resize(out.len().max(64), 0);
    out
}

/// Drops/s under a trafgen SYN flood from a blocklisted source: our program (driver mode)
/// vs an nftables netdev-ingress drop rule with the same list.
fn flood(n: usize, seconds: Duration) -> Result<()> {
    if !which("trafgen") || !which("nft") {
        println!(
            "\nveth flood skipped: trafgen or nft is missing (`cargo xtask bench xdp` installs \
             netsniff-ng and nftables)"
        );
        return Ok(());
    }
    let (list, hit24, _) = make_list(n);
    let ns = NetNs::new("xdpflood")?;
    let veth = Veth::with_unique_name(&ns, "eth0")?;
    veth.up()?;
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("syn.trafgen");
    let bytes: Vec<String> = pad64(&syn_frame(IpAddr::V4(hit24), 25))
        .iter()
        .map(|b| format!("0x{b:02x}"))
        .collect();
    std::fs::write(&conf, format!("{{ {} }}\n", bytes.join(", ")))?;
    println!(
        "\nveth flood, {} s each, SYNs from {hit24} (blocklisted) into {}, {n} CIDRs loaded:",
        seconds.as_secs(),
        veth.host_ifname()
    );

    let mut filter = XdpFilter::load(None)?;
    filter.replace_named_lists(&[NamedList {
        name: "bench".into(),
        entries: list.clone(),
    }])?;
    filter.attach(veth.host_ifname(), AttachMode::Driver)?;
    let before = drops(&filter)?;
    trafgen(&ns, veth.ns_ifname(), &conf, seconds)?;
    let ours = (drops(&filter)? - before) as f64 / seconds.as_secs_f64();
    drop(filter);

    let nft = Nft::new(veth.host_ifname(), &list)?;
    let nft_before = nft.dropped()?;
    trafgen(&ns, veth.ns_ifname(), &conf, seconds)?;
    let theirs = (nft.dropped()? - nft_before) as f64 / seconds.as_secs_f64();
    println!(
        "  protobalance XDP (driver mode): {ours:>12.0} drops/s\n  \
         nftables netdev ingress:        {theirs:>12.0} drops/s\n  \
         ratio XDP / nftables: {:.2} (nftables loaded {n} CIDRs in {:.1}s)",
        ours / theirs,
        nft.loaded.as_secs_f64()
    );
    Ok(())
}

fn drops(filter: &XdpFilter) -> Result<u64> {
    Ok(filter
        .counters()?
        .into_iter()
        .find(|(c, _)| *c == Counter::DropBlocklist)
        .map_or(0, |(_, v)| v.packets))
}

/// Runs trafgen on one CPU for `time`.
fn trafgen(ns: &NetNs, dev: &str, conf: &std::path::Path, time: Duration) -> Result<()> {
    // No tuning of socket memory or IRQ affinity: trafgen would change them host-wide.
    let mut cmd = ns.command(
        "trafgen",
        [
            "--dev",
            dev,
            "--cpus",
            "1",
            "--no-sock-mem",
            "--notouch-irq",
            "--no-cpu-stats",
            "--conf",
        ],
    );
    // Its own process group: trafgen forks a sender per CPU, and SIGINT must reach both.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.arg(conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = protobalance_tests::ChildGuard::spawn(&mut cmd, "trafgen")?;
    std::thread::sleep(time);
    let group = i32::try_from(child.id()).context("pid")?;
    // SAFETY: kill with a valid process group and signal.
    unsafe { libc::kill(-group, libc::SIGINT) };
    if child.wait_timeout(Duration::from_secs(10))?.is_none() {
        // SAFETY: as above.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        bail!("trafgen did not stop on SIGINT");
    }
    Ok(())
}

/// An nftables table with the list in an interval set and a counting drop rule on the
/// device's ingress hook; deleted on drop.
struct Nft {
    loaded: Duration,
}

const NFT_TABLE: &str = "pbxdpbench";

impl Nft {
    fn new(dev: &str, list: &[Cidr]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("rules.nft");
        let elements: Vec<String> = list
            .iter()
            .filter(|c| c.addr().is_ipv4())
            .map(ToString::to_string)
            .collect();
        std::fs::write(
            &file,
            format!(
                "table netdev {NFT_TABLE} {{
  counter dropped {{ }}
  set blocklist {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}
  chain ingress {{ type filter hook ingress device \"{dev}\" priority -500; policy accept;
    ip saddr @blocklist counter name \"dropped\" drop
  }}
}}
",
                elements.join(", ")
            ),
        )?;
        let started = Instant::now();
        // The guard first: a load that fails half-way is cleaned up too.
        let mut nft = Nft {
            loaded: Duration::ZERO,
        };
        let output = output_with_timeout(
            std::process::Command::new("nft").arg("-f").arg(&file),
            Duration::from_secs(600),
        )?;
        ensure!(
            output.status.success(),
            "nft -f failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        nft.loaded = started.elapsed();
        Ok(nft)
    }

    /// The named counter (listing the chain would dump the million-element set).
    fn dropped(&self) -> Result<u64> {
        let output = output_with_timeout(
            std::process::Command::new("nft")
                .args(["list", "counter", "netdev", NFT_TABLE, "dropped"]),
            Duration::from_secs(60),
        )?;
        let text = String::from_utf8_lossy(&output.stdout);
        text.split("packets ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no counter in `nft list counter`: {text}"))
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "netdev", NFT_TABLE])
            .status();
    }
}
