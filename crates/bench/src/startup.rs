//! `nfvisor bench startup`: how long from process start to the guest's first
//! instruction and to the `hello` guest's exit, and how much memory the VMM
//! itself keeps beside the guest's, over repeated runs of the real binary.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::{BenchError, Spread};

#[derive(Debug, Clone, serde::Serialize)]
pub struct StartupReport {
    pub runs: usize,
    /// main() to the BSP's first KVM_RUN (from the run report).
    pub to_first_instruction_us: Spread,
    /// Spawning the process to its exit, measured outside it.
    pub to_hello_exit_us: Spread,
    /// Resident memory of the process at the end, less the guest's resident pages.
    pub vmm_overhead_kib: Spread,
    pub guest_resident_kib: Spread,
    pub guest_memory_mib: u64,
}

/// Runs `exe run --guest hello --json` `runs` times.
pub fn run(exe: &Path, runs: usize) -> Result<StartupReport, BenchError> {
    let (mut first, mut total, mut overhead, mut guest) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut mem_mib = 0;
    for _ in 0..runs {
        let t0 = Instant::now();
        let out = Command::new(exe)
            .args(["run", "--guest", "hello", "--json", "--serial", "/dev/null"])
            .env("NFVISOR_LOG", "warn")
            .output()
            .map_err(|e| BenchError::Run {
                what: exe.display().to_string(),
                why: e.to_string(),
            })?;
        total.push(t0.elapsed().as_micros() as f64);
        let doc: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| BenchError::Run {
                what: "nfvisor run --json".into(),
                why: format!("{e}: {}", String::from_utf8_lossy(&out.stderr)),
            })?;
        let vm = &doc["vm"];
        let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        first.push(num(&vm["timings"]["process_to_first_run_us"]));
        let rss = num(&vm["process_rss_kib"]);
        let g = num(&vm["guest_resident_kib"]);
        overhead.push(rss - g);
        guest.push(g);
        mem_mib = vm["memory_mib"].as_u64().unwrap_or(0);
    }
    let s = |v: &[f64]| {
        Spread::of(v).ok_or_else(|| BenchError::Run {
            what: "bench startup".into(),
            why: "no runs".into(),
        })
    };
    Ok(StartupReport {
        runs,
        to_first_instruction_us: s(&first)?,
        to_hello_exit_us: s(&total)?,
        vmm_overhead_kib: s(&overhead)?,
        guest_resident_kib: s(&guest)?,
        guest_memory_mib: mem_mib,
    })
}
