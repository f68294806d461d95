//! SMTP replies (RFC 5321 §4.2): the ones the edge writes to clients, and the ones it reads
//! from a backend — SMTP, or LMTP (RFC 2033 §4.2), which answers DATA with one reply per
//! accepted recipient; they arrive back to back and [`decode_reply`] takes one at a time.
//! Enhanced status codes (RFC 3463, carried as RFC 2034 says: after the code, on every
//! line of the reply).
//!
//! Encoders take text from the driver and cannot fail: control characters become spaces
//! and text is cut so a line stays within RFC 5321's 512 octets, so the output is always
//! well-framed. The decoder is bounded ([`MAX_REPLY_LINE`] per line, [`MAX_REPLY_LINES`]
//! per reply) and lenient where that is safe: a bare LF ends a backend's line and text is
//! read as lossy UTF-8, because reply text is re-encoded, never forwarded verbatim.

use super::{CodecError, Decoded, Line, take_line};

/// Longest backend reply line accepted, terminator included (RFC 5321 §4.5.3.1.5 says
/// 512; servers and their rejection texts go beyond it).
pub const MAX_REPLY_LINE: usize = 1024;
/// Most lines in one backend reply (an EHLO reply has about a dozen).
pub const MAX_REPLY_LINES: usize = 64;
/// Longest line the encoders write, code and CRLF included (RFC 5321 §4.5.3.1.5).
pub const MAX_ENCODED_REPLY_LINE: usize = 512;

/// Sent in place of a reply code outside 200–599, which would be a bug in the caller: a
/// transient failure makes the client retry instead of misreading the reply.
const FALLBACK_CODE: u16 = 451;

/// One complete reply from a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// `(class, subject, detail)`, when the first line carries an enhanced status code
    /// whose class matches the code's first digit. It is stripped from every line.
    pub enhanced: Option<(u8, u16, u16)>,
    /// The text of each line (possibly empty), control characters turned into spaces.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2yz: the action was taken.
    pub fn is_positive(&self) -> bool {
        self.code / 100 == 2
    }

    /// 3yz: go on (354 after DATA, 334 during AUTH).
    pub fn is_intermediate(&self) -> bool {
        self.code / 100 == 3
    }

    /// 4yz: try again later.
    pub fn is_transient(&self) -> bool {
        self.code / 100 == 4
    }

    /// 5yz: do not retry as is.
    pub fn is_permanent(&self) -> bool {
        self.code / 100 == 5
    }

    /// For an EHLO/LHLO reply: the parameters of `keyword` when the backend offers it
    /// (`Some("")` for one without parameters), e.g. `extension("SIZE")` → `Some("10240000")`.
    pub fn extension(&self, keyword: &str) -> Option<&str> {
        self.lines.iter().skip(1).find_map(|line| {
            let (name, params) = line.split_once(' ').unwrap_or((line, ""));
            name.eq_ignore_ascii_case(keyword).then_some(params)
        })
    }
}

/// `code enhanced text\r\n`, e.g. `reply(250, Some("2.1.0"), "OK")`. An enhanced code that
/// is malformed or whose class differs from the code's first digit is left out.
pub fn reply(code: u16, enhanced: Option<&str>, text: &str) -> Vec<u8> {
    multiline_reply(code, enhanced, &[text])
}

/// `code-line\r\n` for every line but the last, `code line\r\n` for the last; the
/// enhanced code (if any) opens every line. No lines gives one line without text.
pub fn multiline_reply(code: u16, enhanced: Option<&str>, lines: &[&str]) -> Vec<u8> {
    let code = match code {
        200..=599 => code,
        _ => FALLBACK_CODE,
    };
    let enhanced = enhanced.filter(|text| parse_enhanced(text, code).is_some());
    let count = lines.len().max(1);
    let mut out = Vec::new();
    for at in 0..count {
        let text = lines.get(at).copied().unwrap_or_default();
        push_line(&mut out, code, at + 1 == count, enhanced, text);
    }
    out
}

/// The EHLO reply: greeting, then one extension per line. RFC 2034 §4 exempts the
/// greeting and the HELO/EHLO reply from enhanced status codes (and 3xx replies have none).
pub fn ehlo_reply(greeting: &str, extensions: &[&str]) -> Vec<u8> {
    let mut lines = Vec::with_capacity(extensions.len() + 1);
    lines.push(greeting);
    lines.extend_from_slice(extensions);
    multiline_reply(250, None, &lines)
}

fn push_line(out: &mut Vec<u8>, code: u16, last: bool, enhanced: Option<&str>, text: &str) {
    let start = out.len();
    out.extend_from_slice(code.to_string().as_bytes());
    if !last {
        out.push(b'-');
    } else if enhanced.is_some() || !text.is_empty() {
        out.push(b' ');
    }
    if let Some(enhanced) = enhanced {
        out.extend_from_slice(enhanced.as_bytes());
        if !text.is_empty() {
            out.push(b' ');
        }
    }
    let budget = MAX_ENCODED_REPLY_LINE.saturating_sub(out.len() - start + 2);
    let mut utf8 = [0; 4];
    let mut used = 0;
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        used += c.len_utf8();
        if used > budget {
            break;
        }
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// `class.subject.detail` (RFC 3463 §2: class 2, 4 or 5, then 1–3 digits twice), only
/// when the class matches `code`'s first digit (RFC 2034 §4).
fn parse_enhanced(text: &str, code: u16) -> Option<(u8, u16, u16)> {
    let mut parts = text.split('.');
    let mut number = || {
        let part = parts.next().filter(|p| (1..=3).contains(&p.len()))?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse::<u16>().ok())?
    };
    let (class, subject, detail) = (number()?, number()?, number()?);
    let matches = matches!(class, 2 | 4 | 5) && class == code / 100;
    (matches && parts.next().is_none()).then_some((u8::try_from(class).ok()?, subject, detail))
}

/// Decodes the first complete reply in `buf`, all of its lines.
pub fn decode_reply(buf: &[u8]) -> Result<Decoded<Reply>, CodecError> {
    let mut offset = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        if lines.len() == MAX_REPLY_LINES {
            return Err(CodecError::TooManyLines);
        }
        let rest = buf.get(offset..).unwrap_or_default();
        let Some((line, used)) = take_line(rest, MAX_REPLY_LINE)? else {
            return Ok(Decoded::Incomplete);
        };
        offset += used;
        let (Line::Crlf(text) | Line::BareLf(text)) = line;
        let (line_code, last, text) = split_reply_line(text)?;
        if *code.get_or_insert(line_code) != line_code {
            return Err(CodecError::BadReply);
        }
        lines.push(clean_text(text));
        if last {
            let value = finish_reply(line_code, lines);
            return Ok(Decoded::Complete {
                value,
                consumed: offset,
            });
        }
    }
}

/// `code`, whether this is the last line, and the text.
fn split_reply_line(line: &[u8]) -> Result<(u16, bool, &[u8]), CodecError> {
    let (digits, rest) = line.split_at_checked(3).ok_or(CodecError::BadReply)?;
    let valid = matches!(digits, [b'2'..=b'5', b'0'..=b'9', b'0'..=b'9']);
    let code = digits.iter().fold(0u16, |code, &digit| {
        code * 10 + u16::from(digit.wrapping_sub(b'0'))
    });
    let (last, text) = match rest.split_first() {
        None => (true, rest),
        Some((b' ', text)) => (true, text),
        Some((b'-', text)) => (false, text),
        Some(_) => return Err(CodecError::BadReply),
    };
    match valid {
        true => Ok((code, last, text)),
        false => Err(CodecError::BadReply),
    }
}

fn clean_text(text: &[u8]) -> String {
    String::from_utf8_lossy(text)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn finish_reply(code: u16, mut lines: Vec<String>) -> Reply {
    let leading = |line: &str| {
        let (first, rest) = line.split_once(' ').unwrap_or((line, ""));
        parse_enhanced(first, code).map(|enhanced| (enhanced, rest.len()))
    };
    let enhanced = lines.first().and_then(|line| leading(line)).map(|(e, _)| e);
    for line in lines.iter_mut() {
        match leading(line) {
            Some((found, rest)) if Some(found) == enhanced => {
                let cut = line.len() - rest;
                *line = line.get(cut..).unwrap_or_default().to_owned();
            }
            _ => {}
        }
    }
    Reply {
        code,
        enhanced,
        lines,
    }
}

#[cfg(test)]
#[path = "codec_reply_tests.rs"]
mod tests;
