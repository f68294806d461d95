//! MAIL FROM and RCPT TO arguments: paths (RFC 5321 §4.1.2, UTF-8 per RFC 6531 §3.3) and
//! ESMTP parameters (RFC 5321 §4.1.2 `esmtp-param`; SIZE from RFC 1870, BODY from RFC 6152
//! and RFC 3030, SMTPUTF8 from RFC 6531, AUTH from RFC 4954 §5). Unknown parameters (e.g.
//! RFC 3461 NOTIFY, ORCPT, RET, ENVID) are kept as keyword and value for the driver.
//!
//! Paths are parsed, not judged: source routes (`<@a,@b:user@c>`, RFC 5321 §4.1.1.3 says
//! to ignore them) and quoted local parts (`<"x@ext"@ours>`) come back flagged, so the
//! driver can refuse the forms that hide a relay; the directory never sees raw text.
//! Tolerated beyond the grammar, as most servers do: spaces after `FROM:` / `TO:`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Problem;

/// Most ESMTP parameters on one MAIL or RCPT (keeps the duplicate check cheap).
const MAX_PARAMETERS: usize = 32;
/// RFC 1870 `size-value ::= 1*20DIGIT`.
const MAX_SIZE_DIGITS: usize = 20;
/// RFC 5321 §4.5.3.1.2.
const MAX_DOMAIN: usize = 255;
const MAX_LABEL: usize = 63;

/// A mailbox path as the client sent it between `<` and `>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// The local part; for a quoted one, its content with quoting undone (`x@ext` for
    /// `"x@ext"`), so it may contain `@`, spaces or anything else: check `quoted_local`.
    pub local: String,
    /// The domain as sent (case kept); an address literal keeps its brackets (`[192.0.2.1]`).
    pub domain: String,
    /// The path had a source route (`@a,@b:`), parsed and dropped from `local`/`domain`.
    pub source_route: bool,
    /// The local part was a quoted string.
    pub quoted_local: bool,
    raw: String,
}

impl Path {
    /// The text between the angle brackets, verbatim (source route included).
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Whether the path needs SMTPUTF8 (RFC 6531 §3.4: refuse with `553 5.6.7` without it).
    pub fn is_ascii(&self) -> bool {
        self.raw.is_ascii()
    }
}

/// MAIL FROM's path: `<>` is the null reverse-path of bounces (RFC 5321 §4.5.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    Null,
    Path(Path),
}

/// RCPT TO's path: `<Postmaster>` without a domain must be accepted (RFC 5321 §4.5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardPath {
    Postmaster,
    Path(Path),
}

/// RFC 6152 / RFC 3030 `BODY=` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
    /// Only valid with BDAT; the edge does not advertise BINARYMIME.
    BinaryMime,
}

/// RFC 4954 §5 `AUTH=` on MAIL FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailAuth {
    /// `AUTH=<>`: the submitter is not known.
    Unknown,
    /// The submitter, still xtext-encoded (RFC 3461 §4). Trust it only from trusted clients.
    Identity(String),
}

/// One ESMTP parameter: keyword upper-cased, value as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameter {
    pub keyword: String,
    pub value: Option<String>,
}

/// MAIL FROM parameters, the ones the edge acts on taken apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParameters {
    /// RFC 1870 declared size, octets.
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
    pub auth: Option<MailAuth>,
    /// Everything else, in order (e.g. RET, ENVID).
    pub other: Vec<Parameter>,
}

/// `FROM:<path> [params]` after the MAIL keyword.
pub(super) fn parse_mail(args: &str) -> Result<(ReversePath, MailParameters), Problem> {
    let rest = strip_keyword(args, "FROM:").ok_or(Problem::Argument)?;
    let (raw, params) = split_path(rest)?;
    let path = match raw {
        "" => ReversePath::Null,
        raw => ReversePath::Path(parse_path(raw)?),
    };
    Ok((path, mail_parameters(parse_parameters(params)?)?))
}

/// `TO:<path> [params]` after the RCPT keyword.
pub(super) fn parse_rcpt(args: &str) -> Result<(ForwardPath, Vec<Parameter>), Problem> {
    let rest = strip_keyword(args, "TO:").ok_or(Problem::Argument)?;
    let (raw, params) = split_path(rest)?;
    let path = match raw.eq_ignore_ascii_case("postmaster") {
        true => ForwardPath::Postmaster,
        false => ForwardPath::Path(parse_path(raw)?),
    };
    Ok((path, parse_parameters(params)?))
}

fn strip_keyword<'a>(args: &'a str, keyword: &str) -> Option<&'a str> {
    let head = args.get(..keyword.len())?;
    let rest = args.get(keyword.len()..)?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| rest.trim_start_matches(' '))
}

/// Splits `<raw> params` into the text inside the brackets and the parameter list.
fn split_path(text: &str) -> Result<(&str, &str), Problem> {
    let inner = text.strip_prefix('<').ok_or(Problem::Path)?;
    let close = closing_bracket(inner).ok_or(Problem::Path)?;
    let raw = inner.get(..close).ok_or(Problem::Path)?;
    match inner.get(close + 1..).unwrap_or_default() {
        "" => Ok((raw, "")),
        rest if rest.starts_with(' ') => Ok((raw, rest.trim_start_matches(' '))),
        _ => Err(Problem::Path),
    }
}

/// The `>` that closes the path: one inside a quoted local part does not.
fn closing_bracket(text: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(at),
            _ => {}
        }
    }
    None
}

fn parse_path(raw: &str) -> Result<Path, Problem> {
    let (source_route, mailbox) = strip_source_route(raw)?;
    let (local, quoted_local, domain) = split_mailbox(mailbox)?;
    if !is_domain(domain) && address_literal(domain).is_none() {
        return Err(Problem::Path);
    }
    Ok(Path {
        local,
        domain: domain.to_owned(),
        source_route,
        quoted_local,
        raw: raw.to_owned(),
    })
}

/// `@a,@b:mailbox` → `(true, mailbox)`; every route domain must be a valid domain.
fn strip_source_route(raw: &str) -> Result<(bool, &str), Problem> {
    if !raw.starts_with('@') {
        return Ok((false, raw));
    }
    let (route, mailbox) = raw.split_once(':').ok_or(Problem::Path)?;
    let valid = route
        .split(',')
        .all(|hop| hop.strip_prefix('@').is_some_and(is_domain));
    valid.then_some((true, mailbox)).ok_or(Problem::Path)
}

/// `local@domain` → (local part with quoting undone, was it quoted, domain text).
fn split_mailbox(mailbox: &str) -> Result<(String, bool, &str), Problem> {
    if let Some(quoted) = mailbox.strip_prefix('"') {
        let (local, rest) = unquote(quoted).ok_or(Problem::Path)?;
        let domain = rest.strip_prefix('@').ok_or(Problem::Path)?;
        return Ok((local, true, domain));
    }
    let (local, domain) = mailbox.split_once('@').ok_or(Problem::Path)?;
    let atoms_ok = local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext));
    atoms_ok
        .then(|| (local.to_owned(), false, domain))
        .ok_or(Problem::Path)
}

/// The content of a quoted string whose opening quote is already stripped, and the text
/// after its closing quote. `None` when unterminated or holding characters RFC 5321
/// `qtextSMTP` / `quoted-pairSMTP` (plus RFC 6531 UTF-8) do not allow.
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut content = String::new();
    let mut escaped = false;
    for (at, c) in text.char_indices() {
        let printable = c == ' ' || c.is_ascii_graphic() || (!c.is_ascii() && !c.is_control());
        match c {
            _ if !printable => return None,
            _ if escaped => {
                escaped = false;
                content.push(c);
            }
            '\\' => escaped = true,
            '"' => return Some((content, text.get(at + 1..)?)),
            _ => content.push(c),
        }
    }
    None
}

/// RFC 5321 `atext`, plus any non-control non-ASCII character (RFC 6531 `UTF8-non-ascii`).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || "!#$%&'*+-/=?^_`{|}~".contains(c)
        || (!c.is_ascii() && !c.is_control())
}

/// RFC 5321 `Domain` (LDH labels), with RFC 6531 U-labels taken as labels of letters.
pub(super) fn is_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= MAX_DOMAIN
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3) as an address; general
/// address literals (`[tag:content]`) and anything else give `None`.
pub(super) fn address_literal(text: &str) -> Option<IpAddr> {
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    let tag = inner
        .get(..5)
        .filter(|tag| tag.eq_ignore_ascii_case("IPv6:"));
    match tag.and(inner.get(5..)) {
        Some(v6) => v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        None => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// Space-separated `keyword[=value]` list; keywords unique (case-insensitively).
fn parse_parameters(text: &str) -> Result<Vec<Parameter>, Problem> {
    let mut params: Vec<Parameter> = Vec::new();
    for word in text.split(' ').filter(|word| !word.is_empty()) {
        let param = parse_parameter(word)?;
        let duplicate = params.iter().any(|seen| seen.keyword == param.keyword);
        if duplicate || params.len() == MAX_PARAMETERS {
            return Err(Problem::Parameter);
        }
        params.push(param);
    }
    Ok(params)
}

/// `esmtp-keyword ["=" esmtp-value]` (value extended with UTF-8 by RFC 6531).
fn parse_parameter(word: &str) -> Result<Parameter, Problem> {
    let (keyword, value) = match word.split_once('=') {
        Some((keyword, value)) => (keyword, Some(value)),
        None => (word, None),
    };
    let keyword_ok = keyword.starts_with(|c: char| c.is_ascii_alphanumeric())
        && keyword
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    let value_ok = value.is_none_or(|value| {
        !value.is_empty()
            && value
                .chars()
                .all(|c| c != '=' && (c.is_ascii_graphic() || (!c.is_ascii() && !c.is_control())))
    });
    if !keyword_ok || !value_ok {
        return Err(Problem::Parameter);
    }
    Ok(Parameter {
        keyword: keyword.to_ascii_uppercase(),
        value: value.map(str::to_owned),
    })
}

fn mail_parameters(params: Vec<Parameter>) -> Result<MailParameters, Problem> {
    let mut mail = MailParameters::default();
    for param in params {
        match (param.keyword.as_str(), param.value.as_deref()) {
            ("SIZE", Some(value)) => mail.size = Some(parse_size(value)?),
            ("BODY", Some(value)) => mail.body = Some(parse_body(value)?),
            ("SMTPUTF8", None) => mail.smtputf8 = true,
            ("AUTH", Some("<>")) => mail.auth = Some(MailAuth::Unknown),
            ("AUTH", Some(identity)) => mail.auth = Some(MailAuth::Identity(identity.to_owned())),
            ("SIZE" | "BODY" | "SMTPUTF8" | "AUTH", _) => return Err(Problem::Parameter),
            _ => mail.other.push(param),
        }
    }
    Ok(mail)
}

fn parse_size(value: &str) -> Result<u64, Problem> {
    let digits = value.len() <= MAX_SIZE_DIGITS && value.bytes().all(|b| b.is_ascii_digit());
    match digits {
        true => value.parse().map_err(|_| Problem::Parameter),
        false => Err(Problem::Parameter),
    }
}

fn parse_body(value: &str) -> Result<Body, Problem> {
    match value.to_ascii_uppercase().as_str() {
        "7BIT" => Ok(Body::SevenBit),
        "8BITMIME" => Ok(Body::EightBitMime),
        "BINARYMIME" => Ok(Body::BinaryMime),
        _ => Err(Problem::Parameter),
    }
}

#[cfg(test)]
#[path = "codec_path_tests.rs"]
mod tests;
