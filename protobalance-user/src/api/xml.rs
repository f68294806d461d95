//! The API's XML on the wire: a guarded pull parser for request bodies and a small writer
//! for responses.
//!
//! Requests are documents in the [`NS`] namespace made of elements with attributes only
//! (no text content). The parser refuses, before anything is changed: a DOCTYPE (so no
//! entity declarations: no billion laughs, no external entities), undeclared entity
//! references, processing instructions and CDATA, text content, elements or attributes in
//! another namespace, nesting deeper than [`MAX_DEPTH`], more attributes than
//! [`MAX_ATTRIBUTES`], attribute values over [`MAX_VALUE`] bytes, invalid UTF-8, and (by
//! [`BodyReader`]) bodies over their limit or any single tag over [`MAX_TAG`] bytes, so
//! memory stays bounded whatever arrives. The same parser streams a bulk import: it
//! yields one element at a time.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};
use quick_xml::{
    events::{BytesStart, Event},
    name::ResolveResult,
    reader::NsReader,
};
use tokio::io::{AsyncRead, BufReader, ReadBuf};

/// The namespace of every API document.
pub const NS: &str = "urn:protobalance:api:1";
/// Deepest element nesting a request may have.
pub const MAX_DEPTH: usize = 4;
pub const MAX_ATTRIBUTES: usize = 16;
/// Longest attribute value, in bytes.
pub const MAX_VALUE: usize = 1024;
/// Longest run of bytes without a `>`: bounds any one tag (and any text) in memory.
pub const MAX_TAG: usize = 16 * 1024;

/// What was wrong with a request body; the `code` and message go into the error document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlError {
    pub code: &'static str,
    pub message: String,
}

impl XmlError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn malformed(detail: impl std::fmt::Display) -> Self {
        Self::new(
            "malformed_xml",
            format!("the body is not well-formed XML: {detail}"),
        )
    }
}

/// One element with its attributes (names without prefix; all in [`NS`] or unprefixed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attributes: Vec<(String, String)>,
    /// `<x/>` or `<x>…</x>`: children follow until the matching [`Item::Close`].
    pub has_children: bool,
}

impl Element {
    /// The value of `name`, if present.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name`, or an error naming the element and the attribute.
    pub fn required(&self, name: &str) -> Result<&str, XmlError> {
        self.attr(name).ok_or_else(|| {
            XmlError::new(
                "missing_attribute",
                format!("<{}> needs the attribute `{name}`", self.name),
            )
        })
    }

    /// Refuses attributes other than `allowed`, naming the first unknown one.
    pub fn only(&self, allowed: &[&str]) -> Result<(), XmlError> {
        match self
            .attributes
            .iter()
            .find(|(n, _)| !allowed.contains(&n.as_str()))
        {
            Some((name, _)) => Err(XmlError::new(
                "unknown_attribute",
                format!(
                    "<{}> has no attribute `{name}`; allowed: {}",
                    self.name,
                    allowed.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }
}

/// What the pull parser yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Open(Element),
    /// The end of the last open element with children.
    Close(String),
    End,
}

/// A guarded pull parser over any byte source.
pub struct Parser<R> {
    reader: NsReader<BufReader<R>>,
    buf: Vec<u8>,
    depth: usize,
    /// Names of the open elements with children.
    open: Vec<String>,
    seen_root: bool,
    pending_close: Option<String>,
}

impl<R: AsyncRead + Unpin> Parser<R> {
    pub fn new(source: R) -> Self {
        let mut reader = NsReader::from_reader(BufReader::with_capacity(8 * 1024, source));
        reader.config_mut().trim_text(true);
        reader.config_mut().expand_empty_elements = false;
        Self {
            reader,
            buf: Vec::with_capacity(1024),
            depth: 0,
            open: Vec::new(),
            seen_root: false,
            pending_close: None,
        }
    }

    /// The byte source, e.g. to read what the parser left of a refused body.
    pub fn into_source(self) -> R {
        self.reader.into_inner().into_inner()
    }

    /// The next element, close or the end of the document.
    pub async fn next(&mut self) -> Result<Item, XmlError> {
        if let Some(name) = self.pending_close.take() {
            return Ok(Item::Close(name));
        }
        // The event borrows the buffer while `element` needs `self`: lend it out.
        let mut buf = std::mem::take(&mut self.buf);
        let item = self.next_with(&mut buf).await;
        buf.clear();
        self.buf = buf;
        item
    }

    async fn next_with(&mut self, buf: &mut Vec<u8>) -> Result<Item, XmlError> {
        loop {
            buf.clear();
            let (ns, event) = self
                .reader
                .read_resolved_event_into_async(buf)
                .await
                .map_err(|e| match body_error(&e) {
                    Some(error) => error,
                    None => XmlError::malformed(e),
                })?;
            let in_ns = match ns {
                ResolveResult::Bound(ns) => ns.as_ref() == NS,
                ResolveResult::Unbound => false,
                ResolveResult::Unknown(prefix) => {
                    return Err(XmlError::malformed(format!(
                        "undeclared namespace prefix `{}`",
                        prefix
                    )));
                }
            };
            match event {
                Event::Start(start) | Event::Empty(start)
                    if self.seen_root && self.open.is_empty() =>
                {
                    let name = start.local_name().as_ref().to_owned();
                    return Err(XmlError::malformed(format!(
                        "<{name}> after the document element"
                    )));
                }
                Event::Start(start) => {
                    let element = self.element(&start, in_ns, true)?;
                    self.open.push(element.name.clone());
                    return Ok(Item::Open(element));
                }
                Event::Empty(start) => {
                    let element = self.element(&start, in_ns, false)?;
                    if self.open.is_empty() {
                        // A childless document element: its end follows at once.
                        self.pending_close = Some(element.name.clone());
                        return Ok(Item::Open(Element {
                            has_children: true,
                            ..element
                        }));
                    }
                    return Ok(Item::Open(element));
                }
                Event::End(_) => {
                    self.depth = self.depth.saturating_sub(1);
                    let name = self.open.pop().unwrap_or_default();
                    return Ok(Item::Close(name));
                }
                Event::Eof if !self.open.is_empty() => {
                    return Err(XmlError::malformed("the document ends inside an element"));
                }
                Event::Eof if !self.seen_root => {
                    return Err(XmlError::new("empty_body", "the body has no XML document"));
                }
                Event::Eof => return Ok(Item::End),
                Event::Decl(_) | Event::Comment(_) => {}
                Event::Text(text) if text.trim().is_empty() => {}
                Event::DocType(_) => {
                    return Err(XmlError::new(
                        "doctype_refused",
                        "DOCTYPE declarations are not accepted (no DTDs, no entity declarations)",
                    ));
                }
                Event::GeneralRef(reference) => {
                    let name = reference.to_string();
                    return Err(XmlError::new(
                        "entity_refused",
                        format!("the entity reference `&{name};` is not allowed here"),
                    ));
                }
                Event::Text(_) | Event::CData(_) => {
                    return Err(XmlError::new(
                        "unexpected_text",
                        "API documents carry data in attributes only; remove the text content",
                    ));
                }
                Event::PI(_) => {
                    return Err(XmlError::new(
                        "malformed_xml",
                        "processing instructions are not accepted",
                    ));
                }
            }
        }
    }

    fn element(
        &mut self,
        start: &BytesStart<'_>,
        in_ns: bool,
        has_children: bool,
    ) -> Result<Element, XmlError> {
        let name = start.local_name().as_ref().to_owned();
        if !in_ns {
            return Err(XmlError::new(
                "wrong_namespace",
                format!("<{name}> must be in the namespace {NS} (xmlns=\"{NS}\")"),
            ));
        }
        self.seen_root = true;
        self.depth += usize::from(has_children);
        if self.depth > MAX_DEPTH || self.open.len() >= MAX_DEPTH {
            return Err(XmlError::new(
                "too_deep",
                format!("elements are nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        let mut attributes = Vec::new();
        for attribute in start.attributes() {
            let attribute = attribute.map_err(XmlError::malformed)?;
            let (ns, local) = self.reader.resolver().resolve_attribute(attribute.key);
            let key = local.as_ref().to_owned();
            if attribute.key.0 == "xmlns" || attribute.key.0.starts_with("xmlns:") {
                continue;
            }
            if !matches!(ns, ResolveResult::Unbound) {
                return Err(XmlError::new(
                    "wrong_namespace",
                    format!("<{name}>: attribute `{key}` must be unprefixed"),
                ));
            }
            if attribute.value.len() > MAX_VALUE {
                return Err(XmlError::new(
                    "value_too_long",
                    format!("<{name}> `{key}` is longer than {MAX_VALUE} bytes"),
                ));
            }
            let value = attribute.normalized_value(quick_xml::XmlVersion::Implicit1_0).map_err(|e| {
                XmlError::new(
                    "entity_refused",
                    format!("<{name}> `{key}`: {e} (only the five XML entities and character references)"),
                )
            })?;
            attributes.push((key, value.into_owned()));
            if attributes.len() > MAX_ATTRIBUTES {
                return Err(XmlError::new(
                    "too_many_attributes",
                    format!("<{name}> has more than {MAX_ATTRIBUTES} attributes"),
                ));
            }
        }
        Ok(Element {
            name,
            attributes,
            has_children,
        })
    }

    /// The document element, which must be `root`.
    pub async fn root(&mut self, root: &str) -> Result<Element, XmlError> {
        match self.next().await? {
            Item::Open(element) if element.name == root => Ok(element),
            Item::Open(element) => Err(XmlError::new(
                "wrong_document",
                format!("expected a <{root}> document, got <{}>", element.name),
            )),
            Item::Close(_) | Item::End => Err(XmlError::new("empty_body", "no document element")),
        }
    }

    /// After the document element's children: its close and the end of input.
    pub async fn finish(&mut self) -> Result<(), XmlError> {
        match self.next().await? {
            Item::End => Ok(()),
            Item::Open(element) => Err(XmlError::malformed(format!(
                "unexpected <{}> after the document",
                element.name
            ))),
            Item::Close(_) => match self.next().await? {
                Item::End => Ok(()),
                _ => Err(XmlError::malformed("content after the document element")),
            },
        }
    }

    /// A document that is exactly one childless `root` element.
    pub async fn single(&mut self, root: &str) -> Result<Element, XmlError> {
        let element = self.root(root).await?;
        match self.next().await? {
            Item::Close(_) => {}
            Item::Open(child) => {
                return Err(XmlError::new(
                    "unknown_element",
                    format!("<{root}> has no child elements; found <{}>", child.name),
                ));
            }
            Item::End => return Err(XmlError::malformed("the document ends early")),
        }
        match self.next().await? {
            Item::End => Ok(element),
            _ => Err(XmlError::malformed("content after the document element")),
        }
    }
}

/// The `BodyReader`'s own failures travel through quick-xml as I/O errors.
fn body_error(error: &quick_xml::Error) -> Option<XmlError> {
    let quick_xml::Error::Io(io) = error else {
        return None;
    };
    io.get_ref()
        .and_then(|inner| inner.downcast_ref::<BodyLimit>())
        .map(|limit| limit.0.clone())
}

#[derive(Debug)]
struct BodyLimit(XmlError);

impl std::fmt::Display for BodyLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for BodyLimit {}

/// What [`StreamBound`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overrun {
    /// More than the limit in all.
    Total(u64),
    /// A run longer than this without a `>`.
    Tag(usize),
}

/// Bounds an XML byte stream as it arrives: at most `limit` bytes in all and no run of
/// `max_tag` bytes without a `>`, so no one tag (or text) can grow a reader's buffer past
/// it. Shared by the API's request bodies and `ctl`'s responses.
#[derive(Debug, Clone)]
pub struct StreamBound {
    limit: u64,
    max_tag: usize,
    read: u64,
    since_gt: usize,
}

impl StreamBound {
    pub const fn new(limit: u64, max_tag: usize) -> Self {
        Self {
            limit,
            max_tag,
            read: 0,
            since_gt: 0,
        }
    }

    /// Accounts for the next `chunk`.
    pub fn check(&mut self, chunk: &[u8]) -> Result<(), Overrun> {
        self.read += chunk.len() as u64;
        if self.read > self.limit {
            return Err(Overrun::Total(self.limit));
        }
        for &byte in chunk {
            self.since_gt = if byte == b'>' { 0 } else { self.since_gt + 1 };
            if self.since_gt > self.max_tag {
                return Err(Overrun::Tag(self.max_tag));
            }
        }
        Ok(())
    }
}

/// An HTTP request body as a byte stream, refusing more than `limit` bytes in all and any
/// run of [`MAX_TAG`] bytes without a `>`.
pub struct BodyReader {
    body: Incoming,
    bound: StreamBound,
    pending: Bytes,
}

impl BodyReader {
    pub const fn new(body: Incoming, limit: u64) -> Self {
        Self {
            body,
            bound: StreamBound::new(limit, MAX_TAG),
            pending: Bytes::new(),
        }
    }

    /// Reads and discards the rest of the body (within the byte limit, for at most 30 s):
    /// after a refusal, so the client, still sending, gets the answer rather than a reset.
    pub async fn drain(mut self) {
        use http_body_util::BodyExt as _;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while let Some(Ok(frame)) = self.body.frame().await {
                if let Some(data) = frame.data_ref()
                    && self.bound.check(data).is_err()
                {
                    break;
                }
            }
        })
        .await;
    }

    fn check(&mut self, chunk: &[u8]) -> io::Result<()> {
        let error = match self.bound.check(chunk) {
            Ok(()) => return Ok(()),
            Err(Overrun::Total(limit)) => XmlError::new(
                "body_too_large",
                format!("the body is larger than {limit} bytes"),
            ),
            Err(Overrun::Tag(max)) => XmlError::new(
                "tag_too_long",
                format!("a tag or text run is longer than {max} bytes"),
            ),
        };
        Err(io::Error::other(BodyLimit(error)))
    }
}

impl AsyncRead for BodyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(out.remaining());
                let chunk = self.pending.split_to(n);
                out.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.body.is_end_stream() {
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(io::Error::other(error))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.check(&data)?;
                        self.pending = data;
                    }
                }
            }
        }
    }
}

/// Reads a whole small body (at most `limit` bytes) for a single-element document.
pub async fn collect_small(body: Incoming, limit: u64) -> Result<Bytes, XmlError> {
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(XmlError::new(
            "body_too_large",
            format!("the body is larger than {limit} bytes"),
        )),
        Err(error) => Err(XmlError::new(
            "bad_request",
            format!("reading the body: {error}"),
        )),
    }
}

/// Builds a response document: `<?xml …?>` and elements with escaped attributes.
pub struct Writer {
    out: String,
    open: Vec<&'static str>,
}

impl Writer {
    /// A document whose root is `root` in [`NS`].
    pub fn document(root: &'static str, attributes: &[(&str, &str)]) -> Self {
        let mut writer = Self {
            out: String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"),
            open: Vec::new(),
        };
        let mut all = vec![("xmlns", NS)];
        all.extend_from_slice(attributes);
        writer.start(root, &all);
        writer
    }

    /// `<name a="…">`; close with [`Self::end`].
    pub fn start(&mut self, name: &'static str, attributes: &[(&str, &str)]) {
        self.tag(name, attributes);
        self.out.push('>');
        self.open.push(name);
    }

    /// `<name a="…"/>`.
    pub fn empty(&mut self, name: &str, attributes: &[(&str, &str)]) {
        self.tag(name, attributes);
        self.out.push_str("/>");
    }

    /// `<name>text</name>`.
    pub fn text(&mut self, name: &str, text: &str) {
        self.out.push('<');
        self.out.push_str(name);
        self.out.push('>');
        self.out.push_str(&quick_xml::escape::escape(text));
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
    }

    pub fn end(&mut self) {
        if let Some(name) = self.open.pop() {
            self.out.push_str("</");
            self.out.push_str(name);
            self.out.push('>');
        }
    }

    fn tag(&mut self, name: &str, attributes: &[(&str, &str)]) {
        self.out.push('<');
        self.out.push_str(name);
        for (key, value) in attributes {
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push_str("=\"");
            self.out.push_str(&quick_xml::escape::escape(*value));
            self.out.push('"');
        }
    }

    /// The finished document (every open element closed).
    pub fn finish(mut self) -> String {
        while !self.open.is_empty() {
            self.end();
        }
        self.out.push('\n');
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse_single(text: &str, root: &str) -> Result<Element, XmlError> {
        Parser::new(text.as_bytes()).single(root).await
    }

    fn doc(body: &str) -> String {
        format!("<?xml version=\"1.0\"?>{body}")
    }

    #[tokio::test]
    async fn single_elements_with_escaped_attributes() {
        let text = doc(&format!(
            "<mailbox xmlns=\"{NS}\" address=\"a&amp;b@example.com\" backend=\"b&#49;\"/>"
        ));
        let element = parse_single(&text, "mailbox").await.expect("valid");
        assert_eq!(element.attr("address"), Some("a&b@example.com"));
        assert_eq!(element.attr("backend"), Some("b1"));
        // Prefixed form of the same namespace.
        let text = format!("<p:mailbox xmlns:p=\"{NS}\" address=\"x@example.com\"></p:mailbox>");
        let element = parse_single(&text, "mailbox").await.expect("prefixed");
        assert_eq!(element.attr("address"), Some("x@example.com"));
    }

    #[tokio::test]
    async fn hostile_documents_are_refused_with_a_code() {
        let cases = [
            (
                "<!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;\">]>\
                 <mailbox xmlns=\"urn:protobalance:api:1\" address=\"&lol2;\"/>",
                "doctype_refused",
            ),
            (
                "<mailbox xmlns=\"urn:protobalance:api:1\" address=\"&xxe;\"/>",
                "entity_refused",
            ),
            ("<mailbox address=\"x@example.com\"/>", "wrong_namespace"),
            (
                "<mailbox xmlns=\"urn:other\" address=\"x@example.com\"/>",
                "wrong_namespace",
            ),
            (
                "<mailbox xmlns=\"urn:protobalance:api:1\">text</mailbox>",
                "unexpected_text",
            ),
            (
                "<mailbox xmlns=\"urn:protobalance:api:1\"><x/></mailbox>",
                "unknown_element",
            ),
            (
                "<mailbox xmlns=\"urn:protobalance:api:1\">",
                "malformed_xml",
            ),
            ("", "empty_body"),
            ("not xml at all", "unexpected_text"),
            (
                "<domain xmlns=\"urn:protobalance:api:1\" name=\"x\"/>",
                "wrong_document",
            ),
            (
                "<mailbox xmlns=\"urn:protobalance:api:1\" a=\"1\"/><mailbox xmlns=\"urn:protobalance:api:1\"/>",
                "malformed_xml",
            ),
        ];
        for (text, code) in cases {
            let error = parse_single(text, "mailbox").await.expect_err(text);
            assert_eq!(error.code, code, "{text}: {error:?}");
        }
        let deep = format!(
            "<mailbox xmlns=\"{NS}\">{}{}</mailbox>",
            "<a>".repeat(10),
            "</a>".repeat(10)
        );
        let mut parser = Parser::new(deep.as_bytes());
        parser.root("mailbox").await.expect("root");
        let error = loop {
            match parser.next().await {
                Err(error) => break error,
                Ok(Item::End) => panic!("nesting accepted"),
                Ok(_) => {}
            }
        };
        assert_eq!(error.code, "too_deep");
        let long = format!(
            "<mailbox xmlns=\"{NS}\" address=\"{}\"/>",
            "a".repeat(MAX_VALUE + 1)
        );
        let error = parse_single(&long, "mailbox").await.expect_err("long");
        assert_eq!(error.code, "value_too_long");
    }

    #[tokio::test]
    async fn unknown_attributes_are_named() {
        let text = format!("<mailbox xmlns=\"{NS}\" address=\"x@example.com\" colour=\"red\"/>");
        let element = parse_single(&text, "mailbox").await.expect("parses");
        let error = element.only(&["address", "backend"]).expect_err("unknown");
        assert_eq!(error.code, "unknown_attribute");
        assert!(error.message.contains("`colour`"), "{}", error.message);
    }

    #[tokio::test]
    async fn streams_children_one_by_one() {
        let text = format!(
            "<import xmlns=\"{NS}\"><mailbox address=\"a@example.com\"/>\n\
             <mailbox address=\"b@example.com\" backend=\"b2\"/></import>"
        );
        let mut parser = Parser::new(text.as_bytes());
        parser.root("import").await.expect("root");
        let mut seen = Vec::new();
        loop {
            match parser.next().await.expect("item") {
                Item::Open(e) => seen.push(e.attr("address").map(str::to_owned)),
                Item::Close(name) => {
                    assert_eq!(name, "import");
                    break;
                }
                Item::End => panic!("no close"),
            }
        }
        assert_eq!(
            seen,
            [Some("a@example.com".into()), Some("b@example.com".into())]
        );
        parser.finish().await.expect("end");
    }

    #[test]
    fn writer_escapes_and_closes() {
        let mut w = Writer::document("error", &[("code", "x\"<&")]);
        w.text("message", "a < b & c");
        let text = w.finish();
        assert!(
            text.contains("<error xmlns=\"urn:protobalance:api:1\" code=\"x&quot;&lt;&amp;\">")
        );
        assert!(text.contains("<message>a &lt; b &amp; c</message></error>"));
    }
}
