//! virtio-rng: the bundled `vsock-probe` guest's `mode=rng` (a modern
//! virtio-pci driver of the entropy device, 1af4:1044) against QEMU's
//! virtio-rng-pci fed from /dev/urandom, the reference device.
//!
//! Only the rng mode is tested against QEMU: its vsock device needs
//! /dev/vhost-vsock (vhost-vsock-pci), which the test machines lack; the
//! vsock modes are tested against nfvisor's own device. Without a vsock
//! device the vsock modes must fail cleanly, which is checked here too.
//! QEMU's isa-debug-exit turns the guest's status S into the exit code
//! (S << 1) | 1. Needs QEMU (CI installs it).

mod common;
use common::net::record;
use common::*;

use std::path::PathBuf;
use std::time::Duration;

const QEMU: &str = "qemu-system-x86_64";

fn need_qemu() {
    require_program(QEMU, "qemu-system-x86");
}

/// A scratch directory holding the exported guests.
fn export(name: &str) -> PathBuf {
    let dir = scratch(&format!("vsock-rng-{name}"));
    let r = nfvisor(
        &["guests", "export", dir.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(dir.join("vsock-probe.elf").exists(), "vsock-probe exported");
    dir
}

type Guest = QemuGuest;

/// Boots vsock-probe under QEMU with `append` as its command line, with a
/// virtio-rng-pci device (modern only) when `rng` is set.
fn run_vsock_probe(dir: &std::path::Path, rng: bool, append: &str) -> Guest {
    let devices: &[&str] = if rng {
        &[
            "-object",
            "rng-random,id=r0,filename=/dev/urandom",
            "-device",
            "virtio-rng-pci,rng=r0,disable-legacy=on,romfile=",
        ]
    } else {
        &[]
    };
    qemu_guest(&dir.join("vsock-probe.elf"), devices, append)
}

fn n(r: &std::collections::BTreeMap<String, String>, key: &str) -> u64 {
    r.get(key)
        .unwrap_or_else(|| panic!("no {key} in {r:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {r:?}"))
}

fn features(r: &std::collections::BTreeMap<String, String>) -> u64 {
    u64::from_str_radix(r["features"].trim_start_matches("0x"), 16).unwrap()
}

/// 8 KiB of entropy in 512-byte buffers, by MSI-X: every byte came back,
/// none of the buffers is all zero, the bytes cover nearly every value, and
/// only VERSION_1 was accepted.
#[test]
fn vsock_probe_reads_entropy_from_qemu_virtio_rng() {
    need_qemu();
    let dir = export("msix");
    let g = run_vsock_probe(&dir, true, "mode=rng bytes=8192");
    assert_eq!(g.code, 1, "guest status 0 expected:\n{}", g.output);
    assert!(g.output.contains("#END status=0"), "{}", g.output);
    let dev = record(&g.output, "rngdev");
    assert_eq!(features(&dev), 1 << 32, "VERSION_1 only:\n{}", g.output);
    assert_eq!(dev["event_idx"], "0");
    assert_eq!(dev["msix"], "1", "{}", g.output);
    let rng = record(&g.output, "rng");
    assert!(n(&rng, "bytes") >= 8192, "{}", g.output);
    assert!(n(&rng, "requests") >= 16, "at most 512 bytes a buffer");
    assert_eq!(n(&rng, "zero_buffers"), 0, "{}", g.output);
    assert_eq!(n(&rng, "empty"), 0, "{}", g.output);
    assert!(n(&rng, "distinct") >= 200, "{}", g.output);
    // no vsock record: this mode does not touch vsock
    assert!(!g.output.contains("R vsock"), "{}", g.output);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same polling, with EVENT_IDX and 4 KiB buffers, 64 KiB in all.
#[test]
fn vsock_probe_reads_entropy_polling_with_event_idx() {
    need_qemu();
    let dir = export("poll");
    let g = run_vsock_probe(
        &dir,
        true,
        "mode=rng bytes=65536 chunk=4096 irq=poll event_idx=1",
    );
    assert_eq!(g.code, 1, "guest status 0 expected:\n{}", g.output);
    let dev = record(&g.output, "rngdev");
    assert_eq!(dev["msix"], "0");
    assert_eq!(
        dev["event_idx"], "1",
        "QEMU offers EVENT_IDX:\n{}",
        g.output
    );
    assert_eq!(features(&dev), (1 << 32) | (1 << 29));
    let rng = record(&g.output, "rng");
    assert!(n(&rng, "bytes") >= 65536, "{}", g.output);
    assert_eq!(n(&rng, "zero_buffers"), 0, "{}", g.output);
    assert_eq!(n(&rng, "distinct"), 256, "{}", g.output);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without the device each mode says so and ends with status 1; bad
/// parameters end with status 2.
#[test]
fn vsock_probe_without_its_devices_fails_cleanly() {
    need_qemu();
    let dir = export("absent");
    let g = run_vsock_probe(&dir, false, "mode=rng bytes=4096");
    assert_eq!(g.code, 3, "guest status 1 expected:\n{}", g.output);
    assert!(
        g.output.contains("no modern virtio-rng device"),
        "{}",
        g.output
    );
    // QEMU cannot serve vsock here: the vsock modes find no device
    let g = run_vsock_probe(&dir, true, "mode=echo port=1234 conns=1");
    assert_eq!(g.code, 3, "guest status 1 expected:\n{}", g.output);
    assert!(
        g.output.contains("no modern virtio-vsock device"),
        "{}",
        g.output
    );
    let g = run_vsock_probe(&dir, true, "mode=send conns=33");
    assert_eq!(g.code, 5, "guest status 2 expected:\n{}", g.output);
    let g = run_vsock_probe(&dir, true, "mode=bogus");
    assert_eq!(g.code, 5, "guest status 2 expected:\n{}", g.output);
    let _ = std::fs::remove_dir_all(&dir);
}
