//! Live migration between two nfvisor processes on this host, over a unix
//! socket and over TCP on localhost, and what happens when it goes wrong.

mod common;
use common::*;
use std::io::{Read, Write};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);
const DIRTIER: &[&str] = &[
    "--guest",
    "dirtier",
    "--memory",
    "32M",
    "--cmdline",
    "mb=4 passes=80",
];

fn source(dir: &std::path::Path) -> (Running, std::path::PathBuf) {
    source_with(dir, &[])
}

fn source_with(dir: &std::path::Path, extra: &[&str]) -> (Running, std::path::PathBuf) {
    source_running(dir, &[DIRTIER, extra].concat())
}

/// `run --control-socket DIR/src.sock GUEST_ARGS`, started and controllable.
fn source_running(dir: &std::path::Path, guest_args: &[&str]) -> (Running, std::path::PathBuf) {
    let sock = dir.join("src.sock");
    let mut args = vec!["run", "--control-socket", sock.to_str().unwrap()];
    args.extend_from_slice(guest_args);
    let mut vm = Running::start(&args);
    vm.wait_for("vCPU 0 runs on host thread");
    wait_for_path(&sock);
    (vm, sock)
}

/// A destination listening at `endpoint` that holds the token in `token`,
/// waiting for a migration.
fn token_receiver(endpoint: &str, token: &std::path::Path) -> Running {
    let mut dst = Running::start(&[
        "receive",
        "--listen",
        endpoint,
        "--token-file",
        token.to_str().unwrap(),
    ]);
    dst.wait_for("waiting for a migration");
    dst
}

fn migrate_to(endpoint: &str, name: &str) {
    migrate_to_with(endpoint, name, &[], &[], "ring");
}

/// Migrates a running dirtier (source flags `extra`, `migrate` flags
/// `migrate_flags`) and checks the outcome; returns the migration's report.
fn migrate_to_with(
    endpoint: &str,
    name: &str,
    extra: &[&str],
    migrate_flags: &[&str],
    tracking: &str,
) -> serde_json::Value {
    let plain = nfvisor(&[&["run"], DIRTIER].concat(), T);
    let dir = scratch(name);
    // TCP without a token must be asked for, at both ends
    let insecure: &[&str] = if endpoint.starts_with("tcp:") {
        &["--insecure"]
    } else {
        &[]
    };
    let mut dst = Running::start(&[&["receive", "--listen", endpoint], insecure].concat());
    dst.wait_for("waiting for a migration");
    let (src, sock) = source_with(&dir, extra);
    std::thread::sleep(Duration::from_millis(150));
    let r = migrate(
        sock.to_str().unwrap(),
        endpoint,
        &[&["--json"], migrate_flags, insecure].concat(),
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let report = json(&r);
    let m = &report["migration"];
    assert!(m["rounds"].as_u64().unwrap() >= 2, "{m}");
    let (total, down) = (
        m["total_ms"].as_f64().unwrap(),
        m["downtime_ms"].as_f64().unwrap(),
    );
    assert!(
        down > 0.0 && down < total,
        "downtime {down} ms of {total} ms"
    );
    assert!(m["pages_sent"].as_u64().unwrap() >= 1024, "{m}");
    assert_eq!(m["dirty_tracking"], tracking);
    assert!(m["dirty_log_manual_protect"].is_boolean(), "{m}");
    // the state's cost, measured by the destination, and the link's
    // round trip went into the stop rule
    assert!(
        m["fixed_downtime_estimate_ms"].as_f64().unwrap() > 0.0,
        "{m}"
    );
    // where the downtime went, in the order it happens (one host, one clock)
    let p = &m["downtime_phases"];
    let steps: Vec<f64> = [
        "paused_ms",
        "last_pages_ms",
        "state_ms",
        "dest_stream_end_ms",
        "dest_applied_ms",
        "dest_ready_ms",
        "ready_ms",
        "go_ms",
        "dest_go_ms",
        "dest_resumed_ms",
    ]
    .iter()
    .map(|k| p[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {p}")))
    .collect();
    assert!(steps[0] > 0.0, "{p}");
    // the destination's steps are corrected by the estimated offset between
    // the two ends' clocks, which is off by up to its stated uncertainty
    // (one host, one clock, but the estimate still has that error): a step
    // of one end may seem to precede the other end's by that much
    let tolerance = m["clock_offset_uncertainty_ms"].as_f64().unwrap_or(0.0);
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1] + tolerance),
        "out of order beyond the clock offset's uncertainty ({tolerance} ms): {p}"
    );
    assert_eq!(steps[9], down, "{p}");
    let s = src.finish(T);
    assert_eq!(s.code, 0, "{}", s.stderr);
    assert!(s.stdout.contains("guest migrated to"), "{}", s.stdout);
    assert!(
        !s.stdout.contains("DIRTIER OK"),
        "the guest must not finish on the source"
    );
    let d = dst.finish(T);
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert_eq!(
        digest(&d.stdout),
        digest(&plain.stdout),
        "the migrated guest computed something else"
    );
    m.clone()
}

#[test]
fn a_running_dirtier_migrates_over_a_unix_socket() {
    let dir = scratch("mig-unix-ep");
    let ep = format!("unix:{}", dir.join("in.sock").display());
    migrate_to(&ep, "mig-unix");
}

#[test]
fn the_dirty_bitmap_serves_as_well_as_the_ring() {
    let dir = scratch("mig-bitmap-ep");
    let ep = format!("unix:{}", dir.join("in.sock").display());
    migrate_to_with(&ep, "mig-bitmap", &["--dirty-bitmap"], &[], "bitmap");
}

/// Four vCPUs (the application processors parked, as the guest left them):
/// every one's state crosses and the guest finishes the same.
#[test]
fn a_guest_with_four_vcpus_migrates() {
    let dir = scratch("mig-4vcpu-ep");
    let ep = format!("unix:{}", dir.join("in.sock").display());
    migrate_to_with(&ep, "mig-4vcpu", &["--vcpus", "4"], &[], "ring");
}

/// A dirty ring far too small for the dirtier (256 entries, its working
/// set is 1024 pages) fills during a round: the vCPU empties it itself and
/// runs on, and no page it harvested that way is lost. Pre-copy is held to
/// 10 MB/s, so the first round (4 MiB) lasts long enough for the guest to
/// fill the ring however fast this host runs it, and the budget (1 s)
/// takes what one such round leaves dirty: the migration ends while the
/// guest still runs, whatever the speed of the host.
#[test]
fn a_vcpu_empties_its_full_dirty_ring_and_nothing_is_lost() {
    let dir = scratch("mig-ring-full-ep");
    let ep = format!("unix:{}", dir.join("in.sock").display());
    let m = migrate_to_with(
        &ep,
        "mig-ring-full",
        &["--dirty-ring", "4096"],
        &["--bandwidth-limit", "10M", "--downtime-ms", "1000"],
        "ring",
    );
    assert!(m["ring_full_exits"].as_u64().unwrap() > 0, "{m}");
}

/// A destination whose clock is 5 s ahead of the source's: the source
/// estimates the offset on the Sync round trips and takes it out of the
/// downtime and the destination's steps.
#[test]
fn the_downtime_is_measured_across_hosts_whose_clocks_differ() {
    let dir = scratch("mig-skew");
    let ep = format!("unix:{}", dir.join("in.sock").display());
    let mut dst = Running::start_with_env(
        &["receive", "--listen", &ep],
        &[("NFVISOR_TEST_CLOCK_SKEW_MS", "5000")],
    );
    dst.wait_for("waiting for a migration");
    let (src, sock) = source(&dir);
    std::thread::sleep(Duration::from_millis(150));
    let r = migrate(sock.to_str().unwrap(), &ep, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = json(&r);
    let m = &report["migration"];
    let offset = m["clock_offset_ms"].as_f64().unwrap();
    assert!((offset - 5000.0).abs() < 50.0, "{m}");
    let (down, total) = (
        m["downtime_ms"].as_f64().unwrap(),
        m["total_ms"].as_f64().unwrap(),
    );
    // uncorrected, the downtime would be 5 s: far beyond the total
    assert!(down > 0.0 && down < total, "{m}");
    let p = &m["downtime_phases"];
    assert!(p["dest_stream_end_ms"].as_f64().unwrap() < total, "{m}");
    drop(src);
    assert_eq!(dst.finish(T).code, 0);
}

/// A source that announces two connections and opens one: the receiver
/// gives up within seconds, says why, and runs nothing.
#[test]
fn a_receiver_gives_up_on_a_source_that_opens_too_few_connections() {
    use std::io::BufRead;
    let dir = scratch("mig-few");
    let ep = dir.join("in.sock");
    let mut dst = Running::start(&["receive", "--listen", &format!("unix:{}", ep.display())]);
    dst.wait_for("waiting for a migration");
    let s = std::os::unix::net::UnixStream::connect(&ep).unwrap();
    let mut greeting = String::new();
    std::io::BufReader::new(s.try_clone().unwrap())
        .read_line(&mut greeting)
        .unwrap();
    assert!(greeting.contains("OPEN"), "{greeting}");
    let config = serde_json::json!({
        "vm": {"guest": "dirtier", "memory": "32M", "vcpus": 1, "cmdline": ""},
        "tsc_khz": 0, "connections": 2
    });
    let mut w = migration::Writer::new(s.try_clone().unwrap()).unwrap();
    w.frame(migration::Kind::Config, config.to_string().as_bytes())
        .unwrap();
    w.flush().unwrap();
    // (it gives up by itself: the message says so)
    let d = dst.finish(T);
    assert_ne!(d.code, 0);
    assert!(
        d.stderr.contains("too few connections") && d.stderr.contains("announced 2"),
        "{}",
        d.stderr
    );
    assert!(d.stderr.contains("nothing ran"), "{}", d.stderr);
    drop(s);
}

#[test]
fn a_running_dirtier_migrates_over_tcp() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    migrate_to(&format!("tcp:127.0.0.1:{port}"), "mig-tcp");
}

#[test]
fn a_destination_that_dies_before_ready_leaves_the_guest_running_here() {
    let plain = nfvisor(&[&["run"], DIRTIER].concat(), T);
    let dir = scratch("mig-die");
    let fake = dir.join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake).unwrap();
    // a destination that reads a little of the stream and dies
    let killer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"NFV-MIGRATE 2 OPEN\n").unwrap();
        let mut buf = vec![0u8; 100_000];
        let _ = s.read(&mut buf);
    });
    let (src, sock) = source(&dir);
    let r = migrate(
        sock.to_str().unwrap(),
        &format!("unix:{}", fake.display()),
        &[],
    );
    killer.join().unwrap();
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("runs on here") || r.stderr.contains("migration link"),
        "{}",
        r.stderr
    );
    // nobody listening at all
    let r = migrate(sock.to_str().unwrap(), "unix:/nonexistent/in.sock", &[]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("/nonexistent/in.sock"), "{}", r.stderr);
    // status: running, and what the last attempt ran into
    assert_last_failure(sock.to_str().unwrap(), "running", "/nonexistent/in.sock");
    let s = src.finish(T);
    assert_eq!(s.code, 0, "{}", s.stderr);
    assert_eq!(digest(&s.stdout), digest(&plain.stdout));
}

#[test]
fn a_receiver_refuses_a_corrupt_stream_and_runs_nothing() {
    let dir = scratch("mig-corrupt");
    let (src, sock) = source(&dir);
    let snap = dir.join("snap");
    let r = snapshot(sock.to_str().unwrap(), snap.to_str().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    drop(src);
    let mut bytes = std::fs::read(snap.join("snapshot.nfv")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    let ep = dir.join("in.sock");
    let mut dst = Running::start(&["receive", "--listen", &format!("unix:{}", ep.display())]);
    dst.wait_for("waiting for a migration");
    let mut s = std::os::unix::net::UnixStream::connect(&ep).unwrap();
    let _ = s.write_all(&bytes);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    // PREPARED once its VM existed, then the refusal
    assert!(
        answer.lines().last().unwrap_or("").starts_with("ERROR"),
        "{answer}"
    );
    assert!(answer.contains("checksum"), "{answer}");
    let d = dst.finish(T);
    assert_eq!(d.code, 78, "{}", d.stderr);
    assert!(d.stderr.contains("nothing ran"), "{}", d.stderr);
    assert!(!d.stdout.contains("DIRTIER"));
}

#[test]
fn a_guest_timer_sees_the_stall_of_the_hand_over() {
    // A TSC-deadline timer armed before the pause fires late by about the
    // downtime, as it would on a machine that really stalled: the guest's
    // TSC and kvmclock advance by the time between saving and restoring its
    // state. (On a paravirtual PVM host the guest reads the host's TSC
    // whatever offset is set, so there this holds by construction; on
    // hardware KVM it is the destination's correction that makes it hold.)
    let dir = scratch("mig-time");
    let ep = format!("unix:{}", dir.join("in.sock").display());
    let mut dst = Running::start(&["receive", "--listen", &ep, "--json"]);
    dst.wait_for("waiting for a migration");
    let sock = dir.join("src.sock");
    let mut src = Running::start_with_env(
        &[
            "run",
            "--cmdline",
            "samples=3000 period_us=1000",
            "--control-socket",
            sock.to_str().unwrap(),
        ],
        &[("NFVISOR_TEST_STOP_COPY_DELAY_MS", "300")],
    );
    src.wait_for("vCPU 0 runs on host thread");
    wait_for_path(&sock);
    std::thread::sleep(Duration::from_millis(300));
    let r = migrate(sock.to_str().unwrap(), &ep, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let downtime_us = json(&r)["migration"]["downtime_ms"].as_f64().unwrap() * 1000.0;
    drop(src);
    let d = dst.finish(T);
    assert_eq!(d.code, 0, "{}", d.stderr);
    let max_us = json(&d)["guest"]["histograms"][0]["max"].as_f64().unwrap() / 1000.0;
    // a 300 ms stop-and-copy (test hook): far above this host's noise
    assert!(downtime_us >= 300_000.0, "{downtime_us}");
    assert!(
        max_us >= downtime_us - 2000.0,
        "timer max {max_us} us, downtime {downtime_us} us"
    );
    // KVM's own view on the destination: kvmclock moved on by the stall
    // (KVM_SET_CLOCK with KVM_CLOCK_REALTIME where the host has it), and
    // vCPU 0's TSC is where the real time says it should be. (On PVM the
    // TSC part holds by construction, TSC offsets being the host's: a
    // wrong offset was seen to pass here; on hardware it is off by 300 ms.)
    let number_after = |what: &str| -> f64 {
        let at = d
            .stderr
            .find(what)
            .unwrap_or_else(|| panic!("{what}: {}", d.stderr))
            + what.len();
        d.stderr[at..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    assert!(
        number_after("guest clocks moved on by ") >= 300.0,
        "{}",
        d.stderr
    );
    // a missing or wrong offset is off by the whole 300 ms
    let error_us = number_after("TSC continuity error ");
    assert!(error_us.abs() < 50_000.0, "{}", d.stderr);
}

#[test]
fn a_receiver_with_a_token_accepts_only_a_source_that_knows_it() {
    let dir = scratch("mig-token");
    let (good, bad) = (dir.join("token"), dir.join("wrong"));
    std::fs::write(&good, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(&bad, "ffffffffffffffffffffffffffffffff\n").unwrap();
    let ep = format!("unix:{}", dir.join("in.sock").display());
    let dst = token_receiver(&ep, &good);
    let (src, sock) = source(&dir);
    let s = sock.to_str().unwrap();
    let r = nfvisor(&["migrate", "--control-socket", s, "--to", &ep], T);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--token-file"), "{}", r.stderr);
    let r = migrate(s, &ep, &["--token-file", bad.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("refused our token"), "{}", r.stderr);
    // a short token is refused before anything is sent
    let short = dir.join("short");
    std::fs::write(&short, "abc").unwrap();
    let r = migrate(s, &ep, &["--token-file", short.to_str().unwrap()]);
    assert_eq!(r.code, 78, "{}", r.stderr);
    // the receiver is still waiting, and the right token gets through, on
    // three connections (each proves it), the pages split among them
    let r = migrate(
        s,
        &ep,
        &[
            "--token-file",
            good.to_str().unwrap(),
            "--connections",
            "3",
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(json(&r)["migration"]["connections"], 3);
    let out = src.finish(T);
    assert!(out.stdout.contains("guest migrated to"), "{}", out.stdout);
    let d = dst.finish(T);
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert!(d.stderr.contains("does not know the token"), "{}", d.stderr);
    assert_eq!(digest(&d.stdout), plain_digest());
}

#[test]
fn a_destination_lost_after_go_leaves_the_guest_paused_and_says_so() {
    use std::io::BufRead;
    let plain = nfvisor(&[&["run"], DIRTIER].concat(), T);
    let dir = scratch("mig-after-go");
    let fake = dir.join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake).unwrap();
    // a destination that takes the whole stream, says READY, hears GO, and dies
    let fake_dst = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"NFV-MIGRATE 2 OPEN\n").unwrap();
        let mut r = migration::Reader::new(s.try_clone().unwrap()).unwrap();
        let first = r.next_frame().unwrap().unwrap();
        assert_eq!(first.kind, migration::Kind::Config);
        s.write_all(b"PREPARED\n").unwrap();
        while let Some(f) = r.next_frame().unwrap() {
            // (it has applied everything when it reads a Sync frame)
            if f.kind == migration::Kind::Sync {
                let seq = u64::from_le_bytes(f.payload[..8].try_into().unwrap());
                s.write_all(format!("SYNCED 0 {seq}\n").as_bytes()).unwrap();
            }
        }
        s.write_all(b"READY\n").unwrap();
        let mut go = String::new();
        std::io::BufReader::new(s.try_clone().unwrap())
            .read_line(&mut go)
            .unwrap();
        assert!(go.starts_with("GO "), "{go}");
    });
    let (src, sock) = source(&dir);
    let s = sock.to_str().unwrap();
    let r = migrate(s, &format!("unix:{}", fake.display()), &[]);
    fake_dst.join().unwrap();
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("OUTCOME UNKNOWN") && r.stderr.contains("PAUSED"),
        "{}",
        r.stderr
    );
    assert_failed_paused(s);
    // the operator checked: the guest is not running elsewhere; resume here
    assert_eq!(nfvisor(&["resume", "--control-socket", s], T).code, 0);
    let st = json(&nfvisor(&["status", "--control-socket", s, "--json"], T));
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["last_failed_migration"]["left_paused"], false, "{st}");
    let out = src.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(digest(&out.stdout), digest(&plain.stdout));
}

#[test]
fn a_bandwidth_limit_holds_pre_copy_back_and_progress_is_shown() {
    let dir = scratch("mig-bw");
    let ep = format!("unix:{}", dir.join("in.sock").display());
    let mut dst = Running::start(&["receive", "--listen", &ep]);
    dst.wait_for("waiting for a migration");
    // a guest that outlives the two seconds of pre-copy below on any host
    // (80 passes take about two seconds on a fast host)
    let (src, sock) = source_running(
        &dir,
        &[
            "--guest",
            "dirtier",
            "--memory",
            "32M",
            "--cmdline",
            "mb=4 passes=250",
        ],
    );
    std::thread::sleep(Duration::from_millis(150));
    let s = sock.to_str().unwrap().to_string();
    let migrating = {
        let (s, ep) = (s.clone(), ep.clone());
        std::thread::spawn(move || {
            nfvisor(
                &[
                    "migrate",
                    "--control-socket",
                    &s,
                    "--to",
                    &ep,
                    "--bandwidth-limit",
                    "16M",
                    // at 16 MiB/s a guest dirtying 4 MiB per pass never
                    // converges: give up waiting after two seconds (time
                    // for the status checks below, even on a loaded host)
                    // and complete
                    "--timeout",
                    "2",
                    "--on-timeout",
                    "force",
                    "--json",
                ],
                T,
            )
        })
    };
    // meanwhile status answers, says so and shows the progress; pause and a
    // second migration are refused
    let mut seen = None;
    for _ in 0..100 {
        let r = nfvisor(&["status", "--control-socket", &s, "--json"], T);
        if r.code != 0 {
            break; // the VM has gone (migrated): too late to look
        }
        let st = json(&r);
        if st["state"] == "migrating" && st["migration"]["progress"]["round"].as_u64() >= Some(1) {
            seen = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = seen.expect("status never showed the migration's progress");
    assert_eq!(st["migration"]["to"], ep.as_str());
    assert!(
        st["migration"]["progress"]["bytes"].as_u64().unwrap() > 0,
        "{st}"
    );
    let refused = nfvisor(&["pause", "--control-socket", &s], T);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("in flight"), "{}", refused.stderr);
    let refused = migrate(&s, "unix:/nonexistent", &[]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("in flight"), "{}", refused.stderr);
    let r = migrating.join().unwrap();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = &json(&r)["migration"];
    let (bytes, total_ms) = (
        m["bytes"].as_f64().unwrap(),
        m["total_ms"].as_f64().unwrap(),
    );
    // at most 16 MiB/s in pre-copy: the first round alone takes its share
    // (the stop-and-copy is never held back: it is downtime)
    let last = m["last_round_pages"].as_f64().unwrap() * 4096.0;
    let floor_ms = (bytes - last - 1048576.0).max(0.0) / (16.0 * 1048576.0) * 1000.0;
    assert!(
        total_ms >= floor_ms,
        "{bytes} bytes in {total_ms} ms, limit implies >= {floor_ms} ms"
    );
    assert!(
        r.stderr.contains("migration: round"),
        "progress lines: {}",
        r.stderr
    );
    drop(src);
    let d = dst.finish(T);
    assert_eq!(d.code, 0, "{}", d.stderr);
    digest(&d.stdout);
}

/// The dirtier's digest without migration (computed once per binary).
fn plain_digest() -> String {
    static PLAIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PLAIN
        .get_or_init(|| digest(&nfvisor(&[&["run"], DIRTIER].concat(), T).stdout))
        .clone()
}

/// One migration into a destination told to fail (`NFVISOR_TEST_FAULT`).
/// Returns the migrate run, the destination's run and the source VM.
fn migrate_into_fault(fault: &str) -> (Run, Run, Running, std::path::PathBuf) {
    migrate_into_fault_with(fault, &[])
}

/// `migrate_into_fault`, with `migrate` flags.
fn migrate_into_fault_with(
    fault: &str,
    migrate_flags: &[&str],
) -> (Run, Run, Running, std::path::PathBuf) {
    let dir = scratch(&format!("fault-{}", fault.replace(':', "-")));
    let inbound = dir.join("in.sock");
    let endpoint = format!("unix:{}", inbound.display());
    let mut dst = Running::start_with_env(
        &["receive", "--listen", &endpoint],
        &[("NFVISOR_TEST_FAULT", fault)],
    );
    dst.wait_for("waiting for a migration");
    let (src, sock) = source(&dir);
    std::thread::sleep(Duration::from_millis(150));
    let r = migrate(sock.to_str().unwrap(), &endpoint, migrate_flags);
    let dst = dst.finish(T);
    let (phase, action) = fault.split_once(':').unwrap_or((fault, "kill"));
    assert!(
        dst.stderr
            .contains(&format!("NFVISOR_TEST_FAULT: {action} at {phase}")),
        "the fault was not hit at {phase}: {}",
        dst.stderr
    );
    assert_ne!(
        r.code, 0,
        "a migration into a failing destination succeeded"
    );
    (r, dst, src, sock)
}

/// The destination never ran the guest; the source finishes it, exactly as
/// without a migration.
fn ran_here_only(dst: &Run, src: Running, what: &str) {
    assert!(
        !dst.stdout.contains("DIRTIER"),
        "{what}: the destination ran the guest"
    );
    let out = src.finish(T);
    assert_eq!(out.code, 0, "{what}: {}", out.stderr);
    assert_eq!(digest(&out.stdout), plain_digest(), "{what}");
}

/// `status`: the migration failed and left the guest paused here, and says
/// why, until the operator resumes it.
fn assert_failed_paused(sock: &str) {
    assert_last_failure(sock, "failed", "OUTCOME UNKNOWN");
}

/// `status` says `state`, and its last failed migration names `needle` and
/// whether it left the guest paused (state "failed").
fn assert_last_failure(sock: &str, state: &str, needle: &str) {
    let st = json(&nfvisor(&["status", "--control-socket", sock, "--json"], T));
    assert_eq!(st["state"], state, "{st}");
    let last = &st["last_failed_migration"];
    assert_eq!(last["left_paused"], state == "failed", "{st}");
    assert!(
        last["error"].as_str().unwrap_or("").contains(needle),
        "{st}"
    );
}

/// The guest is paused here and the migration said why; `resume` (the
/// operator's call) lets it finish.
fn resume_paused(r: &Run, sock: &std::path::Path) {
    assert!(
        r.stderr.contains("OUTCOME UNKNOWN") && r.stderr.contains("PAUSED"),
        "{}",
        r.stderr
    );
    let s = sock.to_str().unwrap();
    assert_failed_paused(s);
    assert_eq!(nfvisor(&["resume", "--control-socket", s], T).code, 0);
}

#[test]
fn a_destination_failing_before_ready_leaves_the_guest_running_here() {
    for phase in ["connect", "first-round", "stop-and-copy"] {
        for action in ["kill", "cut"] {
            let (r, dst, src, _) = migrate_into_fault(&format!("{phase}:{action}"));
            assert!(
                r.stderr.contains("runs on here")
                    || r.stderr.contains("migration link")
                    || r.stderr.contains("to prepare"),
                "{phase}:{action}: {}",
                r.stderr
            );
            ran_here_only(&dst, src, &format!("{phase}:{action}"));
        }
    }
}

/// A destination that stops reading (without closing) at the connection
/// (before it says PREPARED), in the first round or in the stop-and-copy:
/// the source gives up after its `--io-timeout`, the guest runs on here,
/// and the destination ran nothing.
#[test]
fn a_destination_stalling_before_ready_leaves_the_guest_running_here() {
    for phase in ["connect", "first-round", "stop-and-copy"] {
        let what = format!("{phase}:stall");
        let (r, dst, src, _) = migrate_into_fault_with(&what, &["--io-timeout", "2"]);
        assert!(
            dst.stderr.contains("the peer hung up on the stall"),
            "{what}: {}",
            dst.stderr
        );
        // (the short dirtier may end here before the source gives up: the
        // stalled migration then ends with the VM; the io-timeout itself is
        // tested with a fake destination above)
        assert!(
            r.stderr.contains("runs on here")
                || r.stderr.contains("migration link")
                || r.stderr.contains("closed the connection without a reply"),
            "{what}: {}",
            r.stderr
        );
        ran_here_only(&dst, src, &what);
    }
}

/// After READY, before GO: the source resumes by itself when GO cannot be
/// sent; when GO went out and nothing came back it cannot know, stays
/// paused and says so. Either way the destination never runs the guest and
/// the guest finishes here.
#[test]
fn a_destination_failing_after_ready_never_runs_the_guest() {
    for action in ["kill", "cut"] {
        let (r, dst, src, sock) = migrate_into_fault(&format!("after-ready:{action}"));
        if !r.stderr.contains("runs on here") {
            resume_paused(&r, &sock);
        }
        ran_here_only(&dst, src, action);
    }
}

/// A destination that stalls after READY (it never reads GO) or after GO
/// (it never answers RUNNING): the source cannot tell whether GO arrived,
/// stays paused after its `--io-timeout` and says so; the destination,
/// stalled, never runs the guest; resumed by the operator, the guest
/// finishes here.
#[test]
fn a_destination_stalling_after_ready_or_go_leaves_the_source_paused_and_saying_why() {
    for phase in ["after-ready", "after-go"] {
        let what = format!("{phase}:stall");
        let (r, dst, src, sock) = migrate_into_fault_with(&what, &["--io-timeout", "2"]);
        if !r.stderr.contains("runs on here") {
            resume_paused(&r, &sock);
        }
        ran_here_only(&dst, src, &what);
    }
}

/// After GO the source cannot tell: it stays paused and says so. Killed,
/// the destination ran nothing and the operator resumes the source; cut
/// off, the destination runs the guest to the end and the source must not
/// be resumed (here it is just stopped).
#[test]
fn a_destination_failing_after_go_leaves_the_source_paused() {
    let (r, dst, src, sock) = migrate_into_fault("after-go:kill");
    resume_paused(&r, &sock);
    ran_here_only(&dst, src, "after-go:kill");

    let (r, dst, src, sock) = migrate_into_fault("after-go:cut");
    assert_eq!(dst.code, 0, "{}", dst.stderr);
    assert_eq!(
        digest(&dst.stdout),
        plain_digest(),
        "it ran on the destination"
    );
    assert!(r.stderr.contains("OUTCOME UNKNOWN"), "{}", r.stderr);
    let s = sock.to_str().unwrap();
    // two running copies must not happen
    assert_failed_paused(s);
    drop(src);
}

/// `bench migration` measures nfvisor and QEMU on the same guest in one
/// run, with the stall both ways: the dirtier's ticks keep arriving around
/// the hand-over, and its TSC gap shows the stall it felt.
#[test]
fn the_migration_benchmark_measures_nfvisor_and_qemu_with_the_stall() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let r = nfvisor(
        &[
            "bench",
            "migration",
            "--scenario",
            "dirtier",
            "--dirtier-mb",
            "16",
            "--runs",
            "1",
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = &json(&r)["dirtier"];
    for vmm in ["nfvisor", "qemu"] {
        let each = &d[vmm]["each"][0];
        let (total, down) = (
            each["total_ms"].as_f64().unwrap(),
            each["downtime_ms"].as_f64().unwrap(),
        );
        assert!(total > 0.0 && down >= 0.0 && down <= total, "{vmm}: {each}");
        let stall = &each["stall"];
        assert!(stall["ticks"].as_u64().unwrap() > 10, "{vmm}: {stall}");
        let silence = stall["tick_silence_ms"].as_f64().unwrap();
        assert!(silence > 0.0 && silence < 10_000.0, "{vmm}: {stall}");
        assert!(
            stall["tsc_gap_ms"].as_f64().unwrap() > 0.0,
            "{vmm}: {stall}"
        );
    }
    assert!(d["qemu_over_nfvisor"]["total"].as_f64().unwrap() > 0.0);
}

/// Runs `guest` (run flags) once unmigrated, then migrates a running copy
/// of it (after 300 ms) over a unix socket: the migrated guest must end
/// well (no CORRUPT) with the unmigrated run's digest.
fn migrates_with_the_plain_digest(name: &str, guest: &[&str]) {
    let plain = nfvisor(&[&["run"], guest].concat(), T);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    let dir = scratch(name);
    let ep = format!("unix:{}", dir.join("in.sock").display());
    let mut dst = Running::start(&["receive", "--listen", &ep]);
    dst.wait_for("waiting for a migration");
    let (src, sock) = source_running(&dir, guest);
    std::thread::sleep(Duration::from_millis(300));
    let r = migrate(sock.to_str().unwrap(), &ep, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = &json(&r)["migration"];
    assert!(m["rounds"].as_u64().unwrap() >= 2, "{m}");
    let d = dst.finish(T);
    assert!(!d.stdout.contains("CORRUPT"), "{}", d.stdout);
    assert_eq!(d.code, 0, "{}\n{}", d.stdout, d.stderr);
    assert_eq!(digest(&d.stdout), digest(&plain.stdout));
    drop(src);
}

/// Pages the guest zeroes after they were sent (the dirtier's even passes
/// zero every other page) arrive as zero: a stale copy would fail the
/// guest's read-back on the destination, and the digest would differ.
#[test]
fn a_page_zeroed_after_it_was_sent_arrives_as_zero() {
    migrates_with_the_plain_digest(
        "mig-zeroed",
        &[
            "--guest",
            "dirtier",
            "--memory",
            "32M",
            "--cmdline",
            "mb=4 passes=60 zero_every=2",
        ],
    );
}

/// Pages that only the VMM writes (the DMA probe, on the guest's request,
/// as a device's DMA would) are not in KVM's dirty log: migration merges
/// the VMM's own dirty bitmap into every round, or the destination would
/// read stale values there and the guest would report CORRUPT.
#[test]
fn pages_only_the_vmm_writes_reach_the_destination() {
    migrates_with_the_plain_digest(
        "mig-vmm-writes",
        &[
            "--dma-probe",
            "--guest",
            "dirtier",
            "--memory",
            "32M",
            "--cmdline",
            "mb=1 dma_mb=1 passes=200",
        ],
    );
}

/// A received guest migrates on: the middle host chose the dirty bitmap on
/// `receive`, and the guest finishes on the third with the digest of an
/// unmigrated run.
#[test]
fn a_received_guest_migrates_on_with_the_tracking_its_receiver_chose() {
    let dir = scratch("mig-chain");
    let (b_in, c_in) = (
        format!("unix:{}", dir.join("b.sock").display()),
        format!("unix:{}", dir.join("c.sock").display()),
    );
    let b_ctl = dir.join("b-ctl.sock");
    let mut b = Running::start(&[
        "receive",
        "--listen",
        &b_in,
        "--dirty-bitmap",
        "--control-socket",
        b_ctl.to_str().unwrap(),
    ]);
    b.wait_for("waiting for a migration");
    let mut c = Running::start(&["receive", "--listen", &c_in]);
    c.wait_for("waiting for a migration");
    let (a, a_ctl) = source(&dir);
    std::thread::sleep(Duration::from_millis(150));
    let hop = |ctl: &std::path::Path, to: &str| {
        let r = migrate(ctl.to_str().unwrap(), to, &["--json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        json(&r)["migration"]["dirty_tracking"].clone()
    };
    assert_eq!(hop(&a_ctl, &b_in), "ring");
    wait_for_path(&b_ctl);
    assert_eq!(hop(&b_ctl, &c_in), "bitmap");
    let out = c.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(digest(&out.stdout), plain_digest());
    drop((a, b));
}

/// A source holding a token gives no page to a destination that does not
/// prove it (one that says OPEN, one that takes any answer), and a
/// destination refuses a stream whose page someone on the path changed
/// and re-checksummed: every frame carries a tag keyed from the token and
/// both nonces. The guest runs on at the source each time, undisturbed.
#[test]
fn a_token_holder_refuses_impostors_and_a_path_that_rewrites_a_page() {
    use std::io::BufRead;
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = scratch("mig-auth");
    let token = dir.join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let tok = ["--token-file", token.to_str().unwrap()];
    let (src, sock) = source(&dir);
    let s = sock.to_str().unwrap();

    // impostors: what reaches them after the greeting is nothing
    for (name, greeting, answer) in [
        ("open", "NFV-MIGRATE 2 OPEN\n", None),
        ("any", "NFV-MIGRATE 2 CHALLENGE abcd\n", Some("OK 00\n")),
    ] {
        let path = dir.join(format!("{name}.sock"));
        let listener = UnixListener::bind(&path).unwrap();
        let fake = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            c.write_all(greeting.as_bytes()).unwrap();
            let mut r = std::io::BufReader::new(c.try_clone().unwrap());
            if let Some(answer) = answer {
                let mut response = String::new();
                r.read_line(&mut response).unwrap();
                assert!(response.starts_with("RESPONSE "), "{response}");
                c.write_all(answer.as_bytes()).unwrap();
            }
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            rest.len()
        });
        let r = migrate(s, &format!("unix:{}", path.display()), &tok);
        assert_ne!(r.code, 0, "{name}: {}", r.stderr);
        assert!(
            r.stderr.contains("refused before any page left"),
            "{name}: {}",
            r.stderr
        );
        assert_eq!(
            fake.join().unwrap(),
            0,
            "{name}: bytes reached the impostor"
        );
    }

    // a real destination behind a path that changes a page and fixes the CRC
    let ep = dir.join("in.sock");
    let dst = token_receiver(&format!("unix:{}", ep.display()), &token);
    let proxy_path = dir.join("proxy.sock");
    let listener = UnixListener::bind(&proxy_path).unwrap();
    let proxy = std::thread::spawn(move || {
        let (from_src, _) = listener.accept().unwrap();
        let to_dst = UnixStream::connect(&ep).unwrap();
        // the destination's lines go back untouched
        let (mut back_in, mut back_out) =
            (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut back_in, &mut back_out));
        let mut r = std::io::BufReader::new(from_src);
        let mut out = to_dst;
        let mut response = String::new();
        r.read_line(&mut response).unwrap();
        out.write_all(response.as_bytes()).unwrap();
        let mut header = [0u8; 12];
        r.read_exact(&mut header).unwrap();
        out.write_all(&header).unwrap();
        let mut changed = false;
        loop {
            let mut head = [0u8; 9];
            if r.read_exact(&mut head).is_err() {
                return changed;
            }
            let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
            let mut rest = vec![0u8; len + migration::TAG_LEN];
            if r.read_exact(&mut rest).is_err() {
                return changed;
            }
            if head[0] == migration::Kind::Pages as u8 && !changed {
                rest[8 + 100] ^= 0xff;
                let crc = migration::crc(head[0], &rest[..len]);
                head[5..9].copy_from_slice(&crc.to_le_bytes());
                changed = true;
            }
            if out
                .write_all(&head)
                .and_then(|_| out.write_all(&rest))
                .is_err()
            {
                return changed;
            }
        }
    });
    let r = migrate(s, &format!("unix:{}", proxy_path.display()), &tok);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(proxy.join().unwrap(), "the path changed no page");
    let d = dst.finish(T);
    assert_ne!(d.code, 0, "{}", d.stderr);
    assert!(d.stderr.contains("authentication tag"), "{}", d.stderr);
    assert!(!d.stdout.contains("DIRTIER OK"), "{}", d.stdout);
    // the source's guest ran on through all of it
    assert_last_failure(s, "running", "");
    let out = src.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(digest(&out.stdout), plain_digest());
}

/// A destination that stops reading (without closing) fails the migration
/// after the source's `--io-timeout`, and the guest runs on at the source:
/// it is not held paused for as long as the peer likes.
#[test]
fn a_destination_that_stops_reading_fails_the_migration_in_time() {
    // long enough to be running still after the failed attempt
    const LONG: &[&str] = &[
        "--guest",
        "dirtier",
        "--memory",
        "32M",
        "--cmdline",
        "mb=4 passes=1000",
    ];
    let plain = std::thread::spawn(|| nfvisor(&[&["run"], LONG].concat(), T));
    let dir = scratch("mig-stall");
    let fake = dir.join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake).unwrap();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let stalled = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"NFV-MIGRATE 2 OPEN\n").unwrap();
        let mut r = migration::Reader::new(s.try_clone().unwrap()).unwrap();
        let first = r.next_frame().unwrap().unwrap();
        assert_eq!(first.kind, migration::Kind::Config);
        s.write_all(b"PREPARED\n").unwrap();
        // and then reads nothing more, the connection left open
        let _ = release_rx.recv_timeout(Duration::from_secs(60));
    });
    let (src, sock) = source_running(&dir, LONG);
    let s = sock.to_str().unwrap();
    let t0 = std::time::Instant::now();
    let r = migrate(
        s,
        &format!("unix:{}", fake.display()),
        &["--io-timeout", "1"],
    );
    let took = t0.elapsed();
    eprintln!("stalled migration failed after {took:?}");
    let _ = release_tx.send(());
    stalled.join().unwrap();
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(
        took < Duration::from_secs(20),
        "the stalled migration took {took:?}: {}",
        r.stderr
    );
    assert_last_failure(s, "running", "");
    let out = src.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(digest(&out.stdout), digest(&plain.join().unwrap().stdout));
}

/// A peer that connects first and drips its answer a byte at a time holds
/// only its own greeting (on a thread of its own, refused at its 5 s
/// deadline): a real source behind it is greeted and migrates meanwhile.
#[test]
fn a_slow_greeter_does_not_keep_a_real_source_out() {
    let dir = scratch("mig-loris");
    let token = dir.join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let ep = dir.join("in.sock");
    let dst = token_receiver(&format!("unix:{}", ep.display()), &token);
    let loris_ep = ep.clone();
    let loris = std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&loris_ep).unwrap();
        let mut greeting = [0u8; 64];
        let _ = s.read(&mut greeting);
        for b in b"RESPONSE 00000000000000000000" {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(700));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    // (long enough to still run once the slow greeter has been refused)
    let (src, sock) = source_running(
        &dir,
        &[
            "--guest",
            "dirtier",
            "--memory",
            "32M",
            "--cmdline",
            "mb=4 passes=400",
        ],
    );
    let t0 = std::time::Instant::now();
    let r = migrate(
        sock.to_str().unwrap(),
        &format!("unix:{}", ep.display()),
        &["--token-file", token.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    loris.join().unwrap();
    let out = src.finish(T);
    assert!(out.stdout.contains("guest migrated to"), "{}", out.stdout);
    let d = dst.finish(T);
    assert_eq!(d.code, 0, "{}", d.stderr);
    let greeted = d.stderr.find("a source connected and greeted");
    let refused = d.stderr.find("did not answer the challenge within");
    assert!(
        matches!((greeted, refused), (Some(g), Some(r)) if g < r),
        "the real source was greeted before the slow one was refused:\n{}",
        d.stderr
    );
    // the guest checks its memory every pass, here as before
    assert!(d.stdout.contains("DIRTIER OK"), "{}", d.stdout);
}
