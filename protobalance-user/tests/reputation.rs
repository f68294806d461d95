//! The reputation engine end to end, in front of three real Dovecot backends: scripted
//! bots (a pregreeting, blindly pipelining spammer; a dictionary harvester; POP3/IMAP
//! password guessers) are refused and then banned, while well-behaved Python clients from
//! other addresses deliver and log in throughout; an account attacked from many addresses
//! is locked except from where its owner logged in before; bans end and scores decay; a
//! real sending Postfix (pregreet delay, 452 splits, PIPELINING groups) earns no offence.
//! (The kernel side of bans, XDP dropping the banned bot's SYNs, is in `xdp_reputation`.)

use protobalance_tests::{BackendOptions, DovecotCluster, python};

mod support;

use support::{Edge, Listen, USERS, delivered, sample, start_edge};

fn skip(test: &str) -> bool {
    support::skip(test)
}

/// Short timings so the test runs in seconds; the thresholds are the defaults.
const REPUTATION: &str = "[reputation]\ngreeting_delay_ms = 300\ntarpit_delay_ms = 100\n\
     allow = [\"127.0.0.69/32\"]\n\
     ban_seconds = 2\nauth_failure_delay_ms = 10\nauth_failure_delay_max_ms = 40\n\
     [api]\n[[api.token]]\nname = \"ops\"\ntoken = \"reputation-test-token-0123456789abcdef\"\n\
     access = \"read-write\"\n";

const TOKEN: &str = "reputation-test-token-0123456789abcdef";

/// `protobalance <args>` against the edge's API: (exit code, stdout + stderr).
fn cli(edge: &Edge, args: &[&str]) -> (i32, String) {
    support::cli(edge, TOKEN, args)
}

/// Python prelude: every socket comes from `ip`.
fn from(ip: &str) -> String {
    format!(
        "import socket\n_orig = socket.create_connection\n\
         socket.create_connection = lambda a, t=None, s=None: _orig(a, t, ('{ip}', 0))\n"
    )
}

/// Sends one message to `to` with smtplib from `ip`; the server's last answer.
fn send_mail(edge: &Edge, ip: &str, to: &str, token: &str) -> Result<String, String> {
    let addr = edge.listeners[0];
    python(&format!(
        "import smtplib\ns = smtplib.SMTP('{}', {}, timeout=15, source_address=('{ip}', 0))\n\
         s.ehlo('client.example.net')\n\
         r = s.sendmail('sender@example.net', ['{to}'], 'Subject: {token}\\r\\n\\r\\n{token}\\r\\n')\n\
         print('refused', r)\ns.quit()\n",
        addr.ip(),
        addr.port()
    ))
    .map_err(|e| e.to_string())
}

/// Connects from `ip` up to `attempts` times, each time sending `payload` at once (before
/// the banner: a pregreet) and reading until the server closes. Prints each session's
/// first and last reply lines.
fn bot(edge: &Edge, ip: &str, payload: &str, attempts: usize) -> String {
    let addr = edge.listeners[0];
    python(&format!(
        "import socket\n\
         for attempt in range({attempts}):\n\
         \x20   s = socket.create_connection(('{}', {}), 10, ('{ip}', 0))\n\
         \x20   s.settimeout(10)\n\
         \x20   s.sendall(b'{payload}')\n\
         \x20   data = b''\n\
         \x20   try:\n\
         \x20       while True:\n\
         \x20           chunk = s.recv(65536)\n\
         \x20           if not chunk: break\n\
         \x20           data += chunk\n\
         \x20   except OSError as e:\n\
         \x20       data += b' ERROR ' + str(e).encode()\n\
         \x20   s.close()\n\
         \x20   lines = data.decode(errors='replace').strip().splitlines()\n\
         \x20   print('session', attempt, lines[0] if lines else '', '|', lines[-1] if lines else '')\n\
         \x20   if 'blocked' in data.decode(errors='replace'): break\n",
        addr.ip(),
        addr.port()
    ))
    .expect("bot script")
}

#[test]
fn smtp_bots_are_refused_then_banned_while_good_clients_deliver() {
    if skip("smtp_bots_are_refused_then_banned_while_good_clients_deliver") {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start_edge(&cluster, &[Listen("smtp", None)], REPUTATION);
    let good = "127.0.0.9";
    send_mail(&edge, good, "user1@example.com", "before").expect("good client before");

    // The spammer talks before the banner ends and pipelines blindly: tarpitted, then
    // refused within its first session; coming back while refused gets it banned.
    let payload = format!(
        "EHLO bot.example\\r\\nMAIL FROM:<spam@bot.example>\\r\\n{}DATA\\r\\n",
        (0..50)
            .map(|i| format!("RCPT TO:<guess{i}@example.com>\\r\\n"))
            .collect::<String>()
    );
    let out = bot(&edge, "127.0.0.66", &payload, 8);
    println!("{out}");
    let sessions: Vec<&str> = out.lines().filter(|l| l.starts_with("session")).collect();
    assert!(
        sessions[0].contains("220-") && sessions[0].contains("421 4.7.0 Too many errors"),
        "first session: banner part, then refused for pregreet + pipelining: {out}"
    );
    let last = sessions.last().expect("sessions");
    assert!(
        last.contains("421 4.7.0 Your address is blocked"),
        "banned: {out}"
    );
    assert!(sessions.len() <= 5, "banned within 5 connections: {out}");
    assert_eq!(
        delivered(&cluster, "user1@example.com"),
        1,
        "nothing from the bot"
    );

    // The same bot from an allowlisted address is scored but never refused.
    let out = bot(&edge, "127.0.0.69", &format!("{payload}QUIT\\r\\n"), 4);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("session")).count(),
        4,
        "{out}"
    );
    assert!(
        !out.contains("Too many errors") && !out.contains("blocked"),
        "allowlisted: {out}"
    );
    let (code, text) = cli(&edge, &["explain", "127.0.0.69"]);
    assert!(
        code == 0 && text.contains("allowlisted") && text.contains("verdict accept"),
        "{text}"
    );

    // A harvester that behaves at the protocol level but guesses mailboxes one by one.
    let harvest = python(&format!(
        "import smtplib\nresults = []\n\
         for attempt in range(6):\n\
         \x20   try:\n\
         \x20       s = smtplib.SMTP('{}', {}, timeout=15, source_address=('127.0.0.68', 0))\n\
         \x20       s.ehlo('harvester.example')\n\
         \x20       s.mail('h@harvester.example')\n\
         \x20       for i in range(20):\n\
         \x20           code, text = s.rcpt('nobody%d@example.com' % i)\n\
         \x20           results.append(code)\n\
         \x20   except (smtplib.SMTPException, OSError) as e:\n\
         \x20       print('ended', attempt, repr(e))\n\
         \x20       if 'blocked' in repr(e): break\n\
         print('codes', sorted(set(results)), len(results))\n",
        edge.listeners[0].ip(),
        edge.listeners[0].port()
    ))
    .expect("harvester");
    println!("{harvest}");
    assert!(harvest.contains("blocked"), "harvester banned: {harvest}");
    let guesses: usize = harvest
        .lines()
        .find_map(|l| l.strip_prefix("codes "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("guess count");
    assert!(
        (10..20).contains(&guesses),
        "the session ends after about 10 unknown mailboxes, long before the 120 tried: {harvest}"
    );

    // Explained: score, verdict, the events that built it; no kernel filter here.
    let (code, text) = cli(&edge, &["explain", "127.0.0.68"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("127.0.0.68: score")
            && text.contains("verdict ban")
            && text.contains("unknown_recipient")
            && text.contains("retry_while_refused")
            && text.contains("kernel: no ban"),
        "{text}"
    );
    for address in ["127.0.0.68", "127.0.0.200"] {
        let (code, xml) = cli(&edge, &["explain", address, "--xml"]);
        assert_eq!(code, 0, "{xml}");
        support::validate_api_xml(&xml);
    }
    let (code, text) = cli(&edge, &["explain", "127.0.0.9"]);
    assert!(code == 0 && text.contains("verdict accept"), "{text}");
    let (code, text) = cli(&edge, &["explain", "not-an-address"]);
    assert!(
        code == 5 && text.contains("invalid_address"),
        "{code} {text}"
    );
    // Forgiven: the harvester's address is served again at once.
    let (code, text) = cli(&edge, &["ctl", "forgive", "127.0.0.68"]);
    assert!(code == 0 && text.contains("forgave 127.0.0.68"), "{text}");
    let (code, text) = cli(&edge, &["explain", "127.0.0.68"]);
    assert!(code == 0 && text.contains("not tracked"), "{text}");
    let (code, text) = cli(&edge, &["ctl", "forgive", "127.0.0.68"]);
    assert_eq!(code, 2, "nothing left to forgive: {text}");
    send_mail(&edge, "127.0.0.68", "user3@example.com", "forgiven").expect("forgiven address");

    // The good client was never affected.
    send_mail(&edge, good, "user1@example.com", "after").expect("good client after");
    assert_eq!(delivered(&cluster, "user1@example.com"), 2);
    assert_eq!(delivered(&cluster, "user3@example.com"), 1);
    assert_eq!(
        sample(
            &edge,
            "protobalance_reputation_bans_total{enforced=\"proxy\"}"
        ),
        2
    );
    for event in [
        "pregreet",
        "pipelining",
        "unknown_recipient",
        "retry_while_refused",
        "clean_session",
    ] {
        assert!(
            sample(
                &edge,
                &format!("protobalance_reputation_events_total{{event=\"{event}\"}}")
            ) >= 1,
            "{event} counted"
        );
    }

    // The ban ends after ban_seconds; the bot's address, now behaving, is served again
    // (tarpitted: it is still suspect until its score decays).
    std::thread::sleep(std::time::Duration::from_millis(3500));
    send_mail(&edge, "127.0.0.66", "user2@example.com", "reformed")
        .expect("a banned address that behaves is accepted after its ban");
    assert_eq!(delivered(&cluster, "user2@example.com"), 1);
}

/// POP3 then IMAP logins with a wrong password from each of `ips` in turn, reconnecting
/// after each closed session, until refused at the door as blocked or `limit` passwords
/// were tried. Prints `<ip> tries <n> blocked <at which try, or None>` per address.
fn guess_passwords(edge: &Edge, ips: &[String], user: &str, limit: usize) -> String {
    let (pop3, imap) = (edge.listeners[0], edge.listeners[1]);
    let ips: Vec<String> = ips.iter().map(|ip| format!("'{ip}'")).collect();
    python(&format!(
        "import poplib, imaplib, socket, time\n_t0 = time.monotonic()\n\
         _orig = socket.create_connection\n\
         for ip in [{}]:\n\
         \x20   socket.create_connection = lambda a, t=None, s=None, ip=ip: _orig(a, t, (ip, 0))\n\
         \x20   tries = 0\n\
         \x20   blocked = None\n\
         \x20   while tries < {limit} and blocked is None:\n\
         \x20       try:\n\
         \x20           if tries % 2 == 0:\n\
         \x20               p = poplib.POP3('{}', {}, timeout=10)\n\
         \x20               while True:\n\
         \x20                   tries += 1\n\
         \x20                   p.user('{user}'); p.pass_('wrong')\n\
         \x20           else:\n\
         \x20               m = imaplib.IMAP4('{}', {}, timeout=10)\n\
         \x20               while True:\n\
         \x20                   tries += 1\n\
         \x20                   m.login('{user}', 'wrong')\n\
         \x20       except Exception as e:\n\
         \x20           if 'blocked' in repr(e): blocked = tries; print('blocked', repr(e))\n\
         \x20   print(ip, 'tries', tries, 'blocked', blocked, time.monotonic() - _t0)\n",
        ips.join(", "),
        pop3.ip(),
        pop3.port(),
        imap.ip(),
        imap.port()
    ))
    .expect("guessing script")
}

fn login(edge: &Edge, ip: &str, user: &str) -> String {
    let pass = protobalance_tests::password_for(user).expect("test user");
    let (pop3, imap) = (edge.listeners[0], edge.listeners[1]);
    python(&format!(
        "{}import poplib, imaplib\n\
         try:\n\
         \x20   p = poplib.POP3('{}', {}, timeout=10); p.user('{user}'); p.pass_('{pass}'); print('pop3', p.stat()); p.quit()\n\
         except Exception as e: print('pop3 failed', repr(e))\n\
         try:\n\
         \x20   m = imaplib.IMAP4('{}', {}, timeout=10); m.login('{user}', '{pass}'); print('imap', m.select('INBOX')[0]); m.logout()\n\
         except Exception as e: print('imap failed', repr(e))\n",
        from(ip),
        pop3.ip(),
        pop3.port(),
        imap.ip(),
        imap.port()
    ))
    .expect("login script")
}

#[test]
fn password_guessing_bans_the_address_and_locks_the_attacked_account() {
    if skip("password_guessing_bans_the_address_and_locks_the_attacked_account") {
        return;
    }
    // Dovecot's own per-client-IP auth penalty (2, 4, 8… s; the edge hands over the
    // client's address) would make the many failed logins here take minutes.
    let ips: Vec<std::net::IpAddr> = (1..=3)
        .map(|i| std::net::IpAddr::from([127, 0, 1, i]))
        .collect();
    let options = BackendOptions {
        users: USERS,
        no_auth_penalty: true,
        ..BackendOptions::default()
    };
    let cluster = DovecotCluster::start_with(&ips, &options).expect("cluster");
    let edge = start_edge(
        &cluster,
        &[Listen("pop3", None), Listen("imap", None)],
        REPUTATION,
    );
    let ok = |out: &str| out.contains("pop3 (0, 0)") && out.contains("imap OK");
    // The victim's owner logs in from home before the attacks.
    let home = "127.0.0.9";
    let out = login(&edge, home, "user5@example.com");
    assert!(ok(&out), "{out}");

    // 200 wrong passwords from one address: banned long before the 200th.
    let out = guess_passwords(&edge, &["127.0.0.67".into()], "user20@example.com", 200);
    println!("{out}");
    let tries: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("127.0.0.67 tries "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("tries");
    assert!(
        out.contains("blocked") && tries < 30,
        "banned after a few dozen at most: {out}"
    );
    let out = login(&edge, "127.0.0.67", "user20@example.com");
    assert!(
        out.contains("pop3 failed") && out.contains("imap failed") && out.contains("blocked"),
        "even the right password is refused from a banned address: {out}"
    );
    // (user20 itself is locked now too: 10 failures lock an account, whoever sent them.)
    assert!(
        ok(&login(&edge, home, "user21@example.com")),
        "other addresses unaffected"
    );

    // 200 wrong passwords for one account from 50 addresses, 4 each: no address is
    // punished, the account is locked.
    let attackers: Vec<String> = (1..=50).map(|i| format!("127.0.3.{i}")).collect();
    let out = guess_passwords(&edge, &attackers, "user5@example.com", 4);
    println!("{out}");
    for ip in &attackers {
        assert!(
            out.contains(&format!("{ip} tries 4 blocked None")),
            "{ip}: four tries, never blocked: {out}"
        );
    }
    let out = login(&edge, "127.0.4.1", "user5@example.com");
    assert!(
        out.contains("pop3 failed") && out.contains("SYS/TEMP") && out.contains("imap failed"),
        "locked account refused from a new address: {out}"
    );
    assert!(
        out.contains("Too many failed logins for this account"),
        "{out}"
    );
    assert!(
        ok(&login(&edge, "127.0.4.1", "user6@example.com")),
        "other accounts fine"
    );
    assert!(
        ok(&login(&edge, home, "user5@example.com")),
        "owner's known address"
    );
    assert!(
        ok(&login(&edge, "127.0.3.7", "user7@example.com")),
        "an attacking address with 4 failures is not banned"
    );
    assert_eq!(
        sample(
            &edge,
            "protobalance_reputation_account_events_total{event=\"locked\"}"
        ),
        2,
        "user20 (by the single guesser) and user5"
    );
    assert!(
        sample(
            &edge,
            "protobalance_reputation_account_events_total{event=\"refused_while_locked\"}"
        ) >= 2
    );
    assert!(
        sample(
            &edge,
            "protobalance_reputation_bans_total{enforced=\"proxy\"}"
        ) >= 1
    );
}

/// A real sending MTA is judged a good client: a Postfix relaying to the edge (which holds
/// its banner back for the pregreet test, splits transactions with `452 4.5.3` and gets
/// PIPELINING-grouped commands) delivers everything and earns no offence, while a bot
/// beside it is banned.
#[test]
fn a_sending_postfix_is_a_good_client_beside_a_banned_bot() {
    let test = "a_sending_postfix_is_a_good_client_beside_a_banned_bot";
    if skip(test) || !protobalance_tests::require_postfix(test) {
        return;
    }
    use protobalance_tests::{PostfixBackend, loopback_ip};
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let edge = start_edge(&cluster, &[Listen("smtp", None)], REPUTATION);
    let sender = PostfixBackend::start_sender(loopback_ip(20).expect("ip"), edge.listeners[0])
        .expect("sender");
    // Recipients on different backends: the edge takes one backend's per transaction.
    let recipients: Vec<String> = (1..=6).map(|n| format!("user{n}@example.com")).collect();
    let list = recipients
        .iter()
        .map(|r| format!("'{r}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let user = "user1@example.com";
    let password = protobalance_tests::password_for(user).expect("password");
    let out = python(&format!(
        "import smtplib\ns = smtplib.SMTP('{}', {}, timeout=10)\ns.ehlo('mua.example.net')\n\
         s.login('{user}', '{password}')\n\
         for i in range(3):\n\
         \x20   print('refused', s.sendmail('{user}', [{list}], 'Subject: relayed-%d\\r\\n\\r\\nx\\r\\n' % i))\n\
         s.quit()\n",
        sender.ip(),
        sender.smtp_port()
    ))
    .expect("inject into the sending Postfix");
    assert!(out.matches("refused {}").count() == 3, "{out}");
    // Meanwhile a bot is banned.
    let bot_out = bot(
        &edge,
        "127.0.0.66",
        "EHLO bot\\r\\nMAIL FROM:<x@bot.example>\\r\\n",
        8,
    );
    assert!(bot_out.contains("blocked"), "{bot_out}");
    sender
        .drain(std::time::Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", sender.log_tail(40)));
    for r in &recipients {
        assert_eq!(delivered(&cluster, r), 3, "{r}");
    }
    // Postfix connects from its own address: nothing held against it.
    let (code, text) = cli(&edge, &["explain", &sender.ip().to_string()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("verdict accept"), "{text}");
    for offence in [
        "pregreet",
        "pipelining",
        "bare_line_ending",
        "protocol_error",
        "unknown_recipient",
        "relay_attempt",
        "retry_while_refused",
    ] {
        assert!(
            !text.contains(offence),
            "Postfix judged for {offence}: {text}"
        );
    }
    assert!(text.contains("clean_session"), "{text}");
}

/// `[reputation]` is reloaded live (`ctl reload`, as SIGHUP): with thresholds too high to
/// judge, a bot goes on unrefused; lowered in the file and reloaded, the same bot's next
/// connections are refused and it is banned — its score so far kept across the reload.
#[test]
fn reputation_thresholds_are_reloaded_live() {
    if skip("reputation_thresholds_are_reloaded_live") {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let lenient = "tarpit_score = 900.0\ntempfail_score = 900.0\nban_score = 900.0\n";
    let edge = start_edge(
        &cluster,
        &[Listen("smtp", None)],
        &REPUTATION.replacen("[api]", &format!("{lenient}[api]"), 1),
    );
    let payload = "EHLO bot.example\\r\\nMAIL FROM:<x@bot.example>\\r\\nQUIT\\r\\n";
    let out = bot(&edge, "127.0.0.66", payload, 3);
    assert!(
        !out.contains("Too many errors") && !out.contains("blocked"),
        "lenient thresholds: {out}"
    );
    let path = edge.dir.path().join("pb.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, text.replace(lenient, "")).expect("config");
    let (code, text) = cli(&edge, &["ctl", "reload"]);
    assert!(code == 0 && text.contains("config reloaded"), "{text}");
    let out = bot(&edge, "127.0.0.66", payload, 6);
    assert!(
        out.contains("blocked"),
        "default thresholds after the reload: {out}"
    );
    let (code, text) = cli(&edge, &["explain", "127.0.0.66"]);
    assert!(
        code == 0 && text.contains("verdict ban") && text.contains("banned for"),
        "the ban is placed, not only answered: {text}"
    );
    send_mail(&edge, "127.0.0.9", "user1@example.com", "still-fine").expect("good client");
}
