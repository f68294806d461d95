//! `cargo xtask run`: the demo cluster — protobalance on embedded defaults in front of three
//! real Dovecot backends, with the XDP filter on a demo veth (never a real NIC).
//!
//! Everything started here is an RAII guard from the test harness: Ctrl-C (or protobalance
//! exiting) stops protobalance, the Dovecot instances, and removes the namespace and veth.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use protobalance_tests::{
    BackendOptions, ChildGuard, DovecotCluster, NetNs, Veth, dovecot_config::Ports, loopback_ip,
    password_for,
};

use crate::util::{self, step};

const DEMO_IFACE: &str = "pb-demo0";
const ADMIN: &str = "127.0.0.1:9925";
/// Node 2's admin listener (`--nodes 2`).
const ADMIN2: &str = "127.0.0.1:9926";
const DEMO_TOKEN: &str = "demo-token-not-secret-0123456789abcdef";

pub fn run(binary: &Path, users: usize, nodes: u8) -> Result<()> {
    if !util::is_root() {
        bail!(
            "the demo attaches XDP and creates a network namespace: run `cargo xtask run` as root"
        );
    }
    step(&format!(
        "starting 3 Dovecot backends on 127.0.1.1-3 (LMTP :24, POP3 :110, IMAP :143), {users} users each"
    ));
    let ips = (1..=3).map(loopback_ip).collect::<Result<Vec<_>>>()?;
    let options = BackendOptions {
        users,
        fixed_ports: Some(Ports {
            lmtp: 24,
            pop3: 110,
            imap: 143,
        }),
        ..BackendOptions::default()
    };
    let cluster = DovecotCluster::start_with(&ips, &options)
        .context("starting the demo backends (are ports 24/110/143 on 127.0.1.1-3 free?)")?;
    let example = util::workspace_root().join("examples/demo.toml");
    let dir = util::workspace_root().join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Two nodes share a PostgreSQL directory; node 1's config is the example's with the
    // store switched, node 2's the same on other ports and without the kernel filter (one
    // XDP program per interface).
    let postgres =
        if nodes == 2 {
            step("starting PostgreSQL for the shared directory (a throw-away cluster in /tmp)");
            Some(protobalance_tests::PostgresServer::start().context(
                "starting PostgreSQL (cargo xtask setup installs the postgresql package)",
            )?)
        } else {
            None
        };
    let config = match &postgres {
        None => {
            provision(binary, &example, &dir, users)?;
            example
        }
        Some(pg) => write_node_configs(&example, &dir, &pg.url())?,
    };
    step(
        "creating the demo network: veth pb-demo0 (198.51.100.1) <-> namespace (198.51.100.2, .66)",
    );
    let _ = util::output(Command::new("ip").args(["link", "del", DEMO_IFACE])); // leftover of a killed demo
    let ns = NetNs::new("demo")?;
    let veth = Veth::new(DEMO_IFACE, &ns, "eth0")?;
    veth.add_host_addr("198.51.100.1/24")?;
    veth.add_ns_addr("198.51.100.2/24")?;
    veth.add_ns_addr("198.51.100.66/24")?;
    veth.up()?;
    step(&format!(
        "starting protobalance --config {}",
        config.display()
    ));
    let (stop_tx, stop_rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the Ctrl-C handler")?;
    let mut protobalance = ChildGuard::spawn(
        Command::new(binary).arg("run").arg("--config").arg(&config),
        "protobalance",
    )?;
    wait_healthy(&mut protobalance, ADMIN)?;
    let mut second = None;
    if postgres.is_some() {
        provision_by_api(binary, &dir, users)?;
        step("starting node 2 (same directory): POP3 :2110, IMAP :2143, SMTP :2025, admin :9926");
        let mut node2 = ChildGuard::spawn(
            Command::new(binary)
                .arg("run")
                .arg("--config")
                .arg(dir.join("node2.toml")),
            "protobalance node 2",
        )?;
        wait_healthy(&mut node2, ADMIN2)?;
        second = Some(node2);
    }
    print_guide(binary, &config, &cluster, &ns);
    if second.is_some() {
        print_two_nodes_guide(binary);
    }
    loop {
        if stop_rx.recv_timeout(Duration::from_millis(500)).is_ok() {
            println!("\nstopping the demo cluster ...");
            break;
        }
        if let Some(status) = protobalance.wait_timeout(Duration::ZERO)? {
            println!("protobalance exited ({status}); stopping the demo cluster");
            break;
        }
    }
    // Terminal Ctrl-C already reached protobalance (same process group); SIGTERM covers
    // a stop from elsewhere. Drain, then the guards remove everything else.
    protobalance_tests::process::signal(protobalance.id(), "TERM");
    let _ = protobalance.wait_timeout(Duration::from_secs(10))?;
    if let Some(mut node2) = second {
        protobalance_tests::process::signal(node2.id(), "TERM");
        let _ = node2.wait_timeout(Duration::from_secs(10))?;
    }
    drop(postgres);
    drop(veth);
    drop(ns);
    drop(cluster);
    println!("demo stopped; backends, namespace and veth removed");
    Ok(())
}

fn wait_healthy(protobalance: &mut ChildGuard, admin_addr: &str) -> Result<()> {
    let admin: SocketAddr = admin_addr.parse()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(status) = protobalance.wait_timeout(Duration::ZERO)? {
            bail!("protobalance exited during start-up ({status}); see its messages above");
        }
        if std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("protobalance did not open its admin listener {admin_addr} within 15 s")
}

/// The two nodes' configs (`node1.toml`, `node2.toml` in `dir`) on the PostgreSQL at
/// `url`; returns node 1's.
fn write_node_configs(example: &Path, dir: &Path, url: &str) -> Result<std::path::PathBuf> {
    let text = std::fs::read_to_string(example)
        .with_context(|| format!("reading {}", example.display()))?;
    let examples = example.parent().context("examples dir")?;
    let node1 = text
        .replace("[directory]\n", "[directory]\nstore = \"postgres\"\n")
        .replace(
            "\"demo-blocklist.txt\"",
            &format!("\"{}\"", examples.join("demo-blocklist.txt").display()),
        )
        + &format!("\n[directory.postgres]\nurl = \"{url}\"\n");
    let xdp_start = node1
        .find("[xdp]")
        .context("demo.toml has an [xdp] section")?;
    let xdp_end = node1[xdp_start..]
        .find("\n# The XML management API")
        .map_or(node1.len(), |i| xdp_start + i);
    let node2 = format!("{}{}", &node1[..xdp_start], &node1[xdp_end..])
        .replace("127.0.0.1:1110", "127.0.0.1:2110")
        .replace("127.0.0.1:1143", "127.0.0.1:2143")
        .replace("127.0.0.1:1025", "127.0.0.1:2025")
        .replace(ADMIN, ADMIN2);
    std::fs::write(dir.join("node1.toml"), node1)?;
    std::fs::write(dir.join("node2.toml"), node2)?;
    Ok(dir.join("node1.toml"))
}

/// Every demo user into the shared directory through node 1's API (`ctl mailbox import`).
fn provision_by_api(binary: &Path, dir: &Path, users: usize) -> Result<()> {
    let list = users_file(dir, users)?;
    step(&format!(
        "provisioning {users} mailboxes through node 1: protobalance ctl mailbox import"
    ));
    util::run(
        Command::new(binary)
            .args([
                "ctl",
                "mailbox",
                "import",
                "--url",
                &format!("http://{ADMIN}"),
            ])
            .arg(&list)
            .env("PROTOBALANCE_TOKEN", DEMO_TOKEN),
    )
}

fn users_file(dir: &Path, users: usize) -> Result<std::path::PathBuf> {
    let list = dir.join("users.csv");
    let lines: String = (1..=users)
        .map(|i| format!("user{i}@example.com\n"))
        .collect();
    std::fs::write(&list, lines)?;
    Ok(list)
}

/// A fresh directory with every demo user apportioned by capacity (1:1:2).
fn provision(binary: &Path, config: &Path, dir: &Path, users: usize) -> Result<()> {
    let list = users_file(dir, users)?;
    step(&format!(
        "provisioning {users} mailboxes: protobalance directory import"
    ));
    util::run(
        Command::new(binary)
            .args(["directory", "import", "--config"])
            .arg(config)
            .arg(&list),
    )
}

fn owner_of(binary: &Path, config: &Path, user: &str) -> Option<String> {
    let out = util::output(
        Command::new(binary)
            .args(["directory", "lookup", "--config"])
            .arg(config)
            .arg(user),
    )?;
    out.split_whitespace().nth(2).map(str::to_owned)
}

fn print_guide(binary: &Path, config: &Path, cluster: &DovecotCluster, ns: &NetNs) {
    println!("\nprotobalance demo cluster is up. Backends (real Dovecot):");
    for b in cluster.backends() {
        println!(
            "  {:<9} {}  LMTP :{}  POP3 :{}  IMAP :{}",
            b.name(),
            b.ip(),
            b.lmtp_port(),
            b.pop3_port(),
            b.imap_port()
        );
    }
    let user = "user1@example.com";
    let pass = password_for(user).unwrap_or_default();
    let owner = owner_of(binary, config, user).unwrap_or_else(|| "backend1".into());
    let lmtp = cluster
        .backends()
        .iter()
        .find(|b| b.name() == owner)
        .map_or_else(|| "127.0.1.1:24".to_owned(), |b| b.lmtp_addr().to_string());
    let ns = ns.name();
    let bin = binary.display();
    let cfg = config.display();
    println!(
        r#"
Mailboxes: user1..userN@example.com (password pass<N>), apportioned 1:1:2 over the backends;
new example.com mailboxes are auto-provisioned on first login.

  where:    {bin} directory lookup --config {cfg} {user}     # -> {owner}
  deliver:  swaks --server 127.0.0.1:1025 --to {user} --from demo@example.net
            (SMTP through protobalance: routed by recipient to {owner}'s LMTP;
             direct to the backend: swaks --protocol LMTP --server {lmtp} --to {user})
  read:     python3 -c "import poplib; p=poplib.POP3('127.0.0.1',1110); p.user('{user}'); p.pass_('{pass}'); print(p.stat())"
            python3 -c "import imaplib; m=imaplib.IMAP4('127.0.0.1',1143); m.login('{user}','{pass}'); print(m.select('INBOX'))"
            (POP3 and IMAP through protobalance on 127.0.0.1:1110 / :1143: the login lands on
             {owner}, where the mail is)
  backends: {bin} directory backends --config {cfg}
  API:      PROTOBALANCE_TOKEN=demo-token-not-secret-0123456789abcdef {bin} ctl backend ls
            curl -s -H 'Authorization: Bearer demo-token-not-secret-0123456789abcdef' http://{ADMIN}/api/v1/mailboxes?limit=5

Kernel filter (XDP on {DEMO_IFACE}; 198.51.100.66 is blocklisted):
  allowed:  ip netns exec {ns} python3 -c "import socket; s=socket.socket(); s.bind(('198.51.100.2',0)); s.settimeout(2); print(s.connect_ex(('198.51.100.1',9)))"   # 111: refused at once
  dropped:  ip netns exec {ns} python3 -c "import socket; s=socket.socket(); s.bind(('198.51.100.66',0)); s.settimeout(2); print(s.connect_ex(('198.51.100.1',9)))"  # 11: times out
  metrics:  curl -s http://{ADMIN}/metrics | grep -E 'protobalance_(xdp|sessions|logins|backend_up)'

Ctrl-C stops protobalance and the backends and removes the demo network.
"#
    );
}

fn print_two_nodes_guide(binary: &Path) {
    let bin = binary.display();
    println!(
        r#"Two nodes share one PostgreSQL directory (target/demo/node1.toml, node2.toml):
  node 2:   POP3 127.0.0.1:2110, IMAP :2143, SMTP :2025, admin {ADMIN2} (no kernel filter)
  try:      swaks --server 127.0.0.1:2025 --to user1@example.com --from demo@example.net
            then read it through node 1 (POP3 :1110): both nodes route user1 to its owner
            PROTOBALANCE_TOKEN={DEMO_TOKEN} {bin} ctl mailbox rm user2@example.com --url http://{ADMIN}
            curl -s http://{ADMIN2}/metrics | grep protobalance_directory_   # node 2 heard it
"#
    );
}
