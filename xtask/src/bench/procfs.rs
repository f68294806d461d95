//! What `/proc` says about a process, for `bench memory`, `smtp` and `abuse`: resident
//! memory (VmRSS, its high-water mark VmHWM, and Pss from smaps_rollup, which charges
//! shared pages by share), CPU time, open descriptors, and the open-file limit — which
//! this process raises for itself with util-linux `prlimit` (xtask has no libc binding,
//! and `prlimit` comes with util-linux like `mount`).

use std::{path::PathBuf, process::Command, sync::OnceLock, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::util;

/// One memory sample, in KiB as /proc reports them.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    /// None where the kernel has no smaps_rollup (before 4.14).
    pub pss_kib: Option<u64>,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let status = read(pid, "status")?;
    let rss_kib = field_kib(&status, "VmRSS:").context("no VmRSS in /proc/<pid>/status")?;
    let pss_kib = read(pid, "smaps_rollup")
        .ok()
        .and_then(|text| field_kib(&text, "Pss:"));
    Ok(Memory { rss_kib, pss_kib })
}

/// VmRSS alone, in KiB: cheaper than [`memory`] (no smaps_rollup walk), for sampling often.
pub fn rss_kib(pid: u32) -> Result<u64> {
    field_kib(&read(pid, "status")?, "VmRSS:").context("no VmRSS in /proc/<pid>/status")
}

/// VmHWM: the most resident memory the process ever had, in KiB (catches a peak that
/// falls between two samples).
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    field_kib(&read(pid, "status")?, "VmHWM:").context("no VmHWM in /proc/<pid>/status")
}

/// CPU time `pid` used so far, user and system, all its threads (fields 14 and 15 of
/// /proc/<pid>/stat, in clock ticks).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = read(pid, "stat")?;
    let ticks = stat_cpu_ticks(&stat).context("cannot parse utime/stime in /proc/<pid>/stat")?;
    Ok(Duration::from_secs_f64(
        ticks as f64 / clock_ticks_per_second() as f64,
    ))
}

/// utime + stime of a stat line; the fields are counted after the `(comm)`, which may
/// hold spaces and parentheses.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    let mut fields = after_comm.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `getconf CLK_TCK` (USER_HZ), once; 100 (Linux's on every common architecture) if it
/// cannot be asked.
fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        util::output(Command::new("getconf").arg("CLK_TCK"))
            .and_then(|out| out.trim().parse().ok())
            .filter(|&hz| hz > 0)
            .unwrap_or(100)
    })
}

/// Entries in /proc/<pid>/fd.
pub fn open_fds(pid: u32) -> Result<usize> {
    let dir = proc_path(pid, "fd");
    let entries = std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
    Ok(entries.count())
}

/// (soft, hard) RLIMIT_NOFILE of `pid`, from /proc/<pid>/limits.
pub fn nofile_limit(pid: u32) -> Result<(u64, u64)> {
    let limits = read(pid, "limits")?;
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .context("no `Max open files` in /proc/<pid>/limits")?;
    let mut words = line.split_ascii_whitespace().map(str::parse::<u64>);
    match (words.next(), words.next()) {
        (Some(Ok(soft)), Some(Ok(hard))) => Ok((soft, hard)),
        _ => bail!("cannot parse `Max open files{line}`"),
    }
}

/// Raises this process's soft RLIMIT_NOFILE towards `wanted`: past the hard limit only
/// where the kernel allows it (CAP_SYS_RESOURCE), else up to the hard limit. Returns the
/// soft limit now in force, which may be less than `wanted`. Never lowers anything.
pub fn raise_own_nofile(wanted: u64) -> Result<u64> {
    let pid = std::process::id();
    let (soft, hard) = nofile_limit(pid)?;
    if soft >= wanted {
        return Ok(soft);
    }
    // Quietly: without CAP_SYS_RESOURCE this fails, and the caller reports the cap.
    if hard >= wanted || !set_nofile(pid, wanted, wanted) {
        let target = wanted.min(hard);
        if soft < target && !set_nofile(pid, target, hard) {
            bail!("prlimit could not raise the soft open-file limit from {soft} to {target}");
        }
    }
    Ok(nofile_limit(pid)?.0)
}

fn set_nofile(pid: u32, soft: u64, hard: u64) -> bool {
    util::output(
        Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={soft}:{hard}")),
    )
    .is_some()
}

fn proc_path(pid: u32, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{name}"))
}

fn read(pid: u32, name: &str) -> Result<String> {
    let path = proc_path(pid, name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// `VmRSS:     12345 kB` → 12345.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix(key))?;
    rest.split_ascii_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kib_fields() {
        let status = "Name:\tx\nVmHWM:\t  200 kB\nVmRSS:\t  123 kB\n";
        assert_eq!(field_kib(status, "VmRSS:"), Some(123));
        assert_eq!(field_kib("Rss: 9 kB\nPss: 7 kB\n", "Pss:"), Some(7));
        assert_eq!(field_kib(status, "Pss:"), None);
    }

    #[test]
    fn parses_cpu_ticks_after_the_command_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0";
        assert_eq!(stat_cpu_ticks(stat), Some(12));
        assert_eq!(stat_cpu_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn reads_own_limits_and_memory() -> Result<()> {
        let pid = std::process::id();
        let (soft, hard) = nofile_limit(pid)?;
        assert!(soft <= hard);
        let rss = memory(pid)?.rss_kib;
        assert!(rss > 0);
        // The kernel reports the high-water mark as at least the RSS of that moment.
        assert!(peak_rss_kib(pid)? >= rss);
        assert!(open_fds(pid)? >= 3);
        Ok(())
    }
}
