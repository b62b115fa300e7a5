//! Builds the bundled guests from `guest-src/` with the system gcc and ld.
//!
//! There is no bare-metal Rust target on the build machines (only the host
//! target is installed and none can be fetched), and the `cc` crate builds
//! objects and archives, not stand-alone images with a linker script; so the
//! guests are freestanding C plus one assembly file, compiled and linked here.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: &[&str] = &[
    "hello",
    "latency_probe",
    "exit_bench",
    "dirtier",
    "ivshmem_probe",
    "net_probe",
    "blk_probe",
    "vsock_probe",
];
const COMMON: &[&str] = &["entry.S", "runtime.c"];
/// Sources linked into some guests only (after COMMON): the virtio-pci
/// transport defines ext_irq, which the other guests define themselves.
const EXTRA: &[(&str, &[&str])] = &[
    ("net_probe", &["virtio_pci.c"]),
    ("blk_probe", &["virtio_pci.c"]),
    ("vsock_probe", &["virtio_pci.c"]),
];
const CFLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-nostdlib",
    "-Wall",
    "-Wextra",
    "-Werror",
];

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot start {:?}: {e} (gcc and binutils are needed to build the guests)",
            cmd.get_program()
        )
    });
    assert!(status.success(), "guest build step failed: {cmd:?}");
}

fn compile(src: &Path, out: &Path) {
    run(Command::new("gcc")
        .args(CFLAGS)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(out));
}

fn main() {
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("guest-src");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", src.display());

    let mut common = Vec::new();
    for file in COMMON {
        let obj = out.join(format!("{file}.o"));
        compile(&src.join(file), &obj);
        common.push(obj);
    }
    let mut extra = std::collections::BTreeMap::new();
    for (_, files) in EXTRA {
        for file in *files {
            let obj = out.join(format!("{file}.o"));
            if !extra.contains_key(file) {
                compile(&src.join(file), &obj);
                extra.insert(*file, obj);
            }
        }
    }
    for guest in GUESTS {
        let obj = out.join(format!("{guest}.o"));
        compile(&src.join(format!("{guest}.c")), &obj);
        let own: Vec<&PathBuf> = EXTRA
            .iter()
            .filter(|(g, _)| g == guest)
            .flat_map(|(_, files)| files.iter().map(|f| &extra[f]))
            .collect();
        run(Command::new("ld")
            .arg("-T")
            .arg(src.join("guest.ld"))
            .args([
                "-nostdlib",
                "-static",
                "-z",
                "max-page-size=0x1000",
                "--no-warn-rwx-segments",
                "-o",
            ])
            .arg(out.join(format!("{guest}.elf")))
            .args(&common)
            .args(own)
            .arg(&obj));
    }
}
