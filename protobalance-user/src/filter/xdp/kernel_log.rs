//! The XDP program's rare diagnostic records (aya-log: frames the parser gave up on, SYN
//! sources the full penalty map could not take; at most one per second per CPU and kind),
//! written into protobalance's own log under the target `protobalance::xdp::kernel`.

use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

use super::XdpError;

/// Forwards aya-log's `log` records to `tracing`.
pub struct Forward;

const TARGET: &str = "protobalance::xdp::kernel";

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{message}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{message}"),
            log::Level::Info => tracing::info!(target: TARGET, "{message}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{message}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// The program's log ring buffer.
pub struct KernelLog(aya_log::EbpfLogger<Forward>);

impl KernelLog {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, XdpError> {
        aya_log::EbpfLogger::init_with_logger(ebpf, Forward)
            .map(Self)
            .map_err(|e| XdpError::Log(e.to_string()))
    }

    /// Writes the records waiting now into the log.
    pub fn flush(&mut self) {
        self.0.flush();
    }

    /// Writes records into the log as they arrive, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        // SAFETY: the fd is the logger's ring-buffer map, owned by the logger that moves into
        // the AsyncFd: it stays open and the same for the AsyncFd's whole life.
        let registered = unsafe { AsyncFd::register_with_interest(self.0, Interest::READABLE) };
        let mut ring = match registered {
            Ok(ring) => ring,
            Err(error) => {
                tracing::warn!(%error, "the XDP program's log cannot be read");
                return;
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                ready = ring.readable_mut() => match ready {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the XDP program's log cannot be read");
                        break;
                    }
                },
            }
        }
    }
}
