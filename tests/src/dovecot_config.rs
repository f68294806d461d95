//! What a test Dovecot instance looks like on disk: its config file, its passwd-file of
//! test users and the unprivileged account that owns the mail. The file is complete on
//! its own (no `!include` of /etc/dovecot), so the packaged configuration is never read.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Domain of every test user.
pub const TEST_DOMAIN: &str = "example.com";

/// Login name of test user `i` (1-based): `user<i>@example.com`.
pub fn user_name(i: usize) -> String {
    format!("user{i}@{TEST_DOMAIN}")
}

/// The password scheme of the test passwd-file: `user<i>@example.com` has password
/// `pass<i>`. `None` for names that are not test users.
pub fn password_for(user: &str) -> Option<String> {
    let local = user.strip_suffix(TEST_DOMAIN)?.strip_suffix('@')?;
    let index = local.strip_prefix("user")?;
    let valid = !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit());
    valid.then(|| format!("pass{index}"))
}

/// Writes `users` lines of `user<i>@example.com:pass<i>:<uid>:<gid>::::` (passdb scheme
/// PLAIN; home comes from the userdb `default_fields`). The uid field must be in the
/// file: a passwd-file line without it is "missing userdb info" even when
/// `default_fields` supplies one.
pub fn write_users_file(path: &Path, users: usize, owner: MailOwner) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for i in 1..=users {
        writeln!(
            out,
            "{}:pass{i}:{}:{}::::",
            user_name(i),
            owner.uid,
            owner.gid
        )?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// The unprivileged account mail processes run as (never root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailOwner {
    pub uid: u32,
    pub gid: u32,
}

impl MailOwner {
    /// `mail` (uid 8 on Debian), else `dovecot`, looked up in /etc/passwd.
    pub fn lookup() -> Result<Self> {
        let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
        for wanted in ["mail", "dovecot"] {
            if let Some(owner) = passwd
                .lines()
                .find_map(|line| parse_passwd_line(line, wanted))
            {
                return Ok(owner);
            }
        }
        bail!("neither `mail` nor `dovecot` exists in /etc/passwd; install dovecot-core")
    }
}

fn parse_passwd_line(line: &str, wanted: &str) -> Option<MailOwner> {
    let mut fields = line.split(':');
    if fields.next()? != wanted {
        return None;
    }
    let uid = fields.nth(1)?.parse().ok()?;
    let gid = fields.next()?.parse().ok()?;
    (uid != 0).then_some(MailOwner { uid, gid })
}

/// Ports one instance listens on (all on its single IP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub lmtp: u16,
    pub pop3: u16,
    pub imap: u16,
}

/// Everything that varies between instances.
#[derive(Debug, Clone)]
pub struct InstanceSpec<'a> {
    pub name: &'a str,
    pub dir: &'a Path,
    pub ip: IpAddr,
    pub ports: Ports,
    pub owner: MailOwner,
    /// Networks besides loopback allowed to send XCLIENT / ID x-originating-ip / PROXY.
    pub trusted_networks: &'a [String],
    /// POP3 and IMAP listeners expect a PROXY protocol header (`haproxy = yes`).
    pub haproxy: bool,
    /// Implicit-TLS POP3S/IMAPS listeners with this certificate.
    pub tls: Option<TlsListeners<'a>>,
    /// An auth inet listener (Dovecot SASL for Postfix) on this port.
    pub auth_port: Option<u16>,
    /// Turn off the per-IP auth penalty (also done with `auth_port`).
    pub no_auth_penalty: bool,
}

/// A certificate for Dovecot's pop3s/imaps listeners and their ports.
#[derive(Debug, Clone, Copy)]
pub struct TlsListeners<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub pop3s: u16,
    pub imaps: u16,
}

/// Renders the complete dovecot.conf for one instance.
pub fn render_config(spec: &InstanceSpec<'_>) -> Result<String> {
    let mut conf = String::new();
    write_core(&mut conf, spec)?;
    write_auth(&mut conf, spec)?;
    write_services(
        &mut conf,
        spec.ports,
        spec.haproxy,
        spec.tls.map_or((0, 0), |t| (t.pop3s, t.imaps)),
    )?;
    if let Some(port) = spec.auth_port {
        write_auth_listener(&mut conf, spec.ip, port)?;
    }
    if spec.auth_port.is_some() || spec.no_auth_penalty {
        write_no_auth_penalty(&mut conf)?;
    }
    Ok(conf)
}

fn write_core(conf: &mut String, spec: &InstanceSpec<'_>) -> Result<()> {
    let dir = spec.dir.display();
    let mut trusted = String::from("127.0.0.0/8 ::1");
    for net in spec.trusted_networks {
        write!(trusted, " {net}")?;
    }
    let MailOwner { uid, gid } = spec.owner;
    writeln!(
        conf,
        "# Generated by protobalance-tests for test backend {name}.
instance_name = pbt-{name}-{pid}
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = imap pop3 lmtp
listen = {ip}
{ssl}
login_trusted_networks = {trusted}
haproxy_trusted_networks = {trusted}
mail_location = maildir:~/Maildir
first_valid_uid = {uid}
first_valid_gid = {gid}
verbose_proctitle = yes
protocol imap {{
  mail_max_userip_connections = 1000
}}
protocol pop3 {{
  mail_max_userip_connections = 1000
}}",
        name = spec.name,
        pid = std::process::id(),
        ip = spec.ip,
        ssl = match spec.tls {
            Some(t) => format!(
                "ssl = yes\nssl_cert = <{}\nssl_key = <{}",
                t.cert.display(),
                t.key.display()
            ),
            None => "ssl = no".to_owned(),
        },
    )?;
    Ok(())
}

fn write_auth(conf: &mut String, spec: &InstanceSpec<'_>) -> Result<()> {
    let dir = spec.dir.display();
    writeln!(
        conf,
        "disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Tests provoke failures on purpose; the default 2 s delay would only slow them down.
auth_failure_delay = 0
# Master users (`user@example.com*admin`, password in {dir}/masters): what a mailbox
# move logs in with to read the old copy and write the new one.
auth_master_user_separator = *
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Lu {dir}/masters
  master = yes
  pass = yes
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Lu {dir}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {dir}/users
  default_fields = home={dir}/mail/%Ld/%Ln
}}"
    )?;
    Ok(())
}

/// Login services stay resident (`service_count = 0`, `process_min_avail`) so many short
/// sessions measure the proxy, not Dovecot forking; TLS listeners only with a certificate
/// (port 0 disables them).
fn write_services(
    conf: &mut String,
    ports: Ports,
    haproxy: bool,
    (pop3s, imaps): (u16, u16),
) -> Result<()> {
    let Ports { lmtp, pop3, imap } = ports;
    let haproxy = if haproxy { "yes" } else { "no" };
    writeln!(
        conf,
        "service imap-login {{
  inet_listener imap {{
    port = {imap}
    haproxy = {haproxy}
  }}
  inet_listener imaps {{
    port = {imaps}
  }}
  service_count = 0
  process_min_avail = 2
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
    haproxy = {haproxy}
  }}
  inet_listener pop3s {{
    port = {pop3s}
  }}
  service_count = 0
  process_min_avail = 2
}}
service imap {{
  process_limit = 1000
}}
service pop3 {{
  process_limit = 1000
}}
service lmtp {{
  inet_listener lmtp {{
    port = {lmtp}
  }}
}}"
    )?;
    Ok(())
}

/// Dovecot SASL over TCP for Postfix (`smtpd_sasl_type = dovecot`,
/// `smtpd_sasl_path = inet:<ip>:<port>`). Any listener name other than `*-master`,
/// `*-userdb` and `*-login` speaks the auth *client* protocol, which is what Postfix uses.
///
/// With it the auth penalty is turned off too ([`write_no_auth_penalty`], so the auth
/// process skips it): Postfix reports every SMTP client of a test as 127.0.0.1, and after
/// one failed AUTH the penalty would delay that address's next attempts by 2, 4, 8… s.
/// This is the SASL counterpart of `auth_failure_delay = 0`.
fn write_auth_listener(conf: &mut String, ip: IpAddr, port: u16) -> Result<()> {
    writeln!(
        conf,
        "service auth {{
  inet_listener sasl {{
    address = {ip}
    port = {port}
  }}
}}"
    )?;
    Ok(())
}

/// No `anvil-auth-penalty` socket, so the auth process skips the penalty.
fn write_no_auth_penalty(conf: &mut String) -> Result<()> {
    writeln!(
        conf,
        "service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}"
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_scheme() {
        assert_eq!(
            password_for("user42@example.com").as_deref(),
            Some("pass42")
        );
        assert_eq!(password_for(&user_name(7)).as_deref(), Some("pass7"));
        assert_eq!(password_for("user@example.com"), None);
        assert_eq!(password_for("user1@example.org"), None);
        assert_eq!(password_for("admin1@example.com"), None);
    }

    #[test]
    fn users_file_is_cheap_for_many_users() -> Result<()> {
        let dir = crate::test_dir::TestDir::new("users-file")?;
        let path = dir.path().join("users");
        let started = std::time::Instant::now();
        write_users_file(&path, 100_000, MailOwner { uid: 8, gid: 8 })?;
        let elapsed = started.elapsed();
        let text = std::fs::read_to_string(&path)?;
        assert_eq!(text.lines().count(), 100_000);
        assert_eq!(
            text.lines().last(),
            Some("user100000@example.com:pass100000:8:8::::")
        );
        assert!(elapsed.as_secs() < 2, "100k users took {elapsed:?}");
        Ok(())
    }

    #[test]
    fn auth_listener_only_when_asked_for() -> Result<()> {
        let dir = Path::new("/nonexistent");
        let mut spec = InstanceSpec {
            name: "b1",
            dir,
            ip: "127.0.1.9".parse()?,
            ports: Ports {
                lmtp: 1,
                pop3: 2,
                imap: 3,
            },
            owner: MailOwner { uid: 8, gid: 8 },
            trusted_networks: &[],
            haproxy: false,
            tls: None,
            auth_port: None,
            no_auth_penalty: false,
        };
        let conf = render_config(&spec)?;
        assert!(!conf.contains("service auth") && !conf.contains("anvil"));
        spec.auth_port = Some(4);
        let conf = render_config(&spec)?;
        assert!(conf.contains("unix_listener anvil-auth-penalty {\n    mode = 0\n"));
        assert!(conf.contains(
            "service auth {\n  inet_listener sasl {\n    address = 127.0.1.9\n    port = 4\n"
        ));
        Ok(())
    }

    #[test]
    fn passwd_line_parsing() {
        let line = "mail:x:8:8:mail:/var/mail:/usr/sbin/nologin";
        assert_eq!(
            parse_passwd_line(line, "mail"),
            Some(MailOwner { uid: 8, gid: 8 })
        );
        assert_eq!(parse_passwd_line(line, "dovecot"), None);
        assert_eq!(parse_passwd_line("root:x:0:0::/root:/bin/sh", "root"), None);
    }
}
