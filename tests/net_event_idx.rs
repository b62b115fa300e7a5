//! virtio-net with VIRTIO_F_RING_EVENT_IDX: the bundled driver (`net-probe
//! event_idx=1`) accepts the feature and drives the split rings as the
//! virtio 1.2 spec (2.7.7, 2.7.10) and Linux's virtio_ring do: it writes
//! used_event to say when it wants the next interrupt and notifies only when
//! the device's avail_event asks for it (kicks sent and held back are
//! counted). The same echo exchange as tests/net.rs, but with 200 frames, so
//! that both rings (64 entries in the guest) wrap several times, the driver's
//! and the device's event indexes with them.
//!
//! QEMU's virtio-net-pci is the reference device; nfvisor's must do the
//! same. A device that never moves avail_event leaves a driver that honours
//! it without notifications: transmit stalls. When that happens here, the
//! test waits for the guest's own timeout, whose `R stall` records (each
//! queue's avail, used and event indexes and kick counts) come in the
//! failure message.

mod common;
use common::net::*;
use common::*;

use std::time::{Duration, Instant};

/// Frames echoed: more than three times the guest's queue size (64).
const COUNT: u32 = 200;

/// How long the exchange waits for the next echo before it calls the
/// device stalled (the guest's own timeout is 30 s).
const STALL: Duration = Duration::from_secs(20);

/// `tests/common/net.rs`'s `echo_exchange` (the first half one at a time,
/// each echo waited for, the rest in one burst, every byte checked), except
/// that a stall does not end the test at once: the guest is given its own
/// timeout to report what it saw (`R stall`), and all of it, with which
/// frames came back, goes into the failure message.
fn exchange(ns: &Netns, cmd: std::process::Command, count: u32) -> (i32, String) {
    let sock = packet_socket(ns, TAP);
    let mut vm = Vm::start(cmd);
    let line = vm.wait_for("R negotiated", Duration::from_secs(60));
    let guest = mac_of(&line);
    assert_eq!(guest, GUEST_MAC, "the MAC the VM was given: {line}");

    let size_of = |seq: u32| SIZES[seq as usize % SIZES.len()];
    let mut back = vec![false; count as usize];
    let mut got = 0u32;
    // Takes echoes until `until` came back: false if none came for STALL.
    let take = |back: &mut Vec<bool>, got: &mut u32, until: u32| -> bool {
        let mut last = Instant::now();
        while *got < until {
            if last.elapsed() > STALL {
                return false;
            }
            let Some(f) = recv_frame(&sock) else { continue };
            if f.len() < 14 || f[12..14] != ETHERTYPE.to_be_bytes() {
                continue;
            }
            assert!(f.len() >= 22, "a short echo: {f:02x?}");
            let seq = u32::from_le_bytes(f[14..18].try_into().unwrap());
            assert!(seq < count, "an echo of a frame never sent: seq {seq}");
            assert!(!back[seq as usize], "frame {seq} came back twice");
            let want = test_frame(HOST_MAC, guest, seq, size_of(seq));
            assert!(
                f == want,
                "the echo of frame {seq} ({} bytes) differs from the frame sent ({} bytes)",
                f.len(),
                want.len()
            );
            back[seq as usize] = true;
            *got += 1;
            last = Instant::now();
        }
        true
    };
    let half = count / 2;
    let mut stalled = None;
    for seq in 0..half {
        send_frame(&sock, &test_frame(guest, HOST_MAC, seq, size_of(seq)));
        if !take(&mut back, &mut got, seq + 1) {
            stalled = Some(format!("one at a time, frame {seq} sent"));
            break;
        }
    }
    if stalled.is_none() {
        for seq in half..count {
            send_frame(&sock, &test_frame(guest, HOST_MAC, seq, size_of(seq)));
        }
        if !take(&mut back, &mut got, count) {
            stalled = Some(format!("frames {half}..{count} sent in one burst"));
        }
    }
    if let Some(phase) = stalled {
        let missing: Vec<usize> = (0..back.len()).filter(|&i| !back[i]).collect();
        // the guest times out 30 s after its last wait began and reports
        let (code, output) = vm.finish(Duration::from_secs(90));
        panic!(
            "stalled ({phase}): {got} of {count} echoes came back, none for {STALL:?}; \
             missing {} from {:?} on; the guest exited {code}, saying:\n{output}",
            missing.len(),
            missing.first()
        );
    }

    let (code, output) = vm.finish(Duration::from_secs(60));
    // nothing more may come back after the guest is gone
    while let Some(f) = recv_frame(&sock) {
        assert!(
            f.len() < 14 || f[12..14] != ETHERTYPE.to_be_bytes(),
            "an extra echo after all {count} came back: {f:02x?}"
        );
    }
    (code, output)
}

fn num(rec: &std::collections::BTreeMap<String, String>, key: &str) -> u64 {
    rec.get(key)
        .unwrap_or_else(|| panic!("no {key}= in {rec:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key}= is not a number in {rec:?}"))
}

/// What both devices must show: EVENT_IDX negotiated (besides VERSION_1,
/// STATUS, MAC), the rings wrapped, every frame echoed, and every kick the
/// driver decided on counted once, sent or held back (one for the receive
/// buffers posted at start, one per buffer reposted, one per echo sent).
/// The echo record, for what else a test checks.
fn check(output: &str, count: u32) -> std::collections::BTreeMap<String, String> {
    assert!(output.contains("#END status=0"), "{output}");
    let neg = record(output, "negotiated");
    let features = u64::from_str_radix(neg["features"].trim_start_matches("0x"), 16).unwrap();
    assert_ne!(features & (1 << 29), 0, "EVENT_IDX negotiated: {neg:?}");
    assert_eq!(
        features,
        0x100010020 | 1 << 29,
        "VERSION_1, STATUS, MAC, EVENT_IDX"
    );
    assert_eq!(neg["event_idx"], "1", "{neg:?}");
    assert_eq!(neg["msix"], "1", "{output}");
    assert_eq!(neg["status"], "1", "link up");
    let qsize = num(&neg, "queue_size").max(num(&neg, "tx_queue_size"));
    assert!(
        count as u64 >= 3 * qsize,
        "{count} frames wrap a ring of {qsize} three times"
    );
    let echo = record(output, "echo");
    assert_eq!(echo["frames"], count.to_string(), "{output}");
    let bytes: usize = (0..count).map(|s| SIZES[s as usize % SIZES.len()]).sum();
    assert_eq!(echo["bytes"], bytes.to_string(), "{output}");
    let (kicks, held) = (num(&echo, "kicks"), num(&echo, "kicks_suppressed"));
    assert_eq!(
        num(&echo, "rx_kicks") + num(&echo, "tx_kicks"),
        kicks,
        "{echo:?}"
    );
    assert_eq!(
        num(&echo, "rx_kicks_suppressed") + num(&echo, "tx_kicks_suppressed"),
        held,
        "{echo:?}"
    );
    let other = num(&echo, "other");
    assert_eq!(
        num(&echo, "rx_kicks") + num(&echo, "rx_kicks_suppressed"),
        1 + count as u64 + other,
        "receive kicks: {echo:?}"
    );
    assert_eq!(
        num(&echo, "tx_kicks") + num(&echo, "tx_kicks_suppressed"),
        count as u64,
        "transmit kicks: {echo:?}"
    );
    echo
}

/// QEMU's virtio-net-pci (the same command line as tests/net.rs's
/// `qemu_virtio_net_echoes_frames`), the driver with `event_idx=1`. QEMU
/// moves avail_event on as it takes buffers, so the driver, reposting
/// receive buffers the device does not need yet, holds kicks back: some
/// must have been. Needs QEMU: CI installs it and fails without it.
#[test]
fn qemu_virtio_net_echoes_frames_with_event_idx() {
    let qemu = require_program("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch("net-event-idx-qemu");
    let r = nfvisor(
        &["guests", "export", dir.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);

    let ns = Netns::new();
    ns.add_tap(TAP);
    let vm = qemu_net_probe(
        &ns,
        &qemu,
        &dir,
        &format!("mode=echo count={COUNT} event_idx=1"),
    );
    let (code, output) = exchange(&ns, vm, COUNT);

    assert_eq!(code, 1, "guest status 0 through isa-debug-exit:\n{output}");
    let echo = check(&output, COUNT);
    assert!(
        num(&echo, "kicks_suppressed") > 0,
        "QEMU's avail_event held no kick back: {echo:?}"
    );
    eprintln!("net event_idx (QEMU): {COUNT} frames echoed; guest: {echo:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same through nfvisor's virtio-net device: it offers EVENT_IDX, so it
/// must keep avail_event (and its interrupts by used_event) right, or the
/// driver stops notifying and the exchange stalls.
#[test]
fn nfvisor_virtio_net_echoes_frames_with_event_idx() {
    let ns = Netns::new();
    ns.add_tap(TAP);
    let exe = env!("CARGO_BIN_EXE_nfvisor");
    let mut vm = ns.exec(exe);
    vm.args(["run", "--guest", "net-probe"])
        .arg("--net")
        .arg(format!("tap={TAP},mac=52:54:00:12:34:56"))
        .arg("--cmdline")
        .arg(format!("mode=echo count={COUNT} event_idx=1"));
    let (code, output) = exchange(&ns, vm, COUNT);

    assert_eq!(code, 0, "guest status 0:\n{output}");
    let echo = check(&output, COUNT);
    eprintln!("net event_idx (nfvisor): {COUNT} frames echoed; guest: {echo:?}");
}
