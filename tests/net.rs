//! virtio-net: the bundled `net-probe` guest (a modern virtio-pci driver)
//! echoes Ethernet frames that the host sends it through a TAP device.
//!
//! Each test gets its own network namespace with a TAP in it; the VM runs
//! inside the namespace on that TAP, and the host end is an AF_PACKET socket
//! bound to the TAP from a thread that entered the namespace. The host side
//! takes the command that starts the VM, so the same exchange runs against
//! QEMU's virtio-net-pci (the reference device) and any other VMM.
//!
//! Test frames (the guest's own format, see `net_probe.c`): Ethernet header
//! with ethertype 0x88b5, then a little-endian u32 sequence number, a u32
//! FNV-1a checksum of the rest, and the rest: xorshift32 words seeded from
//! the sequence number.

mod common;
use common::net::*;
use common::*;

use std::time::Duration;

/// QEMU's virtio-net-pci (modern only, MSI-X, on a TAP) and the bundled
/// driver: the guest negotiates VERSION_1 + MAC + STATUS and echoes 40
/// frames of 60 to 1514 bytes, each checked byte for byte on the host; then
/// exits 0 (QEMU's isa-debug-exit makes that 1). Needs QEMU: CI installs it
/// and fails without it.
#[test]
fn qemu_virtio_net_echoes_frames() {
    let qemu = require_program("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch("net-qemu");
    let r = nfvisor(
        &["guests", "export", dir.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let count = 40;

    let ns = Netns::new();
    ns.add_tap(TAP);
    let vm = qemu_net_probe(&ns, &qemu, &dir, &format!("mode=echo count={count}"));
    let e = echo_exchange(&ns, vm, count);

    assert_eq!(
        e.code, 1,
        "guest status 0 through isa-debug-exit:\n{}",
        e.output
    );
    assert!(e.output.contains("#END status=0"), "{}", e.output);
    let neg = record(&e.output, "negotiated");
    assert_eq!(neg["features"], "0x100010020", "VERSION_1, STATUS, MAC");
    assert_eq!(neg["msix"], "1", "{}", e.output);
    assert_eq!(neg["status"], "1", "link up");
    let echo = record(&e.output, "echo");
    assert_eq!(echo["frames"], count.to_string(), "{}", e.output);
    let bytes: usize = (0..count).map(|s| SIZES[s as usize % SIZES.len()]).sum();
    assert_eq!(echo["bytes"], bytes.to_string(), "{}", e.output);
    // (whether the guest took the echoes by MSI-X or by polling depends on
    // how fast it runs: a busy host leaves it no time to wait, so the
    // interrupt count is reported, not asserted; the link test checks the
    // device's interrupts)
    eprintln!(
        "net: {count} frames echoed, {} other frames on the TAP; guest: {echo:?}",
        e.other
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same exchange through nfvisor's own virtio-net device on a TAP: the
/// same guest driver, the same frames, every byte verified.
#[test]
fn nfvisor_virtio_net_echoes_frames() {
    let count = 40;
    let ns = Netns::new();
    ns.add_tap(TAP);
    let exe = env!("CARGO_BIN_EXE_nfvisor");
    let mut vm = ns.exec(exe);
    vm.args(["run", "--guest", "net-probe"])
        .arg("--net")
        .arg(format!("tap={TAP},mac=52:54:00:12:34:56"))
        .arg("--cmdline")
        .arg(format!("mode=echo count={count}"));
    let e = echo_exchange(&ns, vm, count);
    assert_eq!(e.code, 0, "guest status 0:\n{}", e.output);
    assert!(e.output.contains("#END status=0"), "{}", e.output);
    let neg = record(&e.output, "negotiated");
    assert_eq!(neg["features"], "0x100010020", "VERSION_1, STATUS, MAC");
    assert_eq!(neg["msix"], "1", "{}", e.output);
    assert_eq!(neg["status"], "1", "link up");
    let echo = record(&e.output, "echo");
    assert_eq!(echo["frames"], count.to_string(), "{}", e.output);
    // (interrupts: see the QEMU test; the link test checks the device's)
}

/// Link down: nothing is delivered either way (counted), the guest is
/// told (config interrupt); link up again: frames flow again.
/// nfvisor running `net-probe mode=echo count=0` on TAP `tap` of `ns`,
/// controlled through `ctl`, and already echoing what `sock` sends.
fn echoing_vm(ns: &Netns, ctl: &std::path::Path, tap: &str, sock: &std::os::fd::OwnedFd) -> Vm {
    let mut cmd = ns.exec(env!("CARGO_BIN_EXE_nfvisor"));
    cmd.args(["run", "--guest", "net-probe", "--control-socket"])
        .arg(ctl)
        .arg("--net")
        .arg(format!("tap={tap}"))
        .args(["--cmdline", "mode=echo count=0"]);
    let mut vm = Vm::start(cmd);
    vm.wait_for("R negotiated", Duration::from_secs(60));
    wait_for_path(ctl);
    until_echoing(sock, Duration::from_secs(10));
    vm
}

#[test]
fn a_link_taken_down_delivers_nothing_until_it_is_up_again() {
    let ns = Netns::new();
    ns.add_tap(TAP);
    let dir = scratch("net-link");
    let ctl = dir.join("vm.sock");
    let sock = packet_socket(&ns, TAP);
    let vm = echoing_vm(&ns, &ctl, TAP, &sock);
    let c = ctl.to_str().unwrap();
    let link = |action: &str| {
        let r = nfvisor(&["net-link", "--control-socket", c, action], T);
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    let counters = || {
        let st = json(&nfvisor(&["status", "--control-socket", c, "--json"], T));
        st["devices"]["net0"].clone()
    };
    let up = echo_stream(&sock, 10, Duration::from_millis(50), &mut || {});
    assert!(
        up.iter().all(|&n| n == 1),
        "link up: every frame once: {up:?}"
    );
    link("down");
    assert_eq!(counters()["link_up"], 0);
    let down = echo_stream(&sock, 10, Duration::from_millis(50), &mut || {});
    assert!(
        down.iter().all(|&n| n == 0),
        "link down: nothing back: {down:?}"
    );
    assert!(counters()["dropped_link_down"].as_u64().unwrap() >= 10);
    link("up");
    let again = echo_stream(&sock, 10, Duration::from_millis(50), &mut || {});
    assert!(again.iter().all(|&n| n == 1), "up again: {again:?}");
    let c = counters();
    assert!(c["interrupts"].as_u64().unwrap() > 0, "{c}");
    drop(vm);
}

const T: Duration = Duration::from_secs(60);

/// Live migration mid-traffic: the guest echoes on a TAP, moves to a VM
/// on another TAP of the same (hub) bridge and echoes on there; no frame
/// comes back twice or corrupted, and few are lost (those in flight
/// during the hand-over, counted).
#[test]
fn a_nic_migrates_mid_traffic_without_duplicates_or_corruption() {
    let ns = Netns::new();
    ns.add_hub("nfvbr0", &["nfvtapa", "nfvtapb"]);
    let dir = scratch("net-mig");
    let (ctl, inbound) = (dir.join("src.sock"), dir.join("in.sock"));
    let exe = env!("CARGO_BIN_EXE_nfvisor");
    let listen = format!("unix:{}", inbound.display());
    let mut dst = ns.exec(exe);
    dst.args(["receive", "--listen", &listen, "--net", "tap=nfvtapb"]);
    let mut dst = Vm::start(dst);
    dst.wait_for("waiting for a migration", T);
    let sock = packet_socket(&ns, "nfvbr0");
    let src = echoing_vm(&ns, &ctl, "nfvtapa", &sock);
    let mut report = None;
    let back = echo_stream(&sock, 200, Duration::from_millis(10), &mut || {
        let r = migrate(ctl.to_str().unwrap(), &listen, &["--json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        report = Some(json(&r));
    });
    let m = &report.expect("migrated")["migration"];
    assert!(
        back.iter().all(|&n| n <= 1),
        "an echo came back twice: {back:?}"
    );
    let lost: Vec<usize> = (0..back.len()).filter(|&i| back[i] == 0).collect();
    eprintln!(
        "net migration: downtime {} ms, {} of {} frames lost: {lost:?}",
        m["downtime_ms"],
        lost.len(),
        back.len()
    );
    assert!(lost.len() <= 10, "lost {lost:?}");
    // echoes came back after the hand-over: the guest runs on, on the
    // destination's TAP
    assert!(
        back[150..].iter().filter(|&&n| n == 1).count() >= 40,
        "{back:?}"
    );
    let (code, out) = src.finish(T);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("guest migrated to"), "{out}");
    drop(dst);
}

/// Snapshot and restore of a VM with a NIC: the restored NIC announces
/// the guest's MAC (RARP) and the guest echoes on (its queues where they
/// were), on another TAP.
#[test]
fn a_vm_with_a_nic_is_snapshotted_and_restored() {
    let ns = Netns::new();
    ns.add_hub("nfvbr0", &["nfvtapa", "nfvtapb"]);
    let dir = scratch("net-snap");
    let ctl = dir.join("vm.sock");
    let snap = dir.join("snap");
    let exe = env!("CARGO_BIN_EXE_nfvisor");
    let sock = packet_socket(&ns, "nfvbr0");
    let vm = echoing_vm(&ns, &ctl, "nfvtapa", &sock);
    let before = echo_stream(&sock, 10, Duration::from_millis(30), &mut || {});
    assert!(before.iter().all(|&n| n == 1), "{before:?}");
    let r = nfvisor(
        &[
            "snapshot",
            "--control-socket",
            ctl.to_str().unwrap(),
            "--to",
            snap.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // the source still echoes after its snapshot (its device resumed)
    let after = echo_stream(&sock, 10, Duration::from_millis(30), &mut || {});
    assert!(after.iter().all(|&n| n == 1), "{after:?}");
    drop(vm);
    let mut restored = ns.exec(exe);
    restored
        .args(["restore", "--from"])
        .arg(&snap)
        .args(["--net", "tap=nfvtapb"]);
    let mut restored = Vm::start(restored);
    restored.wait_for("vCPU 0 runs on host thread", T);
    // the restored NIC announces the guest's MAC on its new TAP (a RARP,
    // as QEMU sends for a guest without GUEST_ANNOUNCE)
    let t0 = std::time::Instant::now();
    let announced = loop {
        match recv_frame(&sock) {
            Some(f) if f.len() >= 42 && f[12..14] == [0x80, 0x35] => break Some(f),
            _ if t0.elapsed() > Duration::from_secs(10) => break None,
            _ => {}
        }
    };
    let rarp = announced.expect("no RARP from the restored NIC within 10 s");
    assert_eq!(rarp[..6], [0xff; 6], "to the broadcast address");
    assert_eq!(rarp[6..12], [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    assert_eq!(rarp[20..22], [0, 3], "a reverse request");
    until_echoing(&sock, Duration::from_secs(10));
    let there = echo_stream(&sock, 10, Duration::from_millis(30), &mut || {});
    assert!(
        there.iter().all(|&n| n == 1),
        "the restored guest echoes: {there:?}"
    );
    drop(restored);
    // a restore without the NIC is refused by name, and one whose NIC
    // shows the guest another MAC
    let r = nfvisor(&["restore", "--from", snap.to_str().unwrap()], T);
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(r.stderr.contains("device net0"), "{}", r.stderr);
    let mut other = ns.exec(exe);
    other
        .args(["restore", "--from"])
        .arg(&snap)
        .args(["--net", "tap=nfvtapb,mac=52:54:00:00:00:01"]);
    let out = other.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("device net0") && err.contains("had MAC 52:54:00:12:34:56"),
        "{err}"
    );
}

/// Bad --net values are refused by name before anything runs (exit 78).
#[test]
fn bad_nic_settings_are_refused_by_name() {
    for (spec, needle) in [
        ("tap=x,mac=52:54:00:12:34", "MAC \"52:54:00:12:34\""),
        ("tap=x,mac=01:00:5e:00:00:01", "multicast"),
        ("tap=x,mtu=20", "mtu \"20\""),
        ("fd=0", "fd 0 is not a TAP"),
        ("fd=4321", "fd 4321 is not a TAP"),
        (
            "mac=52:54:00:12:34:56",
            "no tap=NAME, fd=N or vhost-user=SOCKET",
        ),
        ("tap=a-name-far-too-long-for-linux", "does not exist"),
        ("tap=nfvnosuch0", "TAP \"nfvnosuch0\" does not exist"),
    ] {
        let r = nfvisor(
            &["run", "--guest", "hello", "--net", spec],
            Duration::from_secs(30),
        );
        assert_eq!(r.code, 78, "{spec}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{spec}: {}", r.stderr);
        assert!(!r.stdout.contains("hello"), "{spec}: the guest ran");
    }
}

/// The guest's `mode=send` frames, collected on the TAP until every one
/// came (each checked byte for byte, once); then the VM must end with
/// `code` and say it sent them all. `vm` is started here, after the
/// socket is open.
fn guest_sends(ns: &Netns, vm: std::process::Command, code: i32, count: u32, size: usize) {
    let sock = packet_socket(ns, TAP);
    let vm = Vm::start(vm);
    let mut seen = vec![0u32; count as usize];
    let deadline = std::time::Instant::now() + T;
    while seen.contains(&0) && std::time::Instant::now() < deadline {
        let Some(f) = recv_frame(&sock) else { continue };
        if f.len() < 18 || f[12..14] != ETHERTYPE.to_be_bytes() || f[6..12] != GUEST_MAC {
            continue;
        }
        let seq = u32::from_le_bytes(f[14..18].try_into().unwrap());
        assert!(seq < count, "a frame the guest never sent: seq {seq}");
        assert_eq!(
            f,
            test_frame([0xff; 6], GUEST_MAC, seq, size),
            "frame {seq}"
        );
        seen[seq as usize] += 1;
    }
    let (got, out) = vm.finish(T);
    assert_eq!(got, code, "{out}");
    assert!(seen.iter().all(|&n| n == 1), "each frame once: {seen:?}");
    let sent = record(&out, "send");
    assert_eq!(sent["frames"], count.to_string(), "{out}");
}

/// `count` frames of mixed sizes sent to the guest's `mode=recv` once it
/// has negotiated; then the VM must end with `code`, every frame taken,
/// none bad.
fn guest_receives(ns: &Netns, vm: std::process::Command, code: i32, count: u32) {
    let sock = packet_socket(ns, TAP);
    let mut vm = Vm::start(vm);
    vm.wait_for("R negotiated", T);
    for seq in 0..count {
        send_frame(
            &sock,
            &test_frame(GUEST_MAC, HOST_MAC, seq, SIZES[seq as usize % SIZES.len()]),
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (got, out) = vm.finish(T);
    assert_eq!(got, code, "{out}");
    let recv = record(&out, "recv");
    assert_eq!(recv["frames"], count.to_string(), "{out}");
    assert_eq!(recv["bad"], "0", "{out}");
}

/// nfvisor running net-probe with `cmdline` on TAP of `ns`.
fn nfvisor_net_probe(ns: &Netns, cmdline: &str) -> std::process::Command {
    let mut cmd = ns.exec(env!("CARGO_BIN_EXE_nfvisor"));
    cmd.args(["run", "--guest", "net-probe", "--net"])
        .arg(format!("tap={TAP},mac=52:54:00:12:34:56"))
        .args(["--cmdline", cmdline]);
    cmd
}

/// Guest to host: `net-probe mode=send` sends numbered frames; every one
/// arrives on the TAP once and intact, as many as the guest says it sent.
#[test]
fn frames_the_guest_sends_reach_the_host_intact() {
    let ns = Netns::new();
    ns.add_tap(TAP);
    let vm = nfvisor_net_probe(&ns, "mode=send count=50 size=300");
    guest_sends(&ns, vm, 0, 50, 300);
}

/// The same through QEMU's virtio-net-pci (exit 1: status 0 through
/// isa-debug-exit).
#[test]
fn frames_the_guest_sends_through_qemu_reach_the_host_intact() {
    let qemu = require_program("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch("net-qemu-send");
    let r = nfvisor(&["guests", "export", dir.to_str().unwrap()], T);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ns = Netns::new();
    ns.add_tap(TAP);
    let vm = qemu_net_probe(&ns, &qemu, &dir, "mode=send count=50 size=300");
    guest_sends(&ns, vm, 1, 50, 300);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Host to guest: `net-probe mode=recv` verifies and counts numbered
/// frames of mixed sizes; it takes every one, none bad.
#[test]
fn frames_the_host_sends_reach_the_guest_intact() {
    let ns = Netns::new();
    ns.add_tap(TAP);
    let vm = nfvisor_net_probe(&ns, "mode=recv count=30");
    guest_receives(&ns, vm, 0, 30);
}

/// The same through QEMU's virtio-net-pci.
#[test]
fn frames_the_host_sends_through_qemu_reach_the_guest_intact() {
    let qemu = require_program("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch("net-qemu-recv");
    let r = nfvisor(&["guests", "export", dir.to_str().unwrap()], T);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ns = Netns::new();
    ns.add_tap(TAP);
    let vm = qemu_net_probe(&ns, &qemu, &dir, "mode=recv count=30");
    guest_receives(&ns, vm, 1, 30);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A transmit rate limit (the token bucket the disks use) holds the
/// guest's frames back: 40 frames of 1000 bytes at 16 KiB a second take
/// about two seconds, and all arrive intact.
#[test]
fn a_transmit_rate_limit_holds_the_guest_s_frames_back() {
    let ns = Netns::new();
    ns.add_tap(TAP);
    let mut cmd = ns.exec(env!("CARGO_BIN_EXE_nfvisor"));
    cmd.args(["run", "--guest", "net-probe", "--net"])
        .arg(format!("tap={TAP},mac=52:54:00:12:34:56,tx-bw=16K"))
        .args(["--cmdline", "mode=send count=40 size=1000"]);
    let t = std::time::Instant::now();
    guest_sends(&ns, cmd, 0, 40, 1000);
    // 40 KB less the first tenth of a second's burst, at 16 KiB a second
    assert!(
        t.elapsed() > std::time::Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );
}

/// `bench net --scenario migration`: under nfvisor and under QEMU, the
/// guest answers on the destination after the hand-over (the learning
/// bridge found its new port), and the network downtime is measured, not
/// a silence to the end.
#[test]
fn bench_network_downtime_sees_the_guest_answer_on_the_destination() {
    let r = nfvisor(
        &[
            "bench",
            "net",
            "--scenario",
            "migration",
            "--runs",
            "1",
            "--json",
        ],
        Duration::from_secs(180),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    // nfvisor, then QEMU (the baseline) on the same guest and bridge
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{doc}");
    for (run, vmm) in runs.iter().zip(["nfvisor", "qemu"]) {
        assert_eq!(run["vmm"], vmm, "{run}");
        assert!(run["probes"].as_u64().unwrap() > 100, "{run}");
        assert!(run["echoes_after"].as_u64().unwrap() > 10, "{run}");
        // measured, and not a silence to the end of the probing (how long
        // is the benchmark's to say: on this shared host a baseline run
        // once took 1.1 s, its bridge late to learn the new port)
        let net = run["network_downtime_ms"].as_f64().unwrap();
        let probing = run["probes"].as_f64().unwrap() * run["probe_period_ms"].as_f64().unwrap();
        assert!(net > 0.0 && net < probing, "{run}");
        assert!(run["vm_downtime_ms"].as_f64().unwrap() > 0.0, "{run}");
    }
}
