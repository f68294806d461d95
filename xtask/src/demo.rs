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
use protobalance_tests::{ChildGuard, DovecotCluster, NetNs, Veth, password_for};

use crate::util::{self, step};

const DEMO_IFACE: &str = "pb-demo0";
const ADMIN: &str = "127.0.0.1:9925";

pub fn run(binary: &Path, users: usize) -> Result<()> {
    if !util::is_root() {
        bail!(
            "the demo attaches XDP and creates a network namespace: run `cargo xtask run` as root"
        );
    }
    step(&format!(
        "starting 3 Dovecot backends (LMTP, POP3, IMAP) with {users} users each"
    ));
    let cluster = DovecotCluster::start(3, users)?;
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
    let config = util::workspace_root().join("examples/demo.toml");
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
    wait_healthy(&mut protobalance)?;
    print_guide(&cluster, &ns);
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
    drop(veth);
    drop(ns);
    drop(cluster);
    println!("demo stopped; backends, namespace and veth removed");
    Ok(())
}

fn wait_healthy(protobalance: &mut ChildGuard) -> Result<()> {
    let admin: SocketAddr = ADMIN.parse()?;
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
    bail!("protobalance did not open its admin listener {ADMIN} within 15 s")
}

fn print_guide(cluster: &DovecotCluster, ns: &NetNs) {
    println!("\nprotobalance demo cluster is up. Backends (real Dovecot):");
    for b in cluster.backends() {
        println!(
            "  {:<4} {}  LMTP :{}  POP3 :{}  IMAP :{}",
            b.name(),
            b.ip(),
            b.lmtp_port(),
            b.pop3_port(),
            b.imap_port()
        );
    }
    let Some(b1) = cluster.backends().first() else {
        return;
    };
    let (ip, lmtp, pop3) = (b1.ip(), b1.lmtp_port(), b1.pop3_port());
    let pass = password_for("user1@example.com").unwrap_or_default();
    let ns = ns.name();
    println!(
        r#"
Users: user1@example.com .. (password: pass<N>, e.g. user1 / {pass}).
Mailbox routing through protobalance's own SMTP/POP3/IMAP listeners arrives with the
directory issue; until then talk to a backend directly:

  deliver:  swaks --protocol LMTP --server {ip}:{lmtp} --to user1@example.com --from demo@example.net
  read:     python3 -c "import poplib; p=poplib.POP3('{ip}',{pop3}); p.user('user1@example.com'); p.pass_('{pass}'); print(p.stat())"

Kernel filter (XDP on {DEMO_IFACE}; 198.51.100.66 is blocklisted):
  allowed:  ip netns exec {ns} python3 -c "import socket; s=socket.socket(); s.bind(('198.51.100.2',0)); s.settimeout(2); print(s.connect_ex(('198.51.100.1',9)))"   # 111: refused at once
  dropped:  ip netns exec {ns} python3 -c "import socket; s=socket.socket(); s.bind(('198.51.100.66',0)); s.settimeout(2); print(s.connect_ex(('198.51.100.1',9)))"  # times out
  metrics:  curl -s http://{ADMIN}/metrics | grep protobalance_xdp

Ctrl-C stops protobalance and the backends and removes the demo network.
"#
    );
}
