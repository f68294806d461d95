//! Human output of `protobalance ctl`: aligned columns for lists, one line for a change.
//! Everything writes to a `Write` handed in (stdout in use, a `Vec` in tests) and reads
//! the answer's tree ([`Element`]); `--xml` bypasses this module entirely.

use std::io::{self, Write};

use super::doc::Element;

/// Columns whose widths only grow, so pages printed one after another stay aligned.
pub struct Columns {
    headers: Vec<&'static str>,
    /// Right-aligned (numeric) columns.
    right: Vec<bool>,
    widths: Vec<usize>,
}

impl Columns {
    /// `headers`: a leading `>` marks a right-aligned column.
    pub fn new(headers: &[&'static str]) -> Self {
        let right: Vec<bool> = headers.iter().map(|h| h.starts_with('>')).collect();
        let headers: Vec<&'static str> =
            headers.iter().map(|h| h.trim_start_matches('>')).collect();
        let widths = headers.iter().map(|h| h.chars().count()).collect();
        Self {
            headers,
            right,
            widths,
        }
    }

    /// Widens the columns to fit `rows`.
    pub fn fit(&mut self, rows: &[Vec<String>]) {
        for row in rows {
            for (width, cell) in self.widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }

    pub fn header(&self, out: &mut impl Write) -> io::Result<()> {
        let cells: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        self.row(out, &cells)
    }

    pub fn row(&self, out: &mut impl Write, cells: &[String]) -> io::Result<()> {
        let mut line = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            let width = self.widths.get(i).copied().unwrap_or(0);
            if i > 0 {
                line.push_str("  ");
            }
            let pad = width.saturating_sub(cell.chars().count());
            if self.right.get(i).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i < last {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        writeln!(out, "{line}")
    }

    /// Fits, then prints the header and every row.
    pub fn print(mut self, out: &mut impl Write, rows: &[Vec<String>]) -> io::Result<()> {
        self.fit(rows);
        self.header(out)?;
        rows.iter().try_for_each(|r| self.row(out, r))
    }
}

/// Rows of a `<mailboxes>` page: address, backend.
pub fn mailbox_rows(page: &Element) -> Vec<Vec<String>> {
    page.children_named("mailbox")
        .map(|m| vec![m.show("address").to_owned(), m.show("backend").to_owned()])
        .collect()
}

pub fn mailbox(out: &mut impl Write, m: &Element) -> io::Result<()> {
    let rows = [vec![
        m.show("address").to_owned(),
        m.show("backend").to_owned(),
        m.show("backend-state").to_owned(),
    ]];
    Columns::new(&["address", "backend", "backend state"]).print(out, &rows)
}

pub fn domains(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    let rows: Vec<Vec<String>> = doc
        .children_named("domain")
        .map(|d| {
            ["name", "unknown-mailbox", "mailboxes", "managed-by"]
                .iter()
                .map(|a| d.show(a).to_owned())
                .collect()
        })
        .collect();
    Columns::new(&["domain", "unknown mailbox", ">mailboxes", "managed by"]).print(out, &rows)
}

/// `imap,pop3` (up) and `(down: lmtp)`; `-` without health data (no mail listeners).
fn services(backend: &Element) -> String {
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for service in backend.children_named("service") {
        let name = service.show("name");
        if service.attr("up") == Some("true") {
            up.push(name);
        } else {
            down.push(name);
        }
    }
    match (up.is_empty(), down.is_empty()) {
        (true, true) => "-".to_owned(),
        (_, true) => up.join(","),
        (true, false) => format!("none (down: {})", down.join(",")),
        (false, false) => format!("{} (down: {})", up.join(","), down.join(",")),
    }
}

pub fn backends(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    let rows: Vec<Vec<String>> = doc
        .children_named("backend")
        .map(|b| {
            let mut row: Vec<String> = ["name", "state", "capacity", "mailboxes", "load"]
                .iter()
                .map(|a| b.show(a).to_owned())
                .collect();
            row.push(services(b));
            row
        })
        .collect();
    Columns::new(&[
        "backend",
        "state",
        ">capacity",
        ">mailboxes",
        ">load",
        "services up",
    ])
    .print(out, &rows)
}

/// The one-line confirmation of a backend state change.
pub fn backend_state(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    let Some(b) = doc.children_named("backend").next() else {
        return writeln!(out, "done");
    };
    let why = match b.show("state") {
        "active" => "takes new mailboxes".to_owned(),
        "draining" => format!(
            "keeps serving its {} mailboxes, takes no new ones",
            b.show("mailboxes")
        ),
        "down" => format!(
            "its {} mailboxes get temporary failures until it is activated",
            b.show("mailboxes")
        ),
        _ => String::new(),
    };
    writeln!(
        out,
        "backend {}: {} ({why})",
        b.show("name"),
        b.show("state")
    )
}

/// The one-line confirmation of `backend add`.
pub fn backend_added(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    let Some(b) = doc.children_named("backend").next() else {
        return writeln!(out, "done");
    };
    writeln!(
        out,
        "added backend {} at {} (capacity {}): it takes new mailboxes now",
        b.show("name"),
        b.show("address"),
        b.show("capacity")
    )
}

/// The one-line confirmation of `backend set --capacity`.
pub fn backend_capacity(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    let Some(b) = doc.children_named("backend").next() else {
        return writeln!(out, "done");
    };
    writeln!(
        out,
        "backend {}: capacity {} ({} mailboxes, load {})",
        b.show("name"),
        b.show("capacity"),
        b.show("mailboxes"),
        b.show("load")
    )
}

/// A length of time for people: its two largest units (`2d 3h`, `1h 0m`, `45s`).
pub fn span(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A number of seconds as attribute text, spelled as a [`span`].
fn span_of(text: &str) -> String {
    text.parse().map_or_else(|_| text.to_owned(), span)
}

/// `expires-at` (Unix seconds) relative to `now`: `in 1h 0m`, `never` when absent.
fn expiry(element: &Element, now: i64) -> String {
    match element.attr("expires-at").map(str::parse::<i64>) {
        None => "never".to_owned(),
        Some(Ok(at)) if at > now => format!("in {}", span(at.abs_diff(now))),
        Some(Ok(_)) => "expired".to_owned(),
        Some(Err(_)) => element.show("expires-at").to_owned(),
    }
}

pub fn bans(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    let rows: Vec<Vec<String>> = doc
        .children_named("ban")
        .map(|b| {
            vec![
                b.show("target").to_owned(),
                b.show("mode").to_owned(),
                b.show("reason").to_owned(),
                span_of(b.show("remaining-seconds")),
            ]
        })
        .collect();
    Columns::new(&["target", "mode", ">reason", ">remaining"]).print(out, &rows)
}

/// `mailbox moves`: the recorded moves and when each lease ends.
pub fn recorded_moves(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let rows: Vec<Vec<String>> = doc
        .children_named("recorded-move")
        .map(|m| {
            let lease = match m.show("lease-ends-ms").parse::<u128>() {
                Ok(ends) if ends > now => format!("in {}", span(((ends - now) / 1000) as u64)),
                Ok(_) => "ended".to_owned(),
                Err(_) => m.show("lease-ends-ms").to_owned(),
            };
            vec![
                m.show("mailbox").to_owned(),
                m.show("from").to_owned(),
                m.show("to").to_owned(),
                m.show("state").to_owned(),
                lease,
            ]
        })
        .collect();
    Columns::new(&["mailbox", "from", "to", "state", ">lease ends"]).print(out, &rows)
}

pub fn suspensions(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    let rows: Vec<Vec<String>> = doc
        .children_named("suspension")
        .map(|s| {
            vec![
                s.show("account").to_owned(),
                s.show("reason").to_owned(),
                format!("{} ago", span_of(s.show("seconds-ago"))),
                span_of(s.show("remaining-seconds")),
            ]
        })
        .collect();
    Columns::new(&["account", "reason", "since", ">remaining"]).print(out, &rows)
}

/// `explain`: the verdict line, the event counts, the latest events, the kernel bans.
pub fn reputation(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    if doc.show("enabled") == "false" {
        writeln!(
            out,
            "the reputation engine is disabled (reputation.enabled = false)"
        )?;
    }
    let subject = doc.attr("subject").unwrap_or(doc.show("address"));
    if doc.show("tracked") == "true" {
        write!(
            out,
            "{subject}: score {}, verdict {}",
            doc.show("score"),
            doc.show("verdict")
        )?;
        if doc.show("allowlisted") == "true" {
            write!(out, " (allowlisted: never refused)")?;
        }
        if let Some(left) = doc.attr("banned-seconds") {
            write!(out, ", banned for {}", span_of(left))?;
        }
        writeln!(out, "; {} ban(s) so far", doc.show("bans"))?;
    } else {
        writeln!(out, "{subject}: nothing held against it (not tracked)")?;
    }
    let counts: Vec<Vec<String>> = doc
        .children_named("event")
        .map(|e| vec![e.show("name").to_owned(), e.show("count").to_owned()])
        .collect();
    if !counts.is_empty() {
        Columns::new(&["event", ">count"]).print(out, &counts)?;
    }
    let recent: Vec<String> = doc
        .children_named("recent")
        .map(|e| {
            format!(
                "{} ({} ago)",
                e.show("event"),
                span_of(e.show("seconds-ago"))
            )
        })
        .collect();
    if !recent.is_empty() {
        writeln!(out, "latest: {}", recent.join(", "))?;
    }
    for verdict in doc.children_named("kernel-verdict") {
        writeln!(out, "kernel: {}", verdict.show("explanation"))?;
    }
    for ban in doc.children_named("kernel-ban") {
        writeln!(
            out,
            "kernel: ban of {} ({}, reason {}), {} left",
            ban.show("target"),
            ban.show("mode"),
            ban.show("reason"),
            span_of(ban.show("remaining-seconds"))
        )?;
    }
    if doc.children_named("kernel-ban").next().is_none() {
        writeln!(out, "kernel: no ban")?;
    }
    Ok(())
}

/// The one-line confirmation of `ban add`.
/// A finished mailbox move.
pub fn moved(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    writeln!(
        out,
        "moved {} from {} to {}: {} folders, {} messages copied before the switch and {} after, \
         {} deleted from {}, {} deletions and {} flag changes made during the copy carried over \
         ({} ms)",
        doc.show("mailbox"),
        doc.show("from"),
        doc.show("to"),
        doc.show("folders"),
        doc.show("copied-before-switch"),
        doc.show("copied-after-switch"),
        doc.show("deleted-from-old"),
        doc.show("from"),
        doc.show("expunged-on-new"),
        doc.show("flags-synced"),
        // The move's own document says milliseconds, its finished job elapsed-ms.
        doc.attr("milliseconds")
            .or_else(|| doc.attr("elapsed-ms"))
            .unwrap_or("?"),
    )
}

pub fn ban_placed(out: &mut impl Write, ban: &Element) -> io::Result<()> {
    let what = match ban.show("mode") {
        "new-connections" => "new connections",
        _ => "all traffic",
    };
    writeln!(
        out,
        "banned {} ({what}) for {}",
        ban.show("target"),
        span_of(ban.show("remaining-seconds"))
    )
}

pub fn blocklists(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    let rows: Vec<Vec<String>> = doc
        .children_named("list")
        .map(|l| {
            ["name", "managed-by", "entries"]
                .iter()
                .map(|a| l.show(a).to_owned())
                .collect()
        })
        .collect();
    Columns::new(&["list", "managed by", ">entries"]).print(out, &rows)
}

/// The entries of one `<list>`: CIDR, reason, expiry (relative to `now`, Unix seconds).
pub fn block_entries(out: &mut impl Write, list: &Element, now: i64) -> io::Result<()> {
    let rows: Vec<Vec<String>> = list
        .children_named("entry")
        .map(|e| {
            vec![
                e.show("cidr").to_owned(),
                expiry(e, now),
                e.show("reason").to_owned(),
            ]
        })
        .collect();
    Columns::new(&["cidr", "expires", "reason"]).print(out, &rows)
}

/// The one-line confirmation of `block add`.
pub fn block_added(out: &mut impl Write, list: &Element, now: i64) -> io::Result<()> {
    let Some(entry) = list.children_named("entry").next() else {
        return writeln!(out, "done");
    };
    let expires = match expiry(entry, now).as_str() {
        "never" => "no expiry".to_owned(),
        other => format!("expires {other}"),
    };
    writeln!(
        out,
        "added {} to blocklist {} ({expires})",
        entry.show("cidr"),
        list.show("name")
    )
}

/// `<stats>`: the directory's total, then one row per metric sample.
pub fn stats(out: &mut impl Write, doc: &Element) -> io::Result<()> {
    if let Some(directory) = doc.children_named("directory").next() {
        writeln!(out, "directory: {} mailboxes", directory.show("mailboxes"))?;
    }
    let mut rows = Vec::new();
    for metric in doc.children_named("metric") {
        for sample in metric.children_named("sample") {
            let labels: Vec<String> = sample
                .children_named("label")
                .map(|l| format!("{}={}", l.show("name"), l.show("value")))
                .collect();
            rows.push(vec![
                metric.show("name").to_owned(),
                labels.join(" "),
                sample.show("value").to_owned(),
            ]);
        }
    }
    Columns::new(&["metric", "labels", ">value"]).print(out, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::doc::DocReader;

    async fn doc(text: &str) -> Element {
        let text = text.replace("NS", crate::api::xml::NS);
        DocReader::new(text.as_bytes()).tree().await.expect("doc")
    }

    fn text(f: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> String {
        let mut out = Vec::new();
        f(&mut out).expect("write");
        String::from_utf8(out).expect("utf-8")
    }

    #[tokio::test]
    async fn backends_align_with_numbers_right_and_health_summarised() {
        let d = doc("<backends xmlns=\"NS\">\
            <backend name=\"backend1\" state=\"active\" capacity=\"100\" mailboxes=\"7\" load=\"0.070\">\
            <service name=\"pop3\" up=\"true\"/><service name=\"lmtp\" up=\"false\"/></backend>\
            <backend name=\"b2\" state=\"draining\" capacity=\"5\" mailboxes=\"1000\" load=\"200.000\"/>\
            </backends>")
        .await;
        let out = text(|o| backends(o, &d));
        assert_eq!(
            out,
            "backend   state     capacity  mailboxes     load  services up\n\
             backend1  active         100          7    0.070  pop3 (down: lmtp)\n\
             b2        draining         5       1000  200.000  -\n"
        );
    }

    #[tokio::test]
    async fn stats_rows_name_metric_labels_and_value() {
        let d = doc("<stats xmlns=\"NS\"><directory mailboxes=\"306\"/>\
            <metric name=\"protobalance_backend_up\" type=\"gauge\"><sample value=\"1\">\
            <label name=\"backend\" value=\"b1\"/><label name=\"service\" value=\"pop3\"/></sample>\
            </metric><metric name=\"protobalance_x_total\" type=\"counter\"><sample value=\"12\"/></metric></stats>")
        .await;
        let out = text(|o| stats(o, &d));
        assert_eq!(
            out,
            "directory: 306 mailboxes\n\
             metric                   labels                   value\n\
             protobalance_backend_up  backend=b1 service=pop3      1\n\
             protobalance_x_total                                 12\n"
        );
    }

    #[test]
    fn spans_show_their_two_largest_units() {
        let cases = [
            (0, "0s"),
            (45, "45s"),
            (61, "1m 1s"),
            (3600, "1h 0m"),
            (86_399, "23h 59m"),
            (90_061, "1d 1h"),
            (31_536_000, "365d 0h"),
        ];
        for (seconds, text) in cases {
            assert_eq!(span(seconds), text, "{seconds}");
        }
    }

    #[tokio::test]
    async fn bans_and_blocklists_are_tables_with_times_for_people() {
        let d = doc(
            "<bans xmlns=\"NS\"><ban target=\"2001:db8:1:2::/64\" mode=\"all\" \
            reason=\"0\" remaining-seconds=\"3600\"/><ban target=\"198.51.100.7\" \
            mode=\"new-connections\" reason=\"12\" remaining-seconds=\"59\"/></bans>",
        )
        .await;
        assert_eq!(
            text(|o| bans(o, &d)),
            "target             mode             reason  remaining\n\
             2001:db8:1:2::/64  all                   0      1h 0m\n\
             198.51.100.7       new-connections      12        59s\n"
        );
        let d = doc("<list xmlns=\"NS\" name=\"abuse\" managed-by=\"api\">\
            <entry cidr=\"198.51.100.0/24\" reason=\"spam run\" expires-at=\"1000120\"/>\
            <entry cidr=\"203.0.113.0/24\"/><entry cidr=\"192.0.2.0/24\" expires-at=\"5\"/></list>")
        .await;
        assert_eq!(
            text(|o| block_entries(o, &d, 1_000_000)),
            "cidr             expires   reason\n\
             198.51.100.0/24  in 2m 0s  spam run\n\
             203.0.113.0/24   never     -\n\
             192.0.2.0/24     expired   -\n"
        );
        assert_eq!(
            text(|o| block_added(o, &d, 1_000_000)),
            "added 198.51.100.0/24 to blocklist abuse (expires in 2m 0s)\n"
        );
    }

    #[test]
    fn columns_only_grow_across_pages() {
        let mut columns = Columns::new(&["address", "backend"]);
        let first = vec![vec!["a@x.com".to_owned(), "b1".to_owned()]];
        columns.fit(&first);
        let out = text(|o| {
            columns.header(o)?;
            columns.row(o, &first[0])
        });
        assert_eq!(out, "address  backend\na@x.com  b1\n");
        columns.fit(&[vec!["longer@x.com".to_owned(), "b2".to_owned()]]);
        columns.fit(&[vec!["c@x.com".to_owned(), "b3".to_owned()]]);
        let out = text(|o| columns.row(o, &["c@x.com".to_owned(), "b3".to_owned()]));
        assert_eq!(out, "c@x.com       b3\n");
    }
}
