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
            let outcome = session(stream, peer, protocol, tls, &ctx).await;
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
    };
    let stream = match (tls, &ctx.tls) {
        (TlsMode::Implicit, Some(acceptor)) => {
            let handshake =
                tokio::time::timeout(ctx.limits.pre_auth_timeout(), acceptor.accept(stream));
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
        Protocol::Pop3 => pop3::session::run(stream, &conn, ctx).await,
        Protocol::Imap => imap::session::run(stream, &conn, ctx).await,
        Protocol::Smtp => smtp::session::run(stream, &conn, ctx, Mode::Inbound).await,
        Protocol::Submission => smtp::session::run(stream, &conn, ctx, Mode::Submission).await,
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
