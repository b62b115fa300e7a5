//! Helpers for the integration tests: run the real `nfvisor` binary on the
//! real /dev/kvm and look at what it printed.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub mod net;

/// Stops an `nfvisor switch` as its user does (SIGTERM): it must exit 0;
/// its JSON report and its log.
pub fn stop_switch(sw: Running) -> (serde_json::Value, String) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(sw.pid() as i32, libc::SIGTERM) };
    let out = sw.finish(Duration::from_secs(60));
    assert_eq!(out.code, 0, "{}", out.stderr);
    (json(&out), out.stderr)
}

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
    nfvisor_env(args, &[], limit)
}

/// `nfvisor`, with `env` set for it.
pub fn nfvisor_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let out = Command::new("timeout")
        .arg("--signal=KILL")
        .arg(limit.as_secs().to_string())
        .arg(NFVISOR)
        .args(args)
        .env("NFVISOR_LOG", "info")
        .envs(env.iter().copied())
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

/// A running nfvisor whose stderr is read line by line.
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    pub fn start(args: &[&str]) -> Running {
        Running::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut cmd = Command::new(NFVISOR);
        cmd.args(args).envs(env.iter().copied());
        Running::start_command(cmd)
    }

    /// `cmd` (which runs nfvisor in the end: `unshare ... nfvisor ...`),
    /// watched as `start` watches nfvisor.
    pub fn start_command(mut cmd: Command) -> Running {
        let mut child = cmd
            .env("NFVISOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        self.wait_for_within(needle, Duration::from_secs(60))
    }

    /// Waits up to `limit` for a stderr line containing `needle`.
    pub fn wait_for_within(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?}; stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to end (killed after `limit`); its stdout and
    /// the stderr lines not yet read.
    pub fn finish(mut self, limit: Duration) -> Run {
        let mut stdout = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut out, &mut s);
                let _ = tx.send(s);
            });
            stdout = rx.recv_timeout(limit).unwrap_or_default();
        }
        let status = self.child.wait().ok().and_then(|s| s.code()).unwrap_or(-1);
        let mut stderr = self.seen.join("\n");
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            stderr.push('\n');
            stderr.push_str(&l);
        }
        let run = Run {
            code: status,
            stdout,
            stderr,
        };
        run.assert_no_panic();
        run
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The digest of the dirtier's `DIRTIER OK` line (it depends only on the
/// values the guest wrote, never on timing).
pub fn digest(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("DIRTIER OK"))
        .unwrap_or_else(|| panic!("no DIRTIER OK in:\n{out}"))
        .split(' ')
        .find(|w| w.starts_with("digest="))
        .unwrap()
        .to_string()
}

/// Waits (at most 30 s) for a socket or file a child process creates.
pub fn wait_for_path(path: &Path) {
    let t = std::time::Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `nfvisor migrate --control-socket CTL --to TO EXTRA...` (two minutes at most).
pub fn migrate(ctl: &str, to: &str, extra: &[&str]) -> Run {
    let mut args = vec!["migrate", "--control-socket", ctl, "--to", to];
    args.extend_from_slice(extra);
    nfvisor(&args, Duration::from_secs(120))
}

/// `nfvisor snapshot --control-socket CTL --to DIR`.
pub fn snapshot(ctl: &str, dir: &str) -> Run {
    nfvisor(
        &["snapshot", "--control-socket", ctl, "--to", dir],
        Duration::from_secs(120),
    )
}

/// A bundled guest's end under QEMU: its exit code and its console (stdout
/// and stderr).
pub struct QemuGuest {
    pub code: i32,
    pub output: String,
}

/// Boots the exported guest `elf` under QEMU (q35 with nothing the guests
/// do not need, the exit port of their protocol) with the `devices`
/// arguments and `append` as its command line; killed after a minute.
pub fn qemu_guest(elf: &Path, devices: &[&str], append: &str) -> QemuGuest {
    let out = Command::new("timeout")
        .args(["--signal=KILL", "60", "qemu-system-x86_64"])
        .args(["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
        .args(["-M", "q35", "-nodefaults", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(devices)
        .arg("-kernel")
        .arg(elf)
        .arg("-append")
        .arg(append)
        .stdin(Stdio::null())
        .output()
        .expect("cannot start qemu");
    QemuGuest {
        code: out.status.code().unwrap_or(-1),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
