//! `protobalance check`: the shipped example configs pass; broken ones fail with a message
//! that names the offending key, and exit non-zero.

use std::{path::PathBuf, process::Command};

fn check(config: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_protobalance"))
        .args(["check", "--config", config])
        .output()
        .expect("run protobalance check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn repo(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join(path).display().to_string()
}

#[test]
fn example_configs_pass() {
    for example in ["examples/demo.toml", "examples/protobalance.toml"] {
        let (ok, text) = check(&repo(example));
        assert!(ok, "{example} should be valid: {text}");
        assert!(text.contains(": ok"), "{text}");
    }
    let (_, text) = check(&repo("examples/demo.toml"));
    assert!(
        text.contains("(4 blocklist entries)"),
        "inline + file entries counted: {text}"
    );
}

#[test]
fn invalid_configs_fail_naming_the_key() {
    let cases = [
        (
            "bad-blocklist.toml",
            "xdp.blocklist[1]",
            "did you mean 203.0.113.0/24",
        ),
        ("bad-admin-listen.toml", "listen", "invalid socket address"),
        ("bad-unknown-key.toml", "pin_directory", "unknown field"),
        (
            "bad-blocklist-file.toml",
            "xdp.blocklist_files[0]",
            "does-not-exist.txt",
        ),
    ];
    for (file, key, detail) in cases {
        let (ok, text) = check(&repo(&format!("protobalance-user/tests/fixtures/{file}")));
        assert!(!ok, "{file} must be rejected");
        assert!(
            text.contains(key),
            "{file}: message should name `{key}`: {text}"
        );
        assert!(
            text.contains(detail),
            "{file}: message should say `{detail}`: {text}"
        );
        assert!(!text.contains("panicked"), "{file}: no panic: {text}");
    }
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let (ok, text) = check("/nonexistent/protobalance.toml");
    assert!(!ok);
    assert!(
        text.contains("cannot read config file /nonexistent/protobalance.toml"),
        "{text}"
    );
}

#[test]
fn syn_limiter_keys_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let on = "[xdp]\ninterface = \"eth0\"\nsyn_rate_per_second = 5\n";
    let many_ports: Vec<String> = (1..=65).map(|p| p.to_string()).collect();
    let cases = [
        (format!("{on}syn_burst = 0\n"), "`xdp.syn_burst`", "1..="),
        (
            format!("{on}syn_limited_ports = [25]\nsyn_penalty_seconds = 0\n"),
            "`xdp.syn_penalty_seconds`",
            "1..=86400",
        ),
        (
            "[xdp]\nsyn_penalty_seconds = 86401\n".to_owned(),
            "`xdp.syn_penalty_seconds`",
            "1..=86400",
        ),
        (
            format!("{on}syn_limited_ports = [{}]\n", many_ports.join(", ")),
            "`xdp.syn_limited_ports`",
            "at most 64",
        ),
        (
            format!("{on}syn_limited_ports = [25, 0]\n"),
            "`xdp.syn_limited_ports[1]`",
            "port 0",
        ),
        (
            "[xdp]\nsyn_rate_per_second = 5\nsyn_limited_ports = [25]\n".to_owned(),
            "`xdp.syn_rate_per_second`",
            "set xdp.interface",
        ),
        (
            "[xdp]\ninterface = \"eth0\"\nsyn_rate_per_second = 2000000\n".to_owned(),
            "`xdp.syn_rate_per_second`",
            "0..=1000000",
        ),
        (on.to_owned(), "`xdp.syn_limited_ports`", "no [[listener]]s"),
        (
            format!("{on}syn_limited_ports = [\"smtp\"]\n"),
            "syn_limited_ports",
            "invalid type",
        ),
    ];
    for (i, (text, key, detail)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("syn-{i}.toml"));
        std::fs::write(&path, text).expect("write config");
        let (ok, out) = check(&path.display().to_string());
        assert!(!ok, "{text} must be rejected");
        assert!(
            out.contains(key) && out.contains(detail),
            "{text}: want {key} and {detail:?}: {out}"
        );
    }
    let good = [
        format!("{on}syn_burst = 10\nsyn_penalty_seconds = 600\nsyn_limited_ports = [25, 587]\n"),
        // Off (the default), whatever the burst.
        "[xdp]\nsyn_burst = 0\n".to_owned(),
    ];
    for (i, text) in good.iter().enumerate() {
        let path = dir.path().join(format!("good-{i}.toml"));
        std::fs::write(&path, text).expect("write config");
        let (ok, out) = check(&path.display().to_string());
        assert!(ok, "{text} is valid: {out}");
    }
}
