//! PROXY protocol v2 towards backends: Dovecot listeners with `haproxy = yes` accept only
//! connections that start with the header, so logins through the edge (and its health
//! checks, which send a LOCAL header) working at all prove the header; Dovecot's log
//! shows the client's address.

mod support;

use protobalance_tests::{BackendOptions, DovecotCluster, dovecot::loopback_ip};
use support::{CLIENT_IP, Listen, USERS, backend_section, metric_line, start_edge_with};

#[test]
fn logins_reach_haproxy_listeners_with_the_client_address() {
    if support::skip("proxy_protocol") {
        return;
    }
    let ips: Vec<_> = (1..=3).map(|n| loopback_ip(n).expect("ip")).collect();
    let options = BackendOptions {
        users: USERS,
        haproxy: true,
        ..BackendOptions::default()
    };
    let cluster = DovecotCluster::start_with(&ips, &options).expect("cluster");
    let listeners = [Listen("pop3", None), Listen("imap", None)];
    let edge = start_edge_with(&cluster, &listeners, "", |b| {
        backend_section(b, "proxy_protocol = true")
    });
    for service in ["pop3", "imap", "lmtp"] {
        for b in cluster.backends() {
            let name = format!("backend=\"{}\"", b.name());
            let line = metric_line(
                &edge,
                &[
                    "protobalance_backend_checks_total",
                    &name,
                    &format!("service=\"{service}\""),
                    "result=\"ok\"",
                ],
            );
            assert!(
                !line.ends_with(" 0"),
                "health checks pass through the PROXY header: {line}"
            );
        }
    }
    for b in cluster.backends() {
        let up = format!(
            "protobalance_backend_up{{backend=\"{}\",service=\"lmtp\"}} 1",
            b.name()
        );
        assert!(
            support::metrics(&edge).contains(&up),
            "LMTP gets no PROXY header, its checks keep passing: {up}"
        );
    }
    let logins = support::login_pop3_and_imap(&cluster, &edge, "user11@example.com");
    for service in ["pop3-login", "imap-login"] {
        assert!(
            logins
                .iter()
                .any(|l| l.contains(service) && l.contains(&format!("rip={CLIENT_IP}"))),
            "{service} logged the client address: {logins:?}"
        );
    }
}
