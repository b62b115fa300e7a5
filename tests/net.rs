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
    let mut vm = ns.exec(&qemu);
    vm.args(["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
        .args(["-M", "q35", "-nodefaults", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-netdev")
        .arg(format!(
            "tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"
        ))
        .args([
            "-device",
            "virtio-net-pci,disable-legacy=on,romfile=,netdev=n0,mac=52:54:00:12:34:56",
        ])
        .arg("-kernel")
        .arg(dir.join("net-probe.elf"))
        .arg("-append")
        .arg(format!("mode=echo count={count}"));
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
    let irqs: u64 = echo["irqs"].parse().unwrap();
    assert!(
        irqs > 0,
        "frames sent one at a time reach a waiting guest by MSI-X: {}",
        e.output
    );
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
    let irqs: u64 = echo["irqs"].parse().unwrap();
    assert!(irqs > 0, "MSI-X through an irqfd: {}", e.output);
}

/// A VM with a NIC refuses a snapshot by name (its queue state is not
/// saved yet) and runs on.
#[test]
fn a_vm_with_a_nic_refuses_a_snapshot_and_runs_on() {
    let ns = Netns::new();
    ns.add_tap(TAP);
    let dir = scratch("net-snap");
    let sock = dir.join("vm.sock");
    let exe = env!("CARGO_BIN_EXE_nfvisor");
    let mut cmd = ns.exec(exe);
    cmd.args(["run", "--guest", "net-probe", "--control-socket"])
        .arg(&sock)
        .arg("--net")
        .arg(format!("tap={TAP}"))
        .args(["--cmdline", "mode=recv count=1 timeout_s=30"]);
    let mut vm = Vm::start(cmd);
    vm.wait_for("R negotiated", Duration::from_secs(60));
    wait_for_path(&sock);
    let r = nfvisor(
        &[
            "snapshot",
            "--control-socket",
            sock.to_str().unwrap(),
            "--to",
            dir.join("snap").to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("device net0: virtio-net"), "{}", r.stderr);
    let st = nfvisor(
        &[
            "status",
            "--control-socket",
            sock.to_str().unwrap(),
            "--json",
        ],
        Duration::from_secs(30),
    );
    let st = json(&st);
    assert_eq!(st["state"], "running", "{st}");
    assert!(st["devices"]["net0"]["rx_frames"].is_u64(), "{st}");
    drop(vm);
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
        ("mac=52:54:00:12:34:56", "no tap=NAME or fd=N"),
        ("tap=a-name-far-too-long-for-linux", "longer than 15 bytes"),
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
