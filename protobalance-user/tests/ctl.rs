//! `protobalance ctl` as an operator or a script runs it: the real binary against a running
//! protobalance in front of three real Dovecot backends. Each command's human and `--xml`
//! output (every XML answer validated against docs/api.xsd with xmllint), the documented
//! exit codes (1 connection/usage, 2 not found, 3 conflict, 4 auth, 5 invalid, 7 import
//! incomplete), `mailbox ls --all` across pages, and a file import of a few thousand lines
//! with bad ones, streamed: the server writes its first batch while the file (a FIFO) is
//! still open.

mod support;

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use protobalance_tests::{BackendOptions, DovecotCluster, free_port, loopback_ip};
use support::{BIN, Edge, Listen, USERS, owner, start_edge};

const WRITE_TOKEN: &str = "crm-0123456789abcdef0123456789abcdef";
const READ_TOKEN: &str = "mon-0123456789abcdef0123456789abcdef";

fn skip() -> bool {
    support::skip_api("ctl")
}

/// What one `protobalance ctl` run did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts the exit code; returns stdout.
    fn expect(self, code: i32) -> String {
        assert_eq!(
            self.code, code,
            "exit code; stderr: {}\nstdout: {}",
            self.stderr, self.stdout
        );
        self.stdout
    }

    /// Asserts a failure's exit code and its `protobalance ctl: <code>:` line; returns it.
    fn expect_error(self, code: i32, error: &str) -> String {
        assert_eq!(self.code, code, "exit code; stderr: {}", self.stderr);
        let prefix = format!("protobalance ctl: {error}: ");
        assert!(self.stderr.contains(&prefix), "{prefix} in {}", self.stderr);
        self.stderr
    }
}

/// `protobalance ctl ARGS` with the environment scripts use (URL and token).
fn ctl_command(url: &str, token: Option<&str>, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("ctl")
        .args(args)
        .env("PROTOBALANCE_URL", url)
        .env_remove("PROTOBALANCE_TOKEN")
        .stdin(Stdio::null());
    if let Some(token) = token {
        command.env("PROTOBALANCE_TOKEN", token);
    }
    command
}

fn run_with(url: &str, token: Option<&str>, args: &[&str]) -> Run {
    Run::from(ctl_command(url, token, args).output().expect("run ctl"))
}

fn url(edge: &Edge) -> String {
    format!("http://{}", edge.admin)
}

/// With the read-write token.
fn ctl(edge: &Edge, args: &[&str]) -> Run {
    run_with(&url(edge), Some(WRITE_TOKEN), args)
}

fn validate(text: &str) {
    support::validate_api_xml(text);
}

/// The whitespace-separated cells of the table row that starts with `first`.
fn row(table: &str, first: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cells| cells.first().is_some_and(|c| c == first))
        .unwrap_or_else(|| panic!("no row {first} in\n{table}"))
}

fn cluster() -> DovecotCluster {
    let ips: Vec<_> = (1..=3).map(|n| loopback_ip(n).expect("ip")).collect();
    DovecotCluster::start_with(&ips, &BackendOptions::default()).expect("cluster")
}

/// protobalance with a read-write token inline and a read-only one in a file (returned).
fn start(cluster: &DovecotCluster) -> (Edge, tempfile::TempDir, PathBuf) {
    let tokens = tempfile::tempdir().expect("tempdir");
    let file = tokens.path().join("monitor.token");
    std::fs::write(&file, format!("{READ_TOKEN}\n")).expect("token file");
    let extra = format!(
        "[api]\n\
         [[api.token]]\nname = \"crm\"\ntoken = \"{WRITE_TOKEN}\"\naccess = \"read-write\"\n\
         [[api.token]]\nname = \"monitor\"\ntoken_file = \"{}\"\naccess = \"read-only\"\n",
        file.display()
    );
    let edge = start_edge(cluster, &[Listen("pop3", None)], &extra);
    (edge, tokens, file)
}

#[test]
fn without_a_server_or_a_token_ctl_says_what_to_fix() {
    let lo = IpAddr::from([127, 0, 0, 1]);
    let nobody = format!("http://127.0.0.1:{}", free_port(lo).expect("port"));
    let refused = run_with(&nobody, Some(WRITE_TOKEN), &["mailbox", "ls"]);
    let stderr = refused.expect_error(1, "connection_failed");
    assert!(
        stderr.contains(&format!(
            "cannot connect to {nobody}: connection refused; is protobalance running, and is --url right?"
        )),
        "{stderr}"
    );
    // No token anywhere: exit 4 before any connection, naming both ways to give one.
    let stderr = run_with(&nobody, None, &["stats"]).expect_error(4, "no_token");
    assert!(
        stderr.contains("set PROTOBALANCE_TOKEN or pass --token-file FILE"),
        "{stderr}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.token");
    std::fs::write(&empty, "\n").expect("write");
    let empty = empty.to_str().expect("utf-8");
    run_with(&nobody, None, &["stats", "--token-file", empty]).expect_error(4, "no_token");
    let missing = dir.path().join("missing.token");
    let stderr = run_with(
        &nobody,
        None,
        &["stats", "--token-file", missing.to_str().expect("utf-8")],
    )
    .expect_error(1, "io");
    assert!(stderr.contains("reading --token-file"), "{stderr}");
    // Usage errors exit 1 (clap's own 2 would read as "not found").
    for args in [
        &["mailbox", "add"][..],
        &["mailbox", "ls", "--limit", "0"],
        &[
            "domain",
            "set",
            "example.com",
            "--unknown-mailbox",
            "accept",
        ],
        &["--token", WRITE_TOKEN, "stats"],
        &["frobnicate"],
    ] {
        let run = run_with(&nobody, Some(WRITE_TOKEN), args);
        assert_eq!(run.code, 1, "{args:?}: {}", run.stderr);
    }
    let https = run_with(
        "https://127.0.0.1:9925",
        Some(WRITE_TOKEN),
        &["backend", "ls"],
    );
    assert!(https.expect_error(1, "usage").contains("plain http"));
    // Help documents the exit codes.
    let help = run_with(&nobody, None, &["--help"]).expect(0);
    assert!(
        help.contains("3  conflict") && help.contains("PROTOBALANCE_TOKEN"),
        "{help}"
    );
}

#[test]
fn mailboxes_are_added_shown_listed_and_removed() {
    if skip() {
        return;
    }
    let cluster = cluster();
    let (edge, _tokens, read_only) = start(&cluster);
    let read_only = read_only.to_str().expect("utf-8");

    let out = ctl(
        &edge,
        &[
            "mailbox",
            "add",
            "User305@Example.COM",
            "--backend",
            "backend2",
        ],
    )
    .expect(0);
    assert_eq!(out, "added user305@example.com on backend2\n");
    let xml = ctl(&edge, &["mailbox", "add", "user306@example.com", "--xml"]).expect(0);
    validate(&xml);
    assert!(xml.contains("address=\"user306@example.com\""), "{xml}");
    // Characters that need XML escaping and %-encoding travel both ways.
    let odd = "o'brien&co+news@example.com";
    let out = ctl(&edge, &["mailbox", "add", odd]).expect(0);
    assert!(
        out.starts_with("added o'brien&co@example.com on backend"),
        "{out}"
    );
    let shown = ctl(&edge, &["mailbox", "show", odd]).expect(0);
    assert_eq!(row(&shown, "o'brien&co@example.com")[2], "active");

    let shown = ctl(&edge, &["mailbox", "show", "user305@example.com"]).expect(0);
    assert_eq!(
        shown
            .lines()
            .next()
            .map(str::split_whitespace)
            .map(Iterator::collect::<Vec<_>>),
        Some(vec!["address", "backend", "backend", "state"])
    );
    assert_eq!(
        row(&shown, "user305@example.com"),
        ["user305@example.com", "backend2", "active"]
    );
    // The read-only token (from a file) reads.
    let xml = run_with(
        &url(&edge),
        None,
        &[
            "mailbox",
            "show",
            "user305@example.com",
            "--xml",
            "--token-file",
            read_only,
        ],
    )
    .expect(0);
    validate(&xml);
    assert!(xml.contains("backend-state=\"active\""), "{xml}");

    // Exit codes: 3 conflict, 2 not found, 5 invalid, 4 auth.
    let stderr =
        ctl(&edge, &["mailbox", "add", "user305@example.com"]).expect_error(3, "mailbox_exists");
    assert!(
        stderr.contains("already exists on backend `backend2`"),
        "{stderr}"
    );
    ctl(&edge, &["mailbox", "show", "user399@example.com"]).expect_error(2, "not_found");
    ctl(&edge, &["mailbox", "add", "x@elsewhere.test"]).expect_error(5, "foreign_domain");
    ctl(
        &edge,
        &["mailbox", "add", "user307@example.com", "--backend", "nope"],
    )
    .expect_error(5, "unknown_backend");
    ctl(&edge, &["mailbox", "ls", "--domain", "not a domain"]).expect_error(5, "bad_parameter");
    let xml_error = ctl(&edge, &["mailbox", "show", "user399@example.com", "--xml"]);
    assert_eq!(xml_error.code, 2);
    validate(&xml_error.stdout);
    let stderr = run_with(
        &url(&edge),
        None,
        &[
            "mailbox",
            "add",
            "user307@example.com",
            "--token-file",
            read_only,
        ],
    )
    .expect_error(4, "read_only_token");
    assert!(stderr.contains("read-write token"), "{stderr}");
    let stderr = run_with(&url(&edge), Some(&"x".repeat(40)), &["mailbox", "ls"])
        .expect_error(4, "unauthorized");
    assert!(
        stderr.contains("PROTOBALANCE_TOKEN or --token-file"),
        "{stderr}"
    );

    // One page, with a hint that more follow.
    let page = ctl(&edge, &["mailbox", "ls", "--limit", "5"]);
    assert!(page.stderr.contains("--all"), "{}", page.stderr);
    assert_eq!(page.expect(0).lines().count(), 1 + 5);
    // Every page: each mailbox once, in order, aligned.
    let all = ctl(&edge, &["mailbox", "ls", "--all", "--limit", "70"]).expect(0);
    let addresses: Vec<&str> = all
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(addresses.len(), USERS + 3);
    let mut sorted = addresses.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, addresses, "in order, no duplicates");
    let column = all
        .lines()
        .next()
        .and_then(|h| h.find("backend"))
        .expect("header");
    assert!(
        all.lines()
            .all(|l| l.get(column..).is_some_and(|c| c.starts_with("backend"))),
        "backend column aligned across pages"
    );
    let pages = ctl(&edge, &["mailbox", "ls", "--all", "--limit", "70", "--xml"]).expect(0);
    let documents: Vec<&str> = pages
        .split("<?xml")
        .filter(|d| !d.trim().is_empty())
        .collect();
    assert_eq!(
        documents.len(),
        (USERS + 3).div_ceil(70),
        "one document per page"
    );
    for document in documents {
        validate(&format!("<?xml{document}"));
    }
    let on2 = ctl(&edge, &["mailbox", "ls", "--all", "--backend", "backend2"]).expect(0);
    let rows: Vec<&str> = on2.lines().skip(1).collect();
    assert!(rows.len() > USERS / 3, "backend2's 100 and user305: {on2}");
    assert!(rows.iter().all(|r| r.ends_with("  backend2")), "{on2}");

    // Remove: gone from the directory; removing again is "not found".
    let out = ctl(&edge, &["mailbox", "rm", "user305@example.com"]).expect(0);
    assert!(out.starts_with("removed user305@example.com"), "{out}");
    ctl(&edge, &["mailbox", "show", "user305@example.com"]).expect_error(2, "not_found");
    ctl(&edge, &["mailbox", "rm", "user305@example.com"]).expect_error(2, "not_found");
    assert_eq!(ctl(&edge, &["mailbox", "rm", odd, "--xml"]).expect(0), "");
}

#[test]
fn domains_backends_and_stats_are_managed_live() {
    if skip() {
        return;
    }
    let cluster = cluster();
    let (edge, _tokens, _) = start(&cluster);

    let out = ctl(&edge, &["domain", "add", "Example.ORG"]).expect(0);
    assert_eq!(
        out,
        "added domain example.org (unknown mailboxes: reject)\n"
    );
    ctl(&edge, &["domain", "add", "example.org"]).expect_error(3, "domain_exists");
    let xml = ctl(
        &edge,
        &[
            "domain",
            "add",
            "example.net",
            "--unknown-mailbox",
            "auto-provision",
            "--xml",
        ],
    )
    .expect(0);
    validate(&xml);
    let list = ctl(&edge, &["domain", "ls"]).expect(0);
    assert_eq!(
        row(&list, "example.com"),
        ["example.com", "reject", "300", "config"]
    );
    assert_eq!(
        row(&list, "example.net"),
        ["example.net", "auto-provision", "0", "api"]
    );
    validate(&ctl(&edge, &["domain", "ls", "--xml"]).expect(0));
    let out = ctl(
        &edge,
        &[
            "domain",
            "set",
            "example.org",
            "--unknown-mailbox",
            "auto-provision",
        ],
    )
    .expect(0);
    assert_eq!(
        out,
        "domain example.org: unknown mailboxes auto-provision\n"
    );
    ctl(
        &edge,
        &[
            "domain",
            "set",
            "example.com",
            "--unknown-mailbox",
            "auto-provision",
        ],
    )
    .expect_error(3, "managed_by_config");
    ctl(&edge, &["mailbox", "add", "a@example.org"]).expect(0);
    ctl(&edge, &["domain", "rm", "example.org"]).expect_error(3, "domain_in_use");
    ctl(&edge, &["mailbox", "rm", "a@example.org"]).expect(0);
    assert_eq!(
        ctl(&edge, &["domain", "rm", "example.org"]).expect(0),
        "removed domain example.org\n"
    );
    ctl(&edge, &["domain", "rm", "example.org"]).expect_error(2, "not_found");

    // Backends: a table with health; drain keeps new mailboxes off, activate undoes it.
    let list = ctl(&edge, &["backend", "ls"]).expect(0);
    let header: Vec<&str> = list
        .lines()
        .next()
        .expect("header")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "backend",
            "state",
            "capacity",
            "mailboxes",
            "load",
            "services",
            "up"
        ]
    );
    let backend3 = row(&list, "backend3");
    assert_eq!(backend3[..5], ["backend3", "active", "100", "100", "1.000"]);
    assert!(
        backend3[5].contains("pop3") && !list.contains("down:"),
        "{list}"
    );
    validate(&ctl(&edge, &["backend", "ls", "--xml"]).expect(0));
    let out = ctl(&edge, &["backend", "drain", "backend3"]).expect(0);
    assert_eq!(
        out,
        "backend backend3: draining (keeps serving its 100 mailboxes, takes no new ones)\n"
    );
    for n in 301..=304 {
        let out = ctl(&edge, &["mailbox", "add", &format!("user{n}@example.com")]).expect(0);
        assert!(!out.contains("backend3"), "a draining backend got {out}");
    }
    ctl(
        &edge,
        &[
            "mailbox",
            "add",
            "user305@example.com",
            "--backend",
            "backend3",
        ],
    )
    .expect_error(3, "backend_not_active");
    let xml = ctl(&edge, &["backend", "down", "backend3", "--xml"]).expect(0);
    validate(&xml);
    assert!(xml.contains("state=\"down\""), "{xml}");
    let out = ctl(&edge, &["backend", "activate", "backend3"]).expect(0);
    assert_eq!(out, "backend backend3: active (takes new mailboxes)\n");
    ctl(&edge, &["backend", "drain", "nope"]).expect_error(2, "not_found");
    ctl(&edge, &["backend", "rm", "backend3"]).expect_error(3, "managed_by_config");

    // Stats: the directory's total and the metrics, as a table or as the server's XML.
    let stats = ctl(&edge, &["stats"]).expect(0);
    assert_eq!(
        stats.lines().next(),
        Some("directory: 304 mailboxes"),
        "{stats}"
    );
    let up = row(&stats, "protobalance_backend_up");
    assert_eq!(up.last().map(String::as_str), Some("1"), "{stats}");
    let xml = ctl(&edge, &["stats", "--xml"]).expect(0);
    validate(&xml);
    assert!(xml.contains("<directory mailboxes=\"304\"/>"), "{xml}");

    // A backend added live (127.0.1.250 has no server: it need not have one) is listed at
    // once, takes a new capacity, and goes again; the config file's are left alone.
    let add = [
        "backend",
        "add",
        "backend9",
        "--address",
        "127.0.1.250",
        "--capacity",
        "5",
        "--pop3-port",
        "1110",
    ];
    assert_eq!(
        ctl(&edge, &add).expect(0),
        "added backend backend9 at 127.0.1.250 (capacity 5): it takes new mailboxes now\n"
    );
    ctl(&edge, &add).expect_error(3, "backend_exists");
    ctl(
        &edge,
        &["backend", "add", "backend1", "--address", "127.0.1.251"],
    )
    .expect_error(3, "backend_exists");
    let stderr = ctl(
        &edge,
        &["backend", "add", "backend8", "--address", "not-an-ip"],
    )
    .expect_error(5, "invalid_backend");
    assert!(stderr.contains("address"), "{stderr}");
    let list = ctl(&edge, &["backend", "ls"]).expect(0);
    assert_eq!(
        row(&list, "backend9")[..5],
        ["backend9", "active", "5", "0", "0.000"],
        "{list}"
    );
    assert!(!list.contains("backend8"), "{list}");
    let out = ctl(&edge, &["backend", "set", "backend9", "--capacity", "50"]).expect(0);
    assert_eq!(
        out,
        "backend backend9: capacity 50 (0 mailboxes, load 0.000)\n"
    );
    let xml = ctl(
        &edge,
        &["backend", "set", "backend9", "--capacity", "60", "--xml"],
    )
    .expect(0);
    validate(&xml);
    assert!(xml.contains("capacity=\"60\""), "{xml}");
    let list = ctl(&edge, &["backend", "ls"]).expect(0);
    assert_eq!(row(&list, "backend9")[2], "60", "{list}");
    ctl(&edge, &["backend", "set", "backend3", "--capacity", "5"])
        .expect_error(3, "managed_by_config");
    ctl(&edge, &["backend", "set", "nope", "--capacity", "5"]).expect_error(2, "not_found");
    assert_eq!(
        ctl(&edge, &["backend", "rm", "backend9"]).expect(0),
        "removed backend backend9\n"
    );

    // Bans and blocklists live in the kernel filter, which this edge has not loaded (no
    // xdp.interface): every command says so with exit 3, a streamed replace included.
    for args in [
        &["ban", "ls"][..],
        &["ban", "add", "198.51.100.7", "--ttl", "60"],
        &["ban", "rm", "2001:db8:1:2::/64"],
        &["block", "ls"],
        &["block", "ls", "abuse"],
        &[
            "block",
            "add",
            "abuse",
            "198.51.100.0/24",
            "--reason",
            "spam",
        ],
        &["block", "rm", "abuse", "198.51.100.0/24"],
    ] {
        let stderr = ctl(&edge, args).expect_error(3, "filter_not_loaded");
        assert!(stderr.contains("xdp.interface"), "{args:?}: {stderr}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("abuse.txt");
    std::fs::write(&file, "# abuse\n198.51.100.0/24\n2001:db8::/32\n").expect("list file");
    let file = file.to_str().expect("utf-8 path");
    ctl(&edge, &["block", "replace", "abuse", file]).expect_error(3, "filter_not_loaded");
    let xml = ctl(&edge, &["ban", "ls", "--xml"]);
    assert_eq!(xml.code, 3, "{xml:?}");
    validate(&xml.stdout);
    assert!(xml.stdout.contains("code=\"filter_not_loaded\""), "{xml:?}");
}

/// The import file: comments and blanks, `new` new mailboxes (every 7th pinned to
/// backend3), ten that exist, and one line of each kind that fails.
fn import_file(dir: &Path, edge: &Edge, new: std::ops::RangeInclusive<usize>) -> (PathBuf, usize) {
    let mut text = String::from("# provisioning batch\n\n");
    let mut added = 0;
    for n in new {
        if n % 7 == 0 {
            text.push_str(&format!("user{n}@example.com,backend3\n"));
        } else {
            text.push_str(&format!("  User{n}@Example.com  \n"));
        }
        added += 1;
    }
    for n in 1..=10 {
        text.push_str(&format!("user{n}@example.com\n"));
    }
    let other = if owner(edge, "user11@example.com") == "backend1" {
        "backend2"
    } else {
        "backend1"
    };
    text.push_str(&format!("user11@example.com,{other}\n")); // conflict
    text.push_str("x@elsewhere.test\n"); // foreign_domain
    text.push_str("not an address\n"); // invalid
    text.push_str("user9999@example.com,nope\n"); // unknown_backend
    text.push_str("# a#b@example.com below is an address, not a comment\na#b@example.com\n");
    added += 1;
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(b"j\xf6rg@example.com\n"); // skipped here: not UTF-8
    bytes.extend_from_slice(b"ctl\x01char@example.com\n"); // skipped here: control character
    let path = dir.join("mailboxes.csv");
    std::fs::write(&path, bytes).expect("import file");
    (path, added)
}

#[test]
fn a_file_import_streams_and_reports_every_failure() {
    if skip() {
        return;
    }
    let cluster = cluster();
    let (edge, tokens, _) = start(&cluster);
    let (file, added) = import_file(tokens.path(), &edge, 1001..=3900);
    let file = file.to_str().expect("utf-8");

    let run = ctl(
        &edge,
        &[
            "mailbox",
            "import",
            file,
            "--progress",
            "--progress-every",
            "1000",
        ],
    );
    assert!(
        run.stderr.contains("  1000 lines sent") && run.stderr.contains("  2000 lines sent"),
        "{}",
        run.stderr
    );
    let stderr = run.stderr.clone();
    assert_eq!(run.code, 7, "{stderr}\n{}", run.stdout);
    assert!(
        stderr.contains("protobalance ctl: import_incomplete: 6 mailboxes were not imported"),
        "{stderr}"
    );
    let out = run.stdout;
    let summary = out.lines().next().expect("summary");
    assert!(
        summary.contains(&format!(
            "{added} added, 10 already there, 6 failed (4 refused by the server, 2 skipped here)"
        )),
        "{out}"
    );
    for expected in [
        "line 2919: skipped: not UTF-8",
        "line 2920: skipped: holds control characters",
        "user11@example.com  conflict: exists on another backend",
        "x@elsewhere.test  foreign_domain",
        "not an address  invalid",
        "user9999@example.com  unknown_backend: no backend `nope`",
    ] {
        assert!(out.contains(expected), "{expected} in\n{out}");
    }
    assert!(
        !out.contains("  added") && !out.contains("user1@example.com"),
        "{out}"
    );
    // They are in the directory, pinned where the file said.
    assert_eq!(
        row(
            &ctl(&edge, &["mailbox", "show", "user1001@example.com"]).expect(0),
            "user1001@example.com"
        )[2],
        "active"
    );
    assert_eq!(owner(&edge, "user1008@example.com"), "backend3");
    ctl(&edge, &["mailbox", "show", "a#b@example.com"]).expect(0);
    let stats = ctl(&edge, &["stats"]).expect(0);
    assert!(
        stats.starts_with(&format!("directory: {} mailboxes", USERS + added)),
        "{stats}"
    );

    // Again, for a script: the server's report as is, failures only; same exit code.
    let run = ctl(
        &edge,
        &["mailbox", "import", file, "--xml", "--errors-only"],
    );
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("protobalance ctl: skipped line 2919: not UTF-8"),
        "{}",
        run.stderr
    );
    validate(&run.stdout);
    assert!(
        run.stdout.contains(&format!(
            "added=\"0\" existing=\"{}\" failed=\"4\"",
            added + 10
        )),
        "{}",
        &run.stdout[..300.min(run.stdout.len())]
    );
    assert!(!run.stdout.contains("result=\"exists\""), "errors only");

    // A clean file exits 0.
    let clean = tokens.path().join("clean.csv");
    std::fs::write(
        &clean,
        "user5001@example.com\nuser5002@example.com,backend1\n",
    )
    .expect("write");
    let out = ctl(
        &edge,
        &["mailbox", "import", clean.to_str().expect("utf-8")],
    )
    .expect(0);
    assert!(out.contains("2 added, 0 already there, 0 failed"), "{out}");
}

#[test]
fn an_import_is_written_while_its_file_is_still_being_read() {
    if skip() {
        return;
    }
    let cluster = cluster();
    let (edge, tokens, _) = start(&cluster);
    let fifo = tokens.path().join("mailboxes.fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let child = ctl_command(
        &url(&edge),
        Some(WRITE_TOKEN),
        &["mailbox", "import", fifo.to_str().expect("utf-8")],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn ctl");
    // Opening blocks until ctl opens its end.
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open fifo");
    // One server batch (5000 mailboxes) and a little more, then the file stays open.
    let first: String = (10_001..=15_100)
        .map(|n| format!("user{n}@example.com\n"))
        .collect();
    writer.write_all(first.as_bytes()).expect("write");
    writer.flush().expect("flush");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = ctl(&edge, &["mailbox", "show", "user10001@example.com"]);
        if run.code == 0 {
            break;
        }
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(
            Instant::now() < deadline,
            "the first batch was not written while the file was open"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.write_all(b"user15101@example.com\n").expect("write");
    drop(writer);
    let run = Run::from(child.wait_with_output().expect("ctl"));
    let out = run.expect(0);
    assert!(
        out.contains("5101 added, 0 already there, 0 failed"),
        "{out}"
    );
    assert_eq!(
        row(
            &ctl(&edge, &["mailbox", "show", "user15101@example.com"]).expect(0),
            "user15101@example.com"
        )
        .len(),
        3
    );
}
