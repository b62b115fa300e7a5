//! virtio-net for network functions on a TAP: queue pairs (a multi-queue
//! TAP, the control queue's VQ_PAIRS_SET, frames steered by the kernel to
//! every pair), a poll-mode queue worker placed on its own CPU at
//! SCHED_FIFO with the guest's kicks held off, GUEST_ANNOUNCE after a
//! restore, and the bad settings. The bundled `net-probe` guest drives the
//! device; the queue-pair test runs it against QEMU's virtio-net too.
//!
//! Host frames here are IPv4/UDP (the TAP steers them by flow hash: one
//! source port per flow), sent through an AF_PACKET socket on the TAP.

mod common;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::net::*;
use common::{json, nfvisor, require_program, scratch, wait_for_path};

const T: Duration = Duration::from_secs(60);

/// The poll-mode test takes a CPU for itself at SCHED_FIFO: nothing else
/// of this file runs meanwhile.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// An Ethernet + IPv4 + UDP frame from the host to the guest: flow `flow`
/// (the UDP source port 1000 + flow), `seq` in the payload.
fn udp_frame(flow: u16, seq: u32) -> Vec<u8> {
    let payload_len = 32usize;
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload_len) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&(1000 + flow).to_be_bytes());
    f.extend_from_slice(&2000u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&pattern(seq, payload_len - 4));
    f
}

/// Sends `count` UDP frames over `flows` flows and collects the echoes
/// (MACs swapped, the rest intact) until all came back or `limit`;
/// returns how many times each came back.
fn udp_echoes(sock: &OwnedFd, count: u32, flows: u16, limit: Duration) -> Vec<u32> {
    let mut back = vec![0u32; count as usize];
    for seq in 0..count {
        send_frame(sock, &udp_frame(seq as u16 % flows, seq));
        // (a short gap: the emulated guest echoes about 10^3 frames/s)
        std::thread::sleep(Duration::from_millis(2));
    }
    let deadline = Instant::now() + limit;
    while back.contains(&0) && Instant::now() < deadline {
        let Some(f) = recv_frame(sock) else { continue };
        if f.len() < 46 || f[12..14] != [0x08, 0x00] || f[0..6] != HOST_MAC {
            continue;
        }
        let seq = u32::from_le_bytes(f[42..46].try_into().unwrap());
        assert!(seq < count, "an echo of a frame never sent: seq {seq}");
        let mut want = udp_frame(seq as u16 % flows, seq);
        want[..6].copy_from_slice(&HOST_MAC);
        want[6..12].copy_from_slice(&GUEST_MAC);
        assert_eq!(f, want, "the echo of frame {seq} differs");
        back[seq as usize] += 1;
    }
    back
}

/// The VM's status (`status --json`) through its control socket.
fn status(ctl: &std::path::Path) -> serde_json::Value {
    let r = nfvisor(
        &[
            "status",
            "--control-socket",
            ctl.to_str().unwrap(),
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    json(&r)
}

fn counters(status: &serde_json::Value) -> BTreeMap<String, u64> {
    status["devices"]["net0"]
        .as_object()
        .unwrap_or_else(|| panic!("no net0 counters in {status}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

/// Four queue pairs on a multi-queue TAP: the guest turns all four on
/// (VQ_PAIRS_SET), 64 flows from the host are steered by the kernel over
/// the pairs, every frame comes back once and intact, each pair carried
/// some, and the device's per-pair counters add up to its totals and to
/// the guest's.
#[test]
fn four_queue_pairs_carry_frames_steered_to_every_pair() {
    let _serial = serial();
    let ns = Netns::new();
    ns.add_mq_tap("nfvmq0");
    let dir = scratch("net-mq");
    let ctl = dir.join("vm.sock");
    let sock = packet_socket(&ns, "nfvmq0");
    let mut cmd = ns.exec(env!("CARGO_BIN_EXE_nfvisor"));
    cmd.args(["run", "--guest", "net-probe", "--control-socket"])
        .arg(&ctl)
        .args(["--net", "tap=nfvmq0,queues=4,mac=52:54:00:12:34:56"])
        // (one frame more than the test's 64: the VM is still running,
        // its control socket answering, when the 64 are back)
        .args(["--cmdline", "mode=echo pairs=4 count=65"]);
    let mut vm = Vm::start(cmd);
    let ctrl = vm.wait_for("R ctrl", T);
    assert!(ctrl.contains("pairs=4") && ctrl.contains("ack=0"), "{ctrl}");
    wait_for_path(&ctl);
    let before = counters(&status(&ctl));
    assert_eq!(before["pairs_on"], 4, "{before:?}");
    let back = udp_echoes(&sock, 64, 64, Duration::from_secs(30));
    assert!(
        back.iter().all(|&n| n == 1),
        "every frame back once: {back:?}"
    );
    let c = counters(&status(&ctl));
    send_frame(&sock, &udp_frame(0, 64));
    let (code, out) = vm.finish(T);
    assert_eq!(code, 0, "{out}");
    let per_pair: Vec<u64> = (0..4).map(|p| c[&format!("pair{p}_rx_frames")]).collect();
    assert!(
        per_pair.iter().all(|&n| n > 0),
        "the kernel steered frames to every pair: {per_pair:?}"
    );
    assert_eq!(per_pair.iter().sum::<u64>(), c["rx_frames"], "{c:?}");
    assert_eq!(c["rx_frames"], 64, "{c:?}");
    let tx: u64 = (0..4).map(|p| c[&format!("pair{p}_tx_frames")]).sum();
    assert_eq!(tx, c["tx_frames"], "{c:?}");
    assert_eq!(c["tx_frames"], 64, "{c:?}");
    // the guest saw the same split: each pair echoed what it received
    // (and one pair the 65th frame)
    let echo = record(&out, "echo");
    let off: u64 = per_pair
        .iter()
        .enumerate()
        .map(|(p, &n)| echo[&format!("pair{p}")].parse::<u64>().unwrap() - n)
        .sum();
    assert_eq!(
        (echo["frames"].as_str(), off),
        ("65", 1),
        "{echo:?} {per_pair:?}"
    );
    assert_eq!(c["ctrl_commands"], 1, "one VQ_PAIRS_SET: {c:?}");
    assert_eq!(c["queue_steering_errors"], 0, "{c:?}");
}

/// The same guest on QEMU's virtio-net with four queue pairs (mq=on on a
/// multi-queue TAP): the driver is right by someone else's device too.
#[test]
fn qemu_four_queue_pairs_carry_frames() {
    let qemu = require_program("qemu-system-x86_64", "qemu-system-x86");
    let _serial = serial();
    let dir = scratch("net-mq-qemu");
    let r = nfvisor(&["guests", "export", dir.to_str().unwrap()], T);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ns = Netns::new();
    ns.add_mq_tap("nfvmq1");
    let sock = packet_socket(&ns, "nfvmq1");
    let cmd = qemu_net_probe_on(
        &ns,
        &qemu,
        &dir,
        "mode=echo pairs=4 count=64",
        "nfvmq1",
        ",queues=4",
        ",mq=on,vectors=10",
    );
    let mut vm = Vm::start(cmd);
    vm.wait_for("R ctrl", T);
    let back = udp_echoes(&sock, 64, 64, Duration::from_secs(30));
    assert!(
        back.iter().all(|&n| n == 1),
        "every frame back once: {back:?}"
    );
    let (code, out) = vm.finish(T);
    assert_eq!(code, 1, "guest status 0 through isa-debug-exit:\n{out}");
    let echo = record(&out, "echo");
    let per_pair: Vec<u64> = (0..4)
        .map(|p| echo[&format!("pair{p}")].parse().unwrap())
        .collect();
    assert_eq!(per_pair.iter().sum::<u64>(), 64, "{echo:?}");
    assert!(per_pair.iter().all(|&n| n > 0), "{echo:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Poll mode: the queue worker busy-polls on CPU 1 at SCHED_FIFO (read
/// back from /proc and reported in status), the vCPU is on CPU 0, frames
/// cross both ways, and the guest is told not to kick: no kick in 200
/// frames.
#[test]
fn a_polling_worker_runs_fifo_on_its_cpu_and_the_guest_does_not_kick() {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    if online < 2 {
        panic!("this test needs two CPUs (the vCPU's and the poller's); the host has {online}");
    }
    let _serial = serial();
    let ns = Netns::new();
    // (a TAP made multi_queue, taken as one queue: queues=1 opens it so)
    ns.add_mq_tap(TAP);
    let dir = scratch("net-poll");
    let ctl = dir.join("vm.sock");
    let sock = packet_socket(&ns, TAP);
    let mut cmd = ns.exec(env!("CARGO_BIN_EXE_nfvisor"));
    cmd.args([
        "run",
        "--guest",
        "net-probe",
        "--cpus",
        "0",
        "--control-socket",
    ])
    .arg(&ctl)
    .args(["--net", "tap=nfvtap0,mode=poll,cpus=1,rt-priority=1"])
    .args(["--cmdline", "mode=echo count=0"]);
    let mut vm = Vm::start(cmd);
    vm.wait_for("R negotiated", T);
    wait_for_path(&ctl);
    until_echoing(&sock, Duration::from_secs(10));
    let st = status(&ctl);
    let before = counters(&st);
    let back = echo_stream(&sock, 200, Duration::from_millis(3), &mut || {});
    assert!(
        back.iter().all(|&n| n == 1),
        "every frame back once: {back:?}"
    );
    let after = counters(&status(&ctl));
    let threads = st["device_threads"]["net0"]
        .as_array()
        .unwrap_or_else(|| panic!("no net0 threads in {st}"));
    assert_eq!(threads.len(), 1, "{threads:?}");
    let t = &threads[0];
    assert_eq!(t["policy"], "SCHED_FIFO", "{t}");
    assert_eq!(t["priority"], 1, "{t}");
    assert_eq!(t["cpus"], serde_json::json!([1]), "{t}");
    assert!(
        t["settings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["applied"] == true),
        "{t}"
    );
    // the kernel's own view of the thread
    let tid = t["tid"].as_i64().unwrap();
    let pid = vm.pid();
    let status_file = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    assert!(
        status_file
            .lines()
            .any(|l| l.starts_with("Cpus_allowed_list:") && l.ends_with("\t1")),
        "{status_file}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // (fields after the command's closing parenthesis: policy is field 41)
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    assert_eq!(fields[41 - 3], "1", "SCHED_FIFO is policy 1: {stat}");
    let rx = after["rx_frames"] - before["rx_frames"];
    let tx = after["tx_frames"] - before["tx_frames"];
    assert!(rx >= 200 && tx >= 200, "{before:?} -> {after:?}");
    drop(vm);
    // (kicks from before the worker's first pass, when the driver posted
    // its buffers, may be counted in `before`; none while it polls)
    assert_eq!(
        after["guest_kicks"], before["guest_kicks"],
        "the guest kicked while polled ({rx} frames)"
    );
}

/// A restored guest that has GUEST_ANNOUNCE announces itself: the device
/// sets VIRTIO_NET_S_ANNOUNCE and raises a configuration interrupt, the
/// guest sends its RARP and acknowledges (ANNOUNCE_ACK), and the device
/// sends no RARP of its own.
#[test]
fn a_restored_guest_with_guest_announce_announces_itself() {
    let _serial = serial();
    let ns = Netns::new();
    ns.add_hub("nfvbr1", &["nfvtapc", "nfvtapd"]);
    let dir = scratch("net-announce");
    let ctl = dir.join("vm.sock");
    let ctl2 = dir.join("vm2.sock");
    let snap = dir.join("snap");
    let exe = env!("CARGO_BIN_EXE_nfvisor");
    let sock = packet_socket(&ns, "nfvbr1");
    let mut cmd = ns.exec(exe);
    cmd.args(["run", "--guest", "net-probe", "--control-socket"])
        .arg(&ctl)
        .args(["--net", "tap=nfvtapc"])
        .args(["--cmdline", "mode=echo count=0 announce=1"]);
    let mut vm = Vm::start(cmd);
    let neg = vm.wait_for("R negotiated", T);
    assert!(neg.contains("announce=1"), "{neg}");
    wait_for_path(&ctl);
    until_echoing(&sock, Duration::from_secs(10));
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
    drop(vm);
    let mut restored = ns.exec(exe);
    restored
        .args(["restore", "--from"])
        .arg(&snap)
        .args(["--net", "tap=nfvtapd", "--control-socket"])
        .arg(&ctl2);
    let mut restored = Vm::start(restored);
    let line = restored.wait_for("R announce", T);
    assert!(line.contains("n=1") && line.contains("ack=0"), "{line}");
    // the guest's RARP (the device sends none for a guest that announces)
    let t0 = Instant::now();
    let mut rarps = 0;
    while t0.elapsed() < Duration::from_secs(2) {
        if let Some(f) = recv_frame(&sock) {
            if f.len() >= 42 && f[12..14] == [0x80, 0x35] {
                assert_eq!(f[6..12], GUEST_MAC, "{f:?}");
                assert_eq!(f[20..22], [0, 3], "a reverse request");
                rarps += 1;
            }
        }
    }
    assert_eq!(rarps, 1, "one RARP, the guest's");
    until_echoing(&sock, Duration::from_secs(10));
    wait_for_path(&ctl2);
    let c = counters(&status(&ctl2));
    assert_eq!(c["announces"], 1, "{c:?}");
    assert!(c["ctrl_commands"] >= 1 && c["ctrl_refused"] == 0, "{c:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad queue, mode and placement settings: a clear error naming the value,
/// exit 78, before the guest runs.
#[test]
fn bad_queue_and_placement_settings_are_refused_by_name() {
    let _serial = serial();
    let ns = Netns::new();
    ns.add_tap("nfvsq0");
    let exe = env!("CARGO_BIN_EXE_nfvisor");
    let too_many_cpus = format!("tap=nfvsq0,mode=poll,cpus={}", 4096);
    for (extra, spec, needle) in [
        (&[][..], "tap=nfvsq0,queues=2", "made without multi_queue"),
        (&[][..], "tap=nfvsq0,queues=0", "queues \"0\""),
        (&[][..], "tap=nfvsq0,queues=17", "queues \"17\""),
        (&[][..], "tap=nfvsq0,mode=poll", "mode=poll needs cpus="),
        (&[][..], "tap=nfvsq0,mode=fast", "mode \"fast\""),
        (
            &[][..],
            "tap=nfvsq0,rt-priority=50",
            "rt-priority= needs cpus=",
        ),
        (&[][..], too_many_cpus.as_str(), "4096"),
        (&[][..], "fd=0:1", "fd 0"),
        (&[][..], "fd=3:4,queues=3", "one descriptor per queue pair"),
        (
            &["--cpus", "1"][..],
            "tap=nfvsq0,mode=poll,cpus=1",
            "CPU 1 is a vCPU's",
        ),
    ] {
        let mut cmd = ns.exec(exe);
        cmd.args(["run", "--guest", "hello"])
            .args(extra)
            .args(["--net", spec]);
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{spec}: {err}");
        assert!(
            err.contains(needle),
            "{spec}: expected {needle:?} in:\n{err}"
        );
        assert!(!err.contains("panicked"), "{spec}: {err}");
    }
}

/// Runs `net-probe` with `cmdline` on `--net net` inside `ns` to its end,
/// with `--json`: (exit code, the run report, the guest's console).
fn run_to_end(
    ns: &Netns,
    net: &str,
    cmdline: &str,
    name: &str,
) -> (i32, serde_json::Value, String) {
    let dir = scratch(name);
    let console = dir.join("console.txt");
    let out = ns
        .exec(env!("CARGO_BIN_EXE_nfvisor"))
        .args(["run", "--guest", "net-probe", "--json", "--serial"])
        .arg(&console)
        .args(["--net", net, "--cmdline", cmdline])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "the report is not JSON ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), report, console)
}

/// The one's-complement sum of `bytes` (big-endian words), folded.
fn ones_sum(bytes: &[u8], mut sum: u32) -> u32 {
    for w in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Whether an IPv4 frame's IP header and TCP or UDP checksums hold.
fn checksums_hold(f: &[u8]) -> bool {
    let ihl = usize::from(f[14] & 15) * 4;
    let ip = &f[14..14 + ihl];
    if ones_sum(ip, 0) != 0xffff {
        return false;
    }
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let l4 = &f[14 + ihl..14 + total];
    let mut pseudo = Vec::from(&ip[12..20]);
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    ones_sum(l4, ones_sum(&pseudo, 0)) == 0xffff
}

/// A 64 KiB TCP/IPv4 GSO frame from the guest (HOST_TSO4, a partial
/// checksum), bridged to a veth whose segmentation and checksum offloads
/// are off: the kernel cuts it into ceil(payload / MSS) segments, each
/// with valid checksums, the payload whole and in order.
#[test]
fn a_tso_frame_from_the_guest_arrives_segmented_with_valid_checksums() {
    require_program("ethtool", "ethtool");
    let _serial = serial();
    let ns = Netns::new();
    ns.add_hub("nfvbr2", &["nfvtso0"]);
    ns.ip(&[
        "link", "add", "nfvva", "type", "veth", "peer", "name", "nfvvb",
    ]);
    let out = ns
        .exec("ethtool")
        .args(["-K", "nfvva", "tso", "off", "gso", "off", "tx", "off"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    ns.ip(&["link", "set", "nfvva", "master", "nfvbr2"]);
    ns.ip(&["link", "set", "nfvva", "up"]);
    ns.ip(&["link", "set", "nfvvb", "up"]);
    let sock = packet_socket(&ns, "nfvvb");
    let (size, mss) = (65549usize, 1448usize);
    let (code, report, console) = run_to_end(
        &ns,
        "tap=nfvtso0,offload=csum+tso4",
        &format!("mode=tso size={size} mss={mss}"),
        "net-tso",
    );
    assert_eq!(code, 0, "{console}\n{report}");
    let tso = record(&console, "tso");
    assert_eq!((tso["sent"].as_str(), tso["after"].as_str()), ("1", "1"));
    let payload = size - 54;
    let want = payload.div_ceil(mss);
    let mut got = vec![0u8; payload];
    let mut segments = 0;
    let t0 = Instant::now();
    while segments < want && t0.elapsed() < Duration::from_secs(10) {
        let Some(f) = recv_frame(&sock) else { continue };
        if f.len() < 54 || f[12..14] != [0x08, 0x00] || f[23] != 6 || f[6..12] != GUEST_MAC {
            continue;
        }
        assert!(checksums_hold(&f), "segment {segments}: bad checksum");
        let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
        let seq = u32::from_be_bytes(f[38..42].try_into().unwrap()) as usize;
        let data = &f[54..14 + total];
        assert!(data.len() <= mss, "a segment of {} bytes", data.len());
        got[seq - 1..seq - 1 + data.len()].copy_from_slice(data);
        segments += 1;
    }
    assert_eq!(
        segments, want,
        "segments of a {payload}-byte payload at MSS {mss}: {}",
        report["vm"]["devices"]
    );
    let expected: Vec<u8> = (0..payload).map(|i| (i * 7 + 3) as u8).collect();
    assert!(got == expected, "the payload, reassembled, differs");
    let c = &report["vm"]["devices"]["net0"];
    assert_eq!(c["tx_dropped_bad_offload"], 0, "{c}");
    assert_eq!(c["tx_frames"], 2, "the GSO frame and the test frame: {c}");
}

/// A GSO frame with a bad hdr_len or csum_start is dropped and counted by
/// the device (never handed to the TAP) and the queue goes on: the small
/// frame after it arrives.
#[test]
fn a_bad_offload_header_is_dropped_counted_and_transmit_goes_on() {
    let _serial = serial();
    for bad in ["hdr_len", "csum_start"] {
        let ns = Netns::new();
        ns.add_tap(TAP);
        let sock = packet_socket(&ns, TAP);
        let (code, report, console) = run_to_end(
            &ns,
            "tap=nfvtap0,offload=csum+tso4",
            &format!("mode=tso size=3000 mss=1000 bad={bad}"),
            "net-tso-bad",
        );
        assert_eq!(code, 0, "{bad}: {console}\n{report}");
        let c = &report["vm"]["devices"]["net0"];
        assert_eq!(c["tx_dropped_bad_offload"], 1, "{bad}: {c}");
        assert_eq!(c["tx_frames"], 1, "{bad}: only the frame after it: {c}");
        let mut tcp = 0;
        let mut after = 0;
        while let Some(f) = recv_frame(&sock) {
            if f.len() >= 14 && f[6..12] == GUEST_MAC {
                match [f[12], f[13]] {
                    [0x08, 0x00] => tcp += 1,
                    [0x88, 0xb5] => after += 1,
                    _ => {}
                }
            }
        }
        assert_eq!((tcp, after), (0, 1), "{bad}: on the TAP");
    }
}

/// A NIC that offers checksum offload to a guest that does not take it
/// (net-probe accepts no GUEST_CSUM): the TAP must finish every checksum
/// itself. UDP datagrams from the host's stack to the guest come back
/// (echoed) with full, valid checksums, not the partial ones a TAP with
/// TUN_F_CSUM would hand over.
#[test]
fn a_guest_without_guest_csum_gets_full_checksums() {
    let _serial = serial();
    let ns = Netns::new();
    ns.add_tap(TAP);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", TAP]);
    ns.ip(&[
        "neigh",
        "add",
        "10.0.0.2",
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        TAP,
    ]);
    let sock = packet_socket(&ns, TAP);
    let mut cmd = ns.exec(env!("CARGO_BIN_EXE_nfvisor"));
    cmd.args(["run", "--guest", "net-probe"])
        .args(["--net", "tap=nfvtap0,offload=csum+tso4+tso6"])
        .args(["--cmdline", "mode=echo count=0"]);
    let mut vm = Vm::start(cmd);
    let neg = vm.wait_for("R negotiated", T);
    let udp = in_namespace(&ns, "a UDP socket", || {
        std::net::UdpSocket::bind("10.0.0.1:0").map_err(|e| e.to_string())
    });
    let mut checked = 0;
    let t0 = Instant::now();
    while checked < 10 && t0.elapsed() < Duration::from_secs(20) {
        udp.send_to(&[0x5a; 300], "10.0.0.2:2000").unwrap();
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            let Some(f) = recv_frame(&sock) else { continue };
            if f.len() >= 42 && f[6..12] == GUEST_MAC && f[12..14] == [0x08, 0x00] && f[23] == 17 {
                assert_ne!(f[40..42], [0, 0], "a UDP checksum was filled in");
                assert!(checksums_hold(&f), "a partial checksum reached the guest");
                checked += 1;
                break;
            }
        }
    }
    assert_eq!(checked, 10, "echoes of the host's datagrams ({neg})");
}

/// `nfvisor bench net --queues 2`: the guest echoes on both pairs, every
/// ping-pong comes back, the figures carry the pair count.
#[test]
fn bench_net_measures_queue_pairs() {
    let _serial = serial();
    let r = nfvisor(
        &[
            "bench",
            "net",
            "--frames",
            "20",
            "--size",
            "64",
            "--queues",
            "2",
            "--no-qemu",
            "--json",
        ],
        Duration::from_secs(180),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r);
    let res = &v["results"][0];
    assert_eq!(
        (&res["vmm"], &res["queues"], &res["mode"], &res["lost"]),
        (
            &serde_json::json!("nfvisor"),
            &serde_json::json!(2),
            &serde_json::json!("event"),
            &serde_json::json!(0)
        ),
        "{v}"
    );
    assert!(res["rtt_p50_us"].as_f64().unwrap() > 0.0, "{v}");
}

/// A receive rate limit holds frames back in the TAP (the worker stops
/// reading it until the bucket refills): a host flooding the guest past
/// the TAP's queue length sees the excess dropped by the kernel, and the
/// NIC reports it (`tap_dropped`, the TAP's own count) beside its holds
/// (`rx_throttled`).
#[test]
fn frames_past_a_receive_limit_wait_in_the_tap_and_its_drops_are_counted() {
    let _serial = serial();
    let ns = Netns::new();
    ns.add_tap(TAP);
    ns.ip(&["link", "set", TAP, "txqueuelen", "100"]);
    let dir = scratch("net-rxlimit");
    let ctl = dir.join("vm.sock");
    let sock = packet_socket(&ns, TAP);
    let mut cmd = ns.exec(env!("CARGO_BIN_EXE_nfvisor"));
    cmd.args(["run", "--guest", "net-probe", "--control-socket"])
        .arg(&ctl)
        .args(["--net", "tap=nfvtap0,rx-pps=100"])
        .args(["--cmdline", "mode=echo count=0"]);
    let mut vm = Vm::start(cmd);
    vm.wait_for("R negotiated", T);
    wait_for_path(&ctl);
    until_echoing(&sock, Duration::from_secs(10));
    let before = counters(&status(&ctl));
    let sent = 1000u64;
    for seq in 0..sent {
        send_frame(&sock, &test_frame(GUEST_MAC, HOST_MAC, seq as u32, 128));
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = counters(&status(&ctl));
    let d = |k: &str| after[k] - before[k];
    assert!(d("rx_throttled") > 0, "{before:?} -> {after:?}");
    // the TAP holds 100 and the guest took a few in half a second at 100
    // a second: the kernel dropped most of the rest, and said so
    assert!(
        d("tap_dropped") > sent / 2,
        "the TAP (queue 100) dropped what it could not hold: {before:?} -> {after:?}"
    );
    assert!(
        d("rx_frames") + d("tap_dropped") <= sent,
        "{before:?} -> {after:?}"
    );
    drop(vm);
}
