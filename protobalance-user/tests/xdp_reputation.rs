//! The proxy judges, the kernel enforces: protobalance with its XDP filter on the host end
//! of a veth into a namespace this test creates, an SMTP listener on that veth, and real
//! Dovecot LMTP backends on loopback. A scripted bot inside the namespace (pregreets,
//! pipelines blindly, guesses recipients) is banned by the reputation engine; its next TCP
//! connect is dropped by XDP, while a real client (smtplib) from another address of the
//! same namespace delivers throughout. `explain` shows the kernel ban; `forgive` lifts it.

use std::net::{IpAddr, SocketAddr};

use protobalance_tests::{DovecotCluster, NetNs, TestSubnet, Veth, netns, require_root};

mod support;

use support::{Edge, Listen, USERS, backend_section, delivered, sample, start_edge_on};

const TOKEN: &str = "xdp-reputation-token-0123456789abcdef";

/// The namespace with a good client address and a bot address, both routed to the host.
struct Net {
    ns: NetNs,
    veth: Veth,
    subnet: TestSubnet,
    bot: std::net::Ipv4Addr,
}

impl Net {
    fn new() -> Self {
        let ns = NetNs::new("xrep").expect("namespace");
        let veth = Veth::with_unique_name(&ns, "eth0").expect("veth");
        // Slots far from other tests' (which count up from 0).
        let subnet = TestSubnet::slot(120).expect("subnet");
        subnet.assign(&veth).expect("addresses");
        veth.up().expect("link up");
        let bot = TestSubnet::slot(121).expect("subnet").ns_v4;
        veth.add_ns_addr(&format!("{bot}/32")).expect("bot address");
        netns::ip(&[
            "route",
            "add",
            &format!("{bot}/32"),
            "dev",
            veth.host_ifname(),
        ])
        .expect("route");
        Self {
            ns,
            veth,
            subnet,
            bot,
        }
    }

    /// True when a TCP connect from `src` to `dst` completes within 1.5 s.
    fn connects(&self, src: IpAddr, dst: SocketAddr) -> bool {
        let script = format!(
            "import socket\ns=socket.socket()\ns.bind(('{src}',0))\ns.settimeout(1.5)\n\
             print(s.connect_ex(('{}',{})))",
            dst.ip(),
            dst.port()
        );
        self.ns.python(&script).expect("probe").trim() == "0"
    }

    /// One message to `to` with smtplib from the namespace's good address.
    fn send(&self, edge: &Edge, to: &str, token: &str) {
        let addr = edge.listeners[0];
        let out = self
            .ns
            .python(&format!(
                "import smtplib\ns = smtplib.SMTP('{}', {}, timeout=15, source_address=('{}', 0))\n\
                 s.ehlo('good.example.net')\n\
                 print(s.sendmail('a@example.net', ['{to}'], 'Subject: {token}\\r\\n\\r\\n{token}\\r\\n'))\n\
                 s.quit()\n",
                addr.ip(),
                addr.port(),
                self.subnet.ns_v4
            ))
            .expect("smtplib from the namespace");
        assert!(out.contains("{}"), "accepted: {out}");
    }
}

fn cli(edge: &Edge, args: &[&str]) -> (i32, String) {
    support::cli(edge, TOKEN, args)
}

#[test]
fn reputation_bans_reach_the_kernel_and_good_clients_are_unaffected() {
    let test = "reputation_bans_reach_the_kernel_and_good_clients_are_unaffected";
    if !require_root(test) || !protobalance_tests::dovecot::require_dovecot(test) {
        return;
    }
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let net = Net::new();
    let sections: Vec<String> = cluster
        .backends()
        .iter()
        .map(|b| backend_section(b, ""))
        .collect();
    let extra = format!(
        "[xdp]\ninterface = \"{}\"\n\
         [reputation]\ngreeting_delay_ms = 300\ntarpit_delay_ms = 50\nban_seconds = 300\n\
         [api]\n[[api.token]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\naccess = \"read-write\"\n",
        net.veth.host_ifname()
    );
    let edge = start_edge_on(
        IpAddr::V4(net.subnet.host_v4),
        &sections,
        &[Listen("smtp", None)],
        &extra,
    );
    let smtp = edge.listeners[0];
    let bot = IpAddr::V4(net.bot);
    net.send(&edge, "user1@example.com", "before");
    assert!(
        net.connects(bot, smtp),
        "the bot connects before it misbehaves"
    );

    // The bot: talks before the banner, pipelines blindly, guesses recipients; reconnects
    // until it is refused as blocked or cannot connect at all.
    let guesses: String = (0..50)
        .map(|i| format!("RCPT TO:<guess{i}@example.com>\\r\\n"))
        .collect();
    let out = net
        .ns
        .python(&format!(
            "import socket\n\
             for attempt in range(8):\n\
             \x20   s = socket.socket(); s.bind(('{bot}', 0)); s.settimeout(3)\n\
             \x20   try:\n\
             \x20       s.connect(('{}', {}))\n\
             \x20   except OSError as e:\n\
             \x20       print('connect failed', attempt, e); break\n\
             \x20   s.sendall(b'EHLO bot.example\\r\\nMAIL FROM:<s@bot.example>\\r\\n{guesses}DATA\\r\\n')\n\
             \x20   data = b''\n\
             \x20   try:\n\
             \x20       while True:\n\
             \x20           chunk = s.recv(65536)\n\
             \x20           if not chunk: break\n\
             \x20           data += chunk\n\
             \x20   except OSError as e:\n\
             \x20       data += b' ERROR ' + str(e).encode()\n\
             \x20   s.close()\n\
             \x20   print('session', attempt, data.decode(errors='replace').strip().splitlines()[-1:])\n\
             \x20   if b'blocked' in data: break\n",
            smtp.ip(),
            smtp.port()
        ))
        .expect("bot script");
    println!("{out}");
    assert!(
        out.contains("blocked") || out.contains("connect failed"),
        "the bot is banned: {out}"
    );

    // The kernel drops the bot's next connection; the good address is unaffected.
    assert!(
        !net.connects(bot, smtp),
        "banned bot's SYN is dropped by XDP"
    );
    net.send(&edge, "user1@example.com", "after");
    assert_eq!(delivered(&cluster, "user1@example.com"), 2);
    assert_eq!(
        sample(
            &edge,
            "protobalance_reputation_bans_total{enforced=\"kernel\"}"
        ),
        1
    );
    assert!(
        sample(
            &edge,
            "protobalance_xdp_packets_total{reason=\"ban\",verdict=\"drop\"}"
        ) >= 1,
        "the drop is counted as a ban drop"
    );

    let (code, text) = cli(&edge, &["explain", &net.bot.to_string()]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("verdict ban")
            && text.contains("pregreet")
            && text.contains(&format!("kernel: ban of {} (all, reason 1", net.bot))
            && text.contains(&format!(
                "kernel: DROP SYN from {} to port 25: ban of",
                net.bot
            )),
        "{text}"
    );
    let (code, text) = cli(&edge, &["ctl", "ban", "ls"]);
    assert!(code == 0 && text.contains(&net.bot.to_string()), "{text}");

    // Forgiven: score forgotten, kernel ban lifted: the address connects at once.
    let (code, text) = cli(&edge, &["ctl", "forgive", &net.bot.to_string()]);
    assert_eq!(code, 0, "{text}");
    assert!(
        net.connects(bot, smtp),
        "forgiven: the kernel lets it in again"
    );
    let (_, text) = cli(&edge, &["explain", &net.bot.to_string()]);
    assert!(
        text.contains("not tracked")
            && text.contains("kernel: no ban")
            && text.contains("PASS SYN from"),
        "{text}"
    );
    let (code, xml) = cli(&edge, &["explain", &net.bot.to_string(), "--xml"]);
    assert_eq!(code, 0, "{xml}");
    support::validate_api_xml(&xml);
}
