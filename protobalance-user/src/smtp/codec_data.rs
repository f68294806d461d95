//! The DATA stream (RFC 5321 §4.1.1.4, §4.5.2), read after the edge's `354` and forwarded
//! to the backend as it arrives, still dot-stuffed: [`DataReader`] holds O(1) state, so
//! memory stays flat however large the message, and chunk boundaries may fall anywhere.
//!
//! End of data is only `CRLF.CRLF` (or `.CRLF` as the very first line). The SMTP smuggling
//! advisories of December 2023 (SEC Consult; CVE-2023-51764 Postfix, CVE-2023-51765
//! Sendmail, CVE-2023-51766 Exim) showed what happens when two servers disagree: a
//! `\n.\n`, `\n.\r\n`, `\r\n.\n` or `\r.\r` that one side reads as the end and the other as
//! content lets a second, forged transaction ride inside the first message. So bare CR and
//! bare LF never end a line here, never end the data, and never reach the backend as such:
//!
//! - [`BareLineEndings::Reject`]: the first one stops forwarding and marks the message to
//!   be refused (the driver answers e.g. `550 5.6.0` after the real end of data);
//! - [`BareLineEndings::Normalize`]: each becomes CRLF in the forwarded stream, and a dot
//!   opening a line that a bare ending began is doubled — that dot was content, since the
//!   client never ended the line before it — so `\n.\n` reaches the backend as `\r\n..\r\n`
//!   (a line holding one dot), never as an end of data. `.` + bare ending after a real CRLF
//!   likewise becomes `..` + CRLF.
//!
//! Size (RFC 1870 §4): message octets as the backend will store them — CRLFs counted, the
//! dots of dot-stuffing and the final `.CRLF` not. Over the limit, forwarding stops and
//! reading goes on to the real end of data, so the driver can answer `552 5.3.4` in sync.
//!
//! The forwarded output never contains the end-of-data sequence: the driver sends
//! [`END_OF_DATA`] itself after `End`, and only when the verdict is `Ok`. After a refusal
//! the backend transaction cannot be completed: close the backend connection without the
//! terminator (the backend discards a message whose data never ended).

/// What the driver sends to the backend after the forwarded output, when the verdict is
/// `Ok`: with the CRLF that output always ends with, the backend sees `CRLF.CRLF`.
pub const END_OF_DATA: &[u8] = b".\r\n";

const CR: u8 = b'\r';
const LF: u8 = b'\n';
const CRLF: &[u8] = b"\r\n";

/// What to do with a CR or LF that is not part of a CRLF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareLineEndings {
    /// Refuse the message (forward nothing more), like Postfix `smtpd_forbid_bare_newline`.
    Reject,
    /// Forward it as CRLF, dot-stuffing the line it begins.
    Normalize,
}

/// Why [`DataReader::feed`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataState {
    /// All input consumed; feed more.
    More,
    /// The message just went over the size limit (reported once). Nothing more is
    /// forwarded; give up the backend transaction and keep feeding until `End`.
    Exceeded,
    /// A bare CR or LF under [`BareLineEndings::Reject`] (reported once). As for `Exceeded`.
    BareLineEnding,
    /// The end of data was read; `consumed` includes it, and any input after it is the
    /// next command (PIPELINING). Later calls consume nothing and return `End` again.
    End,
}

/// How much input one [`DataReader::feed`] call consumed, and why it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feed {
    /// Never more than the input; less only for `End` or a refusal (call again with the rest).
    pub consumed: usize,
    pub state: DataState,
}

/// The outcome of the message so far (final once `End` was returned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataVerdict {
    /// Forward [`END_OF_DATA`] and relay the backend's answer.
    Ok { size: u64 },
    /// Over the limit: `552 5.3.4`.
    TooBig { size: u64 },
    /// A bare CR or LF under `Reject`.
    BareLineEnding,
}

/// Where in the stream the reader stands; everything it holds back is implied by this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// At the start of a line begun by a real CRLF, or of the first line.
    LineStart,
    /// At the start of a line begun by a normalized bare CR or LF: a dot here is content.
    NormalizedLineStart,
    Text,
    /// Holding a CR read in text; the next byte tells whether it is a line end.
    Cr,
    /// Holding a dot that opened a line begun by a real CRLF.
    Dot,
    /// Holding `.` CR after a real CRLF: an LF now ends the data.
    DotCr,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    TooBig,
    BareLineEnding,
}

/// Reads one message's DATA stream; make a new one per message.
#[derive(Debug, Clone)]
pub struct DataReader {
    max_size: u64,
    policy: BareLineEndings,
    position: Position,
    size: u64,
    refusal: Option<Refusal>,
    /// A refusal that happened in this call and is still to be reported.
    event: Option<DataState>,
}

impl DataReader {
    /// `max_size` in octets as RFC 1870 counts them; a message of exactly that size passes.
    pub fn new(max_size: u64, policy: BareLineEndings) -> Self {
        Self {
            max_size,
            policy,
            position: Position::LineStart,
            size: 0,
            refusal: None,
            event: None,
        }
    }

    /// Consumes `input` up to the end of data or the first refusal, appending what is to
    /// be forwarded to `out` (at most twice the input).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        let mut at = 0;
        while self.position != Position::Done {
            let rest = input.get(at..).unwrap_or_default();
            let Some(&byte) = rest.first() else {
                break;
            };
            match self.position {
                Position::Text if byte != CR && byte != LF => at += self.copy_text(rest, out),
                _ => {
                    at += 1;
                    self.step(byte, out);
                }
            }
            if let Some(state) = self.event.take() {
                return Feed {
                    consumed: at,
                    state,
                };
            }
        }
        let state = match self.position {
            Position::Done => DataState::End,
            _ => DataState::More,
        };
        Feed {
            consumed: at,
            state,
        }
    }

    pub fn verdict(&self) -> DataVerdict {
        match self.refusal {
            None => DataVerdict::Ok { size: self.size },
            Some(Refusal::TooBig) => DataVerdict::TooBig { size: self.size },
            Some(Refusal::BareLineEnding) => DataVerdict::BareLineEnding,
        }
    }

    /// Message octets so far (RFC 1870), counted on after a refusal.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_done(&self) -> bool {
        self.position == Position::Done
    }

    /// Forwards the run of ordinary text at the start of `rest`; returns its length. Over
    /// the limit, the part that still fits is forwarded, exactly as byte by byte, so where
    /// chunks were cut never changes the output.
    fn copy_text(&mut self, rest: &[u8], out: &mut Vec<u8>) -> usize {
        let run = rest
            .iter()
            .position(|&byte| byte == CR || byte == LF)
            .unwrap_or(rest.len());
        let room = self.max_size.saturating_sub(self.size);
        let fits = usize::try_from(room).map_or(run, |room| run.min(room));
        if self.refusal.is_none() {
            out.extend_from_slice(rest.get(..fits).unwrap_or_default());
        }
        self.count(run);
        run
    }

    fn step(&mut self, byte: u8, out: &mut Vec<u8>) {
        if !self.settle_held(byte, out) {
            self.take_byte(byte, out);
        }
    }

    /// Settles what the position holds back now that `byte` follows it; true when that
    /// used `byte` up, false when `byte` still starts a line or continues text.
    fn settle_held(&mut self, byte: u8, out: &mut Vec<u8>) -> bool {
        match (self.position, byte) {
            (Position::Cr, LF) => {
                self.emit(out, CRLF, 2);
                self.position = Position::LineStart;
                true
            }
            (Position::Cr, _) => {
                self.bare_line_ending(out, CR);
                false
            }
            (Position::Dot, CR) => {
                self.position = Position::DotCr;
                true
            }
            (Position::Dot, LF) => {
                self.bare_after_dot(out, LF);
                true
            }
            (Position::Dot, _) => {
                // A dot-stuffing dot: forwarded as is, not counted (the backend drops it).
                self.emit(out, b".", 0);
                self.position = Position::Text;
                false
            }
            (Position::DotCr, LF) => {
                self.position = Position::Done;
                true
            }
            (Position::DotCr, _) => {
                self.bare_after_dot(out, CR);
                false
            }
            _ => false,
        }
    }

    fn take_byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        match (self.position, byte) {
            (_, CR) => self.position = Position::Cr,
            (_, LF) => self.bare_line_ending(out, LF),
            (Position::LineStart, b'.') => self.position = Position::Dot,
            (Position::NormalizedLineStart, b'.') => {
                self.emit(out, b"..", 1);
                self.position = Position::Text;
            }
            _ => {
                self.emit(out, &[byte], 1);
                self.position = Position::Text;
            }
        }
    }

    fn bare_line_ending(&mut self, out: &mut Vec<u8>, bare: u8) {
        match self.policy {
            BareLineEndings::Normalize => {
                self.emit(out, CRLF, 2);
                self.position = Position::NormalizedLineStart;
            }
            BareLineEndings::Reject => {
                self.refuse(Refusal::BareLineEnding);
                self.emit(out, &[bare], 1);
                self.position = Position::Text;
            }
        }
    }

    /// A line `.` ended by a bare CR or LF: content, never the end of data.
    fn bare_after_dot(&mut self, out: &mut Vec<u8>, bare: u8) {
        match self.policy {
            BareLineEndings::Normalize => {
                self.emit(out, b"..\r\n", 3);
                self.position = Position::NormalizedLineStart;
            }
            BareLineEndings::Reject => {
                self.refuse(Refusal::BareLineEnding);
                self.emit(out, &[bare], 1);
                self.position = Position::Text;
            }
        }
    }

    /// Counts `content` message octets and forwards `bytes`, all or nothing, unless the
    /// message is refused.
    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8], content: usize) {
        self.count(content);
        if self.refusal.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    fn count(&mut self, content: usize) {
        let content = u64::try_from(content).unwrap_or(u64::MAX);
        self.size = self.size.saturating_add(content);
        if self.size > self.max_size {
            self.refuse(Refusal::TooBig);
        }
    }

    /// The first refusal wins and is reported once.
    fn refuse(&mut self, why: Refusal) {
        if self.refusal.is_none() {
            self.refusal = Some(why);
            self.event = Some(match why {
                Refusal::TooBig => DataState::Exceeded,
                Refusal::BareLineEnding => DataState::BareLineEnding,
            });
        }
    }
}

#[cfg(test)]
#[path = "codec_data_tests.rs"]
mod tests;
