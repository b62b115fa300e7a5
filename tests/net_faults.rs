//! virtio-net against a hostile driver: the bundled `net-probe` guest in
//! `mode=bad` misbehaves as a buggy or malicious driver would (looped and
//! over-long transmit chains, buffers past guest RAM, a queue size that is
//! not a power of two, rings outside RAM, a feature never offered, a reset
//! with frames in flight), resets the device, initialises it afresh and
//! echoes frames. Each test proves that nfvisor's device survived (the VM
//! runs on, the guest exits 0, the echoes come back byte for byte) and that
//! the misbehaviour was refused and counted (the run report's
//! `vm.devices.net0` counters).
//!
//! Each case runs in a network namespace of its own with a TAP in it (see
//! tests/net.rs). The guest console goes to a `--serial` file, read while
//! the VM runs (with `--json` the guest console would share stderr with
//! nfvisor's log lines, which may cut a record in two); stdout holds the
//! JSON report. Ethertypes: 0x88b5 the test frames of the final echo,
//! 0x88b6 the host's filler frames (sent while the guest says `R badwait`),
//! 0x88b7 frames the guest builds into bad chains, 0x88b8 good frames the
//! guest sends during the bad part.

mod common;
use common::net::*;
use common::*;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const COUNT: u32 = 4;
const FILLER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
const FILLER_ETHERTYPE: u16 = 0x88b6;
const BAD_ETHERTYPE: u16 = 0x88b7;
const GOOD_ETHERTYPE: u16 = 0x88b8;
const NEEDS_RESET: u64 = 64;
const FEATURES_OK: u64 = 8;

/// What one case's run showed.
struct Outcome {
    case: String,
    code: i32,
    /// The guest console (the `--serial` file).
    console: String,
    /// nfvisor's log.
    stderr: String,
    /// The JSON run report.
    report: serde_json::Value,
    /// The guest's `R bad` record.
    bad: BTreeMap<String, String>,
    /// (ethertype, length) of each frame the guest sent that was not an
    /// echo of a test frame (lengths as read: at most 2048 bytes).
    wire: Vec<(u16, usize)>,
    /// Filler frames the host sent.
    fillers: usize,
}

impl Outcome {
    /// A counter of `vm.devices.net0`.
    fn counter(&self, name: &str) -> u64 {
        self.report["vm"]["devices"]["net0"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter net0.{name} in the report: {}", self.report))
    }

    /// A field of the guest's `R bad` record, as a number.
    fn field(&self, key: &str) -> u64 {
        self.bad
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("R bad has no numeric {key}: {:?}", self.bad))
    }

    fn counters(&self) -> String {
        self.report["vm"]["devices"]["net0"].to_string()
    }

    /// The frames in `wire`, as ETHERTYPE:LENGTH.
    fn wire(&self) -> String {
        let frames: Vec<String> = self
            .wire
            .iter()
            .map(|(e, l)| format!("{e:#06x}:{l}"))
            .collect();
        format!("[{}]", frames.join(", "))
    }

    /// Everything, for an assertion message.
    fn all(&self) -> String {
        format!(
            "case {}: exit {}; R bad {:?}; net0 {}; frames the guest sent besides the echoes (ethertype:length, at most 2048 read): {}; {} filler frames\n--- console ---\n{}\n--- stderr ---\n{}",
            self.case,
            self.code,
            self.bad,
            self.counters(),
            self.wire(),
            self.fillers,
            self.console,
            self.stderr
        )
    }

    /// The frames of `ethertype` the guest put on the wire (their lengths).
    fn sent(&self, ethertype: u16) -> Vec<usize> {
        self.wire
            .iter()
            .filter(|(e, _)| *e == ethertype)
            .map(|&(_, l)| l)
            .collect()
    }

    /// What every case must show: the VM ran on, the device was reset and
    /// initialised again, and the echo of COUNT frames (verified on the
    /// host) went through; nfvisor did not panic.
    fn assert_survived(&self) {
        assert!(
            !self.stderr.contains("panicked"),
            "nfvisor panicked: {}",
            self.all()
        );
        assert_eq!(self.code, 0, "the guest's status 0: {}", self.all());
        assert_eq!(self.report["exit_code"], 0, "{}", self.all());
        assert!(self.console.contains("#END status=0"), "{}", self.all());
        assert_eq!(
            self.bad.get("survived").map(String::as_str),
            Some("1"),
            "device_status reads back 0 after the reset: {}",
            self.all()
        );
        let echo = record(&self.console, "echo");
        assert_eq!(echo["frames"], COUNT.to_string(), "{}", self.all());
        assert!(
            self.counter("tx_frames") >= COUNT as u64 && self.counter("rx_frames") >= COUNT as u64,
            "the final echo is counted: {}",
            self.all()
        );
    }

    /// After a bad transmit chain the device must either go on serving the
    /// queue (the chain given back, a good frame after it completed) or say
    /// that it needs a reset; never stall the queue silently.
    fn assert_queue_went_on_or_needs_reset(&self) {
        let went_on = self.field("tx_used") == 1 && self.field("after_ok") == 1;
        assert!(
            went_on || self.field("status_after") & NEEDS_RESET != 0,
            "the transmit queue stalled without NEEDS_RESET: {}",
            self.all()
        );
    }
}

/// Kills the VM if the test fails before it exits.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

fn ethertype(f: &[u8]) -> Option<u16> {
    (f.len() >= 14).then(|| u16::from_be_bytes([f[12], f[13]]))
}

/// Frames the guest sent that are not echoes of test frames are noted
/// in `wire`; an echo of a test frame is returned.
fn take_frame(sock: &OwnedFd, wire: &mut Vec<(u16, usize)>) -> Option<Vec<u8>> {
    let f = recv_frame(sock)?;
    match ethertype(&f) {
        Some(ETHERTYPE) => Some(f),
        Some(e @ FILLER_ETHERTYPE..=GOOD_ETHERTYPE) => {
            wire.push((e, f.len()));
            None
        }
        _ => None,
    }
}

/// Runs `net-probe mode=bad case=CASE count=COUNT` on nfvisor's
/// virtio-net in a namespace of its own: sends filler frames while the
/// guest waits for frames in its bad part, then (after the fresh `R
/// negotiated`) COUNT test frames, the first half one at a time and the
/// rest in one burst, each echo checked byte for byte; waits for the exit.
fn run_case(case: &str) -> Outcome {
    let started = Instant::now();
    let ns = Netns::new();
    ns.add_tap(TAP);
    let sock = packet_socket(&ns, TAP);
    // two tests may run one case at once
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::SeqCst);
    let dir = scratch(&format!("net-faults-{case}-{run}"));
    let serial: PathBuf = dir.join("console.txt");
    let mut cmd = ns.exec(env!("CARGO_BIN_EXE_nfvisor"));
    cmd.args(["run", "--guest", "net-probe", "--json", "--serial"])
        .arg(&serial)
        .arg("--net")
        .arg(format!("tap={TAP},mac=52:54:00:12:34:56"))
        .arg("--cmdline")
        .arg(format!("mode=bad case={case} count={COUNT}"))
        .env("NFVISOR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let stdout = spawn_reader(child.stdout.take().unwrap());
    let stderr = spawn_reader(child.stderr.take().unwrap());
    let mut vm = Guard(child);
    let console = || std::fs::read_to_string(&serial).unwrap_or_default();

    // the bad part: filler frames whenever the guest waits for some
    let mut wire = Vec::new();
    let mut fillers = 0;
    let filler = {
        let mut f = test_frame(FILLER_MAC, HOST_MAC, 0, 60);
        f[12..14].copy_from_slice(&FILLER_ETHERTYPE.to_be_bytes());
        f
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last_filler = Instant::now();
    let guest_mac = loop {
        let mut text = console();
        // whole lines only: the console file grows a chunk at a time
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        if let Some(at) = text.find("R bad case=") {
            if let Some(line) = text[at..].lines().find(|l| l.starts_with("R negotiated")) {
                break mac_of(line);
            }
        } else if text.contains("R badwait") && last_filler.elapsed() > Duration::from_millis(20) {
            send_frame(&sock, &filler);
            fillers += 1;
            last_filler = Instant::now();
        }
        if text.contains("#END") || vm.0.try_wait().unwrap().is_some() || Instant::now() > deadline
        {
            drop(vm);
            panic!(
                "case {case}: the guest did not get through its bad part to a fresh R negotiated:\n--- console ---\n{}\n--- stderr ---\n{}",
                console(),
                stderr.join().unwrap()
            );
        }
        take_frame(&sock, &mut wire); // waits up to 50 ms
    };
    assert_eq!(
        guest_mac, GUEST_MAC,
        "case {case}: the MAC the VM was given"
    );

    // the final echo
    let size_of = |seq: u32| SIZES[seq as usize % SIZES.len()];
    let mut back = [false; COUNT as usize];
    let mut got = 0;
    let mut take = |until: u32, wire: &mut Vec<(u16, usize)>| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < until {
            assert!(
                Instant::now() < deadline,
                "case {case}: {got} of {COUNT} echoes came back in time; the guest said:\n{}",
                console()
            );
            let Some(f) = take_frame(&sock, wire) else {
                continue;
            };
            assert!(f.len() >= 22, "case {case}: a short echo: {f:02x?}");
            let seq = u32::from_le_bytes(f[14..18].try_into().unwrap());
            assert!(
                seq < COUNT,
                "case {case}: an echo of a frame never sent: {seq}"
            );
            assert!(
                !back[seq as usize],
                "case {case}: frame {seq} came back twice"
            );
            assert_eq!(
                f,
                test_frame(HOST_MAC, GUEST_MAC, seq, size_of(seq)),
                "case {case}: the echo of frame {seq}"
            );
            back[seq as usize] = true;
            got += 1;
        }
    };
    let half = COUNT / 2;
    for seq in 0..half {
        send_frame(&sock, &test_frame(GUEST_MAC, HOST_MAC, seq, size_of(seq)));
        take(seq + 1, &mut wire);
    }
    for seq in half..COUNT {
        send_frame(&sock, &test_frame(GUEST_MAC, HOST_MAC, seq, size_of(seq)));
    }
    take(COUNT, &mut wire);

    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(s) = vm.0.try_wait().unwrap() {
            break s.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            drop(vm);
            panic!(
                "case {case}: the VM did not exit after the echo:\n{}",
                console()
            );
        }
        take_frame(&sock, &mut wire);
    };
    while let Some(f) = recv_frame(&sock) {
        assert!(
            ethertype(&f) != Some(ETHERTYPE),
            "case {case}: an extra echo after all {COUNT} came back: {f:02x?}"
        );
        if let Some(e @ FILLER_ETHERTYPE..=GOOD_ETHERTYPE) = ethertype(&f) {
            wire.push((e, f.len()));
        }
    }
    drop(vm);
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    let console = console();
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("case {case}: stdout is not one JSON document ({e}):\n{stdout}\n--- stderr ---\n{stderr}")
    });
    let bad = record(&console, "bad");
    assert_eq!(bad["case"], case, "{console}");
    let _ = std::fs::remove_dir_all(&dir);
    let out = Outcome {
        case: case.to_string(),
        code,
        console,
        stderr,
        report,
        bad,
        wire,
        fillers,
    };
    eprintln!(
        "case {case}: {:.1} s; R bad {:?}; net0 {}; other frames from the guest {}",
        started.elapsed().as_secs_f64(),
        out.bad,
        out.counters(),
        out.wire()
    );
    out
}

/// A transmit chain 0 -> 1 -> 0: the device gives it back (or asks for a
/// reset), serves a good frame after it, and the VM and device go on.
#[test]
fn a_looped_transmit_chain_leaves_the_device_working() {
    let o = run_case("loop");
    o.assert_survived();
    o.assert_queue_went_on_or_needs_reset();
}

/// ... and the looped chain is refused and counted, never sent.
#[test]
fn a_looped_transmit_chain_is_dropped_and_counted() {
    let o = run_case("loop");
    o.assert_survived();
    assert!(
        o.counter("tx_dropped_bad_chain") + o.counter("bad_queue") >= 1
            || o.field("status_after") & NEEDS_RESET != 0,
        "a looped transmit chain is neither counted (tx_dropped_bad_chain, bad_queue) nor answered with NEEDS_RESET: {}",
        o.all()
    );
    assert_eq!(
        o.sent(BAD_ETHERTYPE),
        Vec::<usize>::new(),
        "a looped transmit chain went out on the TAP as a frame: {}",
        o.all()
    );
}

/// A transmit descriptor beyond guest RAM is dropped and counted, the
/// queue goes on; a receive buffer beyond guest RAM is given back with
/// nothing written and counted, and the next frame lands in a good one.
#[test]
fn buffers_past_guest_ram_are_dropped_and_counted() {
    let o = run_case("past_ram");
    o.assert_survived();
    o.assert_queue_went_on_or_needs_reset();
    assert!(
        o.counter("tx_dropped_bad_chain") >= 1,
        "the transmit descriptor at 0xfff00000 is counted: {}",
        o.all()
    );
    assert!(
        o.counter("bad_queue") >= 1,
        "the receive buffer at 0xfff00000 is counted: {}",
        o.all()
    );
    if o.field("status_after") & NEEDS_RESET == 0 {
        assert_eq!(
            (o.field("rx_used"), o.field("rx_id"), o.field("rx_len")),
            (1, 0, 0),
            "the receive buffer past RAM is given back used, nothing written: {}",
            o.all()
        );
        assert_eq!(
            o.field("rx_after_ok"),
            1,
            "the next frame arrives in the good buffer: {}",
            o.all()
        );
    }
    // (the frames for the receive buffers may be the host's fillers or the
    // namespace's own IPv6 multicast: any frame will do)
}

/// A transmit chain of queue_size + 1 descriptors (next pointers wrapping
/// to its head): the device survives it.
#[test]
fn an_over_long_transmit_chain_leaves_the_device_working() {
    let o = run_case("long_chain");
    o.assert_survived();
    o.assert_queue_went_on_or_needs_reset();
    assert_eq!(o.field("chain"), 65, "{}", o.all());
}

/// ... and the over-long chain is refused and counted, never sent.
#[test]
fn an_over_long_transmit_chain_is_dropped_and_counted() {
    let o = run_case("long_chain");
    o.assert_survived();
    assert!(
        o.counter("tx_dropped_bad_chain") + o.counter("bad_queue") >= 1
            || o.field("status_after") & NEEDS_RESET != 0,
        "a transmit chain longer than the queue is neither counted (tx_dropped_bad_chain, bad_queue) nor answered with NEEDS_RESET: {}",
        o.all()
    );
    assert_eq!(
        o.sent(BAD_ETHERTYPE),
        Vec::<usize>::new(),
        "a transmit chain longer than the queue went out on the TAP as a frame: {}",
        o.all()
    );
}

/// queue_size = 3 (not a power of two) and twice the maximum are refused
/// (neither reads back) and counted; a valid size is taken after them.
#[test]
fn a_queue_size_not_a_power_of_two_is_refused_and_counted() {
    let o = run_case("queue_size3");
    o.assert_survived();
    assert_ne!(o.field("read_back"), 3, "{}", o.all());
    assert_ne!(
        o.field("over_max_read_back"),
        o.field("over_max"),
        "{}",
        o.all()
    );
    assert_eq!(o.field("size"), 64, "{}", o.all());
    assert_eq!(
        o.field("status_after"),
        15,
        "the valid size after the refused ones: ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK: {}",
        o.all()
    );
    assert!(
        o.counter("refused") >= 2,
        "both refused writes are counted: {}",
        o.all()
    );
}

/// Rings outside guest RAM: DRIVER_OK is answered with NEEDS_RESET, the
/// queue is never taken, the refusal is counted; a reset recovers.
#[test]
fn rings_outside_guest_ram_need_a_reset_and_are_counted() {
    let o = run_case("ring_outside");
    o.assert_survived();
    assert_eq!(o.field("needs_reset"), 1, "{}", o.all());
    assert_eq!(o.field("taken"), 0, "{}", o.all());
    assert_ne!(o.field("status_after") & NEEDS_RESET, 0, "{}", o.all());
    assert!(o.counter("refused") >= 1, "{}", o.all());
}

/// A feature the device never offered (bit 33) acked with VERSION_1:
/// FEATURES_OK does not stick, the refusal is counted; a fresh start works.
#[test]
fn an_unoffered_feature_is_refused_features_ok_and_counted() {
    let o = run_case("unoffered");
    o.assert_survived();
    assert_eq!(o.field("features_ok"), 0, "{}", o.all());
    assert_eq!(o.field("status_after") & FEATURES_OK, 0, "{}", o.all());
    assert!(o.counter("refused") >= 1, "{}", o.all());
}

/// A reset while frames are in flight both ways (filler frames streaming
/// in, eight transmit frames kicked just before): device_status reads back
/// 0, nothing touches the old rings after that, and a fresh start echoes.
#[test]
fn a_reset_with_frames_in_flight_stops_the_device_cleanly() {
    let o = run_case("reset_mid");
    o.assert_survived();
    assert_eq!(o.field("echoed"), 3, "{}", o.all());
    assert_eq!(o.field("reset_ok"), 1, "{}", o.all());
    assert_eq!(o.field("status_after"), 0, "{}", o.all());
    assert_eq!(
        o.field("touched"),
        0,
        "a used ring changed after the reset read back 0: {}",
        o.all()
    );
    assert!(o.fillers >= 3, "{}", o.all());
}
