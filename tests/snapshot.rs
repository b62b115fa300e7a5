//! Control socket, pause/resume, snapshot and restore on the real /dev/kvm.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);
const DIRTIER: &[&str] = &[
    "--guest",
    "dirtier",
    "--memory",
    "32M",
    "--cmdline",
    "mb=4 passes=60",
];

fn start_with_socket(name: &str) -> (Running, std::path::PathBuf, std::path::PathBuf) {
    let dir = scratch(name);
    let sock = dir.join("vm.sock");
    let mut args = vec!["run", "--control-socket", sock.to_str().unwrap()];
    args.extend_from_slice(DIRTIER);
    let mut vm = Running::start(&args);
    vm.wait_for("vCPU 0 runs on host thread");
    wait_for_path(&sock);
    (vm, sock, dir)
}

#[test]
fn snapshot_then_restore_continues_with_the_same_digest() {
    let plain = nfvisor(&[&["run"], DIRTIER].concat(), T);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    let (vm, sock, dir) = start_with_socket("snap");
    std::thread::sleep(Duration::from_millis(200));
    let snap = dir.join("snap");
    let r = nfvisor(
        &[
            "snapshot",
            "--control-socket",
            sock.to_str().unwrap(),
            "--to",
            snap.to_str().unwrap(),
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let reply = json(&r);
    assert_eq!(reply["ok"], true);
    assert_eq!(
        reply["state"], "running",
        "the source resumes after the snapshot"
    );
    let written = reply["snapshot"]["pages_written"].as_u64().unwrap();
    let zero = reply["snapshot"]["pages_zero"].as_u64().unwrap();
    assert!(
        written > 0 && zero > written,
        "sparse: {written} written, {zero} zero"
    );
    // the guest's memory is in there: the owner's alone, and no temporary
    // left beside it
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&snap.join("snapshot.nfv")), 0o600);
        assert_eq!(mode(&snap), 0o700);
        let names: Vec<_> = std::fs::read_dir(&snap)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["snapshot.nfv"], "{names:?}");
    }
    // the file holds the non-zero pages only
    let size = std::fs::metadata(snap.join("snapshot.nfv")).unwrap().len();
    assert!(
        size < (written + 64) * 4200,
        "{size} bytes for {written} pages"
    );
    let source = vm.finish(T);
    assert_eq!(source.code, 0, "{}", source.stderr);
    assert_eq!(digest(&source.stdout), digest(&plain.stdout));

    let restored = nfvisor(&["restore", "--from", snap.to_str().unwrap()], T);
    assert_eq!(restored.code, 0, "{}", restored.stderr);
    assert_eq!(digest(&restored.stdout), digest(&plain.stdout));
    // it continued where it was: the guest's header was printed before the snapshot
    assert!(
        !restored.stdout.contains("#NFV v1 guest=dirtier"),
        "{}",
        restored.stdout
    );
}

#[test]
fn pause_resume_status_and_bad_requests() {
    let (vm, sock, _dir) = start_with_socket("ctl");
    let s = sock.to_str().unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let status = json(&nfvisor(&["status", "--control-socket", s, "--json"], T));
    assert_eq!(status["state"], "running");
    let paused = json(&nfvisor(&["pause", "--control-socket", s, "--json"], T));
    assert_eq!(paused["state"], "paused");
    assert_eq!(
        json(&nfvisor(&["status", "--control-socket", s, "--json"], T))["state"],
        "paused"
    );
    std::thread::sleep(Duration::from_millis(300));
    // bad requests are refused and the VM runs on
    for req in [
        "not json",
        "{\"v\":9,\"cmd\":\"status\"}",
        "{\"v\":1,\"cmd\":\"explode\"}",
        "{\"v\":1,\"cmd\":\"snapshot\"}",
    ] {
        let reply = vmm::control::request(
            &sock,
            serde_json::from_str(req).unwrap_or(serde_json::Value::String(req.into())),
        )
        .unwrap();
        assert_eq!(reply["ok"], false, "{req}: {reply}");
        assert!(reply["error"].as_str().unwrap().len() > 5);
    }
    // an over-long request is refused and the connection ends; the VM
    // runs on and answers the next caller
    {
        use std::io::{BufRead, Write};
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = c.write_all(&vec![b'x'; 100 << 10]);
        let mut reply = String::new();
        std::io::BufReader::new(c).read_line(&mut reply).unwrap();
        assert!(reply.contains("longer than 64 KiB"), "{reply}");
    }
    let resumed = json(&nfvisor(&["resume", "--control-socket", s, "--json"], T));
    assert_eq!(resumed["state"], "running");
    let out = vm.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    digest(&out.stdout);
    // the socket is gone with the VM
    assert!(!sock.exists());
    let r = nfvisor(&["status", "--control-socket", s], T);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("vm.sock"), "{}", r.stderr);
}

#[test]
fn a_corrupt_or_cut_snapshot_is_refused_and_never_runs() {
    let (vm, sock, dir) = start_with_socket("corrupt");
    let snap = dir.join("snap");
    let r = snapshot(sock.to_str().unwrap(), snap.to_str().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    drop(vm);
    let good = std::fs::read(snap.join("snapshot.nfv")).unwrap();
    let bad = dir.join("bad.nfv");
    for (what, bytes) in [
        ("flipped byte in memory", {
            let mut b = good.clone();
            b[good.len() / 2] ^= 0x40;
            b
        }),
        ("cut short", good[..good.len() - 100].to_vec()),
        ("cut at the header", good[..10].to_vec()),
        (
            "not a snapshot",
            b"hello world, this is not a snapshot at all".to_vec(),
        ),
    ] {
        std::fs::write(&bad, &bytes).unwrap();
        let r = nfvisor(&["restore", "--from", bad.to_str().unwrap()], T);
        assert_eq!(r.code, 78, "{what}: {}", r.stderr);
        assert!(r.stderr.contains("bad.nfv"), "{what}: {}", r.stderr);
        assert!(!r.stdout.contains("DIRTIER"), "{what}: the guest ran");
    }
    let r = nfvisor(&["restore", "--from", "/nonexistent/snap"], T);
    assert_eq!(r.code, 78);
}

#[test]
fn a_guest_using_cpu_features_this_host_lacks_is_refused() {
    let (vm, sock, dir) = start_with_socket("cpuid");
    let snap = dir.join("snap");
    let r = snapshot(sock.to_str().unwrap(), snap.to_str().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    drop(vm);
    // rewrite the configuration: the guest claims CPUID.1:EDX bit 30 (IA-64), which no host offers
    let bytes = std::fs::read(snap.join("snapshot.nfv")).unwrap();
    let mut reader = migration::Reader::new(&bytes[..]).unwrap();
    let mut writer = migration::Writer::new(Vec::new()).unwrap();
    while let Some(f) = reader.next_frame().unwrap() {
        let mut payload = f.payload.clone();
        if f.kind == migration::Kind::Config {
            let mut cfg: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            assert!(
                !cfg["cpu_features"].as_array().unwrap().is_empty(),
                "the snapshot records the guest's features"
            );
            cfg["cpu_features"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"leaf": 1, "index": 0, "reg": "d", "bits": 1u32 << 30}));
            payload = serde_json::to_vec(&cfg).unwrap();
        }
        writer.frame(f.kind, &payload).unwrap();
    }
    let (out, _) = writer.finish().unwrap();
    let forged = dir.join("forged.nfv");
    std::fs::write(&forged, out).unwrap();
    let r = nfvisor(&["restore", "--from", forged.to_str().unwrap()], T);
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(
        r.stderr.contains("CPU features this host lacks") && r.stderr.contains("0x1.0 edx"),
        "{}",
        r.stderr
    );
}

/// Frames whose checksums hold but whose contents do not (a Sync frame
/// without its sequence number, a vCPU state that is not one): refused,
/// named, and nothing runs.
#[test]
fn well_checksummed_nonsense_is_refused_and_never_runs() {
    let (vm, sock, dir) = start_with_socket("nonsense");
    let snap = dir.join("snap");
    let r = snapshot(sock.to_str().unwrap(), snap.to_str().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    drop(vm);
    let bytes = std::fs::read(snap.join("snapshot.nfv")).unwrap();
    // the stream again, each frame replaced by what `edit` makes of it
    type Frames = Vec<(migration::Kind, Vec<u8>)>;
    type Edit<'a> = &'a dyn Fn(&migration::Frame) -> Frames;
    let forge = |name: &str, edit: Edit| {
        let mut reader = migration::Reader::new(&bytes[..]).unwrap();
        let mut writer = migration::Writer::new(Vec::new()).unwrap();
        while let Some(f) = reader.next_frame().unwrap() {
            for (kind, payload) in edit(&f) {
                writer.frame(kind, &payload).unwrap();
            }
        }
        let path = dir.join(name);
        std::fs::write(&path, writer.finish().unwrap().0).unwrap();
        nfvisor(&["restore", "--from", path.to_str().unwrap()], T)
    };
    let cases: [(&str, Edit, &str); 2] = [
        (
            "sync.nfv",
            &|f| {
                let mut out = vec![(f.kind, f.payload.clone())];
                if f.kind == migration::Kind::Config {
                    out.push((migration::Kind::Sync, vec![1, 2, 3]));
                }
                out
            },
            "malformed Sync frame",
        ),
        (
            "garbage.nfv",
            &|f| match f.kind {
                migration::Kind::VcpuState => vec![(f.kind, vec![0xff; 40])],
                _ => vec![(f.kind, f.payload.clone())],
            },
            "vCPU state",
        ),
    ];
    for (name, edit, needle) in cases {
        let r = forge(name, edit);
        assert_eq!(r.code, 78, "{name}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{name}: {}", r.stderr);
        assert!(!r.stdout.contains("DIRTIER"), "{name}: the guest ran");
    }

    // a device that cannot take its state refuses it by name, and nothing
    // runs: a version it does not know, a field out of range, a device the
    // stream lacks, one this VM lacks
    type DeviceEdit<'a> = &'a dyn Fn(&mut devices::DeviceStates);
    let device_cases: [(&str, DeviceEdit, &str); 4] = [
        (
            "com1-v2.nfv",
            &|d| d.get_mut("com1").unwrap().version = 2,
            "device com1: uart-16550 state version 2 is not known (this nfvisor reads version 1)",
        ),
        (
            "com1-fifo.nfv",
            &|d| {
                let state = devices::serial::SerialConsoleState {
                    in_buffer: vec![b'x'; 65],
                    ..Default::default()
                };
                d.get_mut("com1").unwrap().data = devices::state::encode(&state);
            },
            "device com1: in_buffer = 65 bytes is out of range",
        ),
        (
            "no-exit-port.nfv",
            &|d| {
                d.remove("debug-exit");
            },
            "device debug-exit: the stream has no state for it",
        ),
        (
            "extra.nfv",
            &|d| {
                let com1 = d["com1"].clone();
                d.insert("com2".into(), com1);
            },
            "device com2: the stream holds its state but this VM has no such device",
        ),
    ];
    for (name, edit, needle) in device_cases {
        let r = forge(name, &|f| {
            if f.kind != migration::Kind::DeviceState {
                return vec![(f.kind, f.payload.clone())];
            }
            let mut m = vmm::snapshot::MachineState::decode(&f.payload, name).unwrap();
            edit(&mut m.devices);
            vec![(f.kind, vmm::snapshot::encode_state(&m))]
        });
        assert_eq!(r.code, 78, "{name}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{name}: {}", r.stderr);
        assert!(!r.stdout.contains("DIRTIER"), "{name}: the guest ran");
    }
}

/// `status` shows each vCPU's exits as they happen: exit-bench's bench-port
/// writes keep them climbing, and the final report counts at least as many.
#[test]
fn status_shows_live_exit_counters() {
    let dir = scratch("live-exits");
    let sock = dir.join("vm.sock");
    let s = sock.to_str().unwrap();
    let mut vm = Running::start(&[
        "run",
        "--control-socket",
        s,
        "--guest",
        "exit-bench",
        "--cmdline",
        "n=100000 ops=pio",
        "--json",
    ]);
    vm.wait_for("vCPU 0 runs on host thread");
    wait_for_path(&sock);
    let pio = |st: &serde_json::Value| st["exits"][0]["by_reason"]["pio_out"].as_u64().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(100));
    let first = json(&nfvisor(&["status", "--control-socket", s, "--json"], T));
    std::thread::sleep(Duration::from_millis(200));
    let second = json(&nfvisor(&["status", "--control-socket", s, "--json"], T));
    assert_eq!(second["exits"][0]["vcpu"], 0);
    assert!(pio(&second) > pio(&first), "{first} then {second}");
    assert!(
        second["exits"][0]["total"].as_u64() >= Some(pio(&second)),
        "{second}"
    );
    let out = vm.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let report = json(&out);
    let final_pio = report["vm"]["vcpus"][0]["exits"]["by_reason"]["pio_out"]["count"]
        .as_u64()
        .unwrap();
    assert!(
        final_pio >= pio(&second) && final_pio > 100_000,
        "{final_pio}"
    );
}

/// A snapshot that runs out of space leaves nothing behind and the VM runs
/// on: the VM runs in a mount namespace of its own where its snapshot
/// directory is a 16 KiB tmpfs (the test looks into it through
/// /proc/PID/root).
#[test]
fn a_snapshot_that_runs_out_of_space_leaves_nothing_and_the_vm_runs_on() {
    let dir = scratch("snap-enospc");
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let sock = dir.join("vm.sock");
    let script = format!(
        "mount -t tmpfs -o size=16k nfvisor-test {} && exec {} run --control-socket {} --guest dirtier --memory 32M --cmdline 'mb=4 passes=400'",
        small.display(),
        NFVISOR,
        sock.display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
    let mut vm = Running::start_command(cmd);
    vm.wait_for("vCPU 0 runs on host thread");
    wait_for_path(&sock);
    let s = sock.to_str().unwrap();
    // the guest's image, page tables and first pass are more than 16 KiB
    std::thread::sleep(Duration::from_millis(300));
    let snap = small.join("snap");
    let r = snapshot(s, snap.to_str().unwrap());
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("No space left"), "{}", r.stderr);
    // what the VM sees of its snapshot directory: nothing left in it
    let seen = std::path::PathBuf::from(format!("/proc/{}/root", vm.pid()))
        .join(snap.strip_prefix("/").unwrap());
    let left: Vec<_> = std::fs::read_dir(&seen)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    // and it runs on
    let st = json(&nfvisor(&["status", "--control-socket", s, "--json"], T));
    assert_eq!(st["state"], "running", "{st}");
    let out = vm.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("DIRTIER OK"), "{}", out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
}
