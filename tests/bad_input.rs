//! Bad input gets a clear error naming the culprit, a non-zero exit, no panic.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn refused(args: &[&str], code: i32, needle: &str) {
    let r = nfvisor(args, T);
    assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
    assert!(
        r.stderr.contains(needle),
        "{args:?}: expected {needle:?} in:\n{}",
        r.stderr
    );
}

#[test]
fn missing_kernel_file() {
    refused(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        78,
        "/nonexistent/vmlinux",
    );
}

#[test]
fn a_file_that_is_no_kernel() {
    let dir = scratch("notakernel");
    let f = dir.join("notes.txt");
    std::fs::write(&f, vec![b'x'; 4096]).unwrap();
    refused(
        &["run", "--kernel", f.to_str().unwrap()],
        78,
        "neither an ELF",
    );
    // a truncated ELF
    let hello = guests::find("hello").unwrap().image;
    let cut = dir.join("cut.elf");
    std::fs::write(&cut, &hello[..200]).unwrap();
    refused(&["run", "--kernel", cut.to_str().unwrap()], 78, "cut.elf");
}

#[test]
fn memory_larger_than_the_host() {
    refused(
        &["run", "--guest", "hello", "--memory", "100000G"],
        78,
        "larger than this host",
    );
    refused(
        &["run", "--guest", "hello", "--memory", "12X"],
        78,
        "memory size",
    );
}

#[test]
fn zero_vcpus() {
    refused(
        &["run", "--guest", "hello", "--vcpus", "0"],
        78,
        "at least one vCPU",
    );
}

#[test]
fn impossible_cpu_lists() {
    refused(
        &["run", "--guest", "hello", "--cpus", "999"],
        78,
        "CPU 999 does not exist",
    );
    refused(
        &["run", "--guest", "hello", "--cpus", "3-1"],
        78,
        "bad CPU list",
    );
    refused(
        &["run", "--guest", "hello", "--vcpus", "2", "--cpus", "0"],
        78,
        "one host CPU per vCPU",
    );
    refused(
        &["run", "--guest", "hello", "--housekeeping-cpus", "x"],
        78,
        "housekeeping-cpus",
    );
}

#[test]
fn malformed_toml() {
    let dir = scratch("toml-bad");
    let f = dir.join("vm.toml");
    std::fs::write(&f, "memory = [\n").unwrap();
    refused(&["run", "--config", f.to_str().unwrap()], 78, "vm.toml");
    std::fs::write(&f, "memroy = \"64M\"\n").unwrap();
    refused(&["run", "--config", f.to_str().unwrap()], 78, "memroy");
    refused(
        &["run", "--config", "/nonexistent/vm.toml"],
        78,
        "/nonexistent/vm.toml",
    );
}

#[test]
fn unknown_guest_and_settings() {
    refused(&["run", "--guest", "nope"], 78, "no bundled guest \"nope\"");
    refused(
        &["run", "--guest", "hello", "--hugepages", "3M"],
        78,
        "hugepage size",
    );
    refused(
        &["run", "--guest", "hello", "--disable-exits", "hlt,bogus"],
        78,
        "bogus",
    );
    refused(
        &["run", "--guest", "hello", "--rt-priority", "150"],
        78,
        "1 to 99",
    );
}

#[test]
fn initrd_missing_or_too_large() {
    refused(
        &[
            "run",
            "--guest",
            "hello",
            "--initrd",
            "/nonexistent/initrd.img",
        ],
        78,
        "/nonexistent/initrd.img",
    );
    let dir = scratch("bigrd");
    let rd = dir.join("big.img");
    std::fs::write(&rd, vec![0u8; 40 << 20]).unwrap();
    refused(
        &[
            "run",
            "--guest",
            "hello",
            "--memory",
            "32M",
            "--initrd",
            rd.to_str().unwrap(),
        ],
        78,
        "does not fit",
    );
}

#[test]
fn a_numa_node_that_does_not_exist() {
    refused(
        &["run", "--guest", "hello", "--numa-node", "63"],
        71,
        "NUMA node 63 does not exist",
    );
    refused(
        &[
            "run",
            "--guest",
            "hello",
            "--cpus",
            "0",
            "--numa-node",
            "63",
        ],
        78,
        "NUMA node 63 does not exist",
    );
}

#[test]
fn migration_flags_out_of_range_are_refused_before_anything_starts() {
    // TCP without a token, at either end, must be asked for
    refused(
        &[
            "migrate",
            "--control-socket",
            "/nonexistent/vm.sock",
            "--to",
            "tcp:127.0.0.1:4444",
        ],
        78,
        "--insecure",
    );
    refused(
        &["receive", "--listen", "tcp:127.0.0.1:0"],
        78,
        "--insecure",
    );
    for n in ["0", "17"] {
        refused(
            &[
                "migrate",
                "--control-socket",
                "/nonexistent/vm.sock",
                "--to",
                "unix:/x",
                "--connections",
                n,
            ],
            2,
            "--connections",
        );
    }
    // a receiver never listens with a doorbell-mode region it could not use
    refused(
        &[
            "receive",
            "--listen",
            "unix:/nonexistent/in.sock",
            "--ivshmem",
            "server=/nonexistent/ivs.sock",
        ],
        2,
        "doorbell mode",
    );
    refused(
        &[
            "receive",
            "--listen",
            "unix:/nonexistent/in.sock",
            "--dirty-ring",
            "4096",
            "--dirty-bitmap",
        ],
        2,
        "--dirty-bitmap",
    );
}

/// A socket path where something else lives is refused and left alone:
/// the control socket, the REST API socket and the migration listener
/// remove only a dead socket of their own kind.
#[test]
fn a_socket_path_holding_a_file_is_refused_and_the_file_kept() {
    let dir = scratch("sockpath");
    let file = dir.join("precious");
    std::fs::write(&file, b"keep me").unwrap();
    let f = file.to_str().unwrap();
    let listen = format!("unix:{f}");
    // (a VM whose control socket cannot be made runs on without it)
    for (args, fatal) in [
        (
            vec!["run", "--guest", "hello", "--control-socket", f],
            false,
        ),
        (vec!["run", "--api-socket", f], true),
        (vec!["receive", "--listen", &listen], true),
    ] {
        let r = nfvisor(&args, T);
        assert_eq!(r.code != 0, fatal, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("not a socket") && r.stderr.contains(f),
            "{args:?}: {}",
            r.stderr
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me", "{args:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
