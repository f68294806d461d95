//! `protobalance directory import|lookup|backends` through the real binary and SQLite file.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_protobalance");

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run protobalance");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn import_then_lookup_and_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("pb.toml");
    std::fs::write(
        &config,
        "[directory]\npath = \"dir.db\"\n[[domain]]\nname = \"example.com\"\n\
         [[backend]]\nname = \"b1\"\naddress = \"127.0.1.1\"\ncapacity = 1\n\
         [[backend]]\nname = \"b2\"\naddress = \"127.0.1.2\"\ncapacity = 3\n",
    )
    .expect("config");
    let list = dir.path().join("mailboxes.csv");
    let mut text = String::from("# batch\nPinned@Example.com,b1\n");
    for i in 0..2000 {
        text.push_str(&format!("user{i}@example.com\n"));
    }
    std::fs::write(&list, text).expect("list");
    let config = config.to_str().expect("utf-8 path");
    let (ok, out) = run(&[
        "directory",
        "import",
        "--config",
        config,
        list.to_str().expect("path"),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("imported 2001 new mailboxes"), "{out}");
    let (ok, out) = run(&[
        "directory",
        "lookup",
        "--config",
        config,
        "PINNED+x@example.COM",
    ]);
    assert!(ok && out.contains("pinned@example.com -> b1"), "{out}");
    let (ok, out) = run(&[
        "directory",
        "lookup",
        "--config",
        config,
        "nobody@example.com",
    ]);
    assert!(ok && out.contains("not in the directory"), "{out}");
    let (ok, out) = run(&["directory", "backends", "--config", config]);
    assert!(ok, "{out}");
    // 2001 over capacities 1:3: equal ratios tie to the smaller name, so b1 ends at 501.
    assert!(
        out.lines()
            .any(|l| l.starts_with("b1") && l.ends_with(" 501")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("b2") && l.ends_with(" 1500")),
        "{out}"
    );

    std::fs::write(&list, "ok@example.com\nnot an address\n").expect("list");
    let (ok, out) = run(&[
        "directory",
        "import",
        "--config",
        config,
        list.to_str().expect("path"),
    ]);
    assert!(!ok, "bad line must fail");
    assert!(
        out.contains("line 2") && out.contains("nothing was written"),
        "{out}"
    );
}
