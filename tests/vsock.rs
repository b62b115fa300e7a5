//! virtio-vsock (hybrid: the host side on UNIX sockets, as Firecracker and
//! Cloud Hypervisor do it, the way Kata reaches its agent) and virtio-rng
//! on the real /dev/kvm, with the bundled vsock-probe driver in the guest:
//! streams both ways with every byte checked, many connections at once, a
//! guest that overruns its credit, a restore that resets the transport, and
//! the host's bad input.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::net::record;
use common::*;

const T: Duration = Duration::from_secs(120);

/// The byte at offset `i` of a connection's stream (vsock-probe's).
fn pattern_byte(i: u64) -> u8 {
    ((i * 31 + 7 + (i >> 8)) & 0xff) as u8
}

fn pattern(from: u64, n: usize) -> Vec<u8> {
    (0..n as u64).map(|i| pattern_byte(from + i)).collect()
}

/// A VM running vsock-probe with `args` and a vsock device on `sock`;
/// started, its console in a file.
struct Guest {
    vm: Running,
    console: PathBuf,
}

fn start_guest(dir: &Path, sock: &Path, args: &str, extra: &[&str]) -> Guest {
    let console = dir.join("console");
    let spec = format!("cid=3,socket={}", sock.display());
    let mut a = vec![
        "run",
        "--guest",
        "vsock-probe",
        "--vsock",
        &spec,
        "--cmdline",
        args,
        "--serial",
        console.to_str().unwrap(),
    ];
    a.extend_from_slice(extra);
    let mut vm = Running::start(&a);
    vm.wait_for("vCPU 0 runs on host thread");
    Guest { vm, console }
}

impl Guest {
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn wait_console(&self, needle: &str) {
        let t = Instant::now();
        while !self.console().contains(needle) {
            assert!(
                t.elapsed() < T,
                "{needle:?} never came:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the guest's end: (exit code, console).
    fn finish(self) -> (i32, String) {
        let r = self.vm.finish(T);
        let console = std::fs::read_to_string(&self.console).unwrap_or_default();
        (r.code, console)
    }
}

/// Connects to the guest's `port` through the device's socket (the
/// hybrid handshake, as Kata's runtime does it); retries while the guest
/// is not listening yet.
fn connect(sock: &Path, port: u32) -> UnixStream {
    let t = Instant::now();
    loop {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let mut line = String::new();
        let mut r = BufReader::new(s.try_clone().unwrap());
        if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
            assert!(
                line.trim_end()["OK ".len()..].parse::<u32>().is_ok(),
                "{line:?}"
            );
            return s;
        }
        assert!(t.elapsed() < T, "port {port} never accepted: {line:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Host to guest: a 10 MiB stream the guest checks byte for byte; and a
/// port nobody listens on is refused cleanly (the connection closes).
#[test]
fn a_10_mib_stream_reaches_the_guest_intact() {
    let dir = scratch("vsock-h2g");
    let sock = dir.join("v.sock");
    let bytes = 10 << 20;
    let g = start_guest(
        &dir,
        &sock,
        &format!("mode=recv port=5000 bytes={bytes} conns=1"),
        &[],
    );
    g.wait_console("R vsock ");
    // nobody on 5001: refused, the host's connection ends
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"CONNECT 5001\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).starts_with("OK"), "{got:?}");
    let mut s = connect(&sock, 5000);
    let mut sent = 0u64;
    while sent < bytes {
        let chunk = pattern(sent, 64 << 10);
        s.write_all(&chunk).unwrap();
        sent += chunk.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("GOOD"), "the guest said {answer:?}");
    let (code, console) = g.finish();
    assert_eq!(code, 0, "{console}");
    let r = record(&console, "recv");
    assert_eq!(r["bad"], "0", "{r:?}");
    assert_eq!(r["bytes"], bytes.to_string(), "{r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Guest to host: the guest connects to host port 6000 (SOCKET_6000) and
/// sends 10 MiB, every byte checked here; a port with no listener is
/// refused to the guest.
#[test]
fn a_10_mib_stream_from_the_guest_reaches_the_host_intact() {
    let dir = scratch("vsock-g2h");
    let sock = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_6000", sock.display())).unwrap();
    let bytes: u64 = 10 << 20;
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut at = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            assert_eq!(&buf[..n], &pattern(at, n)[..], "at byte {at}");
            at += n as u64;
        }
        at
    });
    let g = start_guest(
        &dir,
        &sock,
        &format!("mode=send port=6000 bytes={bytes} conns=1"),
        &[],
    );
    assert_eq!(reader.join().unwrap(), bytes);
    let (code, console) = g.finish();
    assert_eq!(code, 0, "{console}");
    let r = record(&console, "send");
    assert_eq!(r["refused"], "0", "{r:?}");
    // nobody on 6001: every attempt refused
    let g = start_guest(
        &dir,
        &sock,
        "mode=send port=6001 bytes=4096 conns=2 expect_refused=1",
        &[],
    );
    let (code, console) = g.finish();
    assert_eq!(code, 0, "{console}");
    assert_eq!(record(&console, "send")["refused"], "2");
    let _ = std::fs::remove_dir_all(&dir);
}

/// 32 connections at once, each echoed back whole.
#[test]
fn thirty_two_connections_at_once_are_echoed() {
    let dir = scratch("vsock-many");
    let sock = dir.join("v.sock");
    let g = start_guest(&dir, &sock, "mode=echo port=7000 conns=32", &[]);
    g.wait_console("R vsock ");
    let threads: Vec<_> = (0..32u64)
        .map(|k| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut s = connect(&sock, 7000);
                let data = pattern(k * 1000, 64 << 10);
                let mut w = s.try_clone().unwrap();
                let d = data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&d).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                s.read_to_end(&mut back).unwrap();
                writer.join().unwrap();
                assert_eq!(back.len(), data.len(), "connection {k}");
                assert!(back == data, "connection {k}: the echo differs");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (code, console) = g.finish();
    assert_eq!(code, 0, "{console}");
    assert_eq!(record(&console, "echo")["conns"], "32");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest that sends past the credit it was given is reset; its next
/// connection, within its credit, carries on.
#[test]
fn a_guest_that_overruns_its_credit_is_reset_and_the_next_connection_works() {
    let dir = scratch("vsock-overrun");
    let sock = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_8000", sock.display())).unwrap();
    let host = std::thread::spawn(move || {
        // the first connection is never read: its buffer here fills
        let (first, _) = listener.accept().unwrap();
        let (mut second, _) = listener.accept().unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut got = Vec::new();
        second.read_to_end(&mut got).unwrap();
        drop(first);
        got.len()
    });
    let g = start_guest(&dir, &sock, "mode=overrun port=8000", &["--json"]);
    assert_eq!(host.join().unwrap(), 4096);
    let (code, console) = g.finish();
    assert_eq!(code, 0, "{console}");
    let r = record(&console, "overrun");
    assert_eq!(
        (r["reset"].as_str(), r["after_ok"].as_str()),
        ("1", "1"),
        "{r:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A snapshot restored: the guest is told its transport was reset (its
/// connections are gone), listens again, and a new connection works.
#[test]
fn a_restored_guest_sees_the_transport_reset_and_listens_again() {
    let dir = scratch("vsock-restore");
    let sock = dir.join("v.sock");
    let ctl = dir.join("ctl.sock");
    let g = start_guest(
        &dir,
        &sock,
        "mode=reset port=9000 resets=1 after=1",
        &["--control-socket", ctl.to_str().unwrap()],
    );
    g.wait_console("R vsock ");
    wait_for_path(&ctl);
    // a connection that works before
    let mut s = connect(&sock, 9000);
    s.write_all(b"before").unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"before");
    let p = nfvisor(&["pause", "--control-socket", ctl.to_str().unwrap()], T);
    assert_eq!(p.code, 0, "{}", p.stderr);
    let snap = dir.join("snap");
    let r = snapshot(ctl.to_str().unwrap(), snap.to_str().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    drop(g);
    drop(s);
    let console = dir.join("restored.console");
    let mut restored = Running::start(&[
        "restore",
        "--from",
        snap.to_str().unwrap(),
        "--serial",
        console.to_str().unwrap(),
    ]);
    restored.wait_for("vCPU 0 runs on host thread");
    let mut s = connect(&sock, 9000);
    s.write_all(b"after!").unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"after!");
    drop(s);
    let r = restored.finish(T);
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(r.code, 0, "{}\n{out}", r.stderr);
    assert_eq!(record(&out, "reset")["n"], "1");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The entropy device gives the guest bytes; a rate limit holds it back.
#[test]
fn the_guest_reads_entropy_and_a_rate_limit_holds() {
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "vsock-probe",
            "--rng",
            "--cmdline",
            "mode=rng bytes=8192",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let rng = record(&r.stdout, "rng");
    assert!(rng["bytes"].parse::<u64>().unwrap() >= 8192, "{rng:?}");
    let t = Instant::now();
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "vsock-probe",
            "--rng",
            "rate=4096",
            "--cmdline",
            "mode=rng bytes=8192",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    // 8 KiB at 4 KiB a second, less the first tenth of a second's burst
    assert!(
        t.elapsed() > Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
}

/// Bad input: a socket in a directory that does not exist, a reserved
/// CID, a second VM on the same socket, a missing entropy file.
#[test]
fn bad_vsock_and_rng_input_exits_78_naming_what_is_wrong() {
    let dir = scratch("vsock-bad");
    let sock = dir.join("v.sock");
    for (flag, spec, why) in [
        (
            "--vsock",
            format!("cid=3,socket={}/missing/v.sock", dir.display()),
            "does not exist",
        ),
        (
            "--vsock",
            format!("cid=2,socket={}", sock.display()),
            "cid 2",
        ),
        (
            "--rng",
            "src=/nonexistent/entropy".to_string(),
            "/nonexistent/entropy",
        ),
    ] {
        let r = nfvisor(&["run", "--guest", "hello", flag, &spec], T);
        assert_eq!(r.code, 78, "{spec}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{spec}: {}", r.stderr);
    }
    let g = start_guest(&dir, &sock, "mode=echo port=1 conns=0", &[]);
    let r = nfvisor(
        &[
            "run",
            "--guest",
            "hello",
            "--vsock",
            &format!("cid=4,socket={}", sock.display()),
        ],
        T,
    );
    assert_eq!(r.code, 78, "{}", r.stderr);
    assert!(r.stderr.contains("in use"), "{}", r.stderr);
    drop(g);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A migrated guest is told its transport was reset too; on the
/// destination (its own socket: `receive --vsock`) a new connection works.
#[test]
fn a_migrated_guest_sees_the_transport_reset_on_the_destination() {
    let dir = scratch("vsock-migrate");
    let sock = dir.join("v.sock");
    let sock2 = dir.join("v2.sock");
    let ctl = dir.join("ctl.sock");
    let ep = format!("unix:{}", dir.join("mig.sock").display());
    let console = dir.join("dst.console");
    let mut dst = Running::start(&[
        "receive",
        "--listen",
        &ep,
        "--vsock",
        &format!("cid=3,socket={}", sock2.display()),
        "--serial",
        console.to_str().unwrap(),
    ]);
    dst.wait_for("waiting for a migration");
    let g = start_guest(
        &dir,
        &sock,
        "mode=reset port=9100 resets=1 after=1",
        &["--control-socket", ctl.to_str().unwrap()],
    );
    g.wait_console("R vsock ");
    wait_for_path(&ctl);
    let mut s = connect(&sock, 9100);
    s.write_all(b"before").unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"before");
    let r = migrate(ctl.to_str().unwrap(), &ep, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let (code, _) = g.finish();
    assert_eq!(code, 0, "the source ends after the hand-over");
    let mut s = connect(&sock2, 9100);
    s.write_all(b"after!").unwrap();
    let mut back = [0u8; 6];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"after!");
    drop(s);
    let d = dst.finish(T);
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(d.code, 0, "{}\n{out}", d.stderr);
    assert_eq!(record(&out, "reset")["n"], "1");
    let _ = std::fs::remove_dir_all(&dir);
}
