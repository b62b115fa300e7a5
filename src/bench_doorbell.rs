//! `nfvisor bench doorbell`: the ivshmem doorbell round trip between two VMs
//! on one `nfvisor ivshmem-server` (A rings B, B rings back from its
//! interrupt handler), timed by A with RDTSC. Pairs: two nfvisor VMs, two
//! QEMU VMs (`-M q35 -device ivshmem-doorbell`, the baseline), and a mixed
//! pair (nfvisor pings, QEMU echoes), which is also the interoperability
//! check: both doorbell directions cross between the two VMMs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pair {
    /// nfvisor pings, nfvisor echoes
    Nfvisor,
    /// QEMU pings, QEMU echoes (the baseline)
    Qemu,
    /// nfvisor pings, QEMU echoes
    Mixed,
}

impl Pair {
    fn name(self) -> &'static str {
        match self {
            Pair::Nfvisor => "nfvisor",
            Pair::Qemu => "qemu",
            Pair::Mixed => "mixed",
        }
    }
    /// (echo side, ping side) run under QEMU?
    fn qemu_sides(self) -> (bool, bool) {
        match self {
            Pair::Nfvisor => (false, false),
            Pair::Qemu => (true, true),
            Pair::Mixed => (true, false),
        }
    }
}

/// A VM running ivshmem-probe with `cmdline`, its console on stdout.
fn start_vm(qemu: bool, sock: &Path, image: &Path, cmdline: &str, json: bool) -> Result<Child> {
    let mut cmd = if qemu {
        let mut c = Command::new("qemu-system-x86_64");
        crate::bench_vmm::qemu_q35(&mut c, "stdio")
            .arg("-chardev")
            .arg(format!("socket,path={},id=ivs", sock.display()))
            .args(["-device", "ivshmem-doorbell,chardev=ivs,vectors=1"])
            .arg("-kernel")
            .arg(image)
            .args(["-append", cmdline]);
        c
    } else {
        let mut c = Command::new(std::env::current_exe().context("locating the nfvisor binary")?);
        c.args(["run", "--guest", "ivshmem-probe", "--ivshmem"])
            .arg(format!("server={}", sock.display()))
            .args(["--cmdline", cmdline])
            .env("NFVISOR_LOG", "warn");
        if json {
            c.arg("--json");
        }
        c
    };
    let what = if qemu {
        "qemu-system-x86_64 (install qemu-system-x86)"
    } else {
        "nfvisor run"
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))
}

struct PairResult {
    /// The round-trip histogram (ns) as `SeriesStats` serializes it.
    rtt: serde_json::Value,
    /// nfvisor pinging: doorbells that reached its userspace.
    vmm_writes: Option<u64>,
}

fn measure(pair: Pair, count: u64, image: &Path, dir: &Path) -> Result<PairResult> {
    let sock = dir.join(format!("{}.sock", pair.name()));
    let shm = format!(
        "nfvisor-bench-doorbell-{}-{}",
        pair.name(),
        std::process::id()
    );
    let mut server = Command::new(std::env::current_exe()?)
        .args(["ivshmem-server", "--socket"])
        .arg(&sock)
        .args(["--shm", &shm, "--size", "1M"])
        .env("NFVISOR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nfvisor ivshmem-server")?;
    let (echo_qemu, ping_qemu) = pair.qemu_sides();
    let result = (|| {
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the ivshmem server did not start");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // the echo side joins first (peer 0) and rings back peer 1
        let mut echo = start_vm(
            echo_qemu,
            &sock,
            image,
            &format!("mode=echo peer=1 count={count}"),
            false,
        )?;
        std::thread::sleep(Duration::from_millis(if echo_qemu { 1500 } else { 300 }));
        let ping = start_vm(
            ping_qemu,
            &sock,
            image,
            &format!("mode=ping peer=0 count={count}"),
            !ping_qemu,
        )?
        .wait_with_output()?;
        let echo_out = {
            // QEMU stays up after a failed ping; never wait on it for ever
            let t = Instant::now();
            while echo.try_wait()?.is_none() && t.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = echo.kill();
            echo.wait_with_output()?
        };
        let stdout = String::from_utf8_lossy(&ping.stdout);
        let failure = || {
            format!(
                "the {} pair gave no round-trip histogram.\nping stdout:\n{stdout}\nping stderr:\n{}\necho stdout:\n{}\necho stderr:\n{}",
                pair.name(),
                String::from_utf8_lossy(&ping.stderr),
                String::from_utf8_lossy(&echo_out.stdout),
                String::from_utf8_lossy(&echo_out.stderr)
            )
        };
        if ping_qemu {
            let parsed = guests::protocol::parse(&stdout).with_context(failure)?;
            let rtt = parsed
                .histograms()
                .into_iter()
                .find(|h| h.series == "rtt")
                .with_context(failure)?;
            Ok(PairResult {
                rtt: serde_json::to_value(rtt)?,
                vmm_writes: None,
            })
        } else {
            let doc: serde_json::Value = serde_json::from_str(&stdout).with_context(failure)?;
            let rtt = doc["guest"]["histograms"]
                .as_array()
                .and_then(|a| a.iter().find(|h| h["series"] == "rtt"))
                .cloned()
                .with_context(failure)?;
            let vmm_writes = doc["vm"]["devices"]["ivshmem0"]["doorbell_writes"]
                .as_u64()
                .context("the ping VM's report has no ivshmem0 doorbell_writes")?;
            Ok(PairResult {
                rtt,
                vmm_writes: Some(vmm_writes),
            })
        }
    })();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_file(format!("/dev/shm/{shm}"));
    result
}

pub fn run(count: u64, pairs: &[Pair], json: bool) -> Result<u8> {
    let dir = std::env::temp_dir().join(format!("nfvisor-bench-doorbell-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let image = dir.join("ivshmem-probe.elf");
    let probe = guests::find("ivshmem-probe").context("the bundled ivshmem-probe")?;
    std::fs::write(&image, probe.image).with_context(|| format!("writing {}", image.display()))?;
    let mut results = Vec::new();
    for &pair in pairs {
        let r = measure(pair, count, &image, &dir);
        results.push((pair, r));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut out = Vec::new();
    for (pair, r) in results {
        let r = r.with_context(|| format!("bench doorbell, pair {}", pair.name()))?;
        let h = &r.rtt;
        let us = |k: &str| h[k].as_f64().unwrap_or(0.0) / 1000.0;
        out.push(serde_json::json!({
            "pair": pair.name(),
            "round_trips": h["count"],
            "min_us": us("min"), "avg_us": us("avg"), "p50_us": us("p50"),
            "p99_us": us("p99"), "max_us": us("max"),
            "overflow": h["overflow"],
            "doorbell_writes_seen_by_the_vmm": r.vmm_writes,
        }));
    }
    let p50 = |name: &str| {
        out.iter()
            .find(|r| r["pair"] == name)
            .and_then(|r| r["p50_us"].as_f64())
    };
    let ratio = match (p50("nfvisor"), p50("qemu")) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    if json {
        let doc = serde_json::json!({
            "count": count,
            "pairs": out,
            "qemu_p50_over_nfvisor_p50": ratio,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for r in &out {
            println!(
                "doorbell round trip, {:<8} {} times: min {:.1} avg {:.1} p50 {:.1} p99 {:.1} max {:.1} us; doorbell writes that reached the VMM: {}",
                r["pair"].as_str().unwrap_or(""),
                r["round_trips"],
                r["min_us"].as_f64().unwrap_or(0.0),
                r["avg_us"].as_f64().unwrap_or(0.0),
                r["p50_us"].as_f64().unwrap_or(0.0),
                r["p99_us"].as_f64().unwrap_or(0.0),
                r["max_us"].as_f64().unwrap_or(0.0),
                r["doorbell_writes_seen_by_the_vmm"]
                    .as_u64()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "n/a (QEMU)".into()),
            );
        }
        if let Some(x) = ratio {
            println!("QEMU p50 / nfvisor p50: {x:.2}");
        }
    }
    Ok(0)
}
