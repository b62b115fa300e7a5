//! `nfvisor bench blk`: the bundled blk-probe guest's random reads and
//! writes under nfvisor (`--disk ...,direct,aio=io_uring`) and under QEMU
//! (`virtio-blk-pci`, `cache=none,aio=io_uring`) on the same image, one
//! after the other for each operation and queue depth.
//!
//! The guest measures each request from its notify to its used element
//! (rdtsc) and reports IOPS and percentiles. Guest code is emulated on
//! hosts without VT-x, which bounds IOPS by the guest; the figures that
//! compare the VMMs fairly there are the VMM's own CPU per request (its
//! threads other than the vCPUs', from the guest's first request to its
//! last) and the latency each adds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench_vmm::{qemu_q35, thread_cpu_ns, which};

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Requests per run.
    #[arg(long, default_value_t = 2000)]
    pub count: u32,
    /// Queue depths (1 to 16).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub qd: Vec<u32>,
    /// randread, randwrite.
    #[arg(long, value_delimiter = ',', default_value = "randread,randwrite")]
    pub op: Vec<String>,
    /// The image (created, filled and removed when not given).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The image's size when created (MiB).
    #[arg(long, default_value_t = 64)]
    pub size_mib: u64,
    /// Leave QEMU out.
    #[arg(long)]
    pub no_qemu: bool,
    #[arg(long)]
    pub json: bool,
}

/// One VMM's figures for one operation and queue depth.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub vmm: String,
    pub op: String,
    pub qd: u32,
    pub bs: u32,
    pub requests: u64,
    pub errors: u64,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// The VMM's CPU (its non-vCPU threads, and the vCPU threads' user
    /// time) per request, from the guest's first request to its end.
    pub vmm_cpu_us_per_request: f64,
}

/// The fields of the guest's `R KIND ...` line in `console`.
fn record(console: &str, kind: &str) -> Option<std::collections::BTreeMap<String, String>> {
    let line = console
        .lines()
        .find(|l| l.starts_with(&format!("R {kind} ")))?;
    Some(
        line.split_whitespace()
            .skip(2)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Runs one VMM to the guest's end, its console in `console`; the VMM's
/// CPU is counted from when the guest printed its disk's identity (the
/// last record before the requests start).
fn run_one(vmm: &str, mut cmd: Command, console: &Path, op: &str, qd: u32) -> Result<Figures> {
    let _ = std::fs::remove_file(console);
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {vmm}"))?;
    let pid = child.id();
    let is_vcpu = |comm: &str| comm.starts_with("vcpu") || comm.starts_with("CPU ");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut start_cpu = None;
    // each thread's last figure (threads leave /proc as they end)
    let mut threads = std::collections::BTreeMap::<u32, u64>::new();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{vmm}: the guest did not finish within 10 minutes");
        }
        for (tid, ns) in thread_cpu_ns(pid, &is_vcpu) {
            // (a thread on its way out may read as 0)
            let last = threads.entry(tid).or_default();
            *last = (*last).max(ns);
        }
        if start_cpu.is_none()
            && std::fs::read_to_string(console).is_ok_and(|c| c.contains("R blkid "))
        {
            start_cpu = Some(threads.values().sum::<u64>());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let out = std::fs::read_to_string(console).unwrap_or_default();
    let Some(r) = record(&out, "bench") else {
        bail!("{vmm}: the guest reported no R bench ({status}):\n{out}");
    };
    let num = |k: &str| r.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let requests = num("count") as u64;
    let cpu = threads
        .values()
        .sum::<u64>()
        .saturating_sub(start_cpu.unwrap_or(0));
    Ok(Figures {
        vmm: vmm.into(),
        op: op.into(),
        qd,
        bs: num("bs") as u32,
        requests,
        errors: num("errors") as u64,
        iops: num("iops"),
        p50_us: num("p50_ns") / 1e3,
        p99_us: num("p99_ns") / 1e3,
        max_us: num("max_ns") / 1e3,
        vmm_cpu_us_per_request: cpu as f64 / 1e3 / requests.max(1) as f64,
    })
}

/// A file of `mib` MiB of non-zero bytes (reads then reach real blocks).
fn fill(path: &Path, mib: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("creating the image {}", path.display()))?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 31 + 7) as u8).collect();
    for _ in 0..mib {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

pub fn run(o: &Options) -> Result<u8> {
    anyhow::ensure!(o.count > 0, "--count must be at least 1");
    for &q in &o.qd {
        anyhow::ensure!((1..=16).contains(&q), "--qd {q}: 1 to 16");
    }
    for op in &o.op {
        anyhow::ensure!(
            op == "randread" || op == "randwrite",
            "--op {op:?}: randread or randwrite"
        );
    }
    let exe = std::env::current_exe().context("locating the nfvisor binary")?;
    let dir = std::env::temp_dir().join(format!("nfvisor-bench-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let elf = dir.join("blk-probe.elf");
    std::fs::write(
        &elf,
        guests::find("blk-probe")
            .context("bundled blk-probe")?
            .image,
    )?;
    let image = match &o.image {
        Some(p) => p.clone(),
        None => {
            let p = dir.join("bench.img");
            fill(&p, o.size_mib)?;
            p
        }
    };
    let qemu = (!o.no_qemu).then(|| which("qemu-system-x86_64")).flatten();
    if !o.no_qemu && qemu.is_none() {
        bail!("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86), or pass --no-qemu");
    }
    let console = dir.join("console");
    let mut results = Vec::new();
    for op in &o.op {
        for &qd in &o.qd {
            let args = format!("mode=bench op={op} count={} qd={qd} bs=4096", o.count);
            let mut c = Command::new(&exe);
            c.args(["run", "--guest", "blk-probe", "--disk"])
                .arg(format!("path={},direct,aio=io_uring", image.display()))
                .arg("--serial")
                .arg(&console)
                .args(["--cmdline", &args]);
            tracing::info!("nfvisor, {op} qd {qd}");
            results.push(run_one("nfvisor", c, &console, op, qd)?);
            if let Some(q) = &qemu {
                let mut c = Command::new(q);
                qemu_q35(&mut c, &format!("file:{}", console.display()))
                    .arg("-drive")
                    .arg(format!(
                        "file={},if=none,id=d0,format=raw,cache=none,aio=io_uring",
                        image.display()
                    ))
                    .args([
                        "-device",
                        "virtio-blk-pci,drive=d0,disable-legacy=on,romfile=",
                    ])
                    .arg("-kernel")
                    .arg(&elf)
                    .args(["-append", &args]);
                tracing::info!("QEMU, {op} qd {qd}");
                results.push(run_one("qemu", c, &console, op, qd)?);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ratios: Vec<serde_json::Value> = results
        .iter()
        .filter(|n| n.vmm == "nfvisor")
        .filter_map(|n| {
            let q = results
                .iter()
                .find(|q| q.vmm == "qemu" && q.op == n.op && q.qd == n.qd)?;
            Some(serde_json::json!({
                "op": n.op,
                "qd": n.qd,
                "qemu_over_nfvisor_cpu_per_request": q.vmm_cpu_us_per_request / n.vmm_cpu_us_per_request.max(1e-9),
                "qemu_over_nfvisor_p50": q.p50_us / n.p50_us.max(1e-9),
                "nfvisor_over_qemu_iops": n.iops / q.iops.max(1e-9),
            }))
        })
        .collect();
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "results": results, "ratios": ratios })
            )?
        );
    } else {
        for r in &results {
            println!(
                "{:<8} {:<9} qd {:>2}: {} x {} B ({} errors), {:.0} IOPS, p50 {:.0} us p99 {:.0} us, VMM CPU {:.1} us/request",
                r.vmm,
                r.op,
                r.qd,
                r.requests,
                r.bs,
                r.errors,
                r.iops,
                r.p50_us,
                r.p99_us,
                r.vmm_cpu_us_per_request
            );
        }
        for r in &ratios {
            println!("QEMU / nfvisor, {} qd {}: {r}", r["op"], r["qd"]);
        }
    }
    Ok(0)
}
