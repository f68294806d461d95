//! Tokens of the IMAP command grammar (RFC 9051 §9): tag, atom, astring, quoted string,
//! literal, nstring. The parser runs over a command the framer has already cut out and
//! bounded, so running out of bytes is a syntax error, except right after a synchronizing
//! literal announcement, which is `Stop::AwaitLiteral`.

use super::frame::parse_literal_header;
use super::{MAX_LITERAL, is_astring_char, is_atom_char, is_tag_char};

/// Why parsing stopped short of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Syntax(&'static str),
    /// The bytes end right after a `{n}` the client wants a `+` for.
    AwaitLiteral,
}

pub(super) struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    pub(super) fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> &'a [u8] {
        let rest = self.rest();
        let len = rest
            .iter()
            .position(|&byte| !keep(byte))
            .unwrap_or(rest.len());
        self.pos += len;
        rest.get(..len).unwrap_or_default()
    }

    pub(super) fn expect(&mut self, byte: u8, reason: &'static str) -> Result<(), Stop> {
        if self.peek() != Some(byte) {
            return Err(Stop::Syntax(reason));
        }
        self.pos += 1;
        Ok(())
    }

    pub(super) fn sp(&mut self) -> Result<(), Stop> {
        self.expect(b' ', "expected a space")
    }

    pub(super) fn at_eol(&self) -> bool {
        matches!(self.peek(), Some(b'\r' | b'\n'))
    }

    /// CRLF, or a bare LF (see `line_end`).
    pub(super) fn eol(&mut self) -> Result<(), Stop> {
        if self.peek() == Some(b'\r') {
            self.pos += 1;
        }
        self.expect(b'\n', "expected end of line")
    }

    /// `tag = 1*<any ASTRING-CHAR except "+">`, which must be followed by SP or the end.
    pub(super) fn tag(&mut self) -> Option<String> {
        let raw = self.take_while(|byte| !matches!(byte, b' ' | b'\r' | b'\n'));
        let valid = !raw.is_empty() && raw.iter().all(|&byte| is_tag_char(byte));
        valid.then(|| String::from_utf8_lossy(raw).into_owned())
    }

    pub(super) fn atom(&mut self) -> Result<&'a str, Stop> {
        let atom = self.take_while(is_atom_char);
        if atom.is_empty() {
            return Err(Stop::Syntax("expected an atom"));
        }
        std::str::from_utf8(atom).map_err(|_| Stop::Syntax("expected an atom"))
    }

    /// `astring = 1*ASTRING-CHAR / string`. Atoms are 7-bit, as the grammar says.
    pub(super) fn astring(&mut self) -> Result<String, Stop> {
        if matches!(self.peek(), Some(b'"' | b'{')) {
            return self.string();
        }
        let atom = self.take_while(is_astring_char);
        if atom.is_empty() {
            return Err(Stop::Syntax("expected a string"));
        }
        Ok(String::from_utf8_lossy(atom).into_owned())
    }

    /// `string = quoted / literal`.
    pub(super) fn string(&mut self) -> Result<String, Stop> {
        match self.peek() {
            Some(b'"') => self.quoted(),
            Some(b'{') => self.literal(),
            _ => Err(Stop::Syntax("expected a quoted string or a literal")),
        }
    }

    /// `nstring = string / NIL`.
    pub(super) fn nstring(&mut self) -> Result<Option<String>, Stop> {
        if matches!(self.peek(), Some(b'"' | b'{')) {
            return self.string().map(Some);
        }
        self.nil().map(|()| None)
    }

    pub(super) fn nil(&mut self) -> Result<(), Stop> {
        match self.atom() {
            Ok(atom) if atom.eq_ignore_ascii_case("NIL") => Ok(()),
            _ => Err(Stop::Syntax("expected NIL or a string")),
        }
    }

    /// A quoted string: no CR, LF or NUL; `\` escapes only `"` and `\`; 8-bit only as
    /// UTF-8 (RFC 9051 QUOTED-CHAR).
    fn quoted(&mut self) -> Result<String, Stop> {
        self.expect(b'"', "expected a quoted string")?;
        let mut text = Vec::new();
        loop {
            let byte = self
                .peek()
                .ok_or(Stop::Syntax("unterminated quoted string"))?;
            self.pos += 1;
            match byte {
                b'"' => break,
                b'\\' => {
                    let escaped = self
                        .peek()
                        .filter(|next| matches!(next, b'"' | b'\\'))
                        .ok_or(Stop::Syntax("invalid escape in quoted string"))?;
                    self.pos += 1;
                    text.push(escaped);
                }
                b'\r' | b'\n' | 0 => return Err(Stop::Syntax("CR, LF or NUL in quoted string")),
                _ => text.push(byte),
            }
        }
        String::from_utf8(text).map_err(|_| Stop::Syntax("quoted string is not UTF-8"))
    }

    /// `literal = "{" number ["+"] "}" CRLF *CHAR8`. CHAR8 excludes NUL; we also want
    /// UTF-8, since logins become `String`s.
    fn literal(&mut self) -> Result<String, Stop> {
        self.expect(b'{', "expected a literal")?;
        let inner = self.take_while(|byte| !matches!(byte, b'}' | b'\r' | b'\n'));
        self.expect(b'}', "invalid literal announcement")?;
        let header =
            parse_literal_header(inner).ok_or(Stop::Syntax("invalid literal announcement"))?;
        self.eol()
            .map_err(|_| Stop::Syntax("a literal announcement must end the line"))?;
        if header.len > MAX_LITERAL {
            return Err(Stop::Syntax("literal too large"));
        }
        if header.synchronizing && self.pos == self.buf.len() {
            return Err(Stop::AwaitLiteral);
        }
        let data = self
            .rest()
            .get(..header.len)
            .ok_or(Stop::Syntax("truncated literal"))?;
        self.pos += header.len;
        if data.contains(&0) {
            return Err(Stop::Syntax("NUL in literal"));
        }
        String::from_utf8(data.to_vec()).map_err(|_| Stop::Syntax("literal is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn astring(input: &[u8]) -> Result<String, Stop> {
        Parser::new(input).astring()
    }

    #[test]
    fn astrings_of_every_form() {
        assert_eq!(astring(b"bob rest"), Ok("bob".into()));
        assert_eq!(astring(b"a]b"), Ok("a]b".into()));
        assert_eq!(astring(br#""with space""#), Ok("with space".into()));
        assert_eq!(astring(br#""q\"b\\s""#), Ok(r#"q"b\s"#.into()));
        assert_eq!(astring(b"\"\""), Ok(String::new()));
        assert_eq!(astring("\"j\u{f6}rg\"".as_bytes()), Ok("j\u{f6}rg".into()));
        assert_eq!(astring(b"{3}\r\na b"), Ok("a b".into()));
        assert_eq!(astring(b"{3+}\na\"b"), Ok("a\"b".into()));
        assert_eq!(astring(b"{0}\r\n "), Ok(String::new()));
    }

    #[test]
    fn bad_astrings() {
        let syntax = |input: &[u8]| match astring(input) {
            Err(Stop::Syntax(_)) => true,
            other => panic!("{input:?}: {other:?}"),
        };
        syntax(b"");
        syntax(b"(x");
        syntax(b"\"open");
        syntax(b"\"a\\nb\"");
        syntax(b"\"a\0b\"");
        syntax(b"\"a\rb\"");
        syntax(b"\"\xff\"");
        syntax(b"\xc3\xa9");
        syntax(b"{3}x\r\nabc");
        syntax(b"{3}\r\nab");
        syntax(b"{3}\r\na\0b");
        syntax(b"{2}\r\n\xc3\x28");
        syntax(b"{4097+}\r\n");
        assert_eq!(astring(b"{3}\r\n"), Err(Stop::AwaitLiteral));
        assert_eq!(astring(b"{3+}\r\n"), Err(Stop::Syntax("truncated literal")));
    }

    #[test]
    fn nstrings_and_nil() {
        assert_eq!(Parser::new(b"nil").nstring(), Ok(None));
        assert_eq!(Parser::new(b"NIL)").nstring(), Ok(None));
        assert_eq!(Parser::new(b"\"NIL\"").nstring(), Ok(Some("NIL".into())));
        assert!(Parser::new(b"NILS").nstring().is_err());
        assert!(Parser::new(b"value").nstring().is_err());
    }

    #[test]
    fn tags_and_line_ends() {
        let mut parser = Parser::new(b"a1 X\r\n");
        assert_eq!(parser.tag(), Some("a1".into()));
        assert_eq!(parser.sp(), Ok(()));
        assert_eq!(parser.atom(), Ok("X"));
        assert!(parser.at_eol());
        assert_eq!(parser.eol(), Ok(()));
        assert_eq!(Parser::new(b"a+ X").tag(), None);
        assert_eq!(
            Parser::new(b"\rx").eol(),
            Err(Stop::Syntax("expected end of line"))
        );
    }
}
