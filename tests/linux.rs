//! A real Debian cloud kernel boots on both paths. The newest
//! linux-image-*-cloud-amd64 the package index offers is fetched by the
//! set-up (scripts/fetch-test-kernel.sh), never committed. Under emulated
//! KVM a full boot takes minutes, so each test stops at the first lines
//! that prove the path works.

mod common;
use common::*;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

static FETCH: Mutex<()> = Mutex::new(());

fn kernel(file: &str) -> PathBuf {
    let _once = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = repo_root().join(".test-assets/linux");
    let status = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/fetch-test-kernel.sh"))
        .arg(&dir)
        .status()
        .expect("running scripts/fetch-test-kernel.sh");
    assert!(
        status.success(),
        "fetching the Debian cloud kernel failed (needs apt and the package index)"
    );
    dir.join(file)
}

#[test]
fn linux_boots_as_pvh_vmlinux_and_echoes_its_command_line() {
    let vmlinux = kernel("vmlinux");
    let dir = scratch("initrd");
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, vec![0x5a; 1 << 20]).unwrap();
    let mut vm = Running::start(&[
        "run",
        "--json",
        "--memory",
        "256M",
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 earlyprintk=ttyS0 nfvisor_marker=pvh42",
    ]);
    let version = vm.wait_for_within("Linux version", Duration::from_secs(180));
    assert!(version.contains("cloud-amd64"), "{version}");
    let cmdline = vm.wait_for_within("Command line:", Duration::from_secs(60));
    assert!(cmdline.contains("nfvisor_marker=pvh42"), "{cmdline}");
    // the initrd, passed as the PVH module, at the top of low RAM (256 MiB - 1 MiB)
    let ramdisk = vm.wait_for_within("RAMDISK:", Duration::from_secs(120));
    assert!(ramdisk.contains("0x0ff00000-0x0fffffff"), "{ramdisk}");
    // our e820 (PVH memmap) and ACPI tables reach the kernel
    vm.wait_for_within("ACPI: APIC", Duration::from_secs(120));
}

#[test]
fn linux_bzimage_decompressor_starts_with_our_zero_page() {
    let bzimage = kernel("bzImage");
    let mut vm = Running::start(&[
        "run",
        "--json",
        "--memory",
        "256M",
        "--kernel",
        bzimage.to_str().unwrap(),
        "--cmdline",
        "earlyprintk=serial nokaslr console=ttyS0",
    ]);
    // printed by the decompressor after it parsed the command line we passed in the zero page
    vm.wait_for_within(
        "KASLR disabled: 'nokaslr' on cmdline.",
        Duration::from_secs(180),
    );
}
