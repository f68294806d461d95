//! Logged-in POP3/IMAP sessions spliced in the kernel (`[splice] kernel = "auto"`; the
//! default is `off`): real Dovecot backends, real clients (Python's poplib/imaplib and raw sockets).
//! Every byte a client reads through the edge must be what it reads directly from the
//! backend, the last answer before a close must arrive (QUIT, LOGOUT, a client that
//! half-closes), a slow reader must get everything, idle sessions must still be closed,
//! and `kernel = "off"` must relay in user space. Each test also checks the splice really
//! happened in the kernel (`protobalance_splices_total{mode="kernel"}`), so a program that
//! failed to load cannot pass unnoticed as a user-space relay.

use std::time::{Duration, Instant};

use protobalance_tests::{DovecotCluster, password_for, process::python_for, python};

mod support;

use support::{Edge, Listen, USERS, backend_index, metrics, owner, start_edge};

fn skip() -> bool {
    support::skip("kernel_splice")
}

/// An edge with `splice.kernel = "auto"` unless `extra` has a `[splice]` of its own.
fn start(cluster: &DovecotCluster, extra: &str) -> Edge {
    let extra = if extra.contains("[splice]") {
        extra.to_owned()
    } else {
        format!("[splice]\nkernel = \"auto\"\n{extra}")
    };
    start_edge(
        cluster,
        &[Listen("pop3", None), Listen("imap", None)],
        &extra,
    )
}

/// `protobalance_splices_total` for `protocol` and `mode`.
fn splices(edge: &Edge, protocol: &str, mode: &str) -> u64 {
    support::sample(
        edge,
        &format!("protobalance_splices_total{{mode=\"{mode}\",protocol=\"{protocol}\"}}"),
    )
}

/// Waits (up to 5 s) until no session is left in the kernel splice's maps.
fn all_unjoined(edge: &Edge) {
    let started = Instant::now();
    loop {
        let text = metrics(edge);
        let active: i64 = text
            .lines()
            .find_map(|l| l.strip_prefix("protobalance_kernel_splices_active "))
            .unwrap_or_else(|| panic!("no protobalance_kernel_splices_active: {text}"))
            .trim()
            .parse()
            .expect("gauge value");
        assert!(active >= 0, "{text}");
        if active == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{active} sessions still joined: {}",
            metrics(edge)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Delivers one message of about `kib` KiB to `user` on its owner (LMTP) and returns
/// `"<size> <sha256>"` of the message as the backend itself serves it over IMAP.
fn deliver_big(cluster: &DovecotCluster, edge: &Edge, user: &str, kib: usize) -> String {
    let backend = cluster
        .backend(backend_index(&owner(edge, user)))
        .expect("owner");
    let pass = password_for(user).expect("test user");
    let out = python(&format!(
        "import smtplib, imaplib, hashlib\n\
         lines = ''.join('line %07d ' % i + 'x' * 60 + '\\r\\n' for i in range({kib} * 1024 // 73))\n\
         l = smtplib.LMTP('{ip}', {lmtp}); l.sendmail('s@example.net', ['{user}'], 'Subject: big\\r\\n\\r\\n' + lines); l.quit()\n\
         m = imaplib.IMAP4('{ip}', {imap}); m.login('{user}', '{pass}'); m.select('INBOX')\n\
         body = m.fetch('1', '(RFC822)')[1][0][1]; m.logout()\n\
         print('direct', len(body), hashlib.sha256(body).hexdigest())\n",
        ip = backend.ip(),
        lmtp = backend.lmtp_port(),
        imap = backend.imap_port(),
    ))
    .expect("LMTP delivery and direct IMAP read");
    let direct = out
        .lines()
        .find_map(|l| l.strip_prefix("direct "))
        .expect("direct digest")
        .to_owned();
    let size: usize = direct
        .split(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("size");
    assert!(size > kib * 1000, "{out}");
    direct
}

#[test]
fn pop3_and_imap_sessions_are_spliced_in_the_kernel_byte_for_byte() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(2, USERS).expect("cluster");
    let edge = start(&cluster, "");
    let user = "user7@example.com";
    let pass = password_for(user).expect("test user");
    let direct = deliver_big(&cluster, &edge, user, 1024);
    let (pop3, imap) = (edge.listeners[0], edge.listeners[1]);
    // 30 sessions of each: the whole message, then QUIT / LOGOUT, whose answers must come
    // back before the close (the backend closes right after sending them).
    let out = python_for(
        &format!(
            "import poplib, imaplib, hashlib\n\
             ok = 0\n\
             for i in range(30):\n\
             \x20   p = poplib.POP3('{pop3_ip}', {pop3_port}, timeout=10); p.user('{user}'); p.pass_('{pass}')\n\
             \x20   resp, lines, octets = p.retr(1)\n\
             \x20   body = b'\\r\\n'.join(lines) + b'\\r\\n'\n\
             \x20   assert '%d %s' % (len(body), hashlib.sha256(body).hexdigest()) == '{direct}', ('pop3', i, len(body))\n\
             \x20   bye = p.quit(); assert bye.startswith(b'+OK'), bye\n\
             \x20   m = imaplib.IMAP4('{imap_ip}', {imap_port}, timeout=10); m.login('{user}', '{pass}'); m.select('INBOX')\n\
             \x20   body = m.fetch('1', '(RFC822)')[1][0][1]\n\
             \x20   assert '%d %s' % (len(body), hashlib.sha256(body).hexdigest()) == '{direct}', ('imap', i, len(body))\n\
             \x20   typ, data = m.logout(); assert typ == 'BYE', (typ, data)\n\
             \x20   ok += 1\n\
             print('sessions', ok)\n",
            pop3_ip = pop3.ip(),
            pop3_port = pop3.port(),
            imap_ip = imap.ip(),
            imap_port = imap.port(),
        ),
        Duration::from_secs(120),
    )
    .expect("sessions through the edge");
    assert!(out.contains("sessions 30"), "{out}");
    assert_eq!(splices(&edge, "pop3", "kernel"), 30, "{}", metrics(&edge));
    assert_eq!(splices(&edge, "imap", "kernel"), 30, "{}", metrics(&edge));
    assert_eq!(
        splices(&edge, "pop3", "user") + splices(&edge, "imap", "user"),
        0
    );
    all_unjoined(&edge);
}

#[test]
fn the_last_answers_reach_clients_that_pipeline_and_half_close() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(2, USERS).expect("cluster");
    let edge = start(&cluster, "");
    let user = "user8@example.com";
    let pass = password_for(user).expect("test user");
    let direct = deliver_big(&cluster, &edge, user, 64);
    let size = direct.split(' ').next().expect("size");
    let (pop3, imap) = (edge.listeners[0], edge.listeners[1]);
    // POP3: STAT and QUIT in one write right after the login answer, then the client shuts
    // its sending side; every other time after a pause, so the session is surely joined
    // (without it the commands may arrive before the client is, or the stream may have
    // ended: relayed in user space then, correctly either way). IMAP: the same with
    // SELECT, FETCH and LOGOUT; half of the sessions send everything from LOGIN on in one
    // write, whose pipelined commands the edge passes on by hand in user space.
    let out = python_for(
        &format!(
            "import socket, time\n\
             def run(addr, first, rest, pause):\n\
             \x20   s = socket.create_connection(addr, timeout=10)\n\
             \x20   f = s.makefile('rb'); f.readline()\n\
             \x20   for line in first:\n\
             \x20       s.sendall(line); f.readline()\n\
             \x20   time.sleep(pause)\n\
             \x20   s.sendall(rest); s.shutdown(socket.SHUT_WR)\n\
             \x20   data = f.read(); s.close(); return data\n\
             for i in range(20):\n\
             \x20   pause = 0.2 if i % 2 else 0\n\
             \x20   out = run(('{pop3_ip}', {pop3_port}), [b'USER {user}\\r\\n', b'PASS {pass}\\r\\n'], b'STAT\\r\\nQUIT\\r\\n', pause)\n\
             \x20   assert out.startswith(b'+OK 1 ') and out.count(b'+OK') == 2 and out.endswith(b'\\r\\n'), ('pop3', i, out)\n\
             \x20   login, rest = b'a LOGIN {user} {pass}\\r\\n', b'b SELECT INBOX\\r\\nc FETCH 1 (RFC822.SIZE BODY[])\\r\\nd LOGOUT\\r\\n'\n\
             \x20   if i % 4 < 2:\n\
             \x20       out = b'\\r\\na OK' + run(('{imap_ip}', {imap_port}), [login], rest, pause)\n\
             \x20   else:\n\
             \x20       out = b'\\r\\n' + run(('{imap_ip}', {imap_port}), [], login + rest, 0)\n\
             \x20   tags = [out.find(t) for t in (b'\\r\\na OK', b'\\r\\nb OK', b'RFC822.SIZE {size}', b'\\r\\nc OK', b'* BYE', b'\\r\\nd OK')]\n\
             \x20   assert -1 not in tags and tags == sorted(tags), ('imap', i, tags, out[-300:])\n\
             \x20   assert len(out) > {size}, ('imap', i, len(out))\n\
             print('done')\n",
            pop3_ip = pop3.ip(),
            pop3_port = pop3.port(),
            imap_ip = imap.ip(),
            imap_port = imap.port(),
        ),
        Duration::from_secs(120),
    )
    .expect("pipelining, half-closing clients");
    assert!(out.contains("done"), "{out}");
    let pop3_kernel = splices(&edge, "pop3", "kernel");
    let imap_kernel = splices(&edge, "imap", "kernel");
    // The paused sessions, at least, went through the kernel; no pipelined one did.
    assert!(pop3_kernel >= 10, "{}", metrics(&edge));
    assert_eq!(pop3_kernel + splices(&edge, "pop3", "user"), 20);
    assert!((5..=10).contains(&imap_kernel), "{}", metrics(&edge));
    assert_eq!(imap_kernel + splices(&edge, "imap", "user"), 20);
    all_unjoined(&edge);
}

#[test]
fn a_client_reading_slowly_gets_every_byte() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(1, USERS).expect("cluster");
    let edge = start(&cluster, "");
    let user = "user9@example.com";
    let pass = password_for(user).expect("test user");
    let direct = deliver_big(&cluster, &edge, user, 16 * 1024);
    let imap = edge.listeners[1];
    // The client asks for the 16 MiB message four times and reads nothing for 3 s: more
    // than every buffer on the way holds, so the kernel holds the backend back (its window
    // closes) instead of dropping or buffering without bound. After 1 s the client shuts
    // its sending side: its FIN reaches the edge while the edge holds bytes for it and the
    // backend still has answers to send. Then every byte arrives, and the stream ends.
    let out = python_for(
        &format!(
            "import imaplib, hashlib, time, socket\n\
             m = imaplib.IMAP4('{ip}', {port}, timeout=30); m.login('{user}', '{pass}'); m.select('INBOX')\n\
             m.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)\n\
             m.send(b''.join(b'%c FETCH 1 (RFC822)\\r\\n' % t for t in b'wxyz')); time.sleep(1)\n\
             m.sock.shutdown(socket.SHUT_WR); time.sleep(2)\n\
             done = set()\n\
             while len(done) < 4:\n\
             \x20   line = m.readline(); assert line, ('closed early', done)\n\
             \x20   if line.endswith(b'}}\\r\\n'):\n\
             \x20       body = m.read(int(line[line.rindex(b'{{') + 1:-3]))\n\
             \x20       print('slow', '%d %s' % (len(body), hashlib.sha256(body).hexdigest()))\n\
             \x20   elif line[:1] in b'wxyz' and line[1:5] == b' OK ':\n\
             \x20       done.add(line[:1])\n\
             end = m.readline(); assert end == b'', end\n",
            ip = imap.ip(),
            port = imap.port(),
        ),
        Duration::from_secs(60),
    )
    .expect("slow reader");
    assert_eq!(
        out.matches(&format!("slow {direct}")).count(),
        4,
        "{out}\ndirect {direct}"
    );
    assert_eq!(splices(&edge, "imap", "kernel"), 1, "{}", metrics(&edge));
    all_unjoined(&edge);
}

#[test]
fn idle_and_reset_spliced_sessions_are_cleaned_up_and_off_relays_in_user_space() {
    if skip() {
        return;
    }
    let cluster = DovecotCluster::start(1, USERS).expect("cluster");
    let edge = start(&cluster, "[limits]\nidle_timeout_seconds = 2\n");
    let user = "user10@example.com";
    let pass = password_for(user).expect("test user");
    let imap = edge.listeners[1];
    let started = Instant::now();
    let out = python(&format!(
        "import imaplib\n\
         m = imaplib.IMAP4('{ip}', {port}, timeout=20); m.login('{user}', '{pass}')\n\
         print('after login', m.noop()[0])\n\
         try:\n\
         \x20   print('read', m.readline())\n\
         except Exception as e:\n\
         \x20   print('read error', e)\n",
        ip = imap.ip(),
        port = imap.port(),
    ))
    .expect("idle session");
    let took = started.elapsed();
    // Closed by the edge (an empty read), after the 2 s of silence and well before the
    // client's own 20 s timeout.
    assert!(
        out.contains("after login OK") && out.contains("read b''"),
        "{out}"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(splices(&edge, "imap", "kernel"), 1, "{}", metrics(&edge));
    all_unjoined(&edge);

    // A client that resets its connection mid-session: the edge lets the backend go and
    // takes the pair out of the maps.
    python(&format!(
        "import imaplib, socket, struct\n\
         m = imaplib.IMAP4('{ip}', {port}, timeout=20); m.login('{user}', '{pass}'); m.select('INBOX')\n\
         m.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); m.sock.close()\n",
        ip = imap.ip(),
        port = imap.port(),
    ))
    .expect("reset session");
    assert_eq!(splices(&edge, "imap", "kernel"), 2, "{}", metrics(&edge));
    all_unjoined(&edge);

    let off = start(&cluster, "[splice]\nkernel = \"off\"\n");
    let pop3 = off.listeners[0];
    let out = python(&format!(
        "import poplib\n\
         p = poplib.POP3('{ip}', {port}, timeout=10); p.user('{user}'); p.pass_('{pass}')\n\
         print('stat', p.stat()); print(p.quit())\n",
        ip = pop3.ip(),
        port = pop3.port(),
    ))
    .expect("POP3 through an edge with the kernel splice off");
    assert!(out.contains("stat (0, 0)") && out.contains("+OK"), "{out}");
    assert_eq!(splices(&off, "pop3", "user"), 1, "{}", metrics(&off));
    assert_eq!(splices(&off, "pop3", "kernel"), 0);
}
