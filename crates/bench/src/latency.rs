//! `nfvisor bench latency`: cyclictest for VMs. The bundled latency-probe
//! guest measures timer wake-up latency and vCPU preemption inside the VM;
//! between its blocks the same measurement runs on the host, on the same CPU
//! at the same priority (the vCPU thread itself runs it), so guest and host
//! figures come from one run and their difference is what the VMM and KVM
//! add. Figures are judged against the KVM4NFV targets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use devices::{Baseline, LatencyPort};
use guests::protocol;
use hdrhistogram::Histogram;
use rt::sampler::LatencyHist;
use vmm::memory::MemoryOptions;
use vmm::vm::{ConsoleSink, RtSpec};
use vmm::{Vm, VmSpec};

use crate::BenchError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Timer,
    Irq,
    Preempt,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Timer => "timer",
            Metric::Irq => "irq",
            Metric::Preempt => "preempt",
        }
    }
}

/// A VM set-up to measure under.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub rt: RtSpec,
    pub memory: MemoryOptions,
    /// Run the same guest under QEMU instead (`qemu-system-x86_64
    /// -enable-kvm`), pinned with taskset and given the priority with chrt
    /// when `rt` names a CPU and a priority. No host baseline there.
    pub qemu: bool,
}

#[derive(Debug, Clone)]
pub struct LatencyOptions {
    pub metrics: Vec<Metric>,
    pub period_us: u64,
    pub samples: u64,
    pub blocks: u64,
    pub threshold_ns: u64,
    pub host_baseline: bool,
    /// One profile, or (compare-profiles) default and RT, alternating.
    pub profiles: Vec<Profile>,
    /// Rounds the samples are split into when several profiles alternate.
    pub rounds: u64,
}

/// Statistics of one series, in microseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Series {
    pub samples: u64,
    pub min_us: f64,
    pub avg_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
    pub overflow: u64,
    /// Non-empty 1 us buckets: (us, count).
    pub buckets: Vec<(u64, u64)>,
}

impl Series {
    /// From a 1 us-bucket histogram (the guest's or the host's).
    pub fn from_hist(h: &LatencyHist) -> Series {
        let mut hdr: Histogram<u64> =
            Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static bounds");
        hdr.auto(true);
        let mut buckets = Vec::new();
        for (us, &n) in h.buckets.iter().enumerate() {
            if n > 0 {
                // the bucket's lower bound (cyclictest's integer us), kept
                // inside what was really seen
                let v = ((us as u64) * 1000).clamp(h.min_ns, h.max_ns.max(h.min_ns));
                hdr.saturating_record_n(v, n);
                buckets.push((us as u64, n));
            }
        }
        if h.overflow > 0 {
            hdr.saturating_record_n(h.max_ns.max(1), h.overflow);
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        // hdrhistogram's buckets round up: never report past the real max
        let q = |p: f64| {
            if h.count == 0 {
                0.0
            } else {
                us(hdr.value_at_quantile(p).min(h.max_ns))
            }
        };
        Series {
            samples: h.count,
            min_us: if h.count == 0 { 0.0 } else { us(h.min_ns) },
            avg_us: if h.count == 0 {
                0.0
            } else {
                h.sum_ns as f64 / h.count as f64 / 1000.0
            },
            p50_us: q(0.5),
            p99_us: q(0.99),
            p999_us: q(0.999),
            p9999_us: q(0.9999),
            max_us: us(h.max_ns),
            overflow: h.overflow,
            buckets,
        }
    }
}

/// A KVM4NFV target and whether the guest met it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub target: String,
    pub figure: String,
    pub pass: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MetricReport {
    pub metric: Metric,
    pub profile: String,
    pub guest: Series,
    pub host: Option<Series>,
    /// Preemption: each gap (the longest is the KVM4NFV figure).
    pub guest_gaps: Option<Series>,
    pub host_gaps: Option<Series>,
    /// Guest minus host at avg, p99, max (us): what the VMM and KVM add.
    pub vmm_added_us: Option<BTreeMap<String, f64>>,
    pub verdicts: Vec<Verdict>,
    pub threshold_ns: Option<u64>,
    /// Interrupts: how the injector learned the guest's TSC offset.
    pub tsc_offset_from: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Environment {
    pub cpu_model: String,
    pub kernel: String,
    pub preempt_rt: bool,
    pub isolated_cpus: String,
    /// /proc/sys/kernel/sched_rt_runtime_us: not -1 means a busy FIFO vCPU
    /// is stopped for the rest of each period (50 ms per second by default).
    pub sched_rt_runtime_us: String,
    pub kvm: rt::KvmKind,
    pub note: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyReport {
    pub environment: Environment,
    pub period_us: u64,
    pub samples: u64,
    pub results: Vec<MetricReport>,
}

impl Environment {
    pub fn kvm_label(&self) -> &'static str {
        match self.kvm {
            rt::KvmKind::Hardware => "hardware KVM",
            rt::KvmKind::NestedPvm => "nested PVM KVM, emulated guest",
            rt::KvmKind::Unknown => "unknown KVM",
        }
    }
}

pub fn environment() -> Environment {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let version = read("/proc/sys/kernel/version");
    let kvm = rt::KvmKind::detect();
    Environment {
        cpu_model,
        kernel: format!("{} {}", read("/proc/sys/kernel/osrelease"), version),
        preempt_rt: read("/sys/kernel/realtime") == "1" || version.contains("PREEMPT_RT"),
        isolated_cpus: read("/sys/devices/system/cpu/isolated"),
        sched_rt_runtime_us: read("/proc/sys/kernel/sched_rt_runtime_us"),
        kvm,
        note: match kvm {
            rt::KvmKind::Hardware => "hardware virtualization: absolute figures are meaningful on a tuned host".into(),
            _ => "KVM here is nested/paravirtual and guest code is emulated: absolute figures are NOT representative; the guest-versus-host difference measured in this run is the meaningful figure".into(),
        },
    }
}

/// Checks options that would make a run meaningless, before any run.
pub fn validate(opts: &LatencyOptions) -> Result<(), BenchError> {
    let bad = |why: String| {
        Err(BenchError::Run {
            what: "bench latency".into(),
            why,
        })
    };
    if opts.period_us == 0 {
        return bad("--period-us 0: the period must be at least 1 us".into());
    }
    if opts.samples == 0 {
        return bad("--samples 0: at least one sample is needed".into());
    }
    if opts.blocks == 0 || opts.blocks > opts.samples {
        return bad(format!("--blocks {}: between 1 and --samples", opts.blocks));
    }
    // A period below what a wake-up costs makes every sample late by the
    // wake-up itself: refuse rather than report noise.
    let floor = match rt::KvmKind::detect() {
        rt::KvmKind::Hardware => 20,
        _ => 100,
    };
    if opts.metrics.contains(&Metric::Timer) && opts.period_us < floor {
        return bad(format!(
            "--period-us {}: this host cannot honour a period below {floor} us (a wake-up alone costs about that{})",
            opts.period_us,
            if floor > 20 { " here, where guest code is emulated" } else { "" }
        ));
    }
    Ok(())
}

fn hist_from_guest(out: &protocol::GuestOutput, series: &str) -> Option<LatencyHist> {
    let sum = out
        .records("histsum")
        .find(|r| r.get("series") == Some(series))?;
    let mut h = LatencyHist::default();
    for r in out
        .records("hist")
        .filter(|r| r.get("series") == Some(series))
    {
        let (b, n) = (r.u64("bucket")? as usize, r.u64("count")?);
        if let Some(slot) = h.buckets.get_mut(b) {
            *slot += n;
        }
    }
    h.count = sum.u64("count")?;
    h.overflow = sum.u64("overflow").unwrap_or(0);
    h.min_ns = sum.u64("min").unwrap_or(0);
    h.max_ns = sum.u64("max").unwrap_or(0);
    h.sum_ns = sum.u64("sum").unwrap_or(0);
    Some(h)
}

fn merge(into: &mut LatencyHist, from: &LatencyHist) {
    for (a, b) in into.buckets.iter_mut().zip(&from.buckets) {
        *a += b;
    }
    if from.count > 0 {
        into.min_ns = into.min_ns.min(from.min_ns);
    }
    into.max_ns = into.max_ns.max(from.max_ns);
    into.count += from.count;
    into.overflow += from.overflow;
    into.sum_ns += from.sum_ns;
}

/// One VM run of one metric under one profile: guest and host histograms.
struct Measured {
    guest: LatencyHist,
    guest_gaps: LatencyHist,
    host: LatencyHist,
    host_gaps: LatencyHist,
    threshold_ns: Option<u64>,
    tsc_offset_from: Option<String>,
}

fn measure(
    opts: &LatencyOptions,
    metric: Metric,
    profile: &Profile,
    samples: u64,
) -> Result<Measured, BenchError> {
    if profile.qemu {
        return measure_qemu(opts, metric, profile, samples);
    }
    // the interrupt metric runs in one block: its host side is the injector
    let blocks = if metric == Metric::Irq {
        1
    } else {
        opts.blocks.min(samples).max(1)
    };
    let per_block = samples / blocks;
    let baseline = match metric {
        _ if !opts.host_baseline => None,
        Metric::Timer => Some(Baseline::Timer {
            period: Duration::from_micros(opts.period_us),
            per_block,
        }),
        Metric::Preempt => Some(Baseline::Preempt {
            threshold: Duration::from_nanos(opts.threshold_ns),
            per_block,
        }),
        // the host side of an interrupt is the injector itself
        Metric::Irq => None,
    };
    let irq_bench = (metric == Metric::Irq).then(|| {
        let vcpu_cpus = profile.rt.cpus.clone().unwrap_or_default();
        vmm::irq_bench::IrqBenchSpec {
            count: samples,
            interval: Duration::from_micros(opts.period_us),
            // beside the vCPU, never on its CPU
            cpu: rt::online_cpus()
                .ok()
                .and_then(|c| c.into_iter().find(|c| !vcpu_cpus.contains(c)))
                .filter(|_| !vcpu_cpus.is_empty()),
            priority: Some(profile.rt.priority.unwrap_or(50)),
        }
    });
    let port = Arc::new(LatencyPort::new(baseline, blocks));
    let g = guests::find("latency-probe").expect("bundled latency-probe");
    let mut spec = VmSpec::new(
        "bundled:latency-probe",
        g.image.to_vec(),
        profile.memory.clone(),
    );
    spec.cmdline = format!(
        "metric={} period_us={} samples={} blocks={blocks} threshold_ns={}",
        metric.name(),
        opts.period_us,
        per_block * blocks,
        opts.threshold_ns
    );
    spec.append_tsc_khz = true;
    spec.rt = profile.rt.clone();
    spec.console = ConsoleSink::None;
    spec.transcript_limit = 4 << 20;
    spec.latency_port = Some(port.clone());
    spec.irq_bench = irq_bench;
    let report = Vm::create(spec)?.run()?;
    let text = String::from_utf8_lossy(&report.transcript);
    let out = protocol::parse(&text).map_err(|e| BenchError::Run {
        what: "latency-probe output".into(),
        why: e.to_string(),
    })?;
    if !matches!(report.stop, vmm::StopReason::GuestExit { status: 0 }) {
        return Err(BenchError::Run {
            what: "latency-probe".into(),
            why: format!(
                "the guest did not finish cleanly: {:?}; output:\n{text}",
                report.stop
            ),
        });
    }
    if let Some(irq) = &report.irq_bench {
        if irq.error.is_some() || irq.acked != samples {
            return Err(BenchError::Run {
                what: "irq injector".into(),
                why: format!(
                    "sent {}, acknowledged {} of {samples}: {}",
                    irq.sent,
                    irq.acked,
                    irq.error.as_deref().unwrap_or("")
                ),
            });
        }
    }
    let missing = || BenchError::Run {
        what: "latency-probe output".into(),
        why: format!("no {} histogram in:\n{text}", metric.name()),
    };
    if let Some(khz) = out.header.get("tsc_khz").and_then(|k| k.parse().ok()) {
        TSC_KHZ.store(khz, std::sync::atomic::Ordering::Relaxed);
    }
    let guest = hist_from_guest(&out, metric.name()).ok_or_else(missing)?;
    let guest_gaps = hist_from_guest(&out, "gap").unwrap_or_default();
    let threshold_ns = out
        .records("preempt")
        .next()
        .and_then(|r| r.u64("threshold_ns"));
    let host = port.results();
    Ok(Measured {
        guest,
        guest_gaps,
        host: host.main,
        host_gaps: host.gaps,
        threshold_ns,
        tsc_offset_from: report.irq_bench.as_ref().map(|i| i.tsc_offset_from.clone()),
    })
}

/// The guest's TSC frequency as KVM reported it in the last nfvisor run,
/// passed to the QEMU run so both guests convert cycles the same way.
static TSC_KHZ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn measure_qemu(
    opts: &LatencyOptions,
    metric: Metric,
    profile: &Profile,
    samples: u64,
) -> Result<Measured, BenchError> {
    let err = |why: String| BenchError::Run {
        what: "qemu-system-x86_64".into(),
        why,
    };
    let dir = std::env::temp_dir().join(format!("nfvisor-bench-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
    let image = dir.join("latency-probe.elf");
    std::fs::write(
        &image,
        guests::find("latency-probe").expect("bundled").image,
    )
    .map_err(|e| err(e.to_string()))?;
    let khz = TSC_KHZ.load(std::sync::atomic::Ordering::Relaxed);
    let mut cmdline = format!(
        "metric={} period_us={} samples={samples} blocks=1 threshold_ns={}",
        metric.name(),
        opts.period_us,
        opts.threshold_ns
    );
    if khz > 0 {
        cmdline.push_str(&format!(" tsc_khz={khz}"));
    }
    let mut cmd = Vec::<String>::new();
    if let Some(cpus) = &profile.rt.cpus {
        cmd.extend(["taskset".into(), "-c".into(), cpus[0].to_string()]);
    }
    if let Some(p) = profile.rt.priority {
        cmd.extend(["chrt".into(), "-f".into(), p.to_string()]);
    }
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    cmd.extend(words(&[
        "qemu-system-x86_64",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        "32",
        "-smp",
        "1",
    ]));
    if profile.memory.mlock {
        cmd.extend(words(&["-overcommit", "mem-lock=on"]));
    }
    cmd.extend(words(&[
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-nographic",
        "-no-reboot",
    ]));
    cmd.extend(words(&[
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel",
    ]));
    cmd.push(image.display().to_string());
    cmd.extend(["-append".into(), cmdline]);
    let out = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| err(format!("{e} (install qemu-system-x86)")))?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed = protocol::parse(&text).map_err(|e| err(e.to_string()))?;
    let guest = hist_from_guest(&parsed, metric.name()).ok_or_else(|| {
        err(format!(
            "no {} histogram; stdout:\n{text}\nstderr:\n{}",
            metric.name(),
            String::from_utf8_lossy(&out.stderr)
        ))
    })?;
    let threshold_ns = parsed
        .records("preempt")
        .next()
        .and_then(|r| r.u64("threshold_ns"));
    Ok(Measured {
        guest,
        guest_gaps: hist_from_guest(&parsed, "gap").unwrap_or_default(),
        host: LatencyHist::default(),
        host_gaps: LatencyHist::default(),
        threshold_ns,
        tsc_offset_from: None,
    })
}

fn verdicts(metric: Metric, guest: &Series, gaps: Option<&Series>) -> Vec<Verdict> {
    match metric {
        Metric::Timer => vec![
            Verdict {
                target: "timer latency avg <= 5 us (KVM4NFV)".into(),
                figure: format!("avg {:.1} us", guest.avg_us),
                pass: guest.avg_us <= 5.0,
            },
            Verdict {
                target: "timer latency max <= 15 us (KVM4NFV)".into(),
                figure: format!("max {:.1} us", guest.max_us),
                pass: guest.max_us <= 15.0,
            },
        ],
        Metric::Irq => vec![Verdict {
            target: "external interrupt latency max <= 20 us (KVM4NFV)".into(),
            figure: format!("max {:.1} us", guest.max_us),
            pass: guest.max_us <= 20.0,
        }],
        Metric::Preempt => vec![
            Verdict {
                target: "longest vCPU preemption <= 10 us (KVM4NFV)".into(),
                figure: format!("longest gap {:.1} us", gaps.map_or(0.0, |g| g.max_us)),
                pass: gaps.map_or(0.0, |g| g.max_us) <= 10.0,
            },
            Verdict {
                target: "cumulative preemption in any 1 ms < 20 us (KVM4NFV)".into(),
                figure: format!("worst 1 ms window {:.1} us", guest.max_us),
                pass: guest.max_us < 20.0,
            },
        ],
    }
}

/// Runs every metric under every profile; with several profiles, the
/// samples are split into `rounds` runs that alternate between them.
pub fn run(opts: &LatencyOptions) -> Result<LatencyReport, BenchError> {
    validate(opts)?;
    let mut results = Vec::new();
    for &metric in &opts.metrics {
        let rounds = if opts.profiles.len() > 1 {
            opts.rounds.max(1).min(opts.samples)
        } else {
            1
        };
        let per_round = opts.samples / rounds;
        let mut acc: Vec<Option<Measured>> = opts.profiles.iter().map(|_| None).collect();
        for round in 0..rounds {
            for (i, profile) in opts.profiles.iter().enumerate() {
                if profile.qemu && metric == Metric::Irq {
                    continue; // no injector beside QEMU
                }
                tracing::info!(
                    "{} under the {} profile: run {}/{rounds}",
                    metric.name(),
                    profile.name,
                    round + 1
                );
                let m = measure(opts, metric, profile, per_round)?;
                match &mut acc[i] {
                    None => acc[i] = Some(m),
                    Some(a) => {
                        merge(&mut a.guest, &m.guest);
                        merge(&mut a.guest_gaps, &m.guest_gaps);
                        merge(&mut a.host, &m.host);
                        merge(&mut a.host_gaps, &m.host_gaps);
                    }
                }
            }
        }
        for (profile, m) in opts.profiles.iter().zip(acc) {
            let Some(m) = m else { continue };
            let guest = Series::from_hist(&m.guest);
            let host = (m.host.count > 0).then(|| Series::from_hist(&m.host));
            let guest_gaps = (metric == Metric::Preempt).then(|| Series::from_hist(&m.guest_gaps));
            let host_gaps = (metric == Metric::Preempt && m.host.count > 0)
                .then(|| Series::from_hist(&m.host_gaps));
            let vmm_added_us = host.as_ref().map(|h| {
                BTreeMap::from([
                    ("avg".to_string(), guest.avg_us - h.avg_us),
                    ("p99".to_string(), guest.p99_us - h.p99_us),
                    ("max".to_string(), guest.max_us - h.max_us),
                ])
            });
            results.push(MetricReport {
                metric,
                profile: profile.name.clone(),
                verdicts: verdicts(metric, &guest, guest_gaps.as_ref()),
                guest,
                host,
                guest_gaps,
                host_gaps,
                vmm_added_us,
                threshold_ns: m.threshold_ns,
                tsc_offset_from: m.tsc_offset_from,
            });
        }
    }
    Ok(LatencyReport {
        environment: environment(),
        period_us: opts.period_us,
        samples: opts.samples,
        results,
    })
}

/// The columns of a histogram file or plot: (label, series).
pub fn columns(r: &LatencyReport) -> Vec<(String, &Series)> {
    let mut cols = Vec::new();
    for m in &r.results {
        let prefix = if r.results.iter().filter(|x| x.metric == m.metric).count() > 1 {
            format!("{}-{}", m.metric.name(), m.profile)
        } else {
            m.metric.name().to_string()
        };
        cols.push((format!("{prefix}-guest"), &m.guest));
        if let Some(h) = &m.host {
            cols.push((format!("{prefix}-host"), h));
        }
    }
    cols
}

/// cyclictest's `-h` histogram format: `#` header lines, one row per us
/// bucket (latency, then one count per column), then the summary lines.
pub fn histogram_file(r: &LatencyReport) -> String {
    let cols = columns(r);
    let last = cols
        .iter()
        .flat_map(|(_, s)| s.buckets.last().map(|b| b.0))
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    out.push_str("# Histogram\n");
    out.push_str(&format!(
        "# Columns: {}\n",
        cols.iter()
            .map(|c| c.0.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let counts: Vec<BTreeMap<u64, u64>> = cols
        .iter()
        .map(|(_, s)| s.buckets.iter().copied().collect())
        .collect();
    for us in 0..=last {
        out.push_str(&format!("{us:06}"));
        for c in &counts {
            out.push_str(&format!(" {:06}", c.get(&us).copied().unwrap_or(0)));
        }
        out.push('\n');
    }
    let row = |name: &str, f: &dyn Fn(&Series) -> String| {
        format!(
            "# {name}:{}\n",
            cols.iter()
                .map(|(_, s)| format!(" {}", f(s)))
                .collect::<String>()
        )
    };
    out.push_str(&row("Total", &|s| format!("{:09}", s.samples)));
    out.push_str(&row("Min Latencies", &|s| {
        format!("{:05}", s.min_us as u64)
    }));
    out.push_str(&row("Avg Latencies", &|s| {
        format!("{:05}", s.avg_us.round() as u64)
    }));
    out.push_str(&row("Max Latencies", &|s| {
        format!("{:05}", s.max_us.ceil() as u64)
    }));
    out.push_str(&row("Histogram Overflows", &|s| {
        format!("{:05}", s.overflow)
    }));
    out
}

/// Reads a histogram file back: column name -> (us -> count).
pub fn parse_histogram_file(text: &str) -> Result<BTreeMap<String, BTreeMap<u64, u64>>, String> {
    let names: Vec<String> = text
        .lines()
        .find_map(|l| l.strip_prefix("# Columns:"))
        .ok_or("no '# Columns:' line")?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut out: BTreeMap<String, BTreeMap<u64, u64>> =
        names.iter().map(|n| (n.clone(), BTreeMap::new())).collect();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.starts_with('#'))
    {
        let mut f = line.split_whitespace().map(|x| x.parse::<u64>());
        let us = f
            .next()
            .ok_or(format!("line {}: empty", i + 1))?
            .map_err(|e| format!("line {}: {e}", i + 1))?;
        for name in &names {
            let n = f
                .next()
                .ok_or(format!("line {}: missing column {name}", i + 1))?
                .map_err(|e| format!("line {}: {e}", i + 1))?;
            if n > 0 {
                out.get_mut(name).expect("named").insert(us, n);
            }
        }
    }
    Ok(out)
}
