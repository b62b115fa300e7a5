//! Helpers for the integration tests: run the real `nfvisor` binary on the
//! real /dev/kvm and look at what it printed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub const NFVISOR: &str = env!("CARGO_BIN_EXE_nfvisor");

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked") && !self.stdout.contains("panicked"),
            "nfvisor panicked:\n{}",
            self.stderr
        );
    }
}

fn finish(out: Output) -> Run {
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    run.assert_no_panic();
    run
}

/// Runs `nfvisor ARGS` to completion (killed after `limit`).
pub fn nfvisor(args: &[&str], limit: Duration) -> Run {
    let out = Command::new("timeout")
        .arg("--signal=KILL")
        .arg(limit.as_secs().to_string())
        .arg(NFVISOR)
        .args(args)
        .env("NFVISOR_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("cannot start nfvisor");
    finish(out)
}

pub fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", run.stdout))
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nfvisor-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Path to a program, or a failure that says how to install it.
pub fn require_program(name: &str, package: &str) -> String {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: `apt-get install {package}` (.ci/run installs it)"
    );
    name.to_string()
}
