//! virtio-blk on the real /dev/kvm: the bundled blk-probe driver against
//! nfvisor's device (the same driver passes against QEMU's virtio-blk-pci
//! in tests/blk_qemu.rs), the image's bytes checked on the host, the
//! flush order traced, migration and snapshot mid-I/O, the guest's bad
//! requests and the host's bad images.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::net::record;
use common::*;

const T: Duration = Duration::from_secs(60);

/// A sparse image of `sectors` zero sectors.
fn image(dir: &Path, name: &str, sectors: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(sectors * 512).unwrap();
    p
}

fn probe(disk: &str, cmdline: &str) -> Run {
    nfvisor(
        &[
            "run",
            "--guest",
            "blk-probe",
            "--disk",
            disk,
            "--cmdline",
            cmdline,
            "--json",
        ],
        T,
    )
}

/// The console (the guest's records) of a `--json` run: stderr carries it.
fn console(r: &Run) -> String {
    r.stderr.clone()
}

fn sector(img: &[u8], s: u64) -> &[u8] {
    &img[(s * 512) as usize..((s + 1) * 512) as usize]
}

/// blk-probe writes, flushes, reads back, discards and write-zeroes on
/// every I/O path (io_uring, the thread pool, O_DIRECT, two queues); the
/// image on the host holds exactly what the guest wrote, the zeroed chunk
/// reads zero, and the file stays sparse.
#[test]
fn blk_probe_verifies_on_every_io_path_and_the_image_holds_its_writes() {
    let dir = scratch("blk-verify");
    for (i, extra) in ["", ",aio=threads", ",direct", ",queues=2,aio=io_uring"]
        .iter()
        .enumerate()
    {
        let img = image(&dir, &format!("v{i}.img"), 8192);
        let spec = format!("path={},serial=nfv-disk-{i}{extra}", img.display());
        let r = probe(
            &spec,
            "mode=verify start=64 sectors=128 chunk=8 qd=4 seed=7",
        );
        let out = console(&r);
        assert_eq!(r.code, 0, "{extra}: {}\n{}", r.stdout, out);
        let v = record(&out, "verify");
        assert_eq!(v["bad"], "0", "{extra}: {v:?}");
        assert_eq!(
            (v["discard"].as_str(), v["wz"].as_str()),
            ("0", "0"),
            "{v:?}"
        );
        let id = record(&out, "blkid");
        assert_eq!(id["serial"], format!("nfv-disk-{i}"));
        let blk = record(&out, "blk");
        assert_eq!(blk["capacity"], "8192");
        assert_eq!(blk["flush"], "1");
        if extra.contains("queues=2") {
            assert_eq!(blk["mq"], "2", "{blk:?}");
        }
        // the host's view: the discarded chunk (64..72) and the zeroed
        // one (72..80) read zero, the rest is the guest's pattern
        let bytes = std::fs::read(&img).unwrap();
        for s in 64..80 {
            assert!(sector(&bytes, s).iter().all(|&b| b == 0), "sector {s}");
        }
        for s in 80..192 {
            assert_eq!(
                sector(&bytes, s),
                &guests::blk_pattern(7, s)[..],
                "{extra}: sector {s}"
            );
        }
        assert!(sector(&bytes, 192).iter().all(|&b| b == 0));
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&img).unwrap().blocks() * 512;
        assert!(
            allocated < 1 << 20,
            "{extra}: {allocated} bytes allocated for 64 KiB written: the image lost its sparseness"
        );
        // which engine served it is reported with the counters
        let report = json(&r);
        let counters = &report["vm"]["devices"]["blk0"];
        let uring = counters["engine_io_uring"].as_u64().unwrap();
        assert_eq!(uring == 0, extra.contains("threads"), "{counters}");
        assert!(counters["writes"].as_u64().unwrap() >= 16, "{counters}");
        assert!(counters["flushes"].as_u64().unwrap() >= 1, "{counters}");
        // the guest drives queue 0: its share is counted there
        assert!(
            counters["q0_requests"].as_u64().unwrap() >= 32,
            "{counters}"
        );
        assert!(
            counters["q0_bytes"].as_u64().unwrap() >= 2 * 128 * 512,
            "{counters}"
        );
        assert_eq!(counters["q0_errors"].as_u64(), Some(0), "{counters}");
        assert!(
            counters["q0_latency_p99_ns"].as_u64().unwrap() > 0,
            "{counters}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The trace of the device's order: every FLUSH completes after an
/// fdatasync issued once every write sent before the FLUSH completed.
#[test]
fn every_flush_completes_after_an_fdatasync_that_follows_the_earlier_writes() {
    let dir = scratch("blk-flush");
    let img = image(&dir, "f.img", 4096);
    let out = Command::new(NFVISOR)
        .args(["run", "--guest", "blk-probe", "--disk"])
        .arg(format!("path={}", img.display()))
        .args([
            "--cmdline",
            "mode=write start=0 sectors=128 chunk=8 qd=8 passes=4 seed=3",
        ])
        .env("NFVISOR_LOG", "info,nfvisor::blk_order=trace")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let field = |l: &str, k: &str| -> u64 {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {l}"))
    };
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.contains("write-done")
                || l.contains("flush-received")
                || l.contains("fdatasync-issued")
                || l.contains("flush-completed")
        })
        .collect();
    let mut flushes = 0;
    for (i, l) in lines.iter().enumerate() {
        if !l.contains("flush-received") {
            continue;
        }
        let head = field(l, "head=");
        let before = field(l, "waits_for_writes_before=");
        let issued = (i..lines.len())
            .find(|&j| lines[j].contains("fdatasync-issued") && field(lines[j], "head=") == head)
            .unwrap_or_else(|| {
                panic!(
                    "flush head={head} never got its fdatasync:\n{}",
                    lines.join("\n")
                )
            });
        let completed = (issued..lines.len())
            .find(|&j| lines[j].contains("flush-completed") && field(lines[j], "head=") == head)
            .unwrap_or_else(|| {
                panic!(
                    "flush head={head} completed before its fdatasync:\n{}",
                    lines.join("\n")
                )
            });
        assert!(lines[completed].contains("ok=true"), "{}", lines[completed]);
        // no write sent before the FLUSH completes after its fdatasync
        for late in &lines[issued..] {
            if late.contains("write-done") {
                assert!(
                    field(late, "seq=") >= before,
                    "write {late} completed after the fdatasync of flush head={head}"
                );
            }
        }
        flushes += 1;
    }
    assert_eq!(flushes, 4, "one FLUSH a pass:\n{stderr}");
    assert!(lines.iter().filter(|l| l.contains("write-done")).count() >= 64);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The guest's bad requests each get the status the specification gives
/// them, and the VM runs on (the good read after each one succeeds).
#[test]
fn bad_requests_are_answered_and_the_vm_runs_on() {
    let dir = scratch("blk-bad");
    let img = image(&dir, "b.img", 2048);
    let rw = format!("path={}", img.display());
    let ro = format!("path={},readonly", img.display());
    for (disk, case, want) in [
        (&rw, "unknown_type", "2"),
        (&rw, "past_end", "1"),
        (&rw, "odd_len", "1"),
        (&rw, "read_into_ro", "1"),
        (&rw, "discard_flags", "2"),
        (&rw, "discard_too_many", "1"),
        (&rw, "wz_too_big", "1"),
        (&rw, "no_status", "255"),
        (&ro, "write_ro", "1"),
    ] {
        let r = probe(disk, &format!("mode=bad case={case} timeout_s=10"));
        let out = console(&r);
        assert_eq!(r.code, 0, "{case}: {out}");
        let b = record(&out, "bad");
        assert_eq!(b["status"], want, "{case}: {b:?}");
        assert_eq!(b["after_ok"], "1", "{case}: {b:?}");
        let report = json(&r);
        let c = &report["vm"]["devices"]["blk0"];
        let counted = ["bad_requests", "unsupported", "bad_chains"]
            .iter()
            .map(|k| c[k].as_u64().unwrap())
            .sum::<u64>();
        assert!(counted >= 1, "{case}: not counted: {c}");
        if want != "255" {
            assert!(c["q0_errors"].as_u64().unwrap() >= 1, "{case}: {c}");
        }
    }
    // a read-only disk was never written
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad images and specs: exit 78 and a message naming the file.
#[test]
fn bad_images_exit_78_naming_the_file() {
    let dir = scratch("blk-host-bad");
    let odd = dir.join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let ro = image(&dir, "ro.img", 64);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let missing = dir.join("missing.img");
    let cases = [
        (format!("path={}", missing.display()), "no such file"),
        (format!("path={}", dir.display()), "is a directory"),
        (
            format!("path={}", odd.display()),
            "not a whole number of 512-byte sectors",
        ),
        (format!("path={}", ro.display()), "read-only on the host"),
        (
            format!("path={},serial=012345678901234567890", ro.display()),
            "at most 20",
        ),
    ];
    for (spec, why) in &cases {
        let r = probe(spec, "mode=verify sectors=8");
        assert_eq!(r.code, 78, "{spec}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{spec}: {}", r.stderr);
        let path = spec.trim_start_matches("path=").split(',').next().unwrap();
        if !why.contains("at most") {
            assert!(r.stderr.contains(path), "{spec}: {}", r.stderr);
        }
    }
    // an image another nfvisor writes is refused, by name
    let shared = image(&dir, "shared.img", 2048);
    let spec = format!("path={}", shared.display());
    let mut first = Running::start(&[
        "run",
        "--guest",
        "blk-probe",
        "--disk",
        &spec,
        "--cmdline",
        "mode=write sectors=64 passes=0",
    ]);
    first.wait_for("vCPU 0 runs on host thread");
    for second in [spec.clone(), format!("{spec},readonly")] {
        let r = probe(&second, "mode=verify sectors=8");
        assert_eq!(r.code, 78, "{}", r.stderr);
        assert!(r.stderr.contains("is in use"), "{}", r.stderr);
        assert!(r.stderr.contains("shared.img"), "{}", r.stderr);
    }
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until the console file holds `needle`.
fn wait_in_file(path: &Path, needle: &str) {
    let t = std::time::Instant::now();
    loop {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return;
        }
        assert!(
            t.elapsed() < T,
            "{needle:?} never appeared in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the writer leaves on an image run start to end on one host.
fn unmigrated_image(dir: &Path, args: &str) -> Vec<u8> {
    let img = image(dir, "plain.img", 2048);
    let r = probe(&format!("path={}", img.display()), args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::fs::read(&img).unwrap()
}

const WRITER: &str = "mode=write start=0 sectors=256 chunk=8 qd=4 passes=12 seed=11";

/// The writer on image `name` in `dir`, controllable, past its first pass
/// (in the middle of its writing); its image and control socket.
fn writer_in_mid_pass(dir: &Path, name: &str) -> (Running, PathBuf, PathBuf) {
    let img = image(dir, name, 2048);
    let sock = dir.join("src.sock");
    let con = dir.join("src.console");
    let disk = format!("path={}", img.display());
    let mut src = Running::start(&[
        "run",
        "--guest",
        "blk-probe",
        "--disk",
        &disk,
        "--cmdline",
        WRITER,
        "--control-socket",
        sock.to_str().unwrap(),
        "--serial",
        con.to_str().unwrap(),
    ]);
    src.wait_for("vCPU 0 runs on host thread");
    wait_for_path(&sock);
    wait_in_file(&con, "R pass n=1 ");
    (src, img, sock)
}

/// A guest writing its disk migrates mid-I/O: the destination opens the
/// same image (shared storage) and takes its lock at the hand-over; the
/// guest checks each pass's data before the next, and the image ends
/// exactly as an unmigrated run's.
#[test]
fn a_guest_writing_its_disk_migrates_and_nothing_is_lost() {
    let dir = scratch("blk-migrate");
    let plain = unmigrated_image(&dir, WRITER);
    let ep = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Running::start(&["receive", "--listen", &ep]);
    dst.wait_for("waiting for a migration");
    let (src, img, sock) = writer_in_mid_pass(&dir, "m.img");
    let r = migrate(sock.to_str().unwrap(), &ep, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let s = src.finish(T);
    assert_eq!(s.code, 0, "{}", s.stderr);
    let d = dst.finish(T);
    assert_eq!(d.code, 0, "{}\n{}", d.stdout, d.stderr);
    let w = record(&d.stdout, "write");
    assert_eq!(w["bad"], "0", "{w:?}");
    assert_eq!(w["errors"], "0", "{w:?}");
    assert!(
        std::fs::read(&img).unwrap() == plain,
        "the migrated guest's image differs from an unmigrated run's"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A paused writer snapshotted, its process gone, and restored: it
/// finishes, and the image ends as an unmigrated run's.
#[test]
fn a_guest_writing_its_disk_is_snapshotted_and_restored_and_nothing_is_lost() {
    let dir = scratch("blk-snapshot");
    let plain = unmigrated_image(&dir, WRITER);
    let snap = dir.join("snap");
    let (src, img, sock) = writer_in_mid_pass(&dir, "s.img");
    let p = nfvisor(&["pause", "--control-socket", sock.to_str().unwrap()], T);
    assert_eq!(p.code, 0, "{}", p.stderr);
    let r = snapshot(sock.to_str().unwrap(), snap.to_str().unwrap());
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    // the original is gone (its lock with it) before it wrote anything more
    drop(src);
    let restored = nfvisor(&["restore", "--from", snap.to_str().unwrap()], T);
    assert_eq!(restored.code, 0, "{}\n{}", restored.stdout, restored.stderr);
    let w = record(&restored.stdout, "write");
    assert_eq!(w["bad"], "0", "{w:?}");
    assert!(
        std::fs::read(&img).unwrap() == plain,
        "the restored guest's image differs from an unmigrated run's"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination that cannot open the image refuses the migration, naming
/// the image; the guest runs on at the source and finishes there.
#[test]
fn a_destination_that_cannot_open_the_image_refuses_and_the_guest_runs_on() {
    let dir = scratch("blk-migrate-refused");
    let ep = format!("unix:{}", dir.join("mig.sock").display());
    let missing = dir.join("not-here.img");
    let mut dst = Running::start(&[
        "receive",
        "--listen",
        &ep,
        "--disk",
        &format!("path={}", missing.display()),
    ]);
    dst.wait_for("waiting for a migration");
    let (src, img, sock) = writer_in_mid_pass(&dir, "r.img");
    let r = migrate(sock.to_str().unwrap(), &ep, &[]);
    assert_ne!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("not-here.img"),
        "the refusal names the image: {}",
        r.stderr
    );
    let d = dst.finish(T);
    assert_ne!(d.code, 0);
    let s = src.finish(T);
    assert_eq!(s.code, 0, "{}", s.stderr);
    let console = std::fs::read_to_string(dir.join("src.console")).unwrap();
    let w = record(&console, "write");
    assert_eq!(w["bad"], "0", "{w:?}");
    assert_eq!(w["passes"], "12", "{w:?}");
    assert!(std::fs::read(&img).unwrap().len() == 2048 * 512);
    let _ = std::fs::remove_dir_all(&dir);
}
