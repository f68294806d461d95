//! AUTHENTICATE PLAIN and LOGIN (RFC 4616, RFC 4959 SASL-IR): the exchange with the
//! client up to the credentials, which the session then hands to `login`.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Client, ReadEnd, Step};
use crate::{
    imap::{
        codec::{self, InitialResponse, SaslError, SaslResponse},
        login::Login,
    },
    proxy::Outcome,
    secret::Secret,
};

/// Why an AUTHENTICATE exchange ended without credentials.
enum Abort {
    /// Send this tagged answer and carry on.
    Reply(Vec<u8>),
    Read(ReadEnd),
}

impl From<ReadEnd> for Abort {
    fn from(end: ReadEnd) -> Self {
        Self::Read(end)
    }
}

struct Credentials {
    name: String,
    password: Secret<String>,
}

pub(super) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    tag: String,
    mechanism: &str,
    initial: Option<InitialResponse>,
) -> Step {
    let result = match mechanism {
        "PLAIN" => auth_plain(client, &tag, initial).await,
        "LOGIN" => auth_login(client, &tag, initial).await,
        _ => Err(Abort::Reply(codec::tagged_no(
            &tag,
            None,
            "Unsupported mechanism; use PLAIN or LOGIN",
        ))),
    };
    match result {
        Ok(Credentials { name, password }) => Step::Login(Login {
            tag,
            name,
            password,
        }),
        Err(Abort::Reply(reply)) if client.send(&reply).await => Step::Continue,
        Err(Abort::Reply(_)) => Step::End(Outcome::ClientQuit),
        Err(Abort::Read(end)) => Step::Read(end),
    }
}

/// Sends `prompt` and reads the client's base64 answer (`*` cancels: RFC 9051 §6.2.2).
async fn sasl_response<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    tag: &str,
    prompt: &str,
) -> Result<Secret<String>, Abort> {
    if !client.send(&codec::continuation(prompt)).await {
        return Err(Abort::Read(ReadEnd::Closed));
    }
    match client.sasl_line().await? {
        Some(SaslResponse::Base64(payload)) => Ok(payload),
        Some(SaslResponse::Cancel) => Err(Abort::Reply(codec::tagged_bad(
            tag,
            None,
            "Authentication cancelled",
        ))),
        None => Err(Abort::Reply(invalid_base64(tag))),
    }
}

fn invalid_base64(tag: &str) -> Vec<u8> {
    codec::tagged_bad(tag, None, "Invalid base64 in SASL response")
}

/// RFC 4616. `=` is an empty initial response (RFC 4959), which is not a PLAIN message.
async fn auth_plain<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    tag: &str,
    initial: Option<InitialResponse>,
) -> Result<Credentials, Abort> {
    let payload = match initial {
        Some(InitialResponse::Base64(payload)) => payload,
        Some(InitialResponse::Empty) => Secret::new(String::new()),
        None => sasl_response(client, tag, "").await?,
    };
    let plain = codec::parse_plain(payload.expose()).map_err(|error| {
        Abort::Reply(match error {
            SaslError::InvalidBase64 => invalid_base64(tag),
            SaslError::MalformedPlain(_) => codec::tagged_no(tag, None, "Invalid PLAIN message"),
        })
    })?;
    if plain
        .authzid
        .is_some_and(|authzid| authzid != plain.authcid)
    {
        return Err(Abort::Reply(codec::tagged_no(
            tag,
            Some("CANNOT"),
            "Authorization identities are not supported",
        )));
    }
    Ok(Credentials {
        name: plain.authcid,
        password: plain.password,
    })
}

/// The non-standard but common LOGIN mechanism: base64 user name, then password. A SASL-IR
/// is taken as the user name, as clients that send one mean it.
async fn auth_login<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut Client<S>,
    tag: &str,
    initial: Option<InitialResponse>,
) -> Result<Credentials, Abort> {
    let name_b64 = match initial {
        Some(InitialResponse::Base64(name)) => name,
        Some(InitialResponse::Empty) | None => sasl_response(client, tag, "VXNlcm5hbWU6").await?,
    };
    let text = |b64: &Secret<String>| {
        crate::base64::decode_text(b64.expose()).ok_or_else(|| {
            Abort::Reply(codec::tagged_no(
                tag,
                None,
                "Invalid AUTHENTICATE LOGIN response",
            ))
        })
    };
    let name = text(&name_b64)?;
    let password_b64 = sasl_response(client, tag, "UGFzc3dvcmQ6").await?;
    let password = Secret::new(text(&password_b64)?);
    Ok(Credentials { name, password })
}
