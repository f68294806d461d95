//! `bench smtp`'s memory phase: protobalance's resident memory while it streams DATA. A
//! few clients send ~10 KB messages, then 20 MiB ones, through an edge with LMTP backends
//! (one recipient each); VmRSS is sampled every 10 ms during each phase and VmHWM read
//! after it, so a peak between two samples still shows. Streaming should keep the two
//! alike: a session holds a bounded piece of the message, never all of it. Kernel socket
//! buffers are not in RSS. Only a handful of large messages go out, so the backends' disk
//! use stays modest (8 × 20 MiB).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

use super::{
    lmtp,
    load::{self, Endpoint},
    mail::Owners,
    procfs,
    protocol::{Delivery, Session},
};
use crate::util::step;

/// The edge's `[limits] max_message_octets`: room for the large messages.
pub const MAX_MESSAGE_OCTETS: u64 = 64 << 20;
const CLIENTS: u32 = 4;
const SMALL_MESSAGES: usize = 400;
const LARGE_BODY_BYTES: usize = 20 << 20;
const LARGE_MESSAGES: usize = 8;
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Before the baseline: start-up's last allocations and frees are done.
const SETTLE: Duration = Duration::from_secs(1);

/// protobalance's memory at rest and during both phases.
pub struct StreamingMemory {
    baseline_kib: u64,
    small: Peak,
    large: Peak,
}

/// What one phase sent and the most memory seen during it.
struct Peak {
    messages: usize,
    message_bytes: usize,
    elapsed: Duration,
    /// The highest VmRSS sample during the phase.
    sampled_kib: u64,
    /// VmHWM after the phase: the process's peak since it started. The kernel keeps RSS
    /// in per-CPU counters, so this may read a few KiB under the highest sample.
    hwm_kib: u64,
}

/// Measures the edge `pid` listening for SMTP on `listener` (with LMTP backends).
pub fn measure(pid: u32, listener: SocketAddr, owners: &Owners) -> Result<StreamingMemory> {
    step(&format!(
        "memory: protobalance's VmRSS while {CLIENTS} clients send {SMALL_MESSAGES} \
         ~10 KB messages, then {LARGE_MESSAGES} of 20 MiB (delivery = \"lmtp\")"
    ));
    thread::sleep(SETTLE);
    let baseline_kib = procfs::memory(pid)?.rss_kib;
    let small = phase(pid, listener, owners, lmtp::BODY_BYTES, SMALL_MESSAGES)?;
    let large = phase(pid, listener, owners, LARGE_BODY_BYTES, LARGE_MESSAGES)?;
    Ok(StreamingMemory {
        baseline_kib,
        small,
        large,
    })
}

/// Sends `count` messages of ~`body_bytes` on [`CLIENTS`] connections at a time, one
/// recipient each (user1, user2, …), while sampling protobalance's memory.
fn phase(
    pid: u32,
    listener: SocketAddr,
    owners: &Owners,
    body_bytes: usize,
    count: usize,
) -> Result<Peak> {
    let message: Arc<[u8]> = lmtp::message(body_bytes).into();
    let endpoints: Vec<Endpoint> = (owners.iter().cycle().take(count))
        .map(|(user, _)| Endpoint {
            addr: listener,
            session: Session::Smtp(Delivery {
                recipients: vec![user.clone()],
                message: Arc::clone(&message),
            }),
        })
        .collect();
    let started = Instant::now();
    let sampled_kib = peak_during(pid, || load::once_each(CLIENTS, &endpoints))?;
    Ok(Peak {
        messages: endpoints.len(),
        message_bytes: message.len(),
        elapsed: started.elapsed(),
        sampled_kib,
        hwm_kib: procfs::peak_rss_kib(pid)?,
    })
}

/// The highest VmRSS of `pid` sampled while `work` runs (and once after it).
fn peak_during(pid: u32, work: impl FnOnce() -> Result<()>) -> Result<u64> {
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let sampler = scope.spawn(|| -> Result<u64> {
            let mut peak = 0;
            loop {
                // Read before sampling, so the last sample is taken after the work ended.
                let finished = done.load(Relaxed);
                peak = peak.max(procfs::rss_kib(pid)?);
                if finished {
                    return Ok(peak);
                }
                thread::sleep(SAMPLE_EVERY);
            }
        });
        let outcome = work();
        done.store(true, Relaxed);
        let peak = sampler
            .join()
            .map_err(|_| anyhow!("the memory sampler panicked"))?;
        outcome?;
        peak
    })
}

impl StreamingMemory {
    pub fn print(&self) {
        println!(
            "\nmemory (protobalance VmRSS, {CLIENTS} clients, 1 recipient, delivery = lmtp): \
             baseline {} KiB",
            self.baseline_kib
        );
        for peak in [&self.small, &self.large] {
            let mib_per_s = (peak.messages * peak.message_bytes) as f64
                / f64::from(1 << 20)
                / peak.elapsed.as_secs_f64().max(1e-9);
            println!(
                "  {:>3} x {:>9} bytes: peak {} KiB (+{} over baseline), VmHWM {} KiB; \
                 {:.1} MiB/s",
                peak.messages,
                peak.message_bytes,
                peak.sampled_kib,
                peak.sampled_kib.saturating_sub(self.baseline_kib),
                peak.hwm_kib,
                mib_per_s
            );
        }
        let ratio = self.large.sampled_kib as f64 / self.small.sampled_kib.max(1) as f64;
        println!(
            "memory  10 KB: {} KiB | 20 MiB: {} KiB | ratio 20 MiB/10 KB {ratio:.2} (flat = 1.00)",
            self.small.sampled_kib, self.large.sampled_kib
        );
    }
}
