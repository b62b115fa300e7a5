//! vhost-user-net against someone else's backend: DPDK's `dpdk-testpmd`
//! with its vhost PMD (`--vdev net_vhost0,iface=SOCK`), forwarding every
//! frame back to the port it came from with the MACs swapped. The guest
//! (`net-probe mode=ping`) sends numbered frames and checks each one that
//! comes back; testpmd's own counters must agree with the guest's.
//! `.ci/run` installs DPDK and prepares hugepages; without them these tests
//! fail, they do not skip.

mod common;
use common::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// testpmd busy-polls a core: one at a time on a 2-core machine.
static ONE_TESTPMD: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_TESTPMD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hugepages for testpmd's own memory (the guest's is a memfd).
fn hugepages_ready() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let free: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.contains(" /dev/hugepages hugetlbfs "));
    assert!(
        free >= 64 && mounted,
        "testpmd needs 64 free 2 MiB hugepages ({free} free) on a hugetlbfs at /dev/hugepages \
         (mounted: {mounted}): echo 256 > /proc/sys/vm/nr_hugepages; \
         mount -t hugetlbfs nodev /dev/hugepages (.ci/run does this)"
    );
}

struct Testpmd {
    child: Child,
    log: PathBuf,
    prefix: String,
}

impl Testpmd {
    /// testpmd with one vhost port `vdev`, forwarding in macswap mode back
    /// to the same port.
    fn start(dir: &Path, prefix: &str, vdev: &str) -> Testpmd {
        require_program("dpdk-testpmd", "dpdk");
        hugepages_ready();
        remove_hugepage_files(prefix);
        let log = dir.join(format!("{prefix}-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("dpdk-testpmd")
            .args(["--no-pci", "--single-file-segments", "-m", "128"])
            .args(["--file-prefix", prefix, "-l", "0-1", "--vdev", vdev, "--"])
            .args([
                "--nb-cores=1",
                "--forward-mode=macswap",
                "--port-topology=loop",
                // (its default pool, 155 k buffers, takes 340 MiB)
                "--total-num-mbufs=16384",
            ])
            .stdin(Stdio::piped())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting dpdk-testpmd");
        Testpmd {
            child,
            log,
            prefix: prefix.into(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ends testpmd as its user does (Enter) and returns port 0's forward
    /// statistics: (RX-packets, TX-packets).
    fn finish(mut self) -> (u64, u64) {
        let _ = self.child.stdin.take().unwrap().write_all(b"\n");
        let t0 = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "testpmd did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.log();
        let stat = |key: &str| -> u64 {
            let at = log
                .find("Forward statistics for port 0")
                .unwrap_or_else(|| panic!("no forward statistics in:\n{log}"));
            log[at..]
                .split_once(key)
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in:\n{log}"))
        };
        (stat("RX-packets:"), stat("TX-packets:"))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.kill();
        remove_hugepage_files(&self.prefix);
    }
}

/// A dead testpmd's hugepage files make the next one with its prefix fail.
fn remove_hugepage_files(prefix: &str) {
    if let Ok(dir) = std::fs::read_dir("/dev/hugepages") {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn ping_args<'a>(net: &'a str, cmdline: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--guest",
        "net-probe",
        "--cmdline",
        cmdline,
        "--net",
        net,
        "--json",
    ]
}

fn net0(run: &Run) -> serde_json::Value {
    json(run)["vm"]["devices"]["net0"].clone()
}

#[test]
fn testpmd_reflects_every_frame_and_its_counters_agree() {
    let _one = serial();
    let dir = scratch("vu-pmd");
    let sock = dir.join("pmd.sock");
    let pmd = Testpmd::start(
        &dir,
        "nfvvu1",
        &format!("net_vhost0,iface={}", sock.display()),
    );
    wait_for_path(&sock);
    let net = format!("vhost-user={}", sock.display());
    let run = nfvisor(
        &ping_args(&net, "mode=ping count=300 size=128 timeout_s=20"),
        Duration::from_secs(90),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("R ping frames=300 bad=0 other=0 resent=0"),
        "{}",
        run.stderr
    );
    let dev = net0(&run);
    assert_eq!(dev["link_up"], 1, "{dev}");
    assert_eq!(dev["backend_disconnects"], 0, "{dev}");
    assert_eq!(dev["backend_failed_requests"], 0, "{dev}");
    // no frame passed through nfvisor: its vCPU saw kicks at most as MMIO
    // writes to the notify area, KVM turned them into eventfd signals
    let (rx, tx) = pmd.finish();
    assert_eq!(
        (rx, tx),
        (300, 300),
        "testpmd's counters against the guest's"
    );
}

#[test]
fn testpmd_killed_and_restarted_mid_traffic_the_vm_runs_on() {
    let _one = serial();
    let dir = scratch("vu-restart");
    let sock = dir.join("pmd.sock");
    let vdev = format!("net_vhost0,iface={}", sock.display());
    let mut pmd = Testpmd::start(&dir, "nfvvu2", &vdev);
    wait_for_path(&sock);
    let net = format!("vhost-user={}", sock.display());
    let mut vm = Running::start(&ping_args(
        &net,
        "mode=ping count=5000 size=64 timeout_s=40 resend_ms=100",
    ));
    vm.wait_for("R negotiated");
    std::thread::sleep(Duration::from_millis(700));
    pmd.kill();
    vm.wait_for("link down, the VM runs on");
    drop(pmd);
    let _ = std::fs::remove_file(&sock);
    let pmd = Testpmd::start(&dir, "nfvvu2", &vdev);
    vm.wait_for_within("is back: link up", Duration::from_secs(30));
    let run = vm.finish(Duration::from_secs(90));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("R ping frames=5000 bad=0"),
        "{}",
        run.stderr
    );
    let dev = net0(&run);
    assert_eq!(dev["backend_disconnects"], 1, "{dev}");
    assert_eq!(dev["backend_reconnects"], 1, "{dev}");
    assert_eq!(dev["link_up"], 1, "{dev}");
    // the rings' positions came from the guest's used rings
    assert_eq!(dev["positions_from_used"], 2, "{dev}");
    // the restarted testpmd carried the rest of the traffic
    let (rx, tx) = pmd.finish();
    assert!(rx > 0 && rx == tx, "after the restart: rx {rx} tx {tx}");
}

#[test]
fn server_mode_testpmd_connects_to_nfvisor() {
    let _one = serial();
    let dir = scratch("vu-server");
    let sock = dir.join("vm.sock");
    let net = format!("vhost-user={},mode=server", sock.display());
    // testpmd connects while it starts, before it forwards: the first
    // frames may be dropped, so they are sent again
    let vm = Running::start(&ping_args(
        &net,
        "mode=ping count=100 size=60 timeout_s=20 resend_ms=200",
    ));
    wait_for_path(&sock);
    let meta = std::fs::metadata(&sock).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "the listener is private"
    );
    let pmd = Testpmd::start(
        &dir,
        "nfvvu3",
        &format!("net_vhost0,iface={},client=1", sock.display()),
    );
    let run = vm.finish(Duration::from_secs(90));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("R ping frames=100 bad=0"),
        "{}",
        run.stderr
    );
    let (rx, tx) = pmd.finish();
    assert!(rx >= 100 && rx == tx, "rx {rx} tx {tx}");
    assert!(
        !sock.exists(),
        "the listener's socket is removed at the end"
    );
}

/// A backend of our own that answers badly: `features` to GET_FEATURES, or
/// (None) nothing at all.
fn fake_backend(sock: &Path, features: Option<u64>) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut hdr = [0u8; 12];
        while s.read_exact(&mut hdr).is_ok() {
            let request = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
            let mut body = vec![0u8; size as usize];
            if s.read_exact(&mut body).is_err() {
                return;
            }
            let Some(f) = features else { continue };
            // GET_FEATURES (1): a u64 reply, version 1 and the reply flag
            if request == 1 {
                let mut reply = Vec::new();
                reply.extend_from_slice(&1u32.to_le_bytes());
                reply.extend_from_slice(&5u32.to_le_bytes());
                reply.extend_from_slice(&8u32.to_le_bytes());
                reply.extend_from_slice(&f.to_le_bytes());
                let _ = s.write_all(&reply);
            }
        }
    })
}

#[test]
fn bad_backends_and_sockets_are_refused_clearly() {
    let dir = scratch("vu-bad");
    let args = |net: &str| -> Vec<String> {
        ["run", "--guest", "net-probe", "--net", net]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let refused = |net: String, needle: &str| {
        let a = args(&net);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let r = nfvisor(&a, Duration::from_secs(60));
        assert_eq!(r.code, 78, "{net}: {}", r.stderr);
        assert!(
            r.stderr.contains(needle),
            "{net}: expected {needle:?}:\n{}",
            r.stderr
        );
        t0.elapsed()
    };
    // no socket at all (client mode): at once
    let missing = dir.join("nobody.sock");
    let took = refused(
        format!("vhost-user={}", missing.display()),
        "no socket there",
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // a file, not a socket: either mode
    let file = dir.join("file");
    std::fs::write(&file, "x").unwrap();
    refused(format!("vhost-user={}", file.display()), "not a socket");
    refused(
        format!("vhost-user={},mode=server", file.display()),
        file.to_str().unwrap(),
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "the file is untouched");
    // a backend without VERSION_1 (a legacy-only virtio backend)
    let legacy = dir.join("legacy.sock");
    let t = fake_backend(&legacy, Some(1 << 5));
    refused(
        format!("vhost-user={}", legacy.display()),
        "does not offer VIRTIO_F_VERSION_1",
    );
    let _ = t.join();
    // a backend that never answers: the request's deadline, not a hang
    let silent = dir.join("silent.sock");
    let t = fake_backend(&silent, None);
    let took = refused(format!("vhost-user={}", silent.display()), "GET_FEATURES");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let _ = t.join();
}

/// Live migration of a VM on vhost-user, mid-traffic: the source's
/// testpmd logs the guest pages it writes (PROTOCOL_F_LOG_SHMFD) and the
/// migration sends them; the destination attaches to its own testpmd and
/// the guest's ping goes on there, every frame verified.
#[test]
fn a_vm_on_vhost_user_migrates_mid_traffic_with_the_backend_s_pages() {
    let _one = serial();
    let dir = scratch("vu-migrate");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let pmd_a = Testpmd::start(&dir, "nfvvu4", &format!("net_vhost0,iface={}", a.display()));
    let pmd_b = Testpmd::start(&dir, "nfvvu5", &format!("net_vhost0,iface={}", b.display()));
    wait_for_path(&a);
    wait_for_path(&b);
    let (ctl, inbound) = (dir.join("src.sock"), dir.join("in.sock"));
    let listen = format!("unix:{}", inbound.display());
    let net_b = format!("vhost-user={}", b.display());
    let mut dst = Running::start(&["receive", "--listen", &listen, "--net", &net_b]);
    dst.wait_for("waiting for a migration");
    let net_a = format!("vhost-user={}", a.display());
    let mut args = ping_args(
        &net_a,
        "mode=ping count=4000 size=64 timeout_s=40 resend_ms=100",
    );
    let ctl_arg = ctl.to_str().unwrap();
    args.extend(["--control-socket", ctl_arg]);
    let mut src = Running::start(&args);
    src.wait_for("R negotiated");
    std::thread::sleep(Duration::from_millis(500));
    let r = migrate(ctl_arg, &listen, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = json(&r)["migration"].clone();
    let src = src.finish(Duration::from_secs(60));
    assert_eq!(src.code, 0, "{}", src.stderr);
    let dev = net0(&src);
    assert!(
        dev["logged_pages"].as_u64().unwrap_or(0) > 0,
        "the backend's log brought no page: {dev}"
    );
    let dst = dst.finish(Duration::from_secs(90));
    assert_eq!(dst.code, 0, "{}", dst.stderr);
    assert!(
        dst.stdout.contains("R ping frames=4000 bad=0"),
        "{}\n{}",
        dst.stdout,
        dst.stderr
    );
    eprintln!(
        "vhost-user migration: total {} ms, downtime {} ms, {} pages from the backend's log",
        m["total_ms"], m["downtime_ms"], dev["logged_pages"]
    );
    let (rx, tx) = pmd_b.finish();
    assert!(
        rx > 0 && rx == tx,
        "the destination's testpmd: rx {rx} tx {tx}"
    );
    drop(pmd_a);
}
