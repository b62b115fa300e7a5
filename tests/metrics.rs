//! Prometheus metrics: `run --metrics-listen` serves them over HTTP, and
//! Prometheus' own checker (`promtool check metrics`) accepts them.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

fn promtool_accepts(text: &str) {
    let promtool = require_program("promtool", "prometheus");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every counter sample (`..._total`), by its name and labels.
fn counters(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(k, _)| k.split('{').next().unwrap_or("").ends_with("_total"))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

#[test]
fn prometheus_scrapes_the_metrics_and_no_counter_goes_down() {
    // a disk too: its counters and levels are named as promtool wants
    let dir = scratch("metrics");
    let img = dir.join("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let disk = format!("path={}", img.display());
    let mut vm = Running::start(&[
        "run",
        "--disk",
        &disk,
        "--dma-probe",
        "--guest",
        "dirtier",
        "--memory",
        "32M",
        "--cmdline",
        "mb=1 dma_mb=1 passes=400",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let line = vm.wait_for("serving metrics on http://");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_string();
    // The server answers before the guest's first instruction: scrape until
    // the guest has written a port (its first line), so the exits below exist.
    let deadline = std::time::Instant::now() + T;
    let first = loop {
        let (code, text) = get(&addr, "/metrics");
        assert_eq!(code, 200, "{text}");
        if text.contains("reason=\"pio_out\"") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    promtool_accepts(&first);
    assert!(
        first.contains("nfvisor_vcpu_exits_total{vcpu=\"0\",reason=\"pio_out\"}"),
        "{first}"
    );
    assert!(
        first.contains("nfvisor_device_writes_total{device=\"dma-probe\"}"),
        "{first}"
    );
    assert!(
        first.contains("nfvisor_vcpu_guest_seconds_total{vcpu=\"0\"}")
            && first.contains("nfvisor_vcpu_system_seconds_total{vcpu=\"0\"}"),
        "{first}"
    );
    assert!(
        first.contains("# TYPE nfvisor_device_engine_io_uring gauge"),
        "{first}"
    );
    assert!(
        first.contains("nfvisor_device_reads_total{device=\"blk0\"} 0"),
        "{first}"
    );
    assert!(
        first.contains("nfvisor_vm_state{state=\"running\"} 1"),
        "{first}"
    );
    assert!(
        first.contains("nfvisor_vcpu_exit_handling_seconds_total{vcpu=\"0\",reason=\"pio_out\"}"),
        "{first}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (_, second) = get(&addr, "/metrics");
    promtool_accepts(&second);
    let (a, b) = (counters(&first), counters(&second));
    assert!(!a.is_empty());
    for (k, v) in &a {
        let w = b
            .get(k)
            .unwrap_or_else(|| panic!("{k} is gone from the second scrape"));
        assert!(w >= v, "{k} went down: {v} then {w}");
    }
    assert!(
        a.iter().any(|(k, v)| b[k] > *v),
        "nothing counted between two scrapes 300 ms apart"
    );
    let (code, _) = get(&addr, "/nothing");
    assert_eq!(code, 404);
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}
