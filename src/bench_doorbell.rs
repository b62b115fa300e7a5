//! `nfvisor bench doorbell`: the ivshmem doorbell round trip between two
//! nfvisor VMs on one `nfvisor ivshmem-server` (A rings B, B rings back
//! from its interrupt handler), timed by A with RDTSC.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub fn run(count: u64, json: bool) -> Result<u8> {
    let exe = std::env::current_exe().context("locating the nfvisor binary")?;
    let dir = std::env::temp_dir().join(format!("nfvisor-bench-doorbell-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("ivs.sock");
    let shm = format!("nfvisor-bench-doorbell-{}", std::process::id());
    let quiet = |args: &[&str]| {
        Command::new(&exe)
            .args(args)
            .env("NFVISOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let mut server = quiet(&[
        "ivshmem-server",
        "--socket",
        sock.to_str().unwrap(),
        "--shm",
        &shm,
        "--size",
        "1M",
    ])?;
    let result = (|| {
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the ivshmem server did not start");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let spec = format!("server={}", sock.display());
        let n = count.to_string();
        // B joins first (peer 0) and echoes to A (peer 1)
        let mut echo = quiet(&[
            "run",
            "--guest",
            "ivshmem-probe",
            "--ivshmem",
            &spec,
            "--cmdline",
            &format!("mode=echo peer=1 count={n}"),
        ])?;
        std::thread::sleep(Duration::from_millis(300));
        let ping = Command::new(&exe)
            .args([
                "run",
                "--guest",
                "ivshmem-probe",
                "--ivshmem",
                &spec,
                "--cmdline",
                &format!("mode=ping peer=0 count={n}"),
                "--json",
            ])
            .env("NFVISOR_LOG", "warn")
            .output()?;
        let _ = echo.wait();
        let doc: serde_json::Value =
            serde_json::from_slice(&ping.stdout).context("the ping VM's report")?;
        let h = doc["guest"]["histograms"]
            .as_array()
            .and_then(|a| a.iter().find(|h| h["series"] == "rtt"))
            .cloned()
            .with_context(|| {
                format!(
                    "no round-trip histogram: {}",
                    String::from_utf8_lossy(&ping.stderr)
                )
            })?;
        let vmm_writes = doc["vm"]["ivshmem_doorbell_writes"]
            .as_u64()
            .context("the ping VM's report has no ivshmem_doorbell_writes")?;
        Ok((h, vmm_writes))
    })();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_file(format!("/dev/shm/{shm}"));
    let _ = std::fs::remove_dir_all(&dir);
    let (h, vmm_writes) = result?;
    let us = |k: &str| h[k].as_f64().unwrap_or(0.0) / 1000.0;
    let out = serde_json::json!({
        "round_trips": h["count"],
        "min_us": us("min"), "avg_us": us("avg"), "p50_us": us("p50"), "p99_us": us("p99"), "max_us": us("max"),
        "overflow": h["overflow"],
        "doorbell_writes_seen_by_the_vmm": vmm_writes,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "doorbell round trip, {} times: min {:.1} avg {:.1} p50 {:.1} p99 {:.1} max {:.1} us; doorbell writes that reached the VMM: {}",
            h["count"], us("min"), us("avg"), us("p50"), us("p99"), us("max"), vmm_writes
        );
    }
    Ok(0)
}
