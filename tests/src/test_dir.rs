//! Per-test scratch directories, removed on drop unless `PROTOBALANCE_KEEP_TEST_DIRS=1`
//! (then the path is printed so a failed run can be inspected).

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

/// Set to `1` to keep test directories (configs, logs, mail) after the test.
pub const KEEP_ENV: &str = "PROTOBALANCE_KEEP_TEST_DIRS";

/// A fresh directory under the system temp dir, mode 0755 so unprivileged service
/// users (Dovecot's mail and login users) can traverse it.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `<tmp>/pbt-<label>-<pid>-<counter>`.
    pub fn new(label: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pbt-{label}-{}-{n}", std::process::id()));
        DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .with_context(|| format!("creating test dir {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// True when the environment asks to keep test directories.
pub fn keep_test_dirs() -> bool {
    std::env::var(KEEP_ENV).is_ok_and(|v| v == "1")
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if keep_test_dirs() {
            eprintln!("keeping test dir {} ({KEEP_ENV}=1)", self.path.display());
        } else if let Err(err) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove {}: {err}", self.path.display());
        }
    }
}
