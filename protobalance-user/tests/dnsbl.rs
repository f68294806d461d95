//! DNSBL/DNSWL end to end: a real DNS server (dnsmasq) serves test block- and allowlists,
//! protobalance asks them for every inbound SMTP client, and real clients (smtplib) from
//! listed and unlisted loopback addresses deliver to real Dovecot backends — or are refused
//! with `554 5.7.1` when the weights of the lists naming them reach the threshold. With the
//! DNS server stopped, mail still flows (and cached listings still count).

use std::net::IpAddr;

use protobalance_tests::{DnsServer, DovecotCluster, python, require_dnsmasq};

mod support;

use support::{Edge, Listen, USERS, delivered, sample, start_edge};

const TOKEN: &str = "dnsbl-test-token-0123456789abcdef";

fn skip(test: &str) -> bool {
    support::skip(test) || !require_dnsmasq(test)
}

/// Tries to send one message to `to` from `ip`: `Ok` with smtplib's output, or `Err`
/// with the exception.
fn send(edge: &Edge, ip: &str, to: &str) -> Result<String, String> {
    let addr = edge.listeners[0];
    let out = python(&format!(
        "import smtplib, time\nt = time.monotonic()\n\
         try:\n\
         \x20   s = smtplib.SMTP('{}', {}, timeout=15, source_address=('{ip}', 0))\n\
         \x20   s.ehlo('client.example.net')\n\
         \x20   print('refused', s.sendmail('a@example.net', ['{to}'], 'Subject: t\\r\\n\\r\\nt\\r\\n'))\n\
         \x20   s.quit()\n\
         except Exception as e:\n\
         \x20   print('ERROR', repr(e))\n\
         print('seconds', time.monotonic() - t)\n",
        addr.ip(),
        addr.port()
    ))
    .expect("smtplib script");
    if out.contains("ERROR") {
        Err(out)
    } else {
        Ok(out)
    }
}

fn record(client: &str, zone: &str, answer: &str) -> (String, IpAddr) {
    let octets: Vec<&str> = client.split('.').rev().collect();
    (
        format!("{}.{zone}", octets.join(".")),
        answer.parse().expect("answer"),
    )
}

#[test]
fn listed_clients_are_refused_or_scored_by_weight_and_dns_failure_never_blocks_mail() {
    let test = "listed_clients_are_refused_or_scored_by_weight_and_dns_failure_never_blocks_mail";
    if skip(test) {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let records = [
        record("127.0.0.70", "bl.test", "127.0.0.2"),
        record("127.0.0.71", "small.test", "127.0.0.2"),
        record("127.0.0.72", "bl.test", "127.0.0.2"),
        record("127.0.0.72", "wl.test", "127.0.0.2"),
        // Listed, but with an answer the site's `answers` do not count.
        record("127.0.0.74", "bl.test", "127.0.0.10"),
        record("127.0.0.75", "bl.test", "127.0.0.2"),
    ];
    let mut dns = DnsServer::start(
        IpAddr::from([127, 0, 5, 53]),
        &["bl.test", "small.test", "wl.test"],
        &records,
        300,
    )
    .expect("dnsmasq");
    let extra = format!(
        "[reputation]\n\
         [dnsbl]\nthreshold = 3.0\ntimeout_ms = 500\nnameservers = [\"{}\"]\n\
         [[dnsbl.site]]\nzone = \"bl.test\"\nweight = 3.0\nanswers = [\"127.0.0.2\"]\n\
         [[dnsbl.site]]\nzone = \"small.test\"\nweight = 1.0\n\
         [[dnsbl.site]]\nzone = \"wl.test.\"\nweight = -5.0\n\
         [api]\n[[api.token]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\naccess = \"read-write\"\n",
        dns.addr()
    );
    let edge = start_edge(&cluster, &[Listen("smtp", None)], &extra);

    send(&edge, "127.0.0.9", "user1@example.com").expect("unlisted client");
    let refused = send(&edge, "127.0.0.70", "user1@example.com").expect_err("listed client");
    assert!(
        refused.contains("554") && refused.contains("blocked using bl.test"),
        "{refused}"
    );
    send(&edge, "127.0.0.71", "user1@example.com").expect("below the threshold");
    send(&edge, "127.0.0.72", "user1@example.com").expect("the allowlist outweighs");
    send(&edge, "127.0.0.74", "user1@example.com").expect("an answer not counted");
    assert_eq!(delivered(&cluster, "user1@example.com"), 4);
    assert!(
        sample(
            &edge,
            "protobalance_dnsbl_lookups_total{result=\"listed\",zone=\"bl.test\"}"
        ) >= 2
    );
    assert!(
        sample(
            &edge,
            "protobalance_dnsbl_lookups_total{result=\"not_listed\",zone=\"bl.test\"}"
        ) >= 3
    );

    // The listing below the threshold is scored all the same.
    let (code, text) = support::cli(&edge, TOKEN, &["explain", "127.0.0.71"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("score 1.00") && text.contains("dnsbl"),
        "{text}"
    );

    // The lists are reloaded live (`ctl reload`, as SIGHUP): bl.test at weight 1 no longer
    // refuses on its own; back at 3 it does again.
    let path = edge.dir.path().join("pb.toml");
    let original = std::fs::read_to_string(&path).expect("config");
    assert!(
        send(&edge, "127.0.0.75", "user1@example.com").is_err(),
        "listed"
    );
    std::fs::write(&path, original.replace("weight = 3.0", "weight = 1.0")).expect("config");
    let reload = |what: &str| {
        let (code, text) = support::cli(&edge, TOKEN, &["ctl", "reload"]);
        assert_eq!(code, 0, "{what}: {text}");
    };
    reload("lowered");
    send(&edge, "127.0.0.75", "user1@example.com").expect("weight 1 after the reload");
    std::fs::write(&path, &original).expect("config");
    reload("restored");
    let refused = send(&edge, "127.0.0.75", "user1@example.com").expect_err("weight 3 again");
    assert!(refused.contains("blocked using bl.test"), "{refused}");
    assert_eq!(delivered(&cluster, "user1@example.com"), 5);
    // A reload starts a new resolver with an empty cache: this looks .70 up again, so the
    // cache holds it below.
    send(&edge, "127.0.0.70", "user1@example.com").expect_err("listed");

    // DNS down: an unseen client is served after at most the timeout; the cached listing
    // still refuses the listed one.
    dns.stop();
    let out = send(&edge, "127.0.0.73", "user1@example.com").expect("DNS down: mail flows");
    let seconds: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("seconds "))
        .and_then(|s| s.parse().ok())
        .expect("seconds");
    println!("unseen client with DNS down took {seconds:.2} s");
    send(&edge, "127.0.0.9", "user1@example.com").expect("DNS down: mail flows");
    assert_eq!(delivered(&cluster, "user1@example.com"), 7);
    let failed = sample(
        &edge,
        "protobalance_dnsbl_lookups_total{result=\"error\",zone=\"bl.test\"}",
    ) + sample(
        &edge,
        "protobalance_dnsbl_lookups_total{result=\"timeout\",zone=\"bl.test\"}",
    );
    assert!(failed >= 1, "failed lookups counted");
    let refused = send(&edge, "127.0.0.70", "user1@example.com").expect_err("cached listing");
    assert!(refused.contains("blocked using bl.test"), "{refused}");
}
