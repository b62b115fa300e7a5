//! ivshmem: two VMs share a region (nfvisor and QEMU alike); read-only
//! windows; doorbells (MSI-X and the legacy pin) between nfvisor VMs and
//! with QEMU; bad specs.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn region(name: &str) -> String {
    let p = format!("/dev/shm/nfvisor-test-{name}-{}", std::process::id());
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn two_vms_share_a_region() {
    let shm = region("share");
    let spec = format!("path={shm},size=64K");
    let a = probe(&spec, "mode=write seed=42", false);
    assert_eq!(a.code, 0, "{}", a.stderr);
    let b = probe(&spec, "mode=read seed=42", true);
    assert_eq!(b.code, 0, "{}", b.stderr);
    let doc = json(&b);
    let check = doc["guest"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "check")
        .unwrap()
        .clone();
    assert_eq!(check["fields"]["mismatches"], "0");
    assert_eq!(check["fields"]["words"], "512");
    // the guest found ECAM through the MCFG table and read the same
    // configuration space there as through the 0xCF8 ports
    let ecam = doc["guest"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "ecam")
        .cloned();
    let ecam = ecam.expect("an ecam record: MCFG found");
    assert_eq!(ecam["fields"]["base"], "0xe8000000");
    assert_eq!(ecam["fields"]["match"], "1");
    // another seed does not match: the check can fail
    let c = probe(&spec, "mode=read seed=43", false);
    assert_eq!(c.code, 3);
    let _ = std::fs::remove_file(&shm);
}

#[test]
fn a_read_only_window_drops_writes_and_the_vm_runs_on() {
    let shm = region("ro");
    let spec = format!("path={shm},size=64K");
    assert_eq!(
        nfvisor(
            &[
                "run",
                "--guest",
                "ivshmem-probe",
                "--ivshmem",
                &spec,
                "--cmdline",
                "mode=write seed=5"
            ],
            T
        )
        .code,
        0
    );
    let ro = format!("{spec},readonly");
    let r = probe(&ro, "mode=write seed=6", true);
    // the guest ran to its end and found its writes gone
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(json(&r)["vm"]["devices"]["ivshmem0"]["dropped_writes"], 512);
    assert_eq!(
        r.stderr.matches("read-only or unmapped region").count(),
        1,
        "logged once: {}",
        r.stderr
    );
    // the region still holds the first pattern
    let ok = probe(&spec, "mode=read seed=5", false);
    assert_eq!(ok.code, 0, "{}", ok.stdout);
    let _ = std::fs::remove_file(&shm);
}

#[test]
fn bad_ivshmem_specs_are_refused() {
    let shm = region("bad");
    for (spec, needle) in [
        (format!("path={shm},size=3M"), "power of two"),
        (format!("path={shm}"), "no size"),
        ("size=1M".to_string(), "no path"),
        (format!("path={shm},size=1M,color=red"), "unknown part"),
        (format!("path={shm}-missing,size=1M,readonly"), "-missing"),
    ] {
        let r = nfvisor(&["run", "--guest", "hello", "--ivshmem", &spec], T);
        assert_eq!(r.code, 78, "{spec}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{spec}: {}", r.stderr);
    }
}

#[test]
fn a_vm_in_doorbell_mode_refuses_snapshots_and_keeps_running() {
    let (_server, ivs) = server("snapdb");
    let dir = scratch("ivshmem-snap");
    let sock = dir.join("vm.sock");
    let spec = format!("server={ivs}");
    let mut vm = Running::start(&[
        "run",
        "--guest",
        "dirtier",
        "--memory",
        "32M",
        "--cmdline",
        "mb=2 passes=30",
        "--ivshmem",
        &spec,
        "--control-socket",
        sock.to_str().unwrap(),
    ]);
    vm.wait_for("vCPU 0 runs on host thread");
    wait_for_path(&sock);
    let r = snapshot(sock.to_str().unwrap(), dir.join("s").to_str().unwrap());
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("doorbell mode"), "{}", r.stderr);
    let out = vm.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("DIRTIER OK"));
    let _ = std::fs::remove_file(format!(
        "/dev/shm/nfvisor-test-snapdb-{}",
        std::process::id()
    ));
}

/// A guest reading a plain shared region (with its BAR2 moved) migrates
/// only to a VM attached to that same region: another region is refused
/// with both named and the guest runs on; the same region takes it, and it
/// finishes there with every word matching.
#[test]
fn a_plain_region_guest_migrates_only_to_the_same_region() {
    let (shm, other, dir, control, src) = slow_reader("migrate");
    let migrate_to = |region: &str, name: &str| {
        let inbound = dir.join(format!("{name}.sock"));
        let ep = format!("unix:{}", inbound.display());
        let region = format!("path={region},size=64K");
        let mut dst = Running::start(&["receive", "--listen", &ep, "--ivshmem", &region]);
        dst.wait_for("waiting for a migration");
        let r = migrate(control.to_str().unwrap(), &ep, &[]);
        (r, dst.finish(T))
    };
    let (r, dst) = migrate_to(&other, "other");
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("another region") && r.stderr.contains(&shm) && r.stderr.contains(&other),
        "{}",
        r.stderr
    );
    assert_ne!(dst.code, 0);
    let (r, dst) = migrate_to(&shm, "same");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(dst.code, 0, "{}", dst.stderr);
    assert!(
        dst.stdout.contains("R check words=768000 mismatches=0"),
        "{}",
        dst.stdout
    );
    let out = src.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let _ = std::fs::remove_file(&shm);
    let _ = std::fs::remove_file(&other);
}

/// A region written with seed 5 (and the name of another), and a guest
/// that reads it for a while, its BAR2 moved, with a control socket in a
/// scratch directory: it ends with `R check words=768000 mismatches=0`.
/// Returns the region, the other, the directory, the socket and the guest.
fn slow_reader(
    name: &str,
) -> (
    String,
    String,
    std::path::PathBuf,
    std::path::PathBuf,
    Running,
) {
    let shm = region(name);
    let other = region(&format!("{name}-other"));
    let spec = format!("path={shm},size=64K");
    let write = probe(&spec, "mode=write seed=5", false);
    assert_eq!(write.code, 0, "{}", write.stderr);
    let dir = scratch(&format!("ivshmem-{name}"));
    let control = dir.join("src.sock");
    let vm = controlled_probe(
        &spec,
        &control,
        "mode=read seed=5 bytes=4096 repeat=1500 bar2=0xc8000000",
        &[],
    );
    (shm, other, dir, control, vm)
}

/// `nfvisor run --guest ivshmem-probe --ivshmem SPEC --cmdline CMDLINE`
/// (and `extra`) with a control socket at `control`, started and
/// answering.
fn controlled_probe(
    spec: &str,
    control: &std::path::Path,
    cmdline: &str,
    extra: &[&str],
) -> Running {
    let mut args = probe_args(spec, cmdline);
    args.extend_from_slice(&["--control-socket", control.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let mut vm = Running::start(&args);
    vm.wait_for("vCPU 0 runs on host thread");
    wait_for_path(control);
    vm
}

/// The same guest snapshotted: restored only attached to the same region
/// (another is refused, naming both), and there it finishes reading it.
#[test]
fn a_plain_region_guest_restores_only_on_the_same_region() {
    let (shm, other, dir, control, src) = slow_reader("snapshot");
    let snap = dir.join("snap");
    let r = snapshot(control.to_str().unwrap(), snap.to_str().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    drop(src);
    let restore = |region: &str| {
        let region = format!("path={region},size=64K");
        nfvisor(
            &[
                "restore",
                "--from",
                snap.to_str().unwrap(),
                "--ivshmem",
                &region,
            ],
            T,
        )
    };
    let refused = restore(&other);
    assert_eq!(refused.code, 78, "{}", refused.stderr);
    assert!(
        refused.stderr.contains(&shm) && refused.stderr.contains(&other),
        "{}",
        refused.stderr
    );
    let restored = restore(&shm);
    assert_eq!(restored.code, 0, "{}", restored.stderr);
    assert!(
        restored
            .stdout
            .contains("R check words=768000 mismatches=0"),
        "{}",
        restored.stdout
    );
    let _ = std::fs::remove_file(&shm);
    let _ = std::fs::remove_file(&other);
}

/// The arguments of `nfvisor run --guest ivshmem-probe --ivshmem SPEC
/// --cmdline CMDLINE`.
fn probe_args<'a>(spec: &'a str, cmdline: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--guest",
        "ivshmem-probe",
        "--ivshmem",
        spec,
        "--cmdline",
        cmdline,
    ]
}

/// `nfvisor run --guest ivshmem-probe --ivshmem SPEC --cmdline CMDLINE`,
/// with `--json` when asked.
fn probe(spec: &str, cmdline: &str, json: bool) -> Run {
    let mut args = probe_args(spec, cmdline);
    if json {
        args.push("--json");
    }
    nfvisor(&args, T)
}

fn server(name: &str) -> (Running, String) {
    let dir = scratch(name);
    let sock = dir.join("ivs.sock");
    let shm = format!("nfvisor-test-{name}-{}", std::process::id());
    let mut s = Running::start(&[
        "ivshmem-server",
        "--socket",
        sock.to_str().unwrap(),
        "--shm",
        &shm,
        "--size",
        "1M",
    ]);
    s.wait_for("ivshmem-server on");
    wait_for_path(&sock);
    // the region and the socket are the user's alone, whatever the umask
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sock), 0o600);
        assert_eq!(
            mode(std::path::Path::new(&format!("/dev/shm/{shm}"))),
            0o600
        );
    }
    (s, sock.to_str().unwrap().to_string())
}

/// On a fresh server: a VM running ivshmem-probe with `wait` (peer 0), then
/// one with `ring` (peer 1); both must succeed. Their JSON reports.
fn wait_and_ring(tag: &str, wait: &str, ring: &str) -> (serde_json::Value, serde_json::Value) {
    let (_server, sock) = server(tag);
    let reports = wait_and_ring_on(&sock, wait, ring);
    let _ = std::fs::remove_file(format!(
        "/dev/shm/nfvisor-test-{tag}-{}",
        std::process::id()
    ));
    reports
}

/// `wait_and_ring` on the server at `sock`.
fn wait_and_ring_on(sock: &str, wait: &str, ring: &str) -> (serde_json::Value, serde_json::Value) {
    let spec = format!("server={sock}");
    let vm = |cmdline: &str| -> Vec<String> {
        [
            "run",
            "--guest",
            "ivshmem-probe",
            "--ivshmem",
            &spec,
            "--cmdline",
            cmdline,
            "--json",
        ]
        .map(String::from)
        .to_vec()
    };
    let wait_args = vm(wait);
    let mut waiting = Running::start(&wait_args.iter().map(String::as_str).collect::<Vec<_>>());
    // the waiting VM's peer id (0 on a fresh server), which the ringer rings
    let line = waiting.wait_for("ivshmem: peer ");
    let id: u64 = line
        .split("ivshmem: peer ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no peer id in {line:?}"));
    let ring_args = vm(&ring.replace("peer=0", &format!("peer={id}")));
    let ringing = nfvisor(&ring_args.iter().map(String::as_str).collect::<Vec<_>>(), T);
    assert_eq!(ringing.code, 0, "{}", ringing.stderr);
    let waited = waiting.finish(T);
    assert_eq!(waited.code, 0, "{}", waited.stderr);
    (json(&waited), json(&ringing))
}

/// The server outlives clients that connect and never read until it runs
/// out of descriptors (run under a 32-descriptor limit), then serves two
/// real VMs once they have gone.
#[test]
fn the_server_outlives_descriptor_exhaustion_and_clients_that_never_read() {
    let dir = scratch("ivs-fds");
    let sock = dir.join("ivs.sock");
    let shm = format!("nfvisor-test-ivsfds-{}", std::process::id());
    let server = std::process::Command::new("prlimit")
        .args([
            "--nofile=32:32",
            "--",
            NFVISOR,
            "ivshmem-server",
            "--socket",
        ])
        .arg(&sock)
        .args(["--shm", &shm, "--size", "1M", "--vectors", "4"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux) runs the server");
    // killed however the test ends (a failed assertion included)
    struct Reaped(Option<std::process::Child>);
    impl Drop for Reaped {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut server = Reaped(Some(server));
    wait_for_path(&sock);
    let hogs: Vec<_> = (0..40)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&sock).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        server.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the server ended with {} clients that never read",
        hogs.len()
    );
    drop(hogs);
    // it notices they left within its 5 ms poll
    std::thread::sleep(Duration::from_millis(300));
    let (db, da) = wait_and_ring_on(
        sock.to_str().unwrap(),
        "mode=wait count=5",
        "mode=ring peer=0 count=5",
    );
    let mut child = server.0.take().unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_file(format!("/dev/shm/{shm}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(field(&da, "rung").as_deref(), Some("5"), "{log}");
    assert_eq!(field(&db, "received").as_deref(), Some("5"), "{log}");
    // it did run out: 4 eventfds and a socket a client, 32 descriptors
    assert!(log.contains("Too many open files"), "{log}");
}

/// The fields of the guest's first record of `kind`.
fn record(d: &serde_json::Value, kind: &str) -> serde_json::Value {
    d["guest"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == kind)
        .map(|r| r["fields"].clone())
        .unwrap_or_else(|| panic!("no {kind} record: {d}"))
}

/// A field of whichever record has it.
fn field(d: &serde_json::Value, k: &str) -> Option<String> {
    d["guest"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|r| r["fields"][k].as_str().map(str::to_string))
}

#[test]
fn doorbells_ring_the_peer_with_no_userspace_exit() {
    let (db, da) = wait_and_ring("bell", "mode=wait count=25", "mode=ring peer=0 count=25");
    assert_eq!(field(&da, "rung").as_deref(), Some("25"));
    assert_eq!(field(&db, "received").as_deref(), Some("25"));
    assert_eq!(field(&da, "ivposition").as_deref(), Some("1"));
    // the doorbell writes never reached the VMM: only the IVPosition read did
    let exits = &da["vm"]["vcpus"][0]["exits"];
    assert!(exits["by_reason"]["mmio_write"].is_null(), "{exits}");
    assert_eq!(exits["mmio_by_device"]["ivshmem-regs"]["count"], 1);
}

/// A server without --shm hands out a memfd sealed against shrinking
/// (nothing can pull the pages from under a peer's mapping): both VMs see
/// it sealed and ring each other through it; a named /dev/shm region is
/// not sealed, and the VMs say so.
#[test]
fn a_server_without_a_name_hands_out_a_sealed_region() {
    let dir = scratch("ivs-sealed");
    let sock = dir.join("ivs.sock");
    let mut s = Running::start(&[
        "ivshmem-server",
        "--socket",
        sock.to_str().unwrap(),
        "--size",
        "1M",
    ]);
    let line = s.wait_for("ivshmem-server on");
    assert!(line.contains("a sealed memfd"), "{line}");
    wait_for_path(&sock);
    let (db, da) = wait_and_ring_on(
        sock.to_str().unwrap(),
        "mode=wait count=5",
        "mode=ring peer=0 count=5",
    );
    assert_eq!(field(&db, "received").as_deref(), Some("5"));
    for d in [&db, &da] {
        assert_eq!(d["vm"]["devices"]["ivshmem0"]["region_sealed"], 1, "{d}");
    }
    drop(s);
    let (db, _) = wait_and_ring("unsealed", "mode=wait count=1", "mode=ring peer=0 count=1");
    assert_eq!(db["vm"]["devices"]["ivshmem0"]["region_sealed"], 0, "{db}");
}

#[test]
fn a_missing_server_or_bad_vectors_are_refused_and_a_dying_server_leaves_the_vm_running() {
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--ivshmem",
            "server=/nonexistent/ivs.sock",
        ],
        T,
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("/nonexistent/ivs.sock"), "{}", r.stderr);
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--ivshmem",
            "server=/tmp/x.sock,vectors=99",
        ],
        T,
    );
    assert_eq!(r.code, 78);
    assert!(r.stderr.contains("vectors"), "{}", r.stderr);
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--ivshmem",
            "server=/tmp/x.sock,size=1M",
        ],
        T,
    );
    assert_eq!(r.code, 78);
    let (server, sock) = server("dying");
    let mut vm = Running::start(&[
        "run",
        "--guest",
        "dirtier",
        "--memory",
        "32M",
        "--cmdline",
        "mb=2 passes=40",
        "--ivshmem",
        &format!("server={sock}"),
    ]);
    vm.wait_for("vCPU 0 runs on host thread");
    drop(server);
    let out = vm.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("DIRTIER OK"));
    let _ = std::fs::remove_file(format!(
        "/dev/shm/nfvisor-test-dying-{}",
        std::process::id()
    ));
}

#[test]
fn the_window_closes_and_opens_while_the_guest_runs() {
    let shm = region("window");
    let dir = scratch("ivshmem-window");
    let sock = dir.join("vm.sock");
    let spec = format!("path={shm},size=64K");
    assert_eq!(probe(&spec, "mode=write seed=3", false).code, 0);
    let vm = controlled_probe(&spec, &sock, "mode=read seed=3 repeat=300", &["--json"]);
    let s = sock.to_str().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let closed = json(&nfvisor(
        &["ivshmem-window", "--control-socket", s, "unmap", "--json"],
        T,
    ));
    assert_eq!(closed["window"], "unmapped");
    std::thread::sleep(Duration::from_millis(200));
    let opened = json(&nfvisor(
        &["ivshmem-window", "--control-socket", s, "map", "--json"],
        T,
    ));
    assert_eq!(opened["window"], "mapped");
    let out = vm.finish(T);
    // while closed, the guest read all-ones: the pattern check saw it
    assert_eq!(out.code, 3, "{}", out.stderr);
    let doc = json(&out);
    let check = doc["guest"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "check")
        .unwrap()
        .clone();
    let bad: u64 = check["fields"]["mismatches"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let words: u64 = check["fields"]["words"].as_str().unwrap().parse().unwrap();
    assert!(
        bad > 0 && bad < words,
        "{bad} of {words} reads saw the closed window"
    );
    let _ = std::fs::remove_file(&shm);
}

#[test]
fn the_doorbell_round_trip_benchmark_measures_every_ping() {
    let r = nfvisor(
        &[
            "bench", "doorbell", "--count", "100", "--pairs", "nfvisor", "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    let pair = &doc["pairs"][0];
    assert_eq!(pair["pair"], "nfvisor");
    assert_eq!(pair["round_trips"], 100);
    let (min, p50, max) = (
        pair["min_us"].as_f64().unwrap(),
        pair["p50_us"].as_f64().unwrap(),
        pair["max_us"].as_f64().unwrap(),
    );
    assert!(min > 0.0 && min <= p50 && p50 <= max, "{doc}");
    assert_eq!(pair["doorbell_writes_seen_by_the_vmm"], 0);
}

/// A pattern an nfvisor VM writes, a QEMU VM (`-device ivshmem-plain` on
/// the same file) reads back, and the other way round.
#[test]
fn a_qemu_vm_shares_a_region_with_an_nfvisor_vm() {
    let qemu = require_program("qemu-system-x86_64", "qemu-system-x86");
    let shm = region("qemu");
    let dir = scratch("qemu-plain");
    let r = nfvisor(&["guests", "export", dir.to_str().unwrap()], T);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let run_qemu = |mode: &str| {
        let out = std::process::Command::new(&qemu)
            .args(["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
            .args(["-M", "q35", "-nodefaults", "-nographic", "-no-reboot"])
            .args(["-serial", "stdio"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=m,size=64K,share=on,mem-path={shm}"
            ))
            .args(["-device", "ivshmem-plain,memdev=m"])
            .arg("-kernel")
            .arg(dir.join("ivshmem-probe.elf"))
            .args(["-append", mode])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let spec = format!("path={shm},size=64K");
    let a = probe(&spec, "mode=write seed=7", false);
    assert_eq!(a.code, 0, "{}", a.stderr);
    let q = run_qemu("mode=read seed=7");
    assert!(
        q.contains("pattern OK") && q.contains("#END status=0"),
        "{q}"
    );
    assert!(
        q.contains("R ecam base=0xb0000000 match=1"),
        "q35's MCFG: {q}"
    );
    let q = run_qemu("mode=write seed=8");
    assert!(q.contains("#END status=0"), "{q}");
    let b = probe(&spec, "mode=read seed=8", false);
    assert_eq!(b.code, 0, "{}", b.stderr);
    let c = probe(&spec, "mode=read seed=7", false);
    assert_eq!(c.code, 3, "QEMU's write replaced the pattern");
    let _ = std::fs::remove_file(&shm);
}

/// QEMU's ivshmem-doorbell (q35, MSI-X) and nfvisor's ring each other
/// through one `nfvisor ivshmem-server`: the nfvisor VM pings, the QEMU VM
/// echoes from its interrupt handler, so doorbells cross both ways, each
/// taken by MSI-X. Needs QEMU: CI installs it and fails without it.
#[test]
fn a_qemu_vm_and_an_nfvisor_vm_ring_each_other() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let r = nfvisor(
        &[
            "bench", "doorbell", "--count", "50", "--pairs", "mixed", "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let pair = &json(&r)["pairs"][0];
    assert_eq!(pair["pair"], "mixed");
    assert_eq!(pair["round_trips"], 50, "{pair}");
    assert_eq!(pair["doorbell_writes_seen_by_the_vmm"], 0, "{pair}");
}

/// The doorbell interrupt arrives by MSI-X when the guest enables it and on
/// the legacy pin when it does not (irq=intx); with the MSI-X vector masked
/// for 300 ms (hold), the first doorbell waits and arrives on unmask.
#[test]
fn doorbells_arrive_by_msix_or_by_the_legacy_pin() {
    for (tag, irq) in [
        ("msix", "msix"),
        ("intx", "intx"),
        ("hold", "msix hold_ms=300"),
    ] {
        let (db, _) = wait_and_ring(
            &format!("irq-{tag}"),
            &format!("mode=wait count=5 irq={irq}"),
            "mode=ring peer=0 count=5",
        );
        let want = if irq.starts_with("msix") { "1" } else { "0" };
        assert_eq!(record(&db, "interrupts")["msix"], want, "{db}");
        let held = db["guest"]["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["kind"] == "held");
        assert_eq!(held, tag == "hold", "{db}");
        assert_eq!(field(&db, "received").as_deref(), Some("5"));
    }
}

/// The guest sizes BAR2 and moves all three BARs (decoding off meanwhile):
/// the MSI-X table (BAR1), the doorbell ioeventfds (BAR0) and the shared
/// memory slot (BAR2) follow, and the old BAR2 address no longer decodes.
#[test]
fn bars_the_guest_moves_take_what_backs_them_along() {
    let (db, da) = wait_and_ring(
        "bars",
        "mode=wait count=10 bar1=0xe0200000 bar2=0xc8000000",
        "mode=ring peer=0 count=10 bar0=0xe0300000 bar2=0xc4000000",
    );
    for d in [&da, &db] {
        let bars = record(d, "bars");
        assert_eq!(bars["size2"], "1048576", "BAR2 sizes as the region");
        assert_eq!(bars["old2"], "0xffffffffffffffff", "the old BAR2 is gone");
    }
    assert_eq!(record(&da, "ivshmem")["bar2"], "0xc4000000");
    assert_eq!(record(&db, "ivshmem")["bar2"], "0xc8000000");
    assert_eq!(record(&db, "interrupts")["msix"], "1");
    assert_eq!(field(&db, "received").as_deref(), Some("10"));
    assert_eq!(
        da["vm"]["devices"]["ivshmem0"]["doorbell_writes"], 0,
        "the doorbell ioeventfds moved with BAR0"
    );
}

/// A doorbell rung to a peer id nobody has is ignored (as QEMU does),
/// counted and logged; the guest that rang it sees no answer and says so,
/// and the peer that is there still takes the next doorbell.
#[test]
fn a_doorbell_to_a_peer_that_is_not_there_is_counted_and_ignored() {
    let (_server, sock) = server("nopeer");
    let spec = format!("server={sock}");
    let mut args = probe_args(&spec, "mode=wait count=1");
    args.push("--json");
    let mut waiting = Running::start(&args);
    waiting.wait_for("ivshmem: peer 0");
    let stray = probe(&spec, "mode=ring peer=9 count=1 answer_s=1", true);
    assert_eq!(stray.code, 1, "no answer from peer 9: {}", stray.stderr);
    assert!(stray.stderr.contains("peer 9"), "{}", stray.stderr);
    assert_eq!(
        json(&stray)["vm"]["devices"]["ivshmem0"]["doorbell_writes"],
        1
    );
    let ok = probe(&spec, "mode=ring peer=0 count=1", false);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let w = waiting.finish(T);
    assert_eq!(w.code, 0, "{}", w.stderr);
    let _ = std::fs::remove_file(format!(
        "/dev/shm/nfvisor-test-nopeer-{}",
        std::process::id()
    ));
}
