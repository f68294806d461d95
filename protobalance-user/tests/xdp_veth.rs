//! The kernel filter attached for real: a veth pair into a namespace this test creates,
//! protobalance running as a process with the filter on the host end. A TCP connect from a
//! blocklisted source fails, from an allowed one succeeds, in driver and in SKB mode; once
//! protobalance exits (SIGTERM or SIGKILL) no XDP program remains on the link.
//! `filter load`/`unload` (pinned link) and the swap of `run` into a pinned link too.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use protobalance_tests::{
    ChildGuard, NetNs, TestSubnet, Veth, free_port, netns, process, require_root,
};

const BIN: &str = env!("CARGO_BIN_EXE_protobalance");

/// A namespace + veth with an allowed and a blocklisted source address inside.
struct Net {
    veth: Veth,
    ns: NetNs,
    subnet: TestSubnet,
    bot_v4: Ipv4Addr,
}

impl Net {
    fn new(tag: &str) -> Net {
        let ns = NetNs::new(tag).expect("namespace");
        let veth = Veth::with_unique_name(&ns, "eth0").expect("veth");
        let subnet = TestSubnet::next().expect("subnet");
        subnet.assign(&veth).expect("addresses");
        veth.up().expect("link up");
        // A second source inside the namespace, routed as a /32 over the same veth.
        let bot_v4 = TestSubnet::next().expect("subnet").ns_v4;
        veth.add_ns_addr(&format!("{bot_v4}/32"))
            .expect("bot address");
        netns::ip(&[
            "route",
            "add",
            &format!("{bot_v4}/32"),
            "dev",
            veth.host_ifname(),
        ])
        .expect("route");
        Net {
            veth,
            ns,
            subnet,
            bot_v4,
        }
    }

    fn iface(&self) -> &str {
        self.veth.host_ifname()
    }

    /// True when a TCP connect from `src` (inside the namespace) to `dst` completes.
    fn connects(&self, src: IpAddr, dst: SocketAddr) -> bool {
        let family = if src.is_ipv4() { "AF_INET" } else { "AF_INET6" };
        let script = format!(
            "import socket\ns=socket.socket(socket.{family})\ns.bind(('{src}',0))\ns.settimeout(1.5)\n\
             print(s.connect_ex(('{}',{})))",
            dst.ip(),
            dst.port()
        );
        self.ns.python(&script).expect("probe").trim() == "0"
    }

    /// The XDP attachment `ip link` reports for the host end: "xdp" (driver), "xdpgeneric"
    /// (SKB) or None.
    fn xdp_attachment(&self) -> Option<String> {
        let out = netns::ip(&["-d", "link", "show", "dev", self.iface()]).expect("ip link");
        ["xdpgeneric", "xdpdrv", "xdp"]
            .into_iter()
            .find(|kind| {
                out.split_whitespace()
                    .any(|w| w == *kind || w.starts_with(&format!("{kind}/")))
            })
            .map(str::to_owned)
    }
}

struct Proxy {
    guard: ChildGuard,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
    /// Blocklist files named in the config.
    _lists: Option<tempfile::TempDir>,
}

/// The blocklist file `start` writes: the namespace's IPv6 address (a list of its own, so
/// drops are counted per list: this one and the inline `xdp.blocklist`).
const V6_LIST: &str = "bots-v6.txt";

fn start(net: &Net, mode: &str, pin_dir: Option<&Path>) -> Proxy {
    let pin = pin_dir
        .map(|p| format!("pin_dir = \"{}\"\n", p.display()))
        .unwrap_or_default();
    let lists = tempfile::tempdir().expect("tempdir");
    let v6_list = lists.path().join(V6_LIST);
    std::fs::write(&v6_list, format!("# test bots\n{}/128\n", net.subnet.ns_v6))
        .expect("write blocklist file");
    let xdp = format!(
        "[xdp]\ninterface = \"{}\"\nmode = \"{mode}\"\n{pin}blocklist = [\"{}/32\"]\n\
         blocklist_files = [\"{}\"]\n",
        net.iface(),
        net.bot_v4,
        v6_list.display()
    );
    let mut proxy = start_with(&xdp);
    proxy._lists = Some(lists);
    proxy
}

/// Starts protobalance with `rest` (TOML sections) after `[admin]` and `[shutdown]`, and
/// waits until it is ready.
fn start_with(rest: &str) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = SocketAddr::from((
        [127, 0, 0, 1],
        free_port(IpAddr::from([127, 0, 0, 1])).expect("port"),
    ));
    let config = format!("[admin]\nlisten = \"{admin}\"\n[shutdown]\ngrace_seconds = 2\n{rest}");
    let path = dir.path().join("protobalance.toml");
    std::fs::write(&path, config).expect("write config");
    let guard = ChildGuard::spawn(
        Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null()),
        "protobalance",
    )
    .expect("spawn protobalance");
    let proxy = Proxy {
        guard,
        admin,
        _dir: dir,
        _lists: None,
    };
    // The admin socket is bound early, but answers only once start-up (XDP attach) is done.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get(admin, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "protobalance did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy
}

fn get(admin: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn metrics(admin: SocketAddr) -> String {
    get(admin, "/metrics").expect("GET /metrics")
}

fn drop_count(metrics: &str) -> u64 {
    sample(
        metrics,
        "protobalance_xdp_packets_total{reason=\"blocklist\",verdict=\"drop\"}",
    )
}

/// The value of the sample `series` (metric name and labels as exposed).
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.strip_prefix(series).is_some_and(|v| v.starts_with(' ')))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in metrics:\n{metrics}"))
}

fn filtered_connects(mode: &str, expect_attachment: &str, stop_signal: &str) {
    let net = Net::new(mode);
    let listener = TcpListener::bind((net.subnet.host_v4, 0)).expect("listen v4");
    let listener6 = TcpListener::bind((net.subnet.host_v6, 0)).expect("listen v6");
    let (v4, v6) = (
        listener.local_addr().expect("addr"),
        listener6.local_addr().expect("addr"),
    );
    assert!(
        net.connects(IpAddr::V4(net.bot_v4), v4),
        "before the filter the bot still connects"
    );

    let mut proxy = start(&net, mode, None);
    assert_eq!(
        net.xdp_attachment().as_deref(),
        Some(expect_attachment),
        "attach mode"
    );
    assert!(
        net.connects(IpAddr::V4(net.subnet.ns_v4), v4),
        "allowed IPv4 source connects"
    );
    assert!(
        !net.connects(IpAddr::V4(net.bot_v4), v4),
        "blocklisted IPv4 source is dropped"
    );
    assert!(
        !net.connects(IpAddr::V6(net.subnet.ns_v6), v6),
        "blocklisted IPv6 source is dropped"
    );
    let text = metrics(proxy.admin);
    assert!(drop_count(&text) >= 2, "drops visible on /metrics");
    for list in ["xdp.blocklist", V6_LIST] {
        let hits = format!("protobalance_xdp_list_hits_total{{list=\"{list}\"}}");
        assert!(sample(&text, &hits) >= 1, "drops counted for list {list}");
        let entries = format!("protobalance_xdp_list_entries{{list=\"{list}\"}}");
        assert_eq!(sample(&text, &entries), 1, "one entry in list {list}");
    }

    process::signal(proxy.guard.id(), stop_signal);
    let status = proxy
        .guard
        .wait_timeout(Duration::from_secs(10))
        .expect("wait");
    assert!(status.is_some(), "protobalance exits on SIG{stop_signal}");
    if stop_signal == "TERM" {
        assert!(
            status.is_some_and(|s| s.success()),
            "clean exit on SIGTERM: {status:?}"
        );
    }
    // The bpf_link is owned by the process: gone with it, even after SIGKILL.
    assert_eq!(
        net.xdp_attachment(),
        None,
        "no XDP program left on the link"
    );
    assert!(
        net.connects(IpAddr::V4(net.bot_v4), v4),
        "bot connects again once the filter is gone"
    );
}

#[test]
fn driver_mode_drops_blocklisted_sources_and_detaches_on_sigterm() {
    if !require_root("driver_mode_drops_blocklisted_sources_and_detaches_on_sigterm") {
        return;
    }
    filtered_connects("driver", "xdp", "TERM");
}

#[test]
fn skb_mode_drops_blocklisted_sources_and_detaches_on_sigkill() {
    if !require_root("skb_mode_drops_blocklisted_sources_and_detaches_on_sigkill") {
        return;
    }
    filtered_connects("skb", "xdpgeneric", "KILL");
}

/// Removes a bpffs pin directory even when the test fails.
struct PinDir(PathBuf);

impl PinDir {
    /// A pin directory under bpffs unique to this process and test network.
    fn for_test(net: &Net) -> PinDir {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/pbt-{}-{}",
            std::process::id(),
            net.iface()
        )))
    }
}

impl Proxy {
    /// SIGTERM, then wait for protobalance to exit.
    fn stop(mut self) {
        process::signal(self.guard.id(), "TERM");
        let exited = self
            .guard
            .wait_timeout(Duration::from_secs(10))
            .expect("wait");
        assert!(exited.is_some(), "protobalance exits on SIGTERM");
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn filter_load_pins_and_run_swaps_into_the_pinned_link() {
    if !require_root("filter_load_pins_and_run_swaps_into_the_pinned_link") {
        return;
    }
    let net = Net::new("pin");
    let pins = PinDir::for_test(&net);
    let pin = pins.0.display().to_string();
    let filter = |verb: &str| {
        let out = Command::new(BIN)
            .args(["filter", verb, "--iface", net.iface(), "--pin-dir", &pin])
            .output()
            .expect("run filter");
        assert!(
            out.status.success(),
            "filter {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    filter("load");
    assert_eq!(
        net.xdp_attachment().as_deref(),
        Some("xdp"),
        "stays attached after `filter load` exits"
    );
    assert!(
        pins.0.join(format!("link-{}", net.iface())).exists(),
        "link pinned"
    );

    let listener = TcpListener::bind((net.subnet.host_v4, 0)).expect("listen");
    let v4 = listener.local_addr().expect("addr");
    let proxy = start(&net, "auto", Some(&pins.0));
    assert!(
        !net.connects(IpAddr::V4(net.bot_v4), v4),
        "run's blocklist applies in the pinned link"
    );
    proxy.stop();
    assert!(
        net.xdp_attachment().is_some(),
        "a pinned filter outlives protobalance run"
    );
    assert!(
        !net.connects(IpAddr::V4(net.bot_v4), v4),
        "pinned maps keep the blocklist"
    );

    filter("unload");
    assert_eq!(net.xdp_attachment(), None, "unload detaches");
    assert!(!pins.0.exists(), "unload removes the pins");
    assert!(
        net.connects(IpAddr::V4(net.bot_v4), v4),
        "bot connects once unloaded"
    );
}

#[test]
fn cli_bans_drop_new_connections_and_survive_a_restart() {
    if !require_root("cli_bans_drop_new_connections_and_survive_a_restart") {
        return;
    }
    let net = Net::new("ban");
    let pins = PinDir::for_test(&net);
    let pin = pins.0.display().to_string();
    let listener = TcpListener::bind((net.subnet.host_v4, 0)).expect("listen");
    let v4 = listener.local_addr().expect("addr");
    let client = IpAddr::V4(net.subnet.ns_v4);
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("filter")
            .args(args)
            .args(["--pin-dir", &pin])
            .output()
            .expect("run filter");
        assert!(
            out.status.success(),
            "filter {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let proxy = start(&net, "auto", Some(&pins.0));
    assert!(net.connects(client, v4), "not banned yet");
    cli(&["ban", &client.to_string(), "--ttl", "120", "--reason", "7"]);
    assert!(
        !net.connects(client, v4),
        "a CLI ban drops the next connection"
    );
    assert!(
        metrics(proxy.admin).contains("reason=\"ban\",verdict=\"drop\"}"),
        "ban drops counted"
    );

    // A restart of protobalance keeps the ban: the maps are pinned.
    proxy.stop();
    let proxy = start(&net, "auto", Some(&pins.0));
    assert!(!net.connects(client, v4), "ban survives the restart");
    let listing = cli(&["bans"]);
    assert!(
        listing.contains(&client.to_string()) && listing.contains("reason 7"),
        "{listing}"
    );

    cli(&["unban", &client.to_string()]);
    assert!(net.connects(client, v4), "unban lets it through");
    proxy.stop();
}

/// Opens `attempts` TCP connections from `src` (inside the namespace) to `dst` at once,
/// non-blocking, and waits up to `wait` for them. Returns how many connected and the
/// seconds from the first SYN to the end of the wait.
fn syn_flood(
    net: &Net,
    src: IpAddr,
    dst: SocketAddr,
    attempts: usize,
    wait: Duration,
) -> (usize, f64) {
    let script = format!(
        "import socket, select, time\n\
         t0 = time.monotonic()\n\
         socks = []\n\
         for _ in range({attempts}):\n\
         \x20   s = socket.socket(socket.AF_INET)\n\
         \x20   s.setblocking(False)\n\
         \x20   s.bind(('{src}', 0))\n\
         \x20   s.connect_ex(('{}', {}))\n\
         \x20   socks.append(s)\n\
         deadline = t0 + {}\n\
         pending, ok = set(socks), 0\n\
         while pending and time.monotonic() < deadline:\n\
         \x20   _, ready, _ = select.select([], list(pending), [], max(0, deadline - time.monotonic()))\n\
         \x20   for s in ready:\n\
         \x20       pending.discard(s)\n\
         \x20       ok += s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0\n\
         print(ok, time.monotonic() - t0)\n",
        dst.ip(),
        dst.port(),
        wait.as_secs_f64()
    );
    let out = net.ns.python(&script).expect("flood");
    let mut fields = out.split_whitespace();
    let connected = fields.next().and_then(|v| v.parse().ok());
    let elapsed = fields.next().and_then(|v| v.parse().ok());
    connected
        .zip(elapsed)
        .unwrap_or_else(|| panic!("flood output {out:?}"))
}

/// A SYN flood from one address to the edge's POP3 listener through the real binary: only
/// about the burst gets through, the address stays penalised, another address of the same
/// namespace still connects, and /metrics shows the drops and the penalty.
fn syn_flood_is_limited(mode: &str) {
    const RATE: u32 = 5;
    const BURST: u32 = 10;
    const ATTEMPTS: usize = 200;
    let net = Net::new(&format!("syn{mode}"));
    let host = IpAddr::V4(net.subnet.host_v4);
    let pop3 = SocketAddr::new(host, free_port(host).expect("port"));
    // syn_limited_ports is left out: the limiter takes the listener's port.
    let rest = format!(
        "[xdp]\ninterface = \"{}\"\nmode = \"{mode}\"\nsyn_rate_per_second = {RATE}\n\
         syn_burst = {BURST}\nsyn_penalty_seconds = 60\n\
         [directory]\npath = \"directory.db\"\n\
         [[backend]]\nname = \"b1\"\naddress = \"127.0.0.1\"\n\
         [[listener]]\nprotocol = \"pop3\"\nlisten = \"{pop3}\"\ntls = \"none\"\n",
        net.iface()
    );
    let proxy = start_with(&rest);
    let (flooder, other) = (IpAddr::V4(net.subnet.ns_v4), IpAddr::V4(net.bot_v4));

    let (connected, elapsed) =
        syn_flood(&net, flooder, pop3, ATTEMPTS, Duration::from_millis(1500));
    let bound = f64::from(BURST) + f64::from(RATE) * elapsed + 2.0;
    eprintln!("{mode}: {connected} of {ATTEMPTS} SYN-flood connects in {elapsed:.2} s");
    assert!(
        connected >= 1 && connected as f64 <= bound,
        "{connected} of {ATTEMPTS} connected in {elapsed:.2} s; want 1..={bound:.1}"
    );
    assert!(
        net.connects(other, pop3),
        "another address of the namespace still connects"
    );
    assert!(
        !net.connects(flooder, pop3),
        "the flooding address is penalised"
    );

    let drops = |reason: &str| {
        sample(
            &metrics(proxy.admin),
            &format!("protobalance_xdp_packets_total{{reason=\"{reason}\",verdict=\"drop\"}}"),
        )
    };
    assert!(drops("syn_limit") >= 1, "syn_limit drops on /metrics");
    // The rest of the flood (and its retransmissions, and the probe) hit the penalty.
    let penalty_drops = drops("syn_penalty");
    assert!(
        penalty_drops as f64 >= ATTEMPTS as f64 - bound,
        "{penalty_drops} syn_penalty drops"
    );
    // The sweeper refreshes the gauge every 5 s.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let gauge = sample(
            &metrics(proxy.admin),
            "protobalance_xdp_syn_penalised_sources",
        );
        if gauge == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "penalised sources gauge {gauge}, want 1"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    proxy.stop();
    assert_eq!(
        net.xdp_attachment(),
        None,
        "no XDP program left on the link"
    );
}

#[test]
fn driver_mode_syn_flood_is_limited() {
    if !require_root("driver_mode_syn_flood_is_limited") {
        return;
    }
    syn_flood_is_limited("driver");
}

#[test]
fn skb_mode_syn_flood_is_limited() {
    if !require_root("skb_mode_syn_flood_is_limited") {
        return;
    }
    syn_flood_is_limited("skb");
}

/// The XML API's bans reach the kernel: a ban placed by `POST /api/v1/bans` drops the next
/// connection from that source, shows in `GET /api/v1/bans`, survives a restart with pinned
/// maps, and `DELETE` lets the source through again. Uses curl, a real HTTP client.
#[test]
fn api_bans_drop_in_the_kernel_and_survive_a_restart() {
    if !require_root("api_bans_drop_in_the_kernel_and_survive_a_restart") {
        return;
    }
    let setup = ApiNet::new("apib", "");
    let (net, v4, client, config) = (&setup.net, setup.v4, setup.client, &setup.config);
    const TOKEN: &str = API_TOKEN;
    let api = |admin, method: &str, path: &str, body: Option<&str>| {
        api_call(admin, TOKEN, method, path, body)
    };

    let proxy = start_with(config);
    assert!(net.connects(client, v4), "not banned yet");
    let ban = format!(
        "<ban xmlns=\"urn:protobalance:api:1\" target=\"{client}\" ttl-seconds=\"120\" reason=\"9\"/>"
    );
    let (status, body) = api(proxy.admin, "POST", "bans", Some(&ban));
    assert_eq!(status, 201, "{body}");
    assert!(
        !net.connects(client, v4),
        "an API ban drops the next connection"
    );
    let (status, body) = api(proxy.admin, "GET", "bans", None);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("target=\"{client}\" mode=\"all\" reason=\"9\"")),
        "{body}"
    );
    let bad = "<ban xmlns=\"urn:protobalance:api:1\" target=\"not-an-ip\" ttl-seconds=\"10\"/>";
    let (status, body) = api(proxy.admin, "POST", "bans", Some(bad));
    assert!(
        status == 422 && body.contains("invalid_target"),
        "{status} {body}"
    );

    // Pinned maps: the ban outlives protobalance.
    proxy.stop();
    let proxy = start_with(config);
    assert!(
        !net.connects(client, v4),
        "the API ban survives the restart"
    );
    let (status, body) = api(proxy.admin, "DELETE", &format!("bans/{client}"), None);
    assert_eq!(status, 204, "{body}");
    assert!(
        net.connects(client, v4),
        "lifted: the source connects again"
    );
    let (status, _) = api(proxy.admin, "DELETE", &format!("bans/{client}"), None);
    assert_eq!(status, 404, "no ban left to lift");
    proxy.stop();
}

/// `curl` against the API with `token`: (status, body).
fn api_call(
    admin: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args([
            "-sS",
            "--max-time",
            "10",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("http://{admin}/api/v1/{path}"));
    if let Some(body) = body {
        command.args(["--data-binary", body]);
    }
    let out = command.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("status");
    (status.trim().parse().expect("code"), body.to_owned())
}

/// Blocklists made through the API: an entry drops its source in the kernel at once and
/// is counted under its list, survives a restart (stored in the directory, pinned maps),
/// can be removed, expires by itself, and the config file's lists cannot be changed.
#[test]
fn api_blocklists_drop_in_the_kernel_persist_and_expire() {
    if !require_root("api_blocklists_drop_in_the_kernel_persist_and_expire") {
        return;
    }
    let setup = ApiNet::new("apil", "blocklist = [\"BOT/32\"]\n");
    let (net, v4, client, config) = (&setup.net, setup.v4, setup.client, &setup.config);
    const TOKEN: &str = API_TOKEN;
    let entry = |cidr: &str, extra: &str| {
        format!(
            "<entry xmlns=\"urn:protobalance:api:1\" cidr=\"{cidr}\" reason=\"crm spam\"{extra}/>"
        )
    };
    let cidr = format!("{client}/32");
    let escaped = cidr.replace('/', "%2F");

    let proxy = start_with(config);
    let call = |admin, method: &str, path: &str, body: Option<&str>| {
        api_call(admin, TOKEN, method, path, body)
    };
    assert!(net.connects(client, v4), "not listed yet");
    let (status, body) = call(
        proxy.admin,
        "POST",
        "blocklist/crm",
        Some(&entry(&cidr, "")),
    );
    assert_eq!(status, 201, "{body}");
    assert!(
        !net.connects(client, v4),
        "an API blocklist entry drops the next connection"
    );
    // A big upload refused on its first entry: the answer reaches the client, not a
    // connection reset mid-upload, and the list is unchanged. (curl gets the answer here
    // even without the edge reading the rest; a client that aborts on a failed write, like
    // ctl's, needs it: see `BodyReader::drain`.)
    let upload = tempfile::NamedTempFile::new().expect("upload file");
    let mut big =
        String::from("<list xmlns=\"urn:protobalance:api:1\"><entry cidr=\"not-a-cidr\"/>");
    for i in 0..60_000u32 {
        big.push_str(&format!(
            "<entry cidr=\"10.{}.{}.{}/32\"/>",
            i >> 16,
            (i >> 8) & 255,
            i & 255
        ));
    }
    big.push_str("</list>");
    std::fs::write(upload.path(), &big).expect("write upload");
    let at = format!("@{}", upload.path().display());
    let (status, body) = call(proxy.admin, "PUT", "blocklist/crm", Some(&at));
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("invalid_cidr"), "{body}");
    let (status, body) = call(proxy.admin, "GET", "blocklist", None);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("name=\"xdp.blocklist\" managed-by=\"config\" entries=\"1\""),
        "{body}"
    );
    assert!(
        body.contains("name=\"crm\" managed-by=\"api\" entries=\"1\""),
        "{body}"
    );
    let (status, body) = call(proxy.admin, "GET", "blocklist/crm", None);
    assert!(
        status == 200 && body.contains(&format!("cidr=\"{cidr}\" reason=\"crm spam\"")),
        "{body}"
    );
    assert!(
        metrics(proxy.admin).contains("protobalance_xdp_list_hits_total{list=\"crm\"}"),
        "drops counted under the API list"
    );
    let (status, body) = call(
        proxy.admin,
        "POST",
        "blocklist/xdp.blocklist",
        Some(&entry("203.0.113.0/24", "")),
    );
    assert!(
        status == 409 && body.contains("managed_by_config"),
        "{status} {body}"
    );
    let (status, body) = call(
        proxy.admin,
        "POST",
        "blocklist/crm",
        Some(&entry("203.0.113.9/24", "")),
    );
    assert!(
        status == 422 && body.contains("invalid_cidr"),
        "{status} {body}"
    );

    // Stored in the directory and pinned in the kernel: still dropped after a restart.
    proxy.stop();
    let proxy = start_with(config);
    assert!(
        !net.connects(client, v4),
        "the API entry survives the restart"
    );
    let (status, body) = call(
        proxy.admin,
        "DELETE",
        &format!("blocklist/crm/{escaped}"),
        None,
    );
    assert_eq!(status, 204, "{body}");
    assert!(
        net.connects(client, v4),
        "removed: the source connects again"
    );
    assert!(
        !net.connects(IpAddr::V4(net.bot_v4), v4),
        "the config list still drops"
    );

    // An entry with a lifetime is swept when it expires.
    let (status, body) = call(
        proxy.admin,
        "POST",
        "blocklist/crm",
        Some(&entry(&cidr, " ttl-seconds=\"2\"")),
    );
    assert_eq!(status, 201, "{body}");
    assert!(!net.connects(client, v4), "dropped while the entry lives");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !net.connects(client, v4) {
        assert!(Instant::now() < deadline, "the expired entry was not swept");
    }
    let (_, body) = call(proxy.admin, "GET", "blocklist", None);
    assert!(
        !body.contains("name=\"crm\""),
        "the emptied list is gone: {body}"
    );
    proxy.stop();
}

/// Replacing the program leaves no unfiltered window: with the filter in a pinned link,
/// protobalance is stopped and started again (each start swaps its program into the link)
/// while a blocklisted source in the namespace tries to connect every few milliseconds;
/// not one attempt gets through, and an allowed source connects before and after.
#[test]
fn program_replacement_leaves_no_unfiltered_window() {
    if !require_root("program_replacement_leaves_no_unfiltered_window") {
        return;
    }
    let net = Net::new("swap");
    let pins = PinDir::for_test(&net);
    let pin = pins.0.display().to_string();
    let out = Command::new(BIN)
        .args(["filter", "load", "--iface", net.iface(), "--pin-dir", &pin])
        .output()
        .expect("filter load");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listener = TcpListener::bind((net.subnet.host_v4, 0)).expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let v4 = listener.local_addr().expect("addr");
    let proxy = start(&net, "auto", Some(&pins.0));
    assert!(
        net.connects(IpAddr::V4(net.subnet.ns_v4), v4),
        "allowed source connects"
    );

    // The prober runs for 6 s; meanwhile protobalance restarts twice.
    let probe = format!(
        "import socket, time\nok = tries = 0\nend = time.time() + 6\nwhile time.time() < end:\n\
         \x20   s = socket.socket(); s.bind(('{}', 0)); s.settimeout(0.05)\n\
         \x20   tries += 1\n\
         \x20   ok += s.connect_ex(('{}', {})) == 0\n\
         \x20   s.close()\nprint(ok, tries)\n",
        net.bot_v4,
        v4.ip(),
        v4.port()
    );
    let result = std::thread::scope(|scope| {
        let prober = scope.spawn(|| net.ns.python(&probe).expect("prober"));
        let mut proxy = proxy;
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(800));
            proxy.stop();
            proxy = start(&net, "auto", Some(&pins.0));
        }
        let result = prober.join().expect("prober thread");
        proxy.stop();
        result
    });
    let mut counts = result
        .split_whitespace()
        .map(|n| n.parse::<u64>().expect("count"));
    let (ok, tries) = (counts.next().expect("ok"), counts.next().expect("tries"));
    assert!(tries >= 20, "the prober tried often enough: {tries}");
    assert_eq!(
        ok, 0,
        "{ok} of {tries} connects from the blocklisted source got through"
    );
    assert!(
        net.connects(IpAddr::V4(net.subnet.ns_v4), v4),
        "allowed source still connects"
    );
    let out = Command::new(BIN)
        .args([
            "filter",
            "unload",
            "--iface",
            net.iface(),
            "--pin-dir",
            &pin,
        ])
        .output()
        .expect("filter unload");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const API_TOKEN: &str = "veth-0123456789abcdef0123456789abcdef";

/// A test network, a listener on the host side, and a config with the filter on the veth
/// (pinned), a directory and a read-write API token (`API_TOKEN`). `xdp_extra` lines go into
/// `[xdp]`; `BOT` in them stands for the namespace's blocklisted address.
struct ApiNet {
    config: String,
    v4: SocketAddr,
    client: IpAddr,
    _listener: TcpListener,
    _dir: tempfile::TempDir,
    // Dropped in this order: the pins go before the network.
    _pins: PinDir,
    net: Net,
}

impl ApiNet {
    fn new(tag: &str, xdp_extra: &str) -> Self {
        let net = Net::new(tag);
        let pins = PinDir::for_test(&net);
        let listener = TcpListener::bind((net.subnet.host_v4, 0)).expect("listen");
        let v4 = listener.local_addr().expect("addr");
        let client = IpAddr::V4(net.subnet.ns_v4);
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = xdp_extra.replace("BOT", &net.bot_v4.to_string());
        let config = format!(
            "[xdp]\ninterface = \"{}\"\npin_dir = \"{}\"\n{extra}[directory]\npath = \"{}/dir.db\"\n\
             [api]\n[[api.token]]\nname = \"ops\"\ntoken = \"{API_TOKEN}\"\naccess = \"read-write\"\n",
            net.iface(),
            pins.0.display(),
            dir.path().display()
        );
        Self {
            config,
            v4,
            client,
            _listener: listener,
            _dir: dir,
            _pins: pins,
            net,
        }
    }
}

/// SIGHUP re-reads the config's blocklist files: a source taken off the file connects
/// again and one put on it is dropped, without a restart (the process stays the same);
/// a file that no longer validates is refused and the running lists stay.
#[test]
fn sighup_reloads_the_blocklist_files() {
    if !require_root("sighup_reloads_the_blocklist_files") {
        return;
    }
    let net = Net::new("rld");
    let listener = TcpListener::bind((net.subnet.host_v4, 0)).expect("listen");
    let v4 = listener.local_addr().expect("addr");
    let (bot, client) = (IpAddr::V4(net.bot_v4), IpAddr::V4(net.subnet.ns_v4));
    let lists = tempfile::tempdir().expect("tempdir");
    let file = lists.path().join("bots.txt");
    std::fs::write(&file, format!("# bots\n{}/32\n", net.bot_v4)).expect("write list");
    let state = tempfile::tempdir().expect("tempdir");
    let mut proxy = start_with(&format!(
        "[xdp]\ninterface = \"{}\"\nblocklist_files = [\"{}\"]\n\
         [directory]\npath = \"{}/dir.db\"\n\
         [api]\n[[api.token]]\nname = \"ops\"\ntoken = \"{API_TOKEN}\"\naccess = \"read-write\"\n\
         [health]\ninterval_seconds = 5\n",
        net.iface(),
        file.display(),
        state.path().display()
    ));
    assert!(!net.connects(bot, v4), "listed at start: dropped");
    assert!(net.connects(client, v4), "not listed: connects");
    let pid = proxy.guard.id();
    let reloads = |result: &str| {
        let metrics = metrics(proxy.admin);
        let series = format!("protobalance_config_reloads_total{{result=\"{result}\"}}");
        metrics
            .lines()
            .find(|l| l.strip_prefix(&series).is_some_and(|v| v.starts_with(' ')))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // The bot is taken off the file, the client put on it.
    std::fs::write(&file, format!("# bots\n{}/32\n", net.subnet.ns_v4)).expect("rewrite");
    process::signal(pid, "HUP");
    wait_for("the reload is applied", &|| reloads("applied") == 1);
    assert!(net.connects(bot, v4), "taken off the list: connects");
    assert!(!net.connects(client, v4), "put on the list: dropped");

    // A broken file: refused, the lists in force stay.
    std::fs::write(&file, "not-a-network\n").expect("rewrite");
    process::signal(pid, "HUP");
    wait_for("the reload is refused", &|| reloads("invalid") == 1);
    assert!(
        !net.connects(client, v4),
        "still dropped after a refused reload"
    );
    assert!(net.connects(bot, v4));

    // The same through the API: refused with the config error, then applied, naming the
    // changed section that waits for a restart.
    let (status, body) = api_call(proxy.admin, API_TOKEN, "POST", "reload", None);
    assert!(
        status == 422 && body.contains("invalid_config") && body.contains("not-a-network"),
        "{status} {body}"
    );
    std::fs::write(&file, format!("{}/32\n", net.bot_v4)).expect("rewrite");
    let config = proxy._dir.path().join("protobalance.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("interval_seconds = 5", "interval_seconds = 7"),
    )
    .expect("config");
    let (status, body) = api_call(proxy.admin, API_TOKEN, "POST", "reload", None);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("result=\"applied\" restart-needed=\"health\""),
        "{body}"
    );
    assert!(!net.connects(bot, v4), "listed again: dropped");
    assert!(net.connects(client, v4), "taken off again: connects");
    assert_eq!(
        proxy.guard.wait_timeout(Duration::ZERO).expect("wait"),
        None,
        "the same process throughout"
    );
    proxy.stop();
}

/// Whole-list replacement under traffic: the bot's address is blocklisted throughout, but
/// by a different kind of entry in each set — a /24 (the DIR-24 byte), a /32 (the exact
/// hash, flagged in the byte) and a /26 (the /25–/31 trie) — so a packet that met the byte
/// of one generation and the hash or trie of another would pass. A prober in the namespace
/// opens connections from the bot (non-blocking connects: hundreds of SYNs a second) while
/// the lists are swapped as fast as they publish; no connection may complete.
#[test]
fn list_swaps_under_traffic_never_let_a_blocked_source_through() {
    if !require_root("list_swaps_under_traffic_never_let_a_blocked_source_through") {
        return;
    }
    use protobalance::filter::{
        blocklist::NamedList,
        cidr::Cidr,
        xdp::{AttachMode, XdpFilter},
    };
    use protobalance_common::Counter;

    let net = Net::new("gen");
    let listener = TcpListener::bind((net.subnet.host_v4, 0)).expect("listen");
    let dst = listener.local_addr().expect("addr");
    let mut filter = XdpFilter::load(None).expect("load");
    filter
        .attach(net.iface(), AttachMode::Driver)
        .expect("attach");
    let bot = IpAddr::V4(net.bot_v4);
    let sets: Vec<Vec<NamedList>> = [24u8, 32, 26]
        .iter()
        .map(|len| {
            vec![NamedList {
                name: "xdp.blocklist".into(),
                entries: vec![Cidr::new(bot, *len).expect("cidr").network()],
            }]
        })
        .collect();
    // (The /24 holds the namespace's other address too, so the bot itself shows the path
    // works before it is listed.)
    assert!(net.connects(bot, dst), "the bot connects while unlisted");
    filter.replace_named_lists(&sets[0]).expect("first set");
    assert!(!net.connects(bot, dst), "the bot is blocked");

    let probe = format!(
        "import socket, select, time\n\
         ok = tries = 0\nend = time.time() + 4\nwhile time.time() < end:\n\
         \x20   socks = []\n\
         \x20   for _ in range(50):\n\
         \x20       s = socket.socket(); s.setblocking(False); s.bind(('{bot}', 0))\n\
         \x20       s.connect_ex(('{}', {})); socks.append(s); tries += 1\n\
         \x20   _, writable, _ = select.select([], socks, [], 0.02)\n\
         \x20   ok += sum(1 for s in writable if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)\n\
         \x20   for s in socks: s.close()\n\
         print(ok, tries)\n",
        dst.ip(),
        dst.port()
    );
    let before = drops(&filter);
    let (result, swaps) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| net.ns.python(&probe).expect("prober"));
        let mut swaps = 0usize;
        while !prober.is_finished() {
            filter
                .replace_named_lists(&sets[(swaps + 1) % sets.len()])
                .expect("swap");
            swaps += 1;
        }
        (prober.join().expect("prober thread"), swaps)
    });
    let counts: Vec<u64> = result
        .split_whitespace()
        .map(|n| n.parse().expect("count"))
        .collect();
    let (ok, tries) = (counts[0], counts[1]);
    let dropped = drops(&filter) - before;
    eprintln!("{tries} connects during {swaps} list swaps: {ok} completed, {dropped} SYNs dropped");
    assert_eq!(
        ok, 0,
        "a connection from the blocked bot completed during a swap"
    );
    assert!(
        swaps >= 20,
        "only {swaps} swaps: the test did not exercise the swap"
    );
    assert!(
        tries >= 1000 && dropped >= tries,
        "{tries} connects, {dropped} drops: the SYNs must have met the filter"
    );
    assert_eq!(
        filter.list_generation().serial,
        2 + swaps as u64,
        "one generation per swap (and the load's and the first set's)"
    );

    fn drops(filter: &XdpFilter) -> u64 {
        filter
            .counters()
            .expect("counters")
            .into_iter()
            .find(|(c, _)| *c == Counter::DropBlocklist)
            .map_or(0, |(_, v)| v.packets)
    }
}
