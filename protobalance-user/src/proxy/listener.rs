//! Accept loops for the mail listeners. Each takes an already bound listener and the
//! shutdown token (tests bind port 0); sessions run as tasks on the shared tracker and
//! finish within the grace period after shutdown.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Conn, Outcome, ProxyContext};
use crate::{
    config::{Protocol, TlsMode},
    filter::reputation::{Event, Verdict},
    imap, pop3,
    smtp::{self, session::Mode},
    tls::ClientStream,
};

pub async fn serve(
    listener: TcpListener,
    protocol: Protocol,
    tls: TlsMode,
    ctx: Arc<ProxyContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
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
        let verdict = ctx.reputation.admit(peer.ip());
        if verdict.refuses() {
            ctx.metrics.refused_or_ended(protocol, Outcome::Refused);
            tracing::debug!(%peer, protocol = protocol.as_str(), verdict = verdict.as_str(), "refused by reputation");
            tracker.spawn(refuse(stream, reputation_refusal(protocol, verdict)));
            continue;
        }
        let Some(permit) = ctx.admission.try_admit(peer.ip()) else {
            ctx.metrics.refused_or_ended(protocol, Outcome::Refused);
            ctx.reputation.report(peer.ip(), Event::RateExceeded);
            tracing::info!(%peer, protocol = protocol.as_str(), "refused: too many sessions from this address");
            tracker.spawn(refuse(stream, refusal(protocol)));
            continue;
        };
        let ctx = Arc::clone(&ctx);
        tracker.spawn(async move {
            ctx.metrics.session_started(protocol);
            let outcome = session(stream, peer, protocol, tls, verdict, &ctx).await;
            ctx.metrics.session_ended(protocol, outcome);
            drop(permit);
        });
    }
}

async fn session(
    stream: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    tls: TlsMode,
    admitted: Verdict,
    ctx: &ProxyContext,
) -> Outcome {
    let Ok(local) = stream.local_addr() else {
        // The socket is already dead; there is nobody to answer.
        return Outcome::ClientQuit;
    };
    let starttls = ctx.tls.clone().filter(|_| tls == TlsMode::Starttls);
    let conn = Conn {
        peer,
        local,
        starttls,
        admitted,
    };
    let stream = match (tls, &ctx.tls) {
        (TlsMode::Implicit, Some(acceptor)) => {
            let handshake =
                tokio::time::timeout(ctx.limits().pre_auth_timeout(), acceptor.accept(stream));
            // Boxed: the handshake's state is kilobytes, which the session future would
            // otherwise carry for as long as the session lives.
            let handshake = Box::pin(handshake);
            match handshake.await {
                Ok(Ok(tls)) => ClientStream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))),
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return Outcome::ClientError;
                }
                Err(_) => return Outcome::ClientError,
            }
        }
        _ => ClientStream::Plain(stream),
    };
    match protocol {
        // Each protocol's session boxed: the task's future is then the size of the one it
        // runs, not of the largest (SMTP's).
        Protocol::Pop3 => Box::pin(pop3::session::run(stream, &conn, ctx)).await,
        Protocol::Imap => Box::pin(imap::session::run(stream, &conn, ctx)).await,
        Protocol::Smtp => Box::pin(smtp::session::run(stream, &conn, ctx, Mode::Inbound)).await,
        Protocol::Submission => {
            Box::pin(smtp::session::run(stream, &conn, ctx, Mode::Submission)).await
        }
    }
}

fn refusal(protocol: Protocol) -> Vec<u8> {
    match protocol {
        Protocol::Pop3 => {
            pop3::codec::err(Some("SYS/TEMP"), "Too many connections from your address")
        }
        Protocol::Imap => imap::codec::bye("[UNAVAILABLE] Too many connections from your address"),
        Protocol::Smtp | Protocol::Submission => {
            smtp::codec::reply(421, Some("4.7.0"), "Too many connections from your address")
        }
    }
}

/// Answers a client refused at the door and closes gracefully: FIN after the answer, then
/// a short drain of what the client already sent, so the close is not a reset that could
/// destroy the answer before the client read it. Bounded in time and bytes.
async fn refuse(mut stream: TcpStream, answer: Vec<u8>) {
    use tokio::io::AsyncReadExt as _;
    let write = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < 16 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), write).await;
}

/// The answer to a client the reputation engine refuses at the door.
fn reputation_refusal(protocol: Protocol, verdict: Verdict) -> Vec<u8> {
    let text = if verdict == Verdict::Ban {
        "Your address is blocked for abuse; try again later"
    } else {
        "Too many errors from your address; try again later"
    };
    match protocol {
        Protocol::Pop3 => pop3::codec::err(Some("SYS/TEMP"), text),
        Protocol::Imap => imap::codec::bye(&format!("[UNAVAILABLE] {text}")),
        Protocol::Smtp | Protocol::Submission => smtp::codec::reply(421, Some("4.7.0"), text),
    }
}
