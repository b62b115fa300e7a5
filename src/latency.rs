//! `nfvisor bench latency`: options from flags, and output files written
//! all or nothing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bench::latency::{LatencyOptions, LatencyReport, Metric, Profile};
use vmm::memory::MemoryOptions;
use vmm::vm::{DisableExits, RtSpec};

use crate::config::RtArgs;

/// Parses "60s", "2m", "500ms" into milliseconds.
fn parse_duration_ms(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        bail!("--duration {s:?}: give a unit (ms, s, m, h)")
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("--duration {s:?} is not a number with a unit"))?;
    Ok(n * mult)
}

const GUEST_MEMORY: u64 = 32 << 20;

#[allow(clippy::too_many_arguments)]
pub fn options(
    metric: &str,
    period_us: u64,
    samples: u64,
    duration: Option<&str>,
    blocks: u64,
    threshold_ns: u64,
    host_baseline: bool,
    compare_profiles: bool,
    qemu: bool,
    rounds: u64,
    rt: &RtArgs,
) -> Result<LatencyOptions> {
    let metrics = match metric {
        "timer" => vec![Metric::Timer],
        "irq" => vec![Metric::Irq],
        "preempt" => vec![Metric::Preempt],
        "all" => vec![Metric::Timer, Metric::Irq, Metric::Preempt],
        other => bail!("--metric {other:?}: use timer, irq, preempt or all"),
    };
    let samples = match duration {
        Some(d) => {
            let ms = parse_duration_ms(d)?;
            // timer, irq: one sample per period; preempt: one per 1 ms window
            if metrics.contains(&Metric::Timer) || metrics.contains(&Metric::Irq) {
                ms * 1000 / period_us.max(1)
            } else {
                ms
            }
        }
        None => samples,
    };
    let (given_rt, given_mem) = rt.to_spec()?;
    let given = Profile {
        name: if rt.any() {
            "as-given".into()
        } else {
            "default".into()
        },
        rt: given_rt,
        memory: MemoryOptions {
            size: GUEST_MEMORY,
            ..given_mem
        },
        qemu: false,
    };
    let profiles = if compare_profiles {
        let default = Profile {
            name: "default".into(),
            rt: RtSpec::default(),
            memory: MemoryOptions {
                size: GUEST_MEMORY,
                ..Default::default()
            },
            qemu: false,
        };
        let rt_profile = if rt.any() {
            Profile {
                name: "rt".into(),
                ..given
            }
        } else {
            let last = *rt::online_cpus()?.last().context("no online CPU")?;
            Profile {
                name: "rt".into(),
                rt: RtSpec {
                    cpus: Some(vec![last]),
                    housekeeping_cpus: None,
                    priority: Some(80),
                    realtime_vcpus: None,
                    disable_exits: DisableExits {
                        hlt: true,
                        pause: true,
                        ..Default::default()
                    },
                    halt_poll_ns: None,
                    best_effort: true,
                },
                memory: MemoryOptions {
                    size: GUEST_MEMORY,
                    hugepages: Some(vmm::HugePageSize::Size2M),
                    mlock: true,
                    prefault: true,
                    numa_node: None,
                },
                qemu: false,
            }
        };
        vec![default, rt_profile]
    } else {
        vec![given]
    };
    let mut profiles = profiles;
    if qemu {
        // QEMU with the same placement as the last (most tuned) profile
        let like = profiles.last().expect("a profile").clone();
        profiles.push(Profile {
            name: format!("qemu-{}", like.name),
            qemu: true,
            ..like
        });
    }
    Ok(LatencyOptions {
        metrics,
        period_us,
        samples,
        blocks,
        threshold_ns,
        host_baseline,
        profiles,
        rounds,
    })
}

/// Output files, reserved before the run (so an unwritable path fails
/// first) and written whole at the end; nothing partial is left behind.
pub struct Outputs {
    files: Vec<(PathBuf, PathBuf, Kind)>,
}

#[derive(Clone, Copy)]
enum Kind {
    Histogram,
    Plot,
}

fn temp_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.nfvisor-{}.tmp", std::process::id()))
}

impl Outputs {
    pub fn reserve(histogram: Option<&Path>, plot: Option<&Path>) -> Result<Outputs> {
        let mut out = Outputs { files: Vec::new() };
        for (path, kind) in [(histogram, Kind::Histogram), (plot, Kind::Plot)] {
            let Some(path) = path else { continue };
            let tmp = temp_for(path);
            if let Err(e) = std::fs::File::create(&tmp) {
                out.discard();
                bail!("cannot write {}: {e}", path.display());
            }
            out.files.push((path.to_path_buf(), tmp, kind));
        }
        Ok(out)
    }

    pub fn discard(&self) {
        for (_, tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }

    pub fn commit(self, r: &LatencyReport) -> Result<()> {
        let result = (|| -> Result<()> {
            for (path, tmp, kind) in &self.files {
                let text = match kind {
                    Kind::Histogram => bench::latency::histogram_file(r),
                    Kind::Plot => bench::plot::latency_svg(r)
                        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?,
                };
                std::fs::write(tmp, text).with_context(|| format!("writing {}", path.display()))?;
            }
            for (path, tmp, _) in &self.files {
                std::fs::rename(tmp, path)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        })();
        if result.is_err() {
            self.discard();
        }
        result
    }
}
