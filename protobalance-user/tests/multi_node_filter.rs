//! Blocklist entries decided on one node reach every node's kernel filter: two protobalance
//! nodes share one real PostgreSQL directory, each with its XDP filter on the host end of a
//! veth into its own test namespace. An entry added through node A's API makes node B's XDP
//! drop that source within seconds; removing it on A lets the source through B again; an
//! entry with a lifetime expires on every node.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use protobalance_tests::{
    DovecotCluster, NetNs, PostgresServer, TestSubnet, Veth, require_postgres, require_root,
};

mod support;

use support::{Edge, Listen, USERS, backend_section, start_edge_on};

const TOKEN: &str = "multi-node-filter-token-0123456789ab";

struct Net {
    ns: NetNs,
    veth: Veth,
    subnet: TestSubnet,
}

impl Net {
    fn new(name: &str, slot: u32) -> Self {
        let ns = NetNs::new(name).expect("namespace");
        let veth = Veth::with_unique_name(&ns, "eth0").expect("veth");
        let subnet = TestSubnet::slot(slot).expect("subnet");
        subnet.assign(&veth).expect("addresses");
        veth.up().expect("link up");
        Self { ns, veth, subnet }
    }

    /// True when a TCP connect from the namespace to `dst` completes within 1 s.
    fn connects(&self, dst: SocketAddr) -> bool {
        let script = format!(
            "import socket\ns=socket.socket()\ns.bind(('{}',0))\ns.settimeout(1)\n\
             print(s.connect_ex(('{}',{})))",
            self.subnet.ns_v4,
            dst.ip(),
            dst.port()
        );
        self.ns.python(&script).expect("probe").trim() == "0"
    }

    /// Waits up to `within` until connecting to `dst` gives `want`; how long it took.
    fn until_connects(&self, dst: SocketAddr, want: bool, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.connects(dst) == want {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "connect from {} to {dst} still {} after {within:?}",
                self.subnet.ns_v4,
                if want { "dropped" } else { "accepted" }
            );
        }
    }
}

fn node(cluster: &DovecotCluster, net: &Net, pg: &PostgresServer) -> Edge {
    let sections: Vec<String> = cluster
        .backends()
        .iter()
        .map(|b| backend_section(b, ""))
        .collect();
    let extra = format!(
        "[xdp]\ninterface = \"{}\"\n\
         [directory.postgres]\nurl = \"{}\"\n\
         [api]\n[[api.token]]\nname = \"ops\"\ntoken = \"{TOKEN}\"\naccess = \"read-write\"\n",
        net.veth.host_ifname(),
        pg.url()
    );
    start_edge_on(
        IpAddr::V4(net.subnet.host_v4),
        &sections,
        &[Listen("smtp", None)],
        &extra,
    )
}

#[test]
fn a_blocklist_entry_added_on_one_node_is_enforced_by_every_nodes_xdp() {
    let test = "a_blocklist_entry_added_on_one_node_is_enforced_by_every_nodes_xdp";
    if !require_root(test)
        || !protobalance_tests::dovecot::require_dovecot(test)
        || !require_postgres(test)
    {
        return;
    }
    let pg = PostgresServer::start().expect("postgres");
    let cluster = DovecotCluster::start(3, USERS).expect("cluster");
    let (net_a, net_b) = (Net::new("mna", 110), Net::new("mnb", 111));
    let a = node(&cluster, &net_a, &pg);
    let b = node(&cluster, &net_b, &pg);
    let b_smtp = b.listeners[0];
    assert!(net_b.connects(b_smtp), "the client connects to B at first");

    let client = format!("{}/32", net_b.subnet.ns_v4);
    let (code, text) = support::cli(&a, TOKEN, &["ctl", "block", "add", "shared", &client]);
    assert_eq!(code, 0, "{text}");
    let took = net_b.until_connects(b_smtp, false, Duration::from_secs(5));
    eprintln!("node B's XDP dropped the source added on node A after {took:?}");
    let (code, text) = support::cli(&b, TOKEN, &["ctl", "block", "ls", "shared"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&client),
        "node B lists node A's entry: {text}"
    );

    let (code, text) = support::cli(&a, TOKEN, &["ctl", "block", "rm", "shared", &client]);
    assert_eq!(code, 0, "{text}");
    net_b.until_connects(b_smtp, true, Duration::from_secs(5));

    // A lifetime set on A ends on B as well (expired entries are swept every 5 s).
    let (code, text) = support::cli(
        &a,
        TOKEN,
        &["ctl", "block", "add", "shared", &client, "--ttl", "3"],
    );
    assert_eq!(code, 0, "{text}");
    net_b.until_connects(b_smtp, false, Duration::from_secs(5));
    let took = net_b.until_connects(b_smtp, true, Duration::from_secs(15));
    eprintln!("the 3 s entry stopped dropping on node B {took:?} after it was seen");

    // A timed ban placed on A (API) is enforced by B's XDP with the same end; lifting it
    // on A lifts it on B.
    let source = net_b.subnet.ns_v4.to_string();
    let (code, text) = support::cli(&a, TOKEN, &["ctl", "ban", "add", &source, "--ttl", "600"]);
    assert_eq!(code, 0, "{text}");
    let took = net_b.until_connects(b_smtp, false, Duration::from_secs(5));
    eprintln!("node B's XDP dropped the source banned on node A after {took:?}");
    let (code, text) = support::cli(&b, TOKEN, &["ctl", "ban", "ls", "--xml"]);
    assert_eq!(code, 0, "{text}");
    let remaining: u64 = text
        .split("remaining-seconds=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("node B lists the ban: {text}"));
    assert!(
        (590..=600).contains(&remaining),
        "node B keeps node A's end of the ban: {remaining} s left"
    );
    let (code, text) = support::cli(&a, TOKEN, &["ctl", "ban", "rm", &source]);
    assert_eq!(code, 0, "{text}");
    net_b.until_connects(b_smtp, true, Duration::from_secs(5));
    let stored = pg.psql("SELECT count(*) FROM bans").expect("psql");
    assert_eq!(stored, "0", "a lifted ban leaves the shared table");

    // A ban that leaves the table while node B cannot hear it (the notification is lost)
    // is lifted by B's resync when its directory connection comes back.
    let (code, text) = support::cli(&a, TOKEN, &["ctl", "ban", "add", &source, "--ttl", "600"]);
    assert_eq!(code, 0, "{text}");
    net_b.until_connects(b_smtp, false, Duration::from_secs(5));
    pg.psql(
        "ALTER TABLE bans DISABLE TRIGGER bans_changed; DELETE FROM bans; \
         ALTER TABLE bans ENABLE TRIGGER bans_changed",
    )
    .expect("deleting the ban unheard");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !net_b.connects(b_smtp),
        "nothing told node B yet: it still drops the source"
    );
    // Every directory connection is cut; the nodes reconnect and resynchronise.
    pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND datname = current_database()",
    )
    .expect("cutting the nodes' connections");
    let took = net_b.until_connects(b_smtp, true, Duration::from_secs(30));
    eprintln!("node B lifted the ban it missed {took:?} after its connection was cut");
}
