//! Network namespaces and veth pairs for tests, removed on drop (even after a panic).
//!
//! Names carry the PID and a per-process counter so tests in one binary run in parallel.
//! Addresses come from the documentation ranges (198.51.100.0/24, 203.0.113.0/24,
//! 2001:db8::/32) and only ever live on links inside namespaces a test made.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::process::{self, ChildGuard};

/// Longest interface name the kernel accepts (IFNAMSIZ minus the NUL).
pub const MAX_IFNAME_LEN: usize = 15;
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`NetNs::exec`] lets a command run before killing it.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let what = format!("{cmd:?}");
    let output = process::output_with_timeout(&mut cmd, IP_TIMEOUT)?;
    process::stdout_or_error(&what, output)
}

/// True if the test may create namespaces; otherwise prints `SKIP <test>: <reason>` to
/// stderr and returns false so the test can return early, visibly.
pub fn require_root(test_name: &str) -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    match PROBE.get_or_init(probe_netns) {
        Ok(()) => true,
        Err(reason) => {
            eprintln!("SKIP {test_name}: {reason}");
            false
        }
    }
}

fn probe_netns() -> Result<(), String> {
    if !process::is_root() {
        return Err("not running as root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    NetNs::new("probe")
        .map(drop)
        .map_err(|err| format!("`ip netns add` not permitted: {err:#}"))
}

/// A named network namespace (`ip netns add`), deleted on drop. Its `lo` is up.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `pbt-<prefix>-<pid>-<counter>`.
    pub fn new(prefix: &str) -> Result<Self> {
        let name = format!("pbt-{prefix}-{}-{}", std::process::id(), next_id());
        ip(&["netns", "add", &name]).with_context(|| format!("creating namespace {name}"))?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program args..` inside the namespace (`ip netns exec`).
    /// `ip netns exec` execs the program, so the child's PID is the program's.
    pub fn command<I, S>(&self, program: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }

    /// Runs a command inside the namespace to completion (killed after [`EXEC_TIMEOUT`]).
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        process::output_with_timeout(&mut self.command(program, args), EXEC_TIMEOUT)
    }

    /// Starts a long-running command inside the namespace, killed when the guard drops.
    pub fn spawn(&self, cmd: &mut Command) -> Result<ChildGuard> {
        ChildGuard::spawn(cmd, format!("{cmd:?} in {}", self.name))
    }

    /// [`crate::process::python`], inside the namespace.
    pub fn python(&self, script: &str) -> Result<String> {
        let output = self.exec("python3", ["-c", script])?;
        process::stdout_or_error(&format!("python3 script in {}", self.name), output)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(err) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {err:#}", self.name);
        }
    }
}

/// A host interface name unique in this process: `<prefix><pid hex>x<counter hex>`.
/// `prefix` may be up to 4 characters so the result fits [`MAX_IFNAME_LEN`].
pub fn unique_ifname(prefix: &str) -> Result<String> {
    let name = format!("{prefix}{:x}x{:x}", std::process::id(), next_id());
    ensure!(
        name.len() <= MAX_IFNAME_LEN,
        "interface name {name} is longer than {MAX_IFNAME_LEN}"
    );
    Ok(name)
}

/// A veth pair: one end in the host namespace, its peer created directly inside `ns`
/// (so the peer name only has to be unique inside that namespace). Deleted on drop.
#[derive(Debug)]
pub struct Veth {
    host_ifname: String,
    ns_ifname: String,
    ns_name: String,
}

impl Veth {
    pub fn new(host_ifname: &str, ns: &NetNs, ns_ifname: &str) -> Result<Self> {
        for name in [host_ifname, ns_ifname] {
            ensure!(
                !name.is_empty() && name.len() <= MAX_IFNAME_LEN,
                "interface name {name:?} must be 1..={MAX_IFNAME_LEN} bytes"
            );
        }
        ip(&[
            "link",
            "add",
            host_ifname,
            "type",
            "veth",
            "peer",
            "name",
            ns_ifname,
            "netns",
            ns.name(),
        ])
        .with_context(|| format!("creating veth {host_ifname} <-> {}:{ns_ifname}", ns.name()))?;
        Ok(Self {
            host_ifname: host_ifname.to_owned(),
            ns_ifname: ns_ifname.to_owned(),
            ns_name: ns.name().to_owned(),
        })
    }

    /// A pair with a generated unique host name (see [`unique_ifname`]).
    pub fn with_unique_name(ns: &NetNs, ns_ifname: &str) -> Result<Self> {
        Self::new(&unique_ifname("pbv")?, ns, ns_ifname)
    }

    pub fn host_ifname(&self) -> &str {
        &self.host_ifname
    }

    pub fn ns_ifname(&self) -> &str {
        &self.ns_ifname
    }

    /// Adds `cidr` (e.g. `198.51.100.1/30`, `2001:db8::1/64`) to the host end.
    pub fn add_host_addr(&self, cidr: &str) -> Result<()> {
        ip(&addr_args(cidr, &self.host_ifname)).map(drop)
    }

    /// Adds `cidr` to the end inside the namespace.
    pub fn add_ns_addr(&self, cidr: &str) -> Result<()> {
        let mut args = vec!["-n", &self.ns_name];
        let addr = addr_args(cidr, &self.ns_ifname);
        args.extend(addr.iter().map(String::as_str));
        ip(&args).map(drop)
    }

    /// Sets both ends up.
    pub fn up(&self) -> Result<()> {
        ip(&["link", "set", &self.host_ifname, "up"])?;
        ip(&["-n", &self.ns_name, "link", "set", &self.ns_ifname, "up"]).map(drop)
    }
}

/// `addr add CIDR dev IF`, with `nodad` for IPv6 so the address is usable at once.
fn addr_args(cidr: &str, ifname: &str) -> Vec<String> {
    let mut args: Vec<String> = ["addr", "add", cidr, "dev", ifname]
        .map(String::from)
        .into();
    if cidr.contains(':') {
        args.push("nodad".into());
    }
    args
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting either end removes both; if the namespace went first, the pair is gone.
        if ip(&["link", "del", &self.host_ifname]).is_err() && link_exists(&self.host_ifname) {
            eprintln!("warning: could not delete veth {}", self.host_ifname);
        }
    }
}

/// True if `ifname` exists in the host namespace.
pub fn link_exists(ifname: &str) -> bool {
    ip(&["link", "show", "dev", ifname]).is_ok()
}

/// True if a namespace called `name` exists.
pub fn netns_exists(name: &str) -> Result<bool> {
    let list = ip(&["netns", "list"])?;
    Ok(list
        .lines()
        .any(|line| line.split_whitespace().next() == Some(name)))
}

/// A point-to-point test subnet: a /30 from 198.51.100.0/24 then 203.0.113.0/24, and a
/// /64 from 2001:db8::/32. Each call in a process gets a different one, so parallel tests
/// never install the same prefix route on two links (which would misroute connects).
/// Processes running side by side (e.g. nextest) are not coordinated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestSubnet {
    pub host_v4: Ipv4Addr,
    pub ns_v4: Ipv4Addr,
    pub host_v6: Ipv6Addr,
    pub ns_v6: Ipv6Addr,
}

impl TestSubnet {
    pub const V4_PREFIX: u8 = 30;
    pub const V6_PREFIX: u8 = 64;

    pub fn next() -> Result<Self> {
        static SLOT: AtomicU32 = AtomicU32::new(0);
        Self::slot(SLOT.fetch_add(1, Ordering::Relaxed))
    }

    /// Slot `n` (0..128) of the address plan.
    pub fn slot(n: u32) -> Result<Self> {
        let (base, index) = match n {
            0..64 => ([198, 51, 100], n),
            64..128 => ([203, 0, 113], n - 64),
            _ => bail!("test subnet slot {n} is past the 128 available"),
        };
        let last = |host: u32| u8::try_from(index * 4 + host).context("slot arithmetic");
        let v4 =
            |host| Ok::<_, anyhow::Error>(Ipv4Addr::new(base[0], base[1], base[2], last(host)?));
        let v6_net = u16::try_from(n).context("slot arithmetic")?;
        Ok(Self {
            host_v4: v4(1)?,
            ns_v4: v4(2)?,
            host_v6: Ipv6Addr::new(0x2001, 0xdb8, 0, v6_net, 0, 0, 0, 1),
            ns_v6: Ipv6Addr::new(0x2001, 0xdb8, 0, v6_net, 0, 0, 0, 2),
        })
    }

    /// Puts all four addresses on `veth` (host end and namespace end).
    pub fn assign(&self, veth: &Veth) -> Result<()> {
        veth.add_host_addr(&format!("{}/{}", self.host_v4, Self::V4_PREFIX))?;
        veth.add_ns_addr(&format!("{}/{}", self.ns_v4, Self::V4_PREFIX))?;
        veth.add_host_addr(&format!("{}/{}", self.host_v6, Self::V6_PREFIX))?;
        veth.add_ns_addr(&format!("{}/{}", self.ns_v6, Self::V6_PREFIX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_slots_do_not_overlap() -> Result<()> {
        let first = TestSubnet::slot(0)?;
        assert_eq!(first.host_v4, Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(first.ns_v4, Ipv4Addr::new(198, 51, 100, 2));
        assert_eq!(
            TestSubnet::slot(63)?.ns_v4,
            Ipv4Addr::new(198, 51, 100, 254)
        );
        assert_eq!(TestSubnet::slot(64)?.host_v4, Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!(
            TestSubnet::slot(5)?.ns_v6,
            "2001:db8:0:5::2".parse::<Ipv6Addr>()?
        );
        assert!(TestSubnet::slot(128).is_err());
        Ok(())
    }

    #[test]
    fn interface_names_fit_ifnamsiz() -> Result<()> {
        let a = unique_ifname("pbv")?;
        let b = unique_ifname("pbv")?;
        assert_ne!(a, b);
        assert!(a.len() <= MAX_IFNAME_LEN);
        Ok(())
    }
}
