//! `nfvisor bench exits`: the cost of a PIO and an MMIO exit round trip as
//! the `exit-bench` guest sees it (RDTSC around the access), under nfvisor,
//! under the bare KVM_RUN floor loop, and under QEMU, interleaved in one run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use guests::protocol;
use vmm::memory::MemoryOptions;
use vmm::vm::ConsoleSink;
use vmm::{Vm, VmSpec};

use crate::{BenchError, Spread};

#[derive(Debug, Clone)]
pub struct ExitsOptions {
    /// Round trips per op per run.
    pub n: u64,
    /// Runs of each variant, interleaved.
    pub rounds: usize,
    /// Include QEMU (qemu-system-x86_64 must be installed).
    pub qemu: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Nfvisor,
    Floor,
    Qemu,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OpResult {
    /// Median over rounds of each run's median round trip, and its spread.
    pub p50_cycles: Spread,
    pub p50_ns: Spread,
    /// Median over rounds of each run's mean round trip.
    pub mean_cycles: Spread,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExitsReport {
    pub n: u64,
    pub rounds: usize,
    pub tsc_khz: u64,
    pub kvm_kind: rt::KvmKind,
    pub qemu_version: Option<String>,
    /// variant -> op (pio, mmio) -> result
    pub results: BTreeMap<Variant, BTreeMap<String, OpResult>>,
    /// nfvisor's and QEMU's median over the floor's, per op.
    pub ratio_to_floor: BTreeMap<String, BTreeMap<Variant, f64>>,
}

const OPS: [&str; 2] = ["pio", "mmio"];

fn spec(n: u64) -> VmSpec {
    let g = guests::find("exit-bench").expect("bundled exit-bench");
    let mut spec = VmSpec::new(
        "bundled:exit-bench",
        g.image.to_vec(),
        MemoryOptions {
            size: 32 << 20,
            ..Default::default()
        },
    );
    spec.cmdline = format!("n={n} ops=pio,mmio");
    spec.append_tsc_khz = true;
    spec.console = ConsoleSink::None;
    spec.transcript_limit = 1 << 20;
    spec
}

/// One run's figures: op -> (p50 cycles, mean cycles), and the guest's TSC kHz.
type RunFigures = (BTreeMap<String, (f64, f64)>, u64);

/// Per (variant, op): each run's p50 and mean cycles.
type Samples<'a> = BTreeMap<(Variant, &'a str), (Vec<f64>, Vec<f64>)>;

/// The figures of one run from the guest's output.
fn parse(transcript: &[u8], what: &str) -> Result<RunFigures, BenchError> {
    let text = String::from_utf8_lossy(transcript);
    let out = protocol::parse(&text).map_err(|e| BenchError::Run {
        what: what.into(),
        why: e.to_string(),
    })?;
    let tsc_khz = out
        .header
        .get("tsc_khz")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut m = BTreeMap::new();
    for h in out.histograms() {
        m.insert(h.series.clone(), (h.p50 as f64, h.avg as f64));
    }
    for op in OPS {
        if !m.contains_key(op) {
            return Err(BenchError::Run {
                what: what.into(),
                why: format!("the guest reported no {op} histogram; output:\n{text}"),
            });
        }
    }
    Ok((m, tsc_khz))
}

fn run_nfvisor(n: u64) -> Result<RunFigures, BenchError> {
    let report = Vm::create(spec(n))?.run()?;
    parse(&report.transcript, "nfvisor run")
}

fn run_floor(n: u64) -> Result<RunFigures, BenchError> {
    let (_, console) = Vm::create(spec(n))?.run_floor()?;
    parse(&console, "floor loop")
}

fn run_qemu(image: &Path, n: u64, tsc_khz: u64) -> Result<RunFigures, BenchError> {
    let out = Command::new("qemu-system-x86_64")
        .args(["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "32"])
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel"])
        .arg(image)
        .arg("-append")
        .arg(format!("n={n} ops=pio,mmio tsc_khz={tsc_khz}"))
        .output()
        .map_err(|e| BenchError::Run {
            what: "qemu-system-x86_64".into(),
            why: format!("{e} (install qemu-system-x86, or pass --no-qemu)"),
        })?;
    parse(&out.stdout, "qemu-system-x86_64")
}

fn qemu_version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

/// Runs the benchmark; `progress` is told of each finished run.
pub fn run(
    opts: &ExitsOptions,
    mut progress: impl FnMut(usize, Variant),
) -> Result<ExitsReport, BenchError> {
    let dir = std::env::temp_dir().join(format!("nfvisor-bench-exits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Run {
        what: dir.display().to_string(),
        why: e.to_string(),
    })?;
    let image = dir.join("exit-bench.elf");
    std::fs::write(&image, guests::find("exit-bench").expect("bundled").image).map_err(|e| {
        BenchError::Run {
            what: image.display().to_string(),
            why: e.to_string(),
        }
    })?;

    let mut variants = vec![Variant::Nfvisor, Variant::Floor];
    if opts.qemu {
        variants.push(Variant::Qemu);
    }
    let mut samples: Samples = BTreeMap::new();
    let mut tsc_khz = 0;
    for round in 0..opts.rounds {
        // rotate the order each round so no variant always runs first
        let order: Vec<Variant> = (0..variants.len())
            .map(|i| variants[(i + round) % variants.len()])
            .collect();
        for v in order {
            let (m, khz) = match v {
                Variant::Nfvisor => run_nfvisor(opts.n)?,
                Variant::Floor => run_floor(opts.n)?,
                Variant::Qemu => run_qemu(&image, opts.n, tsc_khz)?,
            };
            if v != Variant::Qemu {
                tsc_khz = khz;
            }
            for op in OPS {
                let (p50, mean) = m[op];
                let e = samples.entry((v, op)).or_default();
                e.0.push(p50);
                e.1.push(mean);
            }
            progress(round, v);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mut results: BTreeMap<Variant, BTreeMap<String, OpResult>> = BTreeMap::new();
    for ((v, op), (p50s, means)) in &samples {
        let ns: Vec<f64> = p50s
            .iter()
            .map(|c| c * 1e6 / tsc_khz.max(1) as f64)
            .collect();
        results.entry(*v).or_default().insert(
            op.to_string(),
            OpResult {
                p50_cycles: Spread::of(p50s).expect("rounds > 0"),
                p50_ns: Spread::of(&ns).expect("rounds > 0"),
                mean_cycles: Spread::of(means).expect("rounds > 0"),
            },
        );
    }
    let mut ratio_to_floor = BTreeMap::new();
    for op in OPS {
        let floor = results[&Variant::Floor][op].p50_cycles.median;
        let mut r = BTreeMap::new();
        for v in &variants {
            r.insert(*v, results[v][op].p50_cycles.median / floor);
        }
        ratio_to_floor.insert(op.to_string(), r);
    }
    Ok(ExitsReport {
        n: opts.n,
        rounds: opts.rounds,
        tsc_khz,
        kvm_kind: rt::KvmKind::detect(),
        qemu_version: if opts.qemu { qemu_version() } else { None },
        results,
        ratio_to_floor,
    })
}
