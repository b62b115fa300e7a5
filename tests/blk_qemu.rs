//! virtio-blk: the bundled `blk-probe` guest (a modern virtio-pci driver)
//! against QEMU's virtio-blk-pci, the reference device.
//!
//! Each test exports the bundled guests, makes a small sparse raw image
//! (4 MiB, 8192 sectors), boots the guest under QEMU on it and reads the
//! guest's records; where the guest wrote, the image file is then compared
//! byte for byte with `guests::blk_pattern`. QEMU's isa-debug-exit turns
//! the guest's status S into the exit code (S << 1) | 1.
//!
//! What QEMU 7.2 answers to the hostile requests (`mode=bad`): unknown_type
//! UNSUPP (2), past_end IOERR (1), odd_len IOERR (1), read_into_ro OK (0:
//! nothing to read into, nothing read), write_ro on a writable disk OK (0),
//! discard_flags UNSUPP (2), discard_too_many UNSUPP (2), wz_too_big IOERR
//! (1), no_status: no completion, the device sets NEEDS_RESET (the guest
//! resets it and reads on). A read-only drive answers write_ro with IOERR.
//! Needs QEMU (CI installs it); without qemu-system-x86_64 each test says
//! so and passes.

mod common;
use common::net::record;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const QEMU: &str = "qemu-system-x86_64";
const IMAGE_BYTES: u64 = 4 << 20;
const SECTOR: usize = 512;

/// QEMU, or a failure saying how to install it (CI installs it).
fn need_qemu() {
    require_program(QEMU, "qemu-system-x86");
}

/// A scratch directory holding the exported guests and a zeroed sparse
/// image of IMAGE_BYTES.
struct Disk {
    dir: PathBuf,
    image: PathBuf,
}

impl Disk {
    fn new(name: &str) -> Disk {
        let dir = scratch(&format!("blk-{name}"));
        let r = nfvisor(
            &["guests", "export", dir.to_str().unwrap()],
            Duration::from_secs(60),
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(IMAGE_BYTES)
            .unwrap();
        Disk { dir, image }
    }

    /// Sector `s` of the image file.
    fn sector(&self, data: &[u8], s: u64) -> Vec<u8> {
        let at = s as usize * SECTOR;
        data[at..at + SECTOR].to_vec()
    }

    fn read(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }
}

/// cache=none wants O_DIRECT, which tmpfs refuses: then the host's page
/// cache is used (cache=writeback), the guest sees the same device.
fn cache_mode(dir: &Path) -> &'static str {
    use std::os::unix::fs::OpenOptionsExt;
    const O_DIRECT: i32 = 0o40000; // x86_64
    let probe = dir.join("odirect.probe");
    let ok = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    if ok {
        "none"
    } else {
        "writeback"
    }
}

type Guest = QemuGuest;

/// Boots blk-probe under QEMU on the disk's image with `append` as its
/// command line; `drive` adds -drive options (readonly=on).
fn run_blk_probe(disk: &Disk, drive: &str, append: &str) -> Guest {
    let drive = format!(
        "file={},if=none,id=d0,format=raw,cache={},aio=threads{drive}",
        disk.image.display(),
        cache_mode(&disk.dir)
    );
    qemu_guest(
        &disk.dir.join("blk-probe.elf"),
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on,romfile=,serial=nfv-disk-1",
        ],
        append,
    )
}

/// The guest ended with status 0 (exit code 1 through isa-debug-exit).
fn assert_ok(g: &Guest) {
    assert_eq!(g.code, 1, "guest status 0 expected:\n{}", g.output);
    assert!(g.output.contains("#END status=0"), "{}", g.output);
}

/// The records every run starts with: the disk QEMU describes.
fn check_blk(g: &Guest) -> BTreeMap<String, String> {
    let blk = record(&g.output, "blk");
    assert_eq!(blk["capacity"], (IMAGE_BYTES / 512).to_string());
    let features = u64::from_str_radix(blk["features"].trim_start_matches("0x"), 16).unwrap();
    let accepted = (1u64 << 32)
        | (1 << 1)
        | (1 << 2)
        | (1 << 5)
        | (1 << 6)
        | (1 << 9)
        | (1 << 10)
        | (1 << 12)
        | (1 << 13)
        | (1 << 14)
        | (1 << 29);
    assert_eq!(features & !accepted, 0, "only accepted features acked");
    assert_ne!(features & (1 << 32), 0, "VERSION_1");
    assert_eq!(blk["flush"], "1", "QEMU offers FLUSH");
    let id = record(&g.output, "blkid");
    assert_eq!(id["serial"], "nfv-disk-1", "GET_ID reads the serial back");
    assert_eq!(id["status"], "0");
    blk
}

/// verify: 256 sectors written in 8-sector requests, 4 in flight, flushed,
/// read back and compared in the guest; the first chunk discarded, the
/// second write-zeroed (and read back as zeros). On the host the image then
/// holds zeros in sectors 8..16, the pattern in 16..256 and nothing after.
#[test]
fn blk_probe_verifies_a_qemu_disk() {
    need_qemu();
    let disk = Disk::new("verify");
    let g = run_blk_probe(
        &disk,
        "",
        "mode=verify start=0 sectors=256 chunk=8 seed=5 qd=4",
    );
    assert_ok(&g);
    let blk = check_blk(&g);
    assert_eq!(blk["discard"], "1", "QEMU offers DISCARD");
    assert_eq!(blk["wz"], "1", "QEMU offers WRITE_ZEROES");
    assert_eq!(blk["ro"], "0");
    assert_eq!(blk["msix"], "1", "{}", g.output);
    assert_eq!(blk["event_idx"], "0");
    let v = record(&g.output, "verify");
    assert_eq!(v["sectors"], "256");
    assert_eq!(v["bad"], "0", "{}", g.output);
    assert_eq!(v["writes"], "32");
    assert_eq!(v["reads"], "33", "32 + the write-zeroed chunk");
    assert_eq!(v["flushes"], "1");
    assert_eq!(v["discard"], "0");
    assert_eq!(v["wz"], "0");
    assert_eq!(v["wz_bad"], "0");
    assert_eq!(v["errors"], "0");
    assert_eq!(v["short_len"], "0");

    let data = disk.read();
    // sectors 0..8 were discarded: QEMU's default discard=ignore keeps them,
    // another setting may not; not checked
    for s in 8..16 {
        assert!(
            disk.sector(&data, s).iter().all(|&b| b == 0),
            "sector {s} was write-zeroed"
        );
    }
    for s in 16..256 {
        assert!(
            disk.sector(&data, s) == guests::blk_pattern(5, s),
            "sector {s} does not hold blk_pattern(5, {s})"
        );
    }
    assert!(
        data[256 * SECTOR..].iter().all(|&b| b == 0),
        "nothing written past the range"
    );
}

/// The same without interrupts and with EVENT_IDX, one request at a time,
/// at an offset and in 16-sector requests.
#[test]
fn blk_probe_verifies_a_qemu_disk_polling_with_event_idx() {
    need_qemu();
    let disk = Disk::new("verify-poll");
    let g = run_blk_probe(
        &disk,
        "",
        "mode=verify start=1000 sectors=256 chunk=16 seed=9 irq=poll event_idx=1",
    );
    assert_ok(&g);
    let blk = check_blk(&g);
    assert_eq!(blk["msix"], "0");
    assert_eq!(blk["event_idx"], "1", "QEMU offers EVENT_IDX");
    let v = record(&g.output, "verify");
    assert_eq!(v["bad"], "0", "{}", g.output);
    assert_eq!(v["errors"], "0", "{}", g.output);
    assert_eq!(v["writes"], "16");
    let data = disk.read();
    for s in 1032..1256 {
        assert!(
            disk.sector(&data, s) == guests::blk_pattern(9, s),
            "sector {s}"
        );
    }
    assert!(data[..1000 * SECTOR].iter().all(|&b| b == 0));
}

/// write: two passes (the second checks the first's pattern before it
/// overwrites); the image ends holding pattern(seed + 1).
#[test]
fn blk_probe_write_passes_leave_the_last_pattern() {
    need_qemu();
    let disk = Disk::new("write");
    let g = run_blk_probe(
        &disk,
        "",
        "mode=write start=64 sectors=256 chunk=16 passes=2 seed=11 qd=2",
    );
    assert_ok(&g);
    check_blk(&g);
    let w = record(&g.output, "write");
    assert_eq!(w["passes"], "2");
    assert_eq!(w["bad"], "0", "{}", g.output);
    assert_eq!(w["errors"], "0", "{}", g.output);
    let passes: Vec<_> = g
        .output
        .lines()
        .filter(|l| l.starts_with("R pass "))
        .collect();
    assert_eq!(passes.len(), 2, "{}", g.output);
    let data = disk.read();
    for s in 64..320 {
        assert!(
            disk.sector(&data, s) == guests::blk_pattern(12, s),
            "sector {s} does not hold blk_pattern(12, {s})"
        );
    }
}

/// bench: a short random-read run, 4 in flight; the figures are sane.
#[test]
fn blk_probe_benchmarks_random_reads() {
    need_qemu();
    let disk = Disk::new("bench");
    let g = run_blk_probe(&disk, "", "mode=bench op=randread count=300 qd=4 bs=4096");
    assert_ok(&g);
    let b = record(&g.output, "bench");
    let n = |k: &str| b[k].parse::<u64>().unwrap();
    assert_eq!(n("count"), 300);
    assert_eq!(n("qd"), 4);
    assert_eq!(n("errors"), 0);
    assert!(n("iops") > 0);
    assert!(n("p50_ns") > 0 && n("p50_ns") <= n("p99_ns") && n("p99_ns") <= n("max_ns"));
    assert!(n("max_ns") <= n("ns_total"));
    eprintln!("QEMU virtio-blk randread 4 KiB qd=4: {b:?}");
}

/// mode=bad against QEMU, every case in one boot (case=all): each hostile
/// request leaves the device able to serve a good read (after a reset where
/// it asked for one); the answers QEMU gives are the reference (see the top
/// of the file).
#[test]
fn qemu_survives_every_bad_request() {
    need_qemu();
    let expected: &[(&str, &str)] = &[
        ("unknown_type", "2"),
        ("past_end", "1"),
        ("odd_len", "1"),
        ("read_into_ro", "0"),
        ("write_ro", "0"),
        ("discard_flags", "2"),
        ("discard_too_many", "2"),
        ("wz_too_big", "1"),
        ("no_status", "255"),
    ];
    let disk = Disk::new("bad");
    let g = run_blk_probe(&disk, "", "mode=bad case=all");
    check_blk(&g);
    let from = g.output.find("#NFV ").unwrap_or(0);
    let parsed = guests::protocol::parse(&g.output[from..]).unwrap();
    let bad: Vec<_> = parsed.records.iter().filter(|r| r.kind == "bad").collect();
    assert_eq!(
        bad.len(),
        expected.len(),
        "one R bad per case:\n{}",
        g.output
    );
    let mut seen = Vec::new();
    for (r, &(case, status)) in bad.iter().zip(expected) {
        let f = |k: &str| {
            r.get(k)
                .unwrap_or_else(|| panic!("{case}: no {k}:\n{}", g.output))
        };
        assert_eq!(f("case"), case);
        assert_eq!(
            f("after_ok"),
            "1",
            "{case}: the good read after:\n{}",
            g.output
        );
        assert!(
            r.get("skipped").is_none(),
            "{case}: QEMU offers every feature"
        );
        seen.push(format!(
            "{case}: status={} used={} used_len={} needs_reset={}",
            f("status"),
            f("used"),
            f("used_len"),
            f("needs_reset")
        ));
        if case == "unknown_type" || case == "past_end" || case == "no_status" {
            // UNSUPP, IOERR, and nothing to write a status into
            assert_eq!(f("status"), status, "{case}:\n{}", g.output);
        } else if f("status") != status {
            // recorded, not asserted: these answers are QEMU's choices
            eprintln!(
                "{case}: QEMU answered {} (7.2 answered {status})",
                f("status")
            );
        }
        if case == "read_into_ro" {
            assert_eq!(
                f("touched"),
                "0",
                "the device wrote into a read-only buffer"
            );
        }
    }
    assert_ok(&g);
    eprintln!("QEMU's answers:\n{}", seen.join("\n"));
}

/// A read-only drive: RO is negotiated and a write answers IOERR; the good
/// read after it works.
#[test]
fn a_read_only_qemu_disk_refuses_writes() {
    need_qemu();
    let disk = Disk::new("ro");
    let g = run_blk_probe(&disk, ",readonly=on", "mode=bad case=write_ro");
    assert_ok(&g);
    let blk = check_blk(&g);
    assert_eq!(blk["ro"], "1", "{}", g.output);
    let bad = record(&g.output, "bad");
    assert_eq!(bad["status"], "1", "IOERR:\n{}", g.output);
    assert_eq!(bad["after_ok"], "1");
    // the verify mode refuses to write a read-only disk
    let g = run_blk_probe(&disk, ",readonly=on", "mode=verify sectors=8");
    assert_eq!(g.code, 3, "guest status 1:\n{}", g.output);
    assert!(g.output.contains("read-only"), "{}", g.output);
}
