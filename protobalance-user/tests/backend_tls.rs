//! TLS towards backends: Dovecot with implicit-TLS POP3S/IMAPS listeners and a certificate
//! from a CA made here; the edge verifies it against `tls_ca` and `tls_name`. Logins
//! through the edge land on the owner over TLS (Dovecot logs `TLS`); a backend whose
//! certificate does not verify is treated as down (temporary failure), never as a
//! credential error.

mod support;

use std::path::Path;

use protobalance_tests::{
    BackendOptions, DovecotBackend, DovecotCluster, dovecot::loopback_ip, password_for, python,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use support::{Listen, USERS, start_edge_with};

const BACKEND_NAME: &str = "backends.example.test";

/// CA (ca.pem), another CA (wrong-ca.pem) and a backend certificate signed by the first.
fn make_certificates(dir: &Path) {
    let ca = |cn: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca")
    };
    let (good, wrong) = (ca("backend CA"), ca("some other CA"));
    std::fs::write(dir.join("ca.pem"), good.pem()).expect("write");
    std::fs::write(dir.join("wrong-ca.pem"), wrong.pem()).expect("write");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![BACKEND_NAME.to_owned()]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, BACKEND_NAME);
    let cert = params.signed_by(&key, &good).expect("sign");
    std::fs::write(dir.join("backend.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("backend.key"), key.serialize_pem()).expect("write");
}

fn tls_section(b: &DovecotBackend, ca: &Path) -> String {
    format!(
        "[[backend]]\nname = \"{}\"\naddress = \"{}\"\npop3_port = {}\nimap_port = {}\nlmtp_port = {}\n\
         tls = true\ntls_ca = \"{}\"\ntls_name = \"{BACKEND_NAME}\"\n",
        b.name(),
        b.ip(),
        b.pop3s_port(),
        b.imaps_port(),
        b.lmtp_port(),
        ca.display()
    )
}

fn cluster(certs: &Path) -> DovecotCluster {
    let ips: Vec<_> = (1..=3).map(|n| loopback_ip(n).expect("ip")).collect();
    let options = BackendOptions {
        users: USERS,
        tls: Some((certs.join("backend.pem"), certs.join("backend.key"))),
        ..BackendOptions::default()
    };
    DovecotCluster::start_with(&ips, &options).expect("cluster")
}

#[test]
fn logins_reach_the_owner_over_verified_tls() {
    if support::skip("backend_tls") {
        return;
    }
    let certs = tempfile::tempdir().expect("tempdir");
    make_certificates(certs.path());
    let cluster = cluster(certs.path());
    let ca = certs.path().join("ca.pem");
    let listeners = [Listen("pop3", None), Listen("imap", None)];
    let edge = start_edge_with(&cluster, &listeners, "", |b| tls_section(b, &ca));
    let logins = support::login_pop3_and_imap(&cluster, &edge, "user21@example.com");
    for service in ["pop3-login", "imap-login"] {
        assert!(
            logins
                .iter()
                .any(|l| l.contains(service) && l.contains(", TLS")),
            "{service}: the backend saw a TLS login: {logins:?}"
        );
    }
}

#[test]
fn a_backend_certificate_that_does_not_verify_is_a_temporary_failure() {
    if support::skip("backend_tls") {
        return;
    }
    let certs = tempfile::tempdir().expect("tempdir");
    make_certificates(certs.path());
    let cluster = cluster(certs.path());
    let wrong = certs.path().join("wrong-ca.pem");
    let edge = start_edge_with(&cluster, &[Listen("pop3", None)], "", |b| {
        tls_section(b, &wrong)
    });
    let user = "user22@example.com";
    let pass = password_for(user).expect("test user");
    let err = python(&format!(
        "import poplib\np = poplib.POP3('{}', {}, timeout=10); p.user('{user}'); p.pass_('{pass}')\n",
        edge.listeners[0].ip(),
        edge.listeners[0].port()
    ))
    .expect_err("unverifiable backend");
    assert!(err.to_string().contains("-ERR [SYS/TEMP]"), "{err}");
}

#[test]
fn backend_tls_config_errors_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |text: &str| support::check_config(dir.path(), text);
    let base = "[[backend]]\nname = \"b1\"\naddress = \"127.0.1.1\"\ntls = true\n";
    let (ok, err) = check(base);
    assert!(!ok && err.contains("`backend[0].tls_ca`"), "{err}");
    let (ok, err) = check(&format!("{base}tls_ca = \"nope.pem\"\n"));
    assert!(
        !ok && err.contains("`backend[0].tls_ca`") && err.contains("nope.pem"),
        "{err}"
    );
    std::fs::write(dir.path().join("ca.pem"), "").expect("write");
    let (ok, err) = check(&format!(
        "{base}tls_ca = \"ca.pem\"\ntls_name = \"not a name\"\n"
    ));
    assert!(!ok && err.contains("`backend[0].tls"), "{err}");
}
