//! Moving a mailbox between real Dovecot backends through protobalance (`ctl mailbox move`,
//! `ctl backend empty`): folders, flags and every message go to the new backend, a sender
//! that keeps delivering through the edge during the move loses nothing and duplicates
//! nothing, the old backend keeps none of it, and an IMAP session left open on the old
//! backend is ended.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use protobalance_tests::{
    DovecotBackend, DovecotCluster, MASTER_PASSWORD, MASTER_USER, password_for, python,
};

mod support;

use support::{Edge, Listen, USERS, cli, owner, sample, start_edge};

const TOKEN: &str = "mailbox-move-token-0123456789abcdef";
/// Messages that make the first copy pass of the moving mailbox take a while.
const BULK: usize = 300;

fn edge(cluster: &DovecotCluster, dir: &std::path::Path, settle_seconds: u32) -> Edge {
    edge_with(cluster, dir, settle_seconds, "")
}

/// [`edge`] with more config after the `[moves]` keys (more of them, or other sections).
fn edge_with(
    cluster: &DovecotCluster,
    dir: &std::path::Path,
    settle_seconds: u32,
    moves: &str,
) -> Edge {
    let password = dir.join("master-password");
    std::fs::write(&password, format!("{MASTER_PASSWORD}\n")).expect("password file");
    let extra = format!(
        "[moves]\nmaster_user = \"{MASTER_USER}\"\nmaster_password_file = \"{}\"\nsettle_seconds = {settle_seconds}\n{moves}\n\
         [api]\n[[api.token]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\naccess = \"read-write\"\n",
        password.display()
    );
    start_edge(
        cluster,
        &[Listen("smtp", None), Listen("imap", None)],
        &extra,
    )
}

type Folders = BTreeMap<String, Vec<(String, String)>>;

/// Every message of `user` on `backend` (master login, straight to the backend):
/// `folder -> [(subject, flags)]`.
fn contents(backend: &DovecotBackend, user: &str) -> Folders {
    contents_of(backend, &[user.to_owned()])
        .remove(user)
        .unwrap_or_default()
}

/// [`contents`] of several users, in one client run.
fn contents_of(backend: &DovecotBackend, users: &[String]) -> BTreeMap<String, Folders> {
    let out = protobalance_tests::process::python_for(
        &format!(
            r#"
import imaplib, re
for user in {users:?}:
    m = imaplib.IMAP4("{ip}", {port}, timeout=20)
    m.login("%s*{MASTER_USER}" % user, "{MASTER_PASSWORD}")
    typ, folders = m.list()
    for line in folders:
        name = line.decode().rsplit(' ', 1)[1].strip('"')
        typ, data = m.select('"%s"' % name, readonly=True)
        if int(data[0]) == 0:
            print("folder	%s	%s" % (user, name))
            continue
        typ, data = m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        for item in data:
            if isinstance(item, tuple):
                flags = " ".join(sorted(f for f in re.search(r"FLAGS \(([^)]*)\)", item[0].decode()).group(1).split() if f != "\Recent"))
                subject = item[1].decode().strip().split(":", 1)[1].strip()
                print("msg	%s	%s	%s	%s" % (user, name, subject, flags))
    m.logout()
"#,
            ip = backend.ip(),
            port = backend.imap_port(),
        ),
        Duration::from_secs(300),
    )
    .expect("reading the mailboxes");
    let mut all: BTreeMap<String, Folders> = BTreeMap::new();
    for line in out.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["folder", user, name] => {
                all.entry((*user).to_owned())
                    .or_default()
                    .entry((*name).to_owned())
                    .or_default();
            }
            ["msg", user, name, subject, flags] => all
                .entry((*user).to_owned())
                .or_default()
                .entry((*name).to_owned())
                .or_default()
                .push(((*subject).to_owned(), (*flags).to_owned())),
            _ => {}
        }
    }
    all
}

fn message_total(folders: &Folders) -> usize {
    folders.values().map(Vec::len).sum()
}

#[test]
fn a_mailbox_moves_with_folders_and_flags_while_mail_keeps_arriving() {
    let test = "a_mailbox_moves_with_folders_and_flags_while_mail_keeps_arriving";
    if support::skip(test) {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    // With the kernel splice: the move must end a session the kernel is splicing too (the
    // other tests cover the user-space relay, the default).
    let edge = edge_with(&cluster, dir.path(), 2, "[splice]\nkernel = \"auto\"");
    let user = "user5@example.com";
    let from = owner(&edge, user);
    let to = if from == "backend2" {
        "backend3"
    } else {
        "backend2"
    };
    let old = cluster
        .backends()
        .iter()
        .find(|b| b.name() == from)
        .expect("old backend");
    let new = cluster
        .backends()
        .iter()
        .find(|b| b.name() == to)
        .expect("new backend");

    // Before: 4 messages in INBOX (one flagged), 2 read ones in a folder "Archive".
    let pass = password_for(user).expect("password");
    let (smtp, imap) = (edge.listeners[0], edge.listeners[1]);
    python(&format!(
        r#"
import imaplib, smtplib
s = smtplib.SMTP("{sh}", {sp}, timeout=10)
for i in range(4):
    s.sendmail("a@example.net", ["{user}"], "Subject: before-%d\r\n\r\nbody\r\n" % i)
s.quit()
m = imaplib.IMAP4("{ih}", {ip}, timeout=10)
m.login("{user}", "{pass}")
m.create("Archive")
for i in range(2):
    m.append("Archive", "(\\Seen)", None, ("Subject: archived-%d\r\n\r\nold\r\n" % i).encode())
m.select("INBOX")
m.store("1", "+FLAGS", "(\\Flagged)")
m.logout()
l = smtplib.LMTP("{lh}", {lp})
for i in range({BULK}):
    l.sendmail("a@example.net", ["{user}"], "Subject: bulk-%d\r\n\r\nbody\r\n" % i)
l.quit()
"#,
        sh = smtp.ip(),
        sp = smtp.port(),
        ih = imap.ip(),
        ip = imap.port(),
        lh = old.ip(),
        lp = old.lmtp_port(),
    ))
    .expect("populating the mailbox");
    let before = contents(old, user);
    assert_eq!(message_total(&before), 6 + BULK, "{before:?}");

    // During: a sender delivering through the edge, and an IMAP session left open.
    let stop = dir.path().join("stop");
    let sender = format!(
        r#"
import os, smtplib, time
sent, failed = [], []
n = 0
while not os.path.exists("{stop}"):
    n += 1
    try:
        s = smtplib.SMTP("{sh}", {sp}, timeout=15)
        refused = s.sendmail("a@example.net", ["{user}"], "Subject: live-%d\r\n\r\nbody\r\n" % n)
        s.quit()
        (failed if refused else sent).append("live-%d" % n)
    except smtplib.SMTPResponseException as e:
        # A temporary refusal is allowed (the client retries); a permanent one is not.
        failed.append("live-%d %d" % (n, e.smtp_code)) if e.smtp_code >= 500 else None
    except Exception as e:
        failed.append("live-%d %r" % (n, e))
    time.sleep(0.05)
print("sent", " ".join(sent))
print("failed", " | ".join(failed))
"#,
        stop = stop.display(),
        sh = smtp.ip(),
        sp = smtp.port(),
    );
    // The watcher, once told, changes the old copy while it is being copied (the bulk
    // messages make the first pass long): answers before-2, deletes before-3.
    let go = dir.path().join("go");
    let watcher = format!(
        r#"
import imaplib, os, time
m = imaplib.IMAP4("{ih}", {ip}, timeout=10)
m.login("{user}", "{pass}")
m.select("INBOX")
while not os.path.exists("{go}"):
    time.sleep(0.01)
try:
    m.store("3", "+FLAGS", "(\\Answered)")
    m.store("4", "+FLAGS", "(\\Deleted)")
    m.expunge()
    print("changed")
except Exception as e:
    print("early %r" % (e,))
end = time.time() + 30
state = "open"
while time.time() < end:
    try:
        m.noop()
    except Exception as e:
        state = "closed"
        break
    time.sleep(0.2)
print(state)
"#,
        ih = imap.ip(),
        ip = imap.port(),
        go = go.display(),
    );
    let (sent, report, watched) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| python(&sender).expect("sender"));
        let watcher = scope.spawn(|| python(&watcher).expect("watcher"));
        std::thread::sleep(Duration::from_millis(800));
        let started = Instant::now();
        let mover =
            scope.spawn(|| cli(&edge, TOKEN, &["ctl", "mailbox", "move", user, "--to", to]));
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(&go, "").expect("go");
        let (code, report) = mover.join().expect("move thread");
        assert_eq!(code, 0, "{report}");
        eprintln!("{} ({:?})", report.trim(), started.elapsed());
        std::thread::sleep(Duration::from_millis(500));
        std::fs::write(&stop, "").expect("stop");
        (
            sender.join().expect("sender thread"),
            report,
            watcher.join().expect("watcher thread"),
        )
    });
    assert!(report.contains(&format!("to {to}")), "{report}");
    let failed = sent
        .lines()
        .find_map(|l| l.strip_prefix("failed"))
        .unwrap_or_default()
        .trim();
    assert!(
        failed.is_empty(),
        "deliveries failed during the move: {failed}"
    );
    let live: Vec<&str> = sent
        .lines()
        .find_map(|l| l.strip_prefix("sent"))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert!(live.len() >= 5, "the sender ran during the move: {sent}");
    let changed = watched.lines().next() == Some("changed");
    eprintln!(
        "client changes during the copy: {}",
        watched.lines().next().unwrap_or_default()
    );
    assert_eq!(
        watched.lines().last(),
        Some("closed"),
        "the IMAP session on the old backend was ended: {watched}"
    );
    // Both IMAP sessions through the edge so far (the set-up and the watcher) were spliced
    // in the kernel, so the move ended a kernel-spliced session.
    let kernel = r#"protobalance_splices_total{mode="kernel",protocol="imap"}"#;
    assert_eq!(sample(&edge, kernel), 2, "{}", support::metrics(&edge));

    // After: the directory, the new backend has everything once, the old one nothing.
    assert_eq!(owner(&edge, user), to);
    let moved = contents(new, user);
    let left = contents(old, user);
    assert_eq!(message_total(&left), 0, "left on {from}: {left:?}");
    let mut subjects: Vec<&str> = moved.values().flatten().map(|(s, _)| s.as_str()).collect();
    subjects.sort_unstable();
    // What the client did on the old copy during the move holds on the new one.
    let kept_before = if changed { 3 } else { 4 };
    let mut want: Vec<String> = (0..kept_before).map(|i| format!("before-{i}")).collect();
    want.extend((0..BULK).map(|i| format!("bulk-{i}")));
    want.extend((0..2).map(|i| format!("archived-{i}")));
    want.extend(live.iter().map(|s| (*s).to_owned()));
    want.sort_unstable();
    assert_eq!(subjects, want, "every message once, none lost or doubled");
    let archive = &moved["Archive"];
    assert_eq!(archive.len(), 2);
    assert!(
        archive.iter().all(|(_, flags)| flags.contains("\\Seen")),
        "{archive:?}"
    );
    let flagged: Vec<&String> = moved["INBOX"]
        .iter()
        .filter(|(_, flags)| flags.contains("\\Flagged"))
        .map(|(s, _)| s)
        .collect();
    assert_eq!(flagged, ["before-0"]);
    if changed {
        let answered: Vec<&String> = moved["INBOX"]
            .iter()
            .filter(|(_, flags)| flags.contains("\\Answered"))
            .map(|(s, _)| s)
            .collect();
        assert_eq!(
            answered,
            ["before-2"],
            "a flag set during the copy is carried over"
        );
    }
    assert_eq!(
        sample(&edge, "protobalance_mailbox_moves_total{result=\"moved\"}"),
        1
    );

    // A login through the edge lands on the new backend and sees the mail.
    let out = python(&format!(
        "import imaplib\nm = imaplib.IMAP4('{}', {}, timeout=10)\nm.login('{user}', '{pass}')\n\
         print(m.select('INBOX')[1][0].decode())\nm.logout()\n",
        imap.ip(),
        imap.port()
    ))
    .expect("login after the move");
    assert_eq!(out.trim(), (kept_before + BULK + live.len()).to_string());
}

/// The backend a move of a mailbox on `from` goes to in these tests.
fn other(from: &str) -> &'static str {
    if from == "backend1" {
        "backend2"
    } else {
        "backend1"
    }
}

/// The harness backend called `name`.
fn backend_named<'a>(cluster: &'a DovecotCluster, name: &str) -> &'a DovecotBackend {
    cluster
        .backends()
        .iter()
        .find(|b| b.name() == name)
        .expect("backend")
}

/// Delivers `bulk-0` .. `bulk-{n-1}` to `user` on `backend` (LMTP, straight to it); the
/// subjects, sorted.
fn populate(backend: &DovecotBackend, user: &str, n: usize) -> Vec<String> {
    python(&format!(
        r#"
import smtplib
l = smtplib.LMTP("{ip}", {port})
for i in range({n}):
    l.sendmail("a@example.net", ["{user}"], "Subject: bulk-%d\r\n\r\nbody %d\r\n" % (i, i))
l.quit()
"#,
        ip = backend.ip(),
        port = backend.lmtp_port(),
    ))
    .expect("populating");
    let mut subjects: Vec<String> = (0..n).map(|i| format!("bulk-{i}")).collect();
    subjects.sort_unstable();
    subjects
}

/// Asserts that `backend` holds exactly the messages `want` (subjects, any order) for
/// `user`: every one once.
fn assert_holds_exactly(backend: &DovecotBackend, user: &str, mut want: Vec<String>, what: &str) {
    let held = contents(backend, user);
    let mut subjects: Vec<&str> = held.values().flatten().map(|(s, _)| s.as_str()).collect();
    subjects.sort_unstable();
    want.sort_unstable();
    assert_eq!(subjects, want, "{what}");
}

/// Starts moving `user` to `to` through the API (`?wait=no`) and follows the job until
/// `ready` (a Python condition on `doc`, the job's XML) holds; then runs `then` (Python)
/// and returns what the script printed.
fn move_until(edge: &Edge, user: &str, to: &str, ready: &str, then: &str) -> String {
    python(&format!(
        r#"
import re, smtplib, time, urllib.error, urllib.request
base = "http://{admin}/api/v1/"
auth = {{"Authorization": "Bearer {TOKEN}", "Content-Type": "application/xml"}}
req = urllib.request.Request(base + "mailboxes/{user}/move?wait=no", data=b'<move xmlns="urn:protobalance:api:1" backend="{to}"/>', headers=auth, method="POST")
r = urllib.request.urlopen(req, timeout=10)
path = r.headers["Location"].split("/api/v1/")[1]
end = time.time() + 120
while time.time() < end:
    with urllib.request.urlopen(urllib.request.Request(base + path, headers=auth), timeout=10) as r:
        doc = r.read().decode()
    if {ready}:
        break
    if 'state="running"' not in doc:
        raise SystemExit("the move ended before the test could stop it: " + doc)
    time.sleep(0.02)
else:
    raise SystemExit("the move never reached the point to stop it: " + doc)
{then}
print(doc.replace("\n", " "))
"#,
        admin = edge.admin,
    ))
    .expect("following the move")
}

/// Waits until `user`'s move to `to` finished on `edge` (a resumed job is done and the
/// old backend is empty), up to `timeout`.
fn wait_moved(edge: &Edge, user: &str, to: &str, old: &DovecotBackend, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let jobs = support::get_with_token(edge.admin, "/api/v1/jobs", TOKEN).unwrap_or_default();
        let done = jobs
            .split("<job ")
            .any(|l| l.contains(&format!("mailbox=\"{user}\"")) && l.contains("state=\"done\""));
        if done && owner(edge, user) == to && message_total(&contents(old, user)) == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stopped move of {user} was not finished: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A move cut short by the edge's death (SIGKILL) is taken over from the directory's
/// record once its heartbeat is stale, and finished: killed while copying (the owner has
/// not changed; a batch may have been appended but not recorded), and killed after the
/// switch while settling (late mail on the old backend). Either way every message ends on
/// the new backend exactly once and none stays on the old one.
#[test]
fn a_move_cut_short_by_a_crash_is_finished_with_every_message_once() {
    let test = "a_move_cut_short_by_a_crash_is_finished_with_every_message_once";
    if support::skip(test) {
        return;
    }
    let mut cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut edge = edge_with(&cluster, dir.path(), 4, "resume_after_seconds = 2");
    for (user, stage) in [
        ("user7@example.com", "copying"),
        ("user8@example.com", "settling"),
    ] {
        let from = owner(&edge, user);
        let to = other(&from);
        let (old, new) = (backend_named(&cluster, &from), backend_named(&cluster, to));
        let mut want = populate(old, user, BULK);
        if stage == "copying" {
            // Stopped in the middle of the first pass, before the switch.
            let doc = move_until(
                &edge,
                user,
                to,
                r#"int(re.search(r'copied="(\d+)"', doc).group(1)) >= 60"#,
                "",
            );
            assert!(doc.contains("phase=\"copying\""), "{doc}");
        } else {
            // Stopped after the switch, with mail that reached the old backend late.
            move_until(
                &edge,
                user,
                to,
                "'phase=\"settling\"' in doc",
                &format!(
                    "l = smtplib.LMTP(\"{}\", {})\nfor i in range(5):\n    \
                     l.sendmail(\"a@example.net\", [\"{user}\"], \"Subject: late-%d\\r\\n\\r\\nlate\\r\\n\" % i)\n\
                     l.quit()",
                    old.ip(),
                    old.lmtp_port()
                ),
            );
            want.extend((0..5).map(|i| format!("late-{i}")));
            assert_eq!(owner(&edge, user), to, "switched before the stop");
        }
        // SIGKILL, and a new process on the same directory.
        edge.restart();
        let started = Instant::now();
        wait_moved(&edge, user, to, old, Duration::from_secs(90));
        eprintln!(
            "{user}: stopped while {stage}, finished {:?} after the restart",
            started.elapsed()
        );
        assert_holds_exactly(
            new,
            user,
            want,
            &format!("{user}: every message once on {to}"),
        );
        assert_eq!(
            sample(
                &edge,
                "protobalance_mailbox_moves_total{result=\"resumed\"}"
            ),
            1,
            "the restarted edge resumed the move"
        );
    }

    // A move that keeps failing after the switch (its old backend went away) is listed as
    // recorded, retried, and can be abandoned; the mail stays on the old backend.
    let user = "user9@example.com";
    let from = owner(&edge, user);
    let to = other(&from);
    support::deliver(&cluster, &from, user, "kept-on-the-old-backend");
    move_until(&edge, user, to, "'phase=\"settling\"' in doc", "");
    // The edge running the move dies, and the old backend goes away (the edge's IMAP
    // session would have outlived the backend's stop): every run resumed on the edge
    // started again fails to connect.
    edge.kill();
    let old_index = support::backend_index(&from);
    cluster.backend_mut(old_index).expect("old backend").stop();
    edge.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, text) = cli(&edge, TOKEN, &["ctl", "mailbox", "moves", "--xml"]);
        assert_eq!(code, 0, "{text}");
        support::validate_api_xml(&text);
        if text.contains(user) && text.contains("state=\"stopped\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failing move is not listed as stopped: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Switched already: abandoning needs --force (the old backend's mail is left behind).
    let (code, text) = cli(&edge, TOKEN, &["ctl", "mailbox", "abandon-move", user]);
    assert!(code != 0 && text.contains("move_switched"), "{text}");
    // Resumed at lease ends and failing at once: abandoned between two attempts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, text) = cli(
            &edge,
            TOKEN,
            &["ctl", "mailbox", "abandon-move", "--force", user],
        );
        if code == 0 {
            assert!(text.contains("abandoned"), "{text}");
            break;
        }
        assert!(text.contains("move_running"), "{text}");
        assert!(Instant::now() < deadline, "never abandoned: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, text) = cli(&edge, TOKEN, &["ctl", "mailbox", "moves"]);
    assert!(!text.contains(user), "{text}");
    let (code, text) = cli(
        &edge,
        TOKEN,
        &["ctl", "mailbox", "abandon-move", "--force", user],
    );
    assert!(code != 0 && text.contains("no move"), "{text}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !cli(&edge, TOKEN, &["ctl", "mailbox", "moves"])
            .1
            .contains(user),
        "nothing resumes an abandoned move"
    );
    let old = cluster.backend_mut(old_index).expect("old backend");
    old.restart().expect("old backend back");
    let left = contents(old, user);
    assert!(
        left.values()
            .flatten()
            .any(|(s, _)| s.contains("kept-on-the-old-backend")),
        "the old backend keeps what it held: {left:?}"
    );
    assert_eq!(owner(&edge, user), to);
}

/// Two nodes on one PostgreSQL directory: a mailbox being moved by node A cannot be moved
/// by node B at the same time (409), and when node A dies in the middle of the move,
/// node B takes it over from the shared record and finishes it.
#[test]
fn a_move_is_one_nodes_at_a_time_and_another_node_finishes_it_when_that_node_dies() {
    let test = "a_move_is_one_nodes_at_a_time_and_another_node_finishes_it_when_that_node_dies";
    if support::skip(test) || !protobalance_tests::require_postgres(test) {
        return;
    }
    let pg = protobalance_tests::PostgresServer::start().expect("postgres");
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = format!(
        "resume_after_seconds = 2\n[directory.postgres]\nurl = \"{}\"",
        pg.url()
    );
    let a = edge_with(&cluster, dir.path(), 6, &shared);
    let b = edge_with(&cluster, dir.path(), 6, &shared);
    let user = "user11@example.com";
    let from = owner(&a, user);
    let to = other(&from);
    let (old, new) = (backend_named(&cluster, &from), backend_named(&cluster, to));
    let want = populate(old, user, 100);
    // An IMAP session through node B on the old backend: node B hears of node A's
    // switch through the directory and ends it.
    let imap_b = b.listeners[1];
    let watcher = support::imap_watcher(imap_b, user, 40);
    let watcher = std::thread::spawn(move || python(&watcher).expect("watcher"));
    std::thread::sleep(Duration::from_millis(500));
    let out = move_until(
        &a,
        user,
        to,
        "'phase=\"settling\"' in doc",
        &format!(
            r#"
try:
    urllib.request.urlopen(urllib.request.Request("http://{b}/api/v1/mailboxes/{user}/move", data=b'<move xmlns="urn:protobalance:api:1" backend="backend3"/>', headers=auth, method="POST"), timeout=30)
    print("node B accepted a second move")
except urllib.error.HTTPError as e:
    print("node B refused", e.code, e.read().decode().replace("\n", " "))
try:
    urllib.request.urlopen(urllib.request.Request("http://{b}/api/v1/mailboxes/{user}", headers=auth, method="DELETE"), timeout=30)
    print("node B deleted the mailbox being moved")
except urllib.error.HTTPError as e:
    print("node B kept it", e.code, e.read().decode().replace("\n", " "))
"#,
            b = b.admin,
        ),
    );
    assert!(
        out.contains("node B refused 409") && out.contains("move_in_progress"),
        "{out}"
    );
    assert!(out.contains("node B kept it 409"), "{out}");
    assert_eq!(
        watcher.join().expect("watcher thread").lines().last(),
        Some("closed"),
        "node B ended its session on the old backend after node A's switch"
    );
    // Node A dies after the switch; node B finishes the move.
    drop(a);
    let started = Instant::now();
    wait_moved(&b, user, to, old, Duration::from_secs(60));
    eprintln!(
        "node B finished node A's move {:?} after A died",
        started.elapsed()
    );
    assert_holds_exactly(new, user, want, &format!("every message once on {to}"));
    assert_eq!(
        sample(&b, "protobalance_mailbox_moves_total{result=\"resumed\"}"),
        1
    );
    assert_eq!(pg.psql("SELECT count(*) FROM moves").expect("psql"), "0");
}

/// A move survives its directory going away: PostgreSQL stops while the move settles, the
/// run cannot renew its lease and stops (before any other run could take it over); once
/// PostgreSQL is back the move is taken over and finished. And a folder that vanished from
/// the old backend before reconciling has its copies expunged instead of blocking the
/// move.
#[test]
fn a_move_stopped_by_an_unreachable_directory_is_finished_when_it_returns() {
    let test = "a_move_stopped_by_an_unreachable_directory_is_finished_when_it_returns";
    if support::skip(test) || !protobalance_tests::require_postgres(test) {
        return;
    }
    let mut pg = protobalance_tests::PostgresServer::start().expect("postgres");
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = format!(
        "resume_after_seconds = 2\n[directory.postgres]\nurl = \"{}\"\ntimeout_ms = 500",
        pg.url()
    );
    let edge = edge_with(&cluster, dir.path(), 4, &shared);
    let user = "user12@example.com";
    let from = owner(&edge, user);
    let to = other(&from);
    let (old, new) = (backend_named(&cluster, &from), backend_named(&cluster, to));
    let want = populate(old, user, 100);
    python(&format!(
        r#"
import imaplib
m = imaplib.IMAP4("{ip}", {imap})
m.login("{user}*{MASTER_USER}", "{MASTER_PASSWORD}")
m.create("Doomed")
for i in range(3):
    m.append("Doomed", None, None, ("Subject: doomed-%d\r\n\r\nx\r\n" % i).encode())
m.logout()
"#,
        ip = old.ip(),
        imap = old.imap_port(),
    ))
    .expect("a folder to delete");
    // Switched and settling: the folder goes from the old backend, then the directory.
    move_until(
        &edge,
        user,
        to,
        "'phase=\"settling\"' in doc",
        &format!(
            "import imaplib\nm = imaplib.IMAP4(\"{}\", {})\nm.login(\"{user}*{MASTER_USER}\", \"{MASTER_PASSWORD}\")\n\
             print(\"deleted\", m.delete(\"Doomed\")[0])\nm.logout()",
            old.ip(),
            old.imap_port()
        ),
    );
    pg.stop().expect("stopping postgres");
    // The run stops within half a lease (1 s) plus a renewal attempt; the job says why.
    let deadline = Instant::now() + Duration::from_secs(15);
    let failed = loop {
        let jobs = support::get_with_token(edge.admin, "/api/v1/jobs", TOKEN).unwrap_or_default();
        if let Some(job) = jobs.split("<job ").find(|j| j.contains("state=\"failed\"")) {
            break job.to_owned();
        }
        assert!(Instant::now() < deadline, "the move did not stop: {jobs}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(failed.contains("lease"), "{failed}");
    assert!(
        message_total(&contents(old, user)) > 0,
        "nothing deleted without the lease"
    );
    pg.restart().expect("postgres back");
    let started = Instant::now();
    wait_moved(&edge, user, to, old, Duration::from_secs(60));
    eprintln!(
        "finished {:?} after PostgreSQL came back",
        started.elapsed()
    );
    assert_holds_exactly(
        new,
        user,
        want,
        &format!("every message once on {to}; the vanished folder's copies expunged"),
    );
    assert_eq!(pg.psql("SELECT count(*) FROM moves").expect("psql"), "0");
}

#[test]
fn moves_refuse_what_they_cannot_do_and_a_backend_can_be_emptied() {
    let test = "moves_refuse_what_they_cannot_do_and_a_backend_can_be_emptied";
    if support::skip(test) {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    // Empty mailboxes and no traffic: no settle time needed.
    let edge = edge(&cluster, dir.path(), 0);
    let user = "user9@example.com";
    let home = owner(&edge, user);
    for (args, want) in [
        (
            vec!["ctl", "mailbox", "move", user, "--to", &home],
            "already",
        ),
        (
            vec!["ctl", "mailbox", "move", user, "--to", "nosuch"],
            "nosuch",
        ),
        (
            vec![
                "ctl",
                "mailbox",
                "move",
                "ghost@example.com",
                "--to",
                "backend1",
            ],
            "ghost@example.com",
        ),
    ] {
        let (code, text) = cli(&edge, TOKEN, &args);
        assert_ne!(code, 0, "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
    }
    assert_eq!(owner(&edge, user), home, "a refused move changes nothing");
    // Mail for the mailbox on the target already (a failed earlier move, say): refused,
    // so nothing is doubled.
    let elsewhere = cluster
        .backends()
        .iter()
        .find(|b| b.name() != home)
        .expect("another backend");
    python(&format!(
        "import smtplib\nl = smtplib.LMTP('{}', {})\nl.sendmail('a@example.net', ['{user}'], 'Subject: stray\\r\\n\\r\\nx\\r\\n')\nl.quit()\n",
        elsewhere.ip(),
        elsewhere.lmtp_port()
    ))
    .expect("LMTP");
    let (code, text) = cli(
        &edge,
        TOKEN,
        &["ctl", "mailbox", "move", user, "--to", elsewhere.name()],
    );
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("target_not_empty") || text.contains("1 messages"),
        "{text}"
    );
    assert_eq!(owner(&edge, user), home);

    // As a job: 202 at once, then watched to its end; both documents valid.
    let third = cluster
        .backends()
        .iter()
        .find(|b| b.name() != home && b.name() != elsewhere.name())
        .expect("a third backend");
    let out = python(&format!(
        r#"
import time, urllib.error, urllib.request
base = "http://{admin}/api/v1/"
auth = {{"Authorization": "Bearer {TOKEN}", "Content-Type": "application/xml"}}
req = urllib.request.Request(base + "mailboxes/{user}/move?wait=no", data=b'<move xmlns="urn:protobalance:api:1" backend="{to}"/>', headers=auth, method="POST")
try:
    r = urllib.request.urlopen(req, timeout=10)
except urllib.error.HTTPError as e:
    raise SystemExit("%d %s" % (e.code, e.read().decode()))
print(r.status, r.headers["Location"])
print(r.read().decode().replace("\n", " "))
path = r.headers["Location"].split("/api/v1/")[1]
for _ in range(200):
    with urllib.request.urlopen(urllib.request.Request(base + path, headers=auth), timeout=10) as r:
        doc = r.read().decode()
    if 'state="running"' not in doc:
        break
    time.sleep(0.1)
print(doc.replace("\n", " "))
"#,
        admin = edge.admin,
        to = third.name(),
    ))
    .expect("move job");
    let mut lines = out.lines();
    let status = lines.next().unwrap_or_default();
    assert!(status.starts_with("202 /api/v1/jobs/"), "{out}");
    let started = lines.next().unwrap_or_default();
    let finished = lines.next().unwrap_or_default();
    support::validate_api_xml(started);
    support::validate_api_xml(finished);
    assert!(
        finished.contains("state=\"done\"") && finished.contains("phase=\"done\""),
        "{finished}"
    );
    assert_eq!(owner(&edge, user), third.name());

    // Emptying backend1: drained first, then every mailbox goes to the others.
    let (code, text) = cli(&edge, TOKEN, &["ctl", "backend", "drain", "backend1"]);
    assert_eq!(code, 0, "{text}");
    let on_backend1: Vec<String> = (1..=USERS)
        .map(|i| format!("user{i}@example.com"))
        .filter(|u| owner(&edge, u) == "backend1")
        .take(100)
        .collect();
    // About a third of the mailboxes (user9 may have moved above).
    assert!(on_backend1.len() >= USERS / 3 - 1, "{}", on_backend1.len());
    let started = Instant::now();
    let (code, text) = cli(
        &edge,
        TOKEN,
        &["ctl", "backend", "empty", "backend1", "--timeout", "600"],
    );
    assert_eq!(code, 0, "{text}");
    eprintln!("{} in {:?}", text.trim(), started.elapsed());
    assert!(on_backend1.iter().all(|u| owner(&edge, u) != "backend1"));
    let (code, text) = cli(&edge, TOKEN, &["ctl", "backend", "rm", "backend1"]);
    // A config backend cannot be removed through the API, but it owns nothing now.
    assert!(text.contains("managed_by_config") || code == 0, "{text}");
}

/// The issue's test: a whole backend's mailboxes move while a sender keeps delivering to
/// them and a reader keeps reading them through the edge. Afterwards every message sent is
/// on the new owner exactly once, the old backend holds none, and no client saw a
/// permanent error (temporary ones, and a session ended by the move, are allowed: clients
/// retry).
#[test]
fn a_backend_is_emptied_under_load_with_every_message_in_exactly_one_place() {
    let test = "a_backend_is_emptied_under_load_with_every_message_in_exactly_one_place";
    if support::skip(test) {
        return;
    }
    // Two backends: the 300 test mailboxes split 150/150, and 50 more are pinned to
    // backend1: its 200 move.
    const EXTRA: usize = 50;
    let cluster = DovecotCluster::start(2, USERS + EXTRA).expect("cluster");
    let dir = tempfile::tempdir().expect("tempdir");
    let password = dir.path().join("master-password");
    std::fs::write(&password, format!("{MASTER_PASSWORD}\n")).expect("password file");
    let extra = format!(
        "[moves]\nmaster_user = \"{MASTER_USER}\"\nmaster_password_file = \"{}\"\nsettle_seconds = 1\n\
         [api]\n[[api.token]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\naccess = \"read-write\"\n",
        password.display()
    );
    let edge = start_edge(
        &cluster,
        &[Listen("smtp", None), Listen("pop3", None)],
        &extra,
    );
    let pinned = dir.path().join("pinned.csv");
    let lines: String = (USERS + 1..=USERS + EXTRA)
        .map(|i| format!("user{i}@example.com,backend1\n"))
        .collect();
    std::fs::write(&pinned, lines).expect("import file");
    let (code, text) = cli(
        &edge,
        TOKEN,
        &[
            "ctl",
            "mailbox",
            "import",
            pinned.to_str().expect("utf-8 path"),
        ],
    );
    assert_eq!(code, 0, "{text}");
    let movers: Vec<String> = (1..=USERS + EXTRA)
        .map(|i| format!("user{i}@example.com"))
        .filter(|u| owner(&edge, u) == "backend1")
        .collect();
    assert_eq!(movers.len(), USERS / 2 + EXTRA);
    let (smtp, pop3) = (edge.listeners[0], edge.listeners[1]);
    let stop = dir.path().join("stop");
    let users_py = format!("{movers:?}");
    let load = format!(
        r#"
import os, poplib, smtplib, threading, time
users = {users_py}
stop = "{stop}"
sent, problems = [], []
def sender():
    n = 0
    while not os.path.exists(stop):
        n += 1
        rcpt = users[n % len(users)]
        try:
            s = smtplib.SMTP("{sh}", {sp}, timeout=20)
            refused = s.sendmail("a@example.net", [rcpt], "Subject: m-%d\r\n\r\nbody\r\n" % n)
            s.quit()
            if refused:
                problems.append("refused %r" % (refused,))
            else:
                sent.append((rcpt, "m-%d" % n))
        except smtplib.SMTPResponseException as e:
            if e.smtp_code >= 500:
                problems.append("smtp %d %r" % (e.smtp_code, e.smtp_error))
        except (OSError, smtplib.SMTPServerDisconnected):
            pass
def reader():
    n = 0
    while not os.path.exists(stop):
        n += 1
        user = users[(n * 7) % len(users)]
        try:
            p = poplib.POP3("{ph}", {pp}, timeout=20)
            p.user(user); p.pass_("pass" + user[4:].split("@")[0])
            count, _ = p.stat()
            if count:
                p.top(1, 0)
            p.quit()
        except poplib.error_proto as e:
            text = e.args[0].decode(errors="replace")
            if "[SYS/TEMP]" not in text and "[IN-USE]" not in text:
                problems.append("pop3 %s: %s" % (user, text))
        except (OSError, EOFError):
            pass
threads = [threading.Thread(target=sender), threading.Thread(target=reader)]
for t in threads: t.start()
for t in threads: t.join()
print("problems", len(problems))
for p in problems[:10]: print("problem", p)
for rcpt, subject in sent: print("sent", rcpt, subject)
"#,
        stop = stop.display(),
        sh = smtp.ip(),
        sp = smtp.port(),
        ph = pop3.ip(),
        pp = pop3.port(),
    );
    let output = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            protobalance_tests::process::python_for(&load, Duration::from_secs(600)).expect("load")
        });
        std::thread::sleep(Duration::from_secs(1));
        let (code, text) = cli(&edge, TOKEN, &["ctl", "backend", "drain", "backend1"]);
        assert_eq!(code, 0, "{text}");
        let started = Instant::now();
        let (code, text) = cli(
            &edge,
            TOKEN,
            &["ctl", "backend", "empty", "backend1", "--timeout", "900"],
        );
        assert_eq!(code, 0, "{text}");
        eprintln!("{} in {:?} under load", text.trim(), started.elapsed());
        std::thread::sleep(Duration::from_millis(500));
        std::fs::write(&stop, "").expect("stop");
        load.join().expect("load thread")
    });
    assert!(
        output.starts_with("problems 0"),
        "clients saw permanent errors:\n{}",
        output.lines().take(12).collect::<Vec<_>>().join("\n")
    );
    let sent: Vec<(&str, &str)> = output
        .lines()
        .filter_map(|l| l.strip_prefix("sent "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    assert!(sent.len() >= 50, "the sender ran: {} messages", sent.len());
    let (old, new) = (
        cluster.backend(1).expect("b1"),
        cluster.backend(2).expect("b2"),
    );
    let mut want: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (user, subject) in &sent {
        want.entry(user).or_default().push(subject);
    }
    let (on_old, mut on_new) = (contents_of(old, &movers), contents_of(new, &movers));
    for user in &movers {
        assert_eq!(owner(&edge, user), "backend2");
        let left = on_old.get(user).map_or(0, message_total);
        assert_eq!(left, 0, "{user} left on backend1");
        let mut have: Vec<String> = on_new
            .remove(user)
            .unwrap_or_default()
            .into_values()
            .flatten()
            .map(|(s, _)| s)
            .collect();
        have.sort_unstable();
        let mut expected: Vec<String> = want
            .get(user.as_str())
            .map(|v| v.iter().map(|s| (*s).to_owned()).collect())
            .unwrap_or_default();
        expected.sort_unstable();
        assert_eq!(have, expected, "{user}: every message once on backend2");
    }
}
