//! Reading the API's response documents for `protobalance ctl`: a pull reader over any
//! byte stream (element starts with their attributes, ends, text) and, for the small
//! documents, a tree. The server's request parser (`crate::api::xml::Parser`) refuses text
//! content, which responses have (`<error><message>…`), so answers get this reader;
//! bounds come from the byte stream (`client::BodyStream`) and [`MAX_DEPTH`].

use quick_xml::{
    events::{BytesStart, Event},
    name::ResolveResult,
    reader::NsReader,
};
use tokio::io::{AsyncRead, BufReader};

use super::CtlError;
use crate::api::xml::NS;

/// Deepest nesting an answer has (`stats/metric/sample/label`), with room to spare.
const MAX_DEPTH: usize = 8;

/// An element: attributes, and (in a tree) children and text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attributes: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The attribute, or `-` when absent (for tables).
    pub fn show(&self, name: &str) -> &str {
        self.attr(name).unwrap_or("-")
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }
}

/// What the reader yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An element; `has_children` when its end is a separate [`Item::End`].
    Start {
        element: Element,
        has_children: bool,
    },
    End,
    Text(String),
    Eof,
}

fn bad(detail: impl std::fmt::Display) -> CtlError {
    CtlError::BadResponse(format!(
        "the answer is not a protobalance API document ({detail}); is --url the admin listener?"
    ))
}

/// A pull reader over a response body.
pub struct DocReader<R> {
    reader: NsReader<BufReader<R>>,
    buf: Vec<u8>,
    depth: usize,
}

impl<R: AsyncRead + Unpin> DocReader<R> {
    pub fn new(source: R) -> Self {
        // No `trim_text`: entity references split text into events, and trimming each
        // would eat the spaces around them (`a &lt; b`).
        let reader = NsReader::from_reader(BufReader::with_capacity(16 * 1024, source));
        Self {
            reader,
            buf: Vec::with_capacity(1024),
            depth: 0,
        }
    }

    pub async fn next(&mut self) -> Result<Item, CtlError> {
        loop {
            self.buf.clear();
            let (ns, event) = self
                .reader
                .read_resolved_event_into_async(&mut self.buf)
                .await
                .map_err(|e| match e {
                    // Only the `--xml` echo to stdout writes: `ctl … --xml | head`.
                    quick_xml::Error::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
                        CtlError::Output(std::io::ErrorKind::BrokenPipe.into())
                    }
                    quick_xml::Error::Io(io) => CtlError::Io(format!("reading the answer: {io}")),
                    other => bad(other),
                })?;
            let in_ns = matches!(ns, ResolveResult::Bound(ns) if ns.as_ref() == NS);
            match event {
                Event::Start(start) => {
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        return Err(bad(format!("nested deeper than {MAX_DEPTH}")));
                    }
                    return Ok(Item::Start {
                        element: element(&start, in_ns)?,
                        has_children: true,
                    });
                }
                Event::Empty(start) => {
                    return Ok(Item::Start {
                        element: element(&start, in_ns)?,
                        has_children: false,
                    });
                }
                Event::End(_) => {
                    self.depth = self.depth.saturating_sub(1);
                    return Ok(Item::End);
                }
                Event::Text(text) => return Ok(Item::Text(text.xml10_content().into_owned())),
                Event::CData(text) => return Ok(Item::Text(text.xml10_content().into_owned())),
                Event::GeneralRef(reference) => {
                    let text = match reference.resolve_char_ref().map_err(bad)? {
                        Some(c) => c.to_string(),
                        None => quick_xml::escape::resolve_xml_entity(&reference)
                            .ok_or_else(|| bad(format!("unknown entity &{};", &*reference)))?
                            .to_owned(),
                    };
                    return Ok(Item::Text(text));
                }
                Event::Eof => return Ok(Item::Eof),
                Event::DocType(_) => return Err(bad("it has a DOCTYPE")),
                Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
            }
        }
    }

    /// The whole document as a tree (for answers of bounded size).
    pub async fn tree(mut self) -> Result<Element, CtlError> {
        let mut stack: Vec<Element> = Vec::new();
        loop {
            match self.next().await? {
                Item::Start {
                    element,
                    has_children: true,
                } => stack.push(element),
                Item::Start { element, .. } => match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None => return Ok(element),
                },
                Item::Text(text) => match stack.last_mut() {
                    Some(current) => current.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(bad("text outside any element")),
                },
                Item::End => {
                    let done = stack.pop().ok_or_else(|| bad("an end without a start"))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(done),
                        None => return Ok(done),
                    }
                }
                Item::Eof => return Err(bad("it ends early or is empty")),
            }
        }
    }
}

fn element(start: &BytesStart<'_>, in_ns: bool) -> Result<Element, CtlError> {
    let name = start.local_name().as_ref().to_owned();
    if !in_ns {
        return Err(bad(format!("<{name}> is not in the namespace {NS}")));
    }
    let mut attributes = Vec::new();
    for attribute in start.attributes() {
        let attribute = attribute.map_err(bad)?;
        let key = attribute.key.as_ref();
        if key == "xmlns" || key.starts_with("xmlns:") {
            continue;
        }
        let value = attribute
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(bad)?;
        let key = attribute.key.local_name().as_ref().to_owned();
        attributes.push((key, value.into_owned()));
    }
    Ok(Element {
        name,
        attributes,
        ..Element::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn tree(text: &str) -> Result<Element, CtlError> {
        DocReader::new(text.as_bytes()).tree().await
    }

    #[tokio::test]
    async fn error_documents_give_code_and_unescaped_message() {
        let text = format!(
            "<?xml version=\"1.0\"?>\n<error xmlns=\"{NS}\" code=\"mailbox_exists\" status=\"409\">\
             <message>a&amp;b@x.com already exists on `b&lt;1&gt;` &#x263A;</message></error>\n"
        );
        let error = tree(&text).await.expect("parses");
        assert_eq!(error.name, "error");
        assert_eq!(error.attr("code"), Some("mailbox_exists"));
        let message = error.children_named("message").next().expect("message");
        assert_eq!(message.text, "a&b@x.com already exists on `b<1>` \u{263a}");
    }

    #[tokio::test]
    async fn nested_answers_become_trees() {
        let text = format!(
            "<backends xmlns=\"{NS}\"><backend name=\"b1\" state=\"active\">\
             <service name=\"pop3\" up=\"true\"/><service name=\"lmtp\" up=\"false\"/></backend>\
             <backend name=\"b2\" state=\"down\"/></backends>"
        );
        let doc = tree(&text).await.expect("parses");
        let names: Vec<_> = doc.children.iter().map(|b| b.show("name")).collect();
        assert_eq!(names, ["b1", "b2"]);
        assert_eq!(doc.children[0].children.len(), 2);
        assert_eq!(doc.children[1].show("capacity"), "-");
        let empty = tree(&format!("<domains xmlns=\"{NS}\"/>"))
            .await
            .expect("empty");
        assert!(empty.children.is_empty());
    }

    #[tokio::test]
    async fn foreign_answers_are_refused() {
        for text in [
            "<html><body>hello</body></html>",
            "not found; try /metrics",
            "",
            "<!DOCTYPE x><x/>",
        ] {
            let error = tree(text).await.expect_err(text);
            assert!(matches!(error, CtlError::BadResponse(_)), "{text}: {error}");
        }
        let deep = format!(
            "<stats xmlns=\"{NS}\">{}{}</stats>",
            "<a>".repeat(20),
            "</a>".repeat(20)
        );
        assert!(tree(&deep).await.is_err());
    }
}
