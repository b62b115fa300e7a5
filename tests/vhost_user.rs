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
use std::path::Path;

use bench::testpmd::Testpmd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// testpmd busy-polls a core: one test at a time on a 2-core machine.
static ONE_TESTPMD: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_TESTPMD.lock().unwrap_or_else(|e| e.into_inner())
}

/// testpmd with one vhost port `vdev` (bench::testpmd); a test fails,
/// saying why, where it cannot start (.ci/run installs DPDK and reserves
/// the hugepages).
fn testpmd(dir: &Path, prefix: &str, vdev: &str) -> Testpmd {
    let pmd =
        Testpmd::start(dir, prefix, vdev).unwrap_or_else(|e| panic!("{e} (.ci/run does this)"));
    pmd.wait_forwarding().unwrap_or_else(|e| panic!("{e}"));
    pmd
}

fn forwarded(pmd: Testpmd) -> (u64, u64) {
    pmd.finish().unwrap_or_else(|e| panic!("{e}"))
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
    let pmd = testpmd(
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
    // guest memory in 2 MiB hugepages (a hugetlb memfd) is mapped by the
    // backend the same way
    let mut args = ping_args(&net, "mode=ping count=100 size=64 timeout_s=20");
    args.extend(["--hugepages", "2M", "--memory", "32M"]);
    let run = nfvisor(&args, Duration::from_secs(90));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("R ping frames=100 bad=0 other=0"),
        "{}",
        run.stderr
    );
    let (rx, tx) = forwarded(pmd);
    assert_eq!(
        (rx, tx),
        (400, 400),
        "testpmd's counters against the guests'"
    );
}

#[test]
fn testpmd_killed_and_restarted_mid_traffic_the_vm_runs_on() {
    let _one = serial();
    let dir = scratch("vu-restart");
    let sock = dir.join("pmd.sock");
    let vdev = format!("net_vhost0,iface={}", sock.display());
    let mut pmd = testpmd(&dir, "nfvvu2", &vdev);
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
    let pmd = testpmd(&dir, "nfvvu2", &vdev);
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
    let (rx, tx) = forwarded(pmd);
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
    let pmd = testpmd(
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
    let (rx, tx) = forwarded(pmd);
    assert!(rx >= 100 && rx == tx, "rx {rx} tx {tx}");
    assert!(
        !sock.exists(),
        "the listener's socket is removed at the end"
    );
}

/// A backend of our own that answers badly, or minimally: `features` to
/// GET_FEATURES, no protocol feature (so no LOG_SHMFD, no MQ), one queue
/// pair, ring position 0 to GET_VRING_BASE, and no data path at all; or
/// (None) nothing at all. It serves one connection.
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
            // GET_FEATURES (1), GET_PROTOCOL_FEATURES (15), GET_QUEUE_NUM
            // (17): a u64; GET_VRING_BASE (11): the ring's index and 0
            let answer: Option<Vec<u8>> = match request {
                1 => Some(f.to_le_bytes().to_vec()),
                15 => Some(0u64.to_le_bytes().to_vec()),
                17 => Some(1u64.to_le_bytes().to_vec()),
                11 => Some([&body[..4.min(body.len())], &[0u8; 4][..]].concat()),
                _ => None,
            };
            if let Some(a) = answer {
                let mut reply = Vec::new();
                reply.extend_from_slice(&request.to_le_bytes());
                // version 1 and the reply flag
                reply.extend_from_slice(&5u32.to_le_bytes());
                reply.extend_from_slice(&(a.len() as u32).to_le_bytes());
                reply.extend_from_slice(&a);
                let _ = s.write_all(&reply);
            }
        }
    })
}

/// A backend that cannot log the pages it writes (no LOG_SHMFD): a
/// migration is refused before any page leaves, and the guest runs on.
#[test]
fn a_backend_without_dirty_logging_refuses_the_migration() {
    let dir = scratch("vu-nolog");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    // VERSION_1 and PROTOCOL_FEATURES
    let features = 1 << 32 | 1 << 30;
    let fake_a = fake_backend(&a, Some(features));
    let fake_b = fake_backend(&b, Some(features));
    let (ctl, inbound) = (dir.join("src.sock"), dir.join("in.sock"));
    let listen = format!("unix:{}", inbound.display());
    let net_b = format!("vhost-user={}", b.display());
    let mut dst = Running::start(&["receive", "--listen", &listen, "--net", &net_b]);
    dst.wait_for("waiting for a migration");
    let net_a = format!("vhost-user={}", a.display());
    let ctl_arg = ctl.to_str().unwrap();
    let mut src = Running::start(&[
        "run",
        "--guest",
        "net-probe",
        "--cmdline",
        "mode=echo count=0",
        "--net",
        &net_a,
        "--control-socket",
        ctl_arg,
        "--json",
    ]);
    src.wait_for("R negotiated");
    let r = migrate(ctl_arg, &listen, &[]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot log the guest pages it writes")
            && r.stderr.contains("the guest runs on here"),
        "{}",
        r.stderr
    );
    let status = nfvisor(
        &["status", "--control-socket", ctl_arg, "--json"],
        Duration::from_secs(30),
    );
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert_eq!(json(&status)["state"], "running", "{}", status.stdout);
    drop(src);
    drop(dst);
    let _ = (fake_a.join(), fake_b.join());
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
/// migration sends them; the destination attaches to its own testpmd,
/// which announces the guest's MAC (RARP), and the guest's ping goes on
/// there, every frame verified.
#[test]
fn a_vm_on_vhost_user_migrates_mid_traffic_with_the_backend_s_pages() {
    let _one = serial();
    let dir = scratch("vu-migrate");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let pmd_a = testpmd(&dir, "nfvvu4", &format!("net_vhost0,iface={}", a.display()));
    let pmd_b = testpmd(&dir, "nfvvu5", &format!("net_vhost0,iface={}", b.display()));
    wait_for_path(&a);
    wait_for_path(&b);
    let (ctl, inbound) = (dir.join("src.sock"), dir.join("in.sock"));
    let listen = format!("unix:{}", inbound.display());
    let net_b = format!("vhost-user={}", b.display());
    let mut dst = Running::start(&["receive", "--listen", &listen, "--net", &net_b, "--json"]);
    dst.wait_for("waiting for a migration");
    let net_a = format!("vhost-user={}", a.display());
    let mut args = ping_args(
        &net_a,
        "mode=ping count=8000 size=64 timeout_s=40 resend_ms=100",
    );
    let ctl_arg = ctl.to_str().unwrap();
    args.extend(["--control-socket", ctl_arg]);
    let mut src = Running::start(&args);
    src.wait_for("R negotiated");
    // (the pings must be flowing when the migration runs: two testpmds
    // busy-poll beside the guest on these 2 cores, so a loaded host needs
    // more than the pings' first round trips)
    std::thread::sleep(Duration::from_millis(1500));
    let r = migrate(ctl_arg, &listen, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = json(&r)["migration"].clone();
    let src = src.finish(Duration::from_secs(60));
    assert_eq!(src.code, 0, "{}", src.stderr);
    let dev = net0(&src);
    assert!(
        dev["logged_pages"].as_u64().unwrap_or(0) > 0,
        "the backend's log brought no page: {dev}\n{}\n{}",
        r.stdout,
        src.stderr
    );
    let dst = dst.finish(Duration::from_secs(90));
    assert_eq!(dst.code, 0, "{}", dst.stderr);
    assert!(
        dst.stderr.contains("R ping frames=8000 bad=0"),
        "{}",
        dst.stderr
    );
    // the destination's testpmd was asked to tell the network where the
    // guest now is (SEND_RARP); its RARP came back to the guest through
    // macswap, a frame that is not the guest's test frames
    let moved = net0(&dst);
    assert_eq!(moved["announces"], 1, "{moved}");
    assert!(
        !dst.stderr.contains(" other=0 "),
        "the RARP did not reach the guest: {}",
        dst.stderr
    );
    eprintln!(
        "vhost-user migration: total {} ms, downtime {} ms, {} pages from the backend's log",
        m["total_ms"], m["downtime_ms"], dev["logged_pages"]
    );
    let (rx, tx) = forwarded(pmd_b);
    assert!(
        rx > 0 && rx == tx,
        "the destination's testpmd: rx {rx} tx {tx}"
    );
    drop(pmd_a);
}

/// `bench net --backend vhost-user` measures both paths in one run and
/// says what testpmd forwarded.
#[test]
fn bench_net_vhost_user_measures_both_backends() {
    let _one = serial();
    let r = nfvisor(
        &[
            "bench",
            "net",
            "--backend",
            "vhost-user",
            "--frames",
            "10",
            "--size",
            "64",
            "--json",
        ],
        Duration::from_secs(180),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    let results = doc["results"].as_array().unwrap();
    for backend in ["vhost-user", "tap"] {
        let row = results
            .iter()
            .find(|x| x["backend"] == backend)
            .unwrap_or_else(|| panic!("no {backend} row: {doc}"));
        assert_eq!(row["frames"], 10, "{row}");
        assert!(row["rtt_avg_us"].as_u64().unwrap() > 0, "{row}");
    }
    let (rx, tx) = (
        doc["testpmd"]["rx_packets"].as_u64().unwrap(),
        doc["testpmd"]["tx_packets"].as_u64().unwrap(),
    );
    // two vhost-user runs: 20 warm-up frames, then 20 + 10
    assert!(rx >= 50 && rx == tx, "testpmd rx {rx} tx {tx}");
}

/// Two queue pairs: the guest turns both on through the control queue
/// (served by nfvisor: VQ_PAIRS_SET becomes SET_VRING_ENABLE) and every
/// other frame goes out and comes back on pair 1; a backend without
/// multiqueue is refused by name.
#[test]
fn two_queue_pairs_both_carry_frames() {
    let _one = serial();
    let dir = scratch("vu-mq");
    let sock = dir.join("mq.sock");
    let pmd = Testpmd::start_queues(
        &dir,
        "nfvvu6",
        &format!("net_vhost0,iface={},queues=2", sock.display()),
        2,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    pmd.wait_forwarding().unwrap_or_else(|e| panic!("{e}"));
    let net = format!("vhost-user={},queues=2", sock.display());
    let run = nfvisor(
        &ping_args(&net, "mode=ping count=200 size=64 pairs=2 timeout_s=20"),
        Duration::from_secs(90),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("R ctrl pairs=2 ack=0"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("R ping frames=200 bad=0")
            && run.stderr.contains(" pairs=2 pair0=100 pair1=100"),
        "{}",
        run.stderr
    );
    let (rx, tx) = forwarded(pmd);
    assert_eq!((rx, tx), (200, 200));

    // a backend without PROTOCOL_F_MQ (a VERSION_1-only one of our own:
    // testpmd's vhost PMD reports more pairs than its port polls, so it
    // cannot be caught there)
    let one = dir.join("one.sock");
    let t = fake_backend(&one, Some(1 << 32));
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "net-probe",
            "--net",
            &format!("vhost-user={},queues=2", one.display()),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("queues=2 asked, the backend serves 1 queue pair"),
        "{}",
        r.stderr
    );
    let _ = t.join();
}
