//! Live upgrade: SIGUSR2 makes protobalance start its binary again with its listening
//! sockets handed over; the new process serves on them, the old one drains and exits. A
//! client loop connecting to the POP3 listener the whole time must never be refused, and
//! afterwards the new process serves logins and the admin listener.

use std::time::Duration;

use protobalance_tests::{DovecotCluster, password_for, python, user_name};

mod support;

use support::{Listen, metrics, running, start_edge, upgrade_in_place};

#[test]
fn sigusr2_replaces_the_process_without_refusing_a_connection() {
    let test = "sigusr2_replaces_the_process_without_refusing_a_connection";
    if support::skip(test) {
        return;
    }
    let cluster = DovecotCluster::start(1, 20).expect("cluster");
    let edge = start_edge(&cluster, &[Listen("pop3", None)], "");
    let old = edge.pid();
    let pop3 = edge.listeners[0];
    let probe = format!(
        "import socket, time\nok = failed = 0\nerrors = []\nend = time.time() + 6\n\
         while time.time() < end:\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('{}', {}), timeout=5)\n\
         \x20       greeting = s.makefile('rb').readline()\n\
         \x20       s.sendall(b'QUIT\\r\\n'); s.close()\n\
         \x20       if greeting.startswith(b'+OK'):\n\
         \x20           ok += 1\n\
         \x20       else:\n\
         \x20           failed += 1; errors.append(repr(greeting))\n\
         \x20   except Exception as e:\n\
         \x20       failed += 1; errors.append(repr(e))\n\
         \x20   time.sleep(0.005)\n\
         print(ok, failed, errors[:3])\n",
        pop3.ip(),
        pop3.port()
    );
    let (result, successor) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| python(&probe).expect("prober"));
        std::thread::sleep(Duration::from_secs(1));
        let successor = upgrade_in_place(&edge, old);
        (prober.join().expect("prober thread"), successor)
    });
    assert!(running(successor.0), "the successor serves");
    let mut fields = result.splitn(3, ' ');
    let ok: u32 = fields
        .next()
        .and_then(|n| n.parse().ok())
        .expect("ok count");
    let failed: u32 = fields
        .next()
        .and_then(|n| n.parse().ok())
        .expect("failed count");
    assert_eq!(
        failed, 0,
        "connections refused or broken during the upgrade: {result}"
    );
    assert!(ok > 200, "the prober ran through the upgrade: {result}");

    // The successor serves logins on the same port, and the admin listener.
    let user = user_name(2);
    let password = password_for(&user).expect("password");
    let out = python(&format!(
        "import poplib\np = poplib.POP3('{}', {}, timeout=10)\np.user('{user}')\n\
         print(p.pass_('{password}'))\np.quit()\n",
        pop3.ip(),
        pop3.port()
    ))
    .expect("poplib");
    assert!(out.contains("+OK"), "{out}");
    assert!(metrics(&edge).contains("protobalance_build_info"));
}
