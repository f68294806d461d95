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
