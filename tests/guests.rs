//! Each bundled guest boots on the real /dev/kvm and says what it should.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

#[test]
fn hello_prints_and_exits_with_its_status() {
    let r = nfvisor(&["run", "--guest", "hello"], T);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("Hello from the nfvisor hello guest"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("guest exited with status 0"));
    let r = nfvisor(&["run", "--guest", "hello", "--cmdline", "exit=7"], T);
    assert_eq!(r.code, 7, "{}", r.stderr);
    // statuses above 63 are kept apart from VMM error codes
    let r = nfvisor(
        &["run", "--guest", "hello", "--cmdline", "exit=200", "--json"],
        T,
    );
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert_eq!(json(&r)["vm"]["stop"]["status"], 200);
}

#[test]
fn application_processors_start_by_init_sipi() {
    let r = nfvisor(&["run", "--guest", "hello", "--vcpus", "3", "--json"], T);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    let cpus: Vec<_> = doc["guest"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "cpu")
        .map(|r| {
            (
                r["fields"]["apic_id"].as_str().unwrap().to_string(),
                r["fields"]["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        cpus,
        vec![
            ("0".into(), "bsp".into()),
            ("1".into(), "ap".into()),
            ("2".into(), "ap".into())
        ],
        "{}",
        r.stderr
    );
    // the guest found 3 processors in the ACPI MADT
    assert!(r.stderr.contains("cpus=3"), "{}", r.stderr);
    assert_eq!(doc["vm"]["vcpus"].as_array().unwrap().len(), 3);
}

#[test]
fn latency_probe_reports_every_sample() {
    let r = nfvisor(
        &["run", "--cmdline", "samples=300 period_us=100", "--json"],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    assert_eq!(doc["guest"]["name"], "latency-probe");
    let h = &doc["guest"]["histograms"][0];
    assert_eq!(h["series"], "timer");
    assert_eq!(h["count"], 300);
    let (min, p50, p99, max) = (
        h["min"].as_u64().unwrap(),
        h["p50"].as_u64().unwrap(),
        h["p99"].as_u64().unwrap(),
        h["max"].as_u64().unwrap(),
    );
    assert!(min <= p50 && p50 <= p99 && p99 <= max, "{h}");
    let bucket_total: u64 = h["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[1].as_u64().unwrap())
        .sum();
    assert_eq!(bucket_total + h["overflow"].as_u64().unwrap(), 300);
}

#[test]
fn exit_bench_exits_are_counted_exactly() {
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "exit-bench",
            "--cmdline",
            "n=500",
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    let v = &doc["vm"]["vcpus"][0];
    // exactly n PIO exits on the bench port and n MMIO exits on the bench page
    assert_eq!(v["exits"]["pio_by_device"]["bench-port"]["count"], 500);
    assert_eq!(v["exits"]["mmio_by_device"]["bench-mmio"]["count"], 500);
    assert_eq!(v["exits"]["by_reason"]["mmio_write"]["count"], 500);
    let hists = doc["guest"]["histograms"].as_array().unwrap();
    let names: Vec<_> = hists
        .iter()
        .map(|h| h["series"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pio", "mmio", "cpuid"]);
    assert!(hists.iter().all(|h| h["count"] == 500));
    // KVM's own counters agree: every exit we handled is one KVM counted
    let ours = v["exits"]["total"].as_u64().unwrap();
    let kvm = &v["kvm_stats"];
    let io = kvm["io_exits"].as_u64().unwrap_or(0);
    if io > 0 {
        let pio = v["exits"]["by_reason"]["pio_in"]["count"].as_u64().unwrap()
            + v["exits"]["by_reason"]["pio_out"]["count"]
                .as_u64()
                .unwrap();
        assert_eq!(io, pio, "KVM io_exits vs ours");
        assert_eq!(kvm["mmio_exits"].as_u64().unwrap(), 500);
    } else {
        // paravirtual KVM counts only the total
        assert!(kvm["exits"].as_u64().unwrap() >= ours, "{kvm}");
        assert_eq!(kvm["mmio_exits"].as_u64().unwrap(), 500);
    }
}

#[test]
fn dirtier_checks_every_pass() {
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "dirtier",
            "--memory",
            "32M",
            "--cmdline",
            "mb=2 passes=2",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("DIRTIER OK"))
        .expect("no DIRTIER OK line");
    assert!(
        line.contains("passes=2") && line.contains("digest=0x"),
        "{line}"
    );
    // the digest depends only on the values: the same run gives the same digest
    let again = nfvisor(
        &[
            "run",
            "--guest",
            "dirtier",
            "--memory",
            "32M",
            "--cmdline",
            "mb=2 passes=2",
        ],
        T,
    );
    assert_eq!(digest(&r.stdout), digest(&again.stdout));
    // a working set larger than RAM is refused by the guest (status 2)
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "dirtier",
            "--memory",
            "16M",
            "--cmdline",
            "mb=64",
        ],
        T,
    );
    assert_eq!(r.code, 2, "{}", r.stdout);
}

#[test]
fn unknown_ports_and_mmio_are_logged_once_and_ignored() {
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--cmdline",
            "mode=poke",
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "the VM must keep running: {}", r.stderr);
    let doc = json(&r);
    let poke = doc["guest"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "poke")
        .unwrap()
        .clone();
    assert_eq!(poke["fields"]["port_read"], "0xff");
    assert_eq!(poke["fields"]["mmio_read"], "0xffffffff");
    assert_eq!(doc["vm"]["unknown_accesses"], 4);
    assert_eq!(
        r.stderr.matches("unknown port 0x2f0").count(),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(
        r.stderr.matches("unknown MMIO address 0xc0000000").count(),
        1,
        "{}",
        r.stderr
    );
}

#[test]
fn a_crashing_guest_is_reported_as_a_crash_with_its_state() {
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--cmdline",
            "mode=triple-fault",
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 65, "{}", r.stderr);
    let doc = json(&r);
    let kind = doc["vm"]["stop"]["kind"].as_str().unwrap();
    assert!(kind == "shutdown" || kind == "internal-error", "{kind}");
    assert!(doc["vm"]["stop"]["state"]
        .as_str()
        .unwrap()
        .contains("rip="));
}

#[test]
fn json_output_is_one_document_and_serial_goes_to_a_file() {
    let dir = scratch("serial");
    let console = dir.join("console.txt");
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--json",
            "--serial",
            console.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(r.code, 0);
    let doc = json(&r);
    assert_eq!(doc["exit_code"], 0);
    assert!(doc["vcpu_threads"][0]["tid"].as_i64().unwrap() > 0);
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("Hello from the nfvisor hello guest"));
    assert!(
        !r.stderr.contains("Hello from"),
        "console must not also go to stderr"
    );
    // without --serial, the console goes to stderr under --json
    let r = nfvisor(&["run", "--guest", "hello", "--json"], T);
    assert!(r.stderr.contains("Hello from the nfvisor hello guest"));
    json(&r);
}

#[test]
fn a_toml_config_is_read_and_flags_override_it() {
    let dir = scratch("toml");
    let cfg = dir.join("vm.toml");
    std::fs::write(
        &cfg,
        "guest = \"hello\"\nmemory = \"48M\"\nvcpus = 2\ncmdline = \"exit=5\"\n",
    )
    .unwrap();
    let r = nfvisor(&["run", "--config", cfg.to_str().unwrap(), "--json"], T);
    assert_eq!(r.code, 5, "{}", r.stderr);
    let doc = json(&r);
    assert_eq!(doc["vm"]["memory_mib"], 48);
    assert_eq!(doc["vm"]["vcpus"].as_array().unwrap().len(), 2);
    let r = nfvisor(
        &[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--cmdline",
            "exit=6",
        ],
        T,
    );
    assert_eq!(r.code, 6);
}

#[test]
fn guests_are_listed_and_exported() {
    let r = nfvisor(&["guests"], T);
    for name in ["hello", "latency-probe", "exit-bench", "dirtier"] {
        assert!(r.stdout.contains(name), "{}", r.stdout);
    }
    let dir = scratch("export");
    let r = nfvisor(&["guests", "export", dir.to_str().unwrap()], T);
    assert_eq!(r.code, 0);
    let elf = std::fs::read(dir.join("hello.elf")).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    // an exported image boots again through --kernel
    let r = nfvisor(
        &[
            "run",
            "--kernel",
            dir.join("hello.elf").to_str().unwrap(),
            "--cmdline",
            "exit=3",
        ],
        T,
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
}

#[test]
fn exported_hello_runs_under_qemu() {
    let qemu = require_program("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch("qemu");
    nfvisor(&["guests", "export", dir.to_str().unwrap()], T);
    let out = std::process::Command::new("timeout")
        .args([
            "60",
            &qemu,
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-M",
            "microvm,x-option-roms=off,rtc=off",
            "-nographic",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel",
        ])
        .arg(dir.join("hello.elf"))
        .args(["-append", "exit=4"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Hello from the nfvisor hello guest"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // QEMU's isa-debug-exit exits with (status << 1) | 1
    assert_eq!(out.status.code(), Some((4 << 1) | 1));
}

/// A hostile guest sweeping unknown MMIO addresses costs a counter, not
/// memory, log lines or descriptors: 10^4 then 10^5 distinct addresses,
/// and the VMM's own memory, its log and its descriptors are the same.
#[test]
fn an_mmio_sweep_grows_neither_memory_nor_logs() {
    let sweep = |n: u64| {
        let cmdline = format!("mode=sweep sweep={n}");
        let r = nfvisor(
            &["run", "--guest", "hello", "--cmdline", &cmdline, "--json"],
            Duration::from_secs(120),
        );
        assert_eq!(r.code, 0, "the VM must keep running: {}", r.stderr);
        let doc = json(&r);
        assert_eq!(doc["vm"]["unknown_accesses"], n, "{doc}");
        let vm = &doc["vm"];
        let own_kib =
            vm["process_rss_kib"].as_u64().unwrap() - vm["guest_resident_kib"].as_u64().unwrap();
        (own_kib, r.stderr.len(), vm["open_fds"].as_u64().unwrap())
    };
    let (small_kib, small_log, small_fds) = sweep(10_000);
    let (big_kib, big_log, big_fds) = sweep(100_000);
    // 256 remembered addresses: the same few KiB either way; allocator
    // noise stays well under the 10x the sweep grew by
    assert!(
        big_kib < small_kib + 1024,
        "VMM memory {small_kib} KiB after 10^4 addresses, {big_kib} KiB after 10^5"
    );
    assert!(
        big_log < small_log + 512,
        "log {small_log} bytes after 10^4 addresses, {big_log} after 10^5"
    );
    assert_eq!(small_fds, big_fds);
}

/// Runs `hello` with an entropy device (virtio-rng: a PCI function with
/// BAR 1 for MSI-X and BAR 4 for its registers and notify ioeventfd, no host
/// resources needed) and `cmdline`; the VM must end well and print
/// `record`. The VMM's own memory (KiB), its log (bytes), its descriptors.
fn storm_cost(cmdline: &str, record: &str) -> (u64, usize, u64) {
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--rng",
            "--cmdline",
            cmdline,
            "--json",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(r.code, 0, "the VM must keep running: {}", r.stderr);
    assert!(r.stderr.contains(record), "no `{record}`: {}", r.stderr);
    let doc = json(&r);
    let vm = &doc["vm"];
    let own_kib =
        vm["process_rss_kib"].as_u64().unwrap() - vm["guest_resident_kib"].as_u64().unwrap();
    (own_kib, r.stderr.len(), vm["open_fds"].as_u64().unwrap())
}

/// A guest moving BARs at full speed costs the VMM nothing it keeps: BAR 1
/// (the MSI-X table, a bus range) 10^3 then 10^4 times, BAR 4 (the virtio
/// registers: a bus range and the notify ioeventfd, unregistered and
/// registered again each move) 10^2 then 10^3 times; every move read back,
/// the VM runs on, memory, log and descriptors as after the smaller storm.
#[test]
fn bar_moves_grow_neither_memory_nor_logs() {
    // each BAR 4 move is two KVM_IOEVENTFD calls, each an SRCU grace period
    // (~4 ms on a nested host): 10^3 moves, not 10^4, keep the test short
    for (bar, small, big) in [(1, 1_000, 10_000), (4, 100, 1_000)] {
        let moves = |n: u64| {
            storm_cost(
                &format!("mode=barmove moves={n} bar={bar}"),
                &format!("bar={bar} moves={n} ok=1\n"),
            )
        };
        let (small_kib, small_log, small_fds) = moves(small);
        let (big_kib, big_log, big_fds) = moves(big);
        assert!(
            big_kib < small_kib + 1024,
            "BAR {bar}: VMM memory {small_kib} KiB after {small} moves, {big_kib} KiB after {big}"
        );
        assert!(
            big_log < small_log + 512,
            "BAR {bar}: log {small_log} bytes after {small} moves, {big_log} after {big}"
        );
        assert_eq!(small_fds, big_fds, "BAR {bar}: descriptors");
    }
}

/// A guest rewriting its MSI-X table at full speed (addresses valid, 0 and
/// 0xdead0000, each entry masked and unmasked by turns: a GSI route and an
/// irqfd each time) costs the VMM nothing it keeps: 10^4 then 10^5 writes.
#[test]
fn an_msix_storm_grows_neither_memory_nor_logs() {
    let storm = |n: u64| {
        storm_cost(
            &format!("mode=msixstorm writes={n}"),
            &format!("entries=2 writes={n}\n"),
        )
    };
    let (small_kib, small_log, small_fds) = storm(10_000);
    let (big_kib, big_log, big_fds) = storm(100_000);
    assert!(
        big_kib < small_kib + 1024,
        "VMM memory {small_kib} KiB after 10^4 MSI-X writes, {big_kib} KiB after 10^5"
    );
    assert!(
        big_log < small_log + 512,
        "log {small_log} bytes after 10^4 MSI-X writes, {big_log} after 10^5"
    );
    assert_eq!(small_fds, big_fds);
}
