//! Accept loops for the mail listeners. Each takes an already bound listener and the
//! shutdown token (tests bind port 0); sessions run as tasks on the shared tracker and
//! finish within the grace period after shutdown.

use std::sync::Arc;

use tokio::{io::AsyncWriteExt as _, net::TcpListener};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Outcome, ProxyContext};
use crate::{config::Protocol, imap, pop3};

pub async fn serve(
    listener: TcpListener,
    protocol: Protocol,
    ctx: Arc<ProxyContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (mut stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, protocol = protocol.as_str(), "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some(permit) = ctx.admission.try_admit(peer.ip()) else {
            ctx.metrics.refused_or_ended(protocol, Outcome::Refused);
            tracing::info!(%peer, protocol = protocol.as_str(), "refused: too many sessions from this address");
            tracker.spawn(async move {
                let _ = stream.write_all(&refusal(protocol)).await;
            });
            continue;
        };
        let ctx = Arc::clone(&ctx);
        tracker.spawn(async move {
            ctx.metrics.session_started(protocol);
            let outcome = match protocol {
                Protocol::Pop3 => pop3::session::run(stream, peer, &ctx).await,
                Protocol::Imap => match stream.local_addr() {
                    Ok(local) => imap::session::run(stream, peer, local, &ctx).await,
                    // The socket is already dead; there is nobody to answer.
                    Err(_) => Outcome::ClientQuit,
                },
            };
            ctx.metrics.session_ended(protocol, outcome);
            drop(permit);
        });
    }
}

fn refusal(protocol: Protocol) -> Vec<u8> {
    match protocol {
        Protocol::Pop3 => {
            pop3::codec::err(Some("SYS/TEMP"), "Too many connections from your address")
        }
        Protocol::Imap => imap::codec::bye("[UNAVAILABLE] Too many connections from your address"),
    }
}
