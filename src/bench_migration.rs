//! `nfvisor bench migration`: both ends on this host, driven through the
//! product's own commands (`receive`, `run --control-socket`, `migrate`),
//! and the same guests under QEMU in the same session (`-incoming`, QMP
//! `migrate` with `max-bandwidth` raised and `downtime-limit` set to our
//! budget; `query-migrate` gives its total time and downtime).
//!
//! Beside each downtime, the stall as the guest and its neighbours feel it
//! (dirtier only): both ends write the guest's console into one FIFO that
//! this process reads, time-stamping each line, so the longest silence of
//! the dirtier's progress ticks spans the hand-over whichever end printed
//! them; and the dirtier's own longest TSC gap, from its tick records.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn spawn(program: &Path, args: &[String]) -> Result<Child> {
    Command::new(program)
        .args(args)
        .env("NFVISOR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

fn wait_for(path: &Path, what: &mut Child) -> Result<()> {
    let t = Instant::now();
    while !path.exists() {
        // prefaulting a large guest takes a while on a nested host
        if t.elapsed() > Duration::from_secs(300) {
            bail!("{} did not appear", path.display());
        }
        if let Some(status) = what.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = what.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!(
                "exited ({status}) before {} appeared: {err}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Console lines from both ends of a migration, time-stamped on arrival.
struct ConsoleWatch {
    fifo: PathBuf,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ConsoleWatch {
    fn new(dir: &Path) -> Result<ConsoleWatch> {
        let fifo = dir.join("console.fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
        // SAFETY: mkfifo(3) on a NUL-terminated path.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            bail!(
                "mkfifo {}: {}",
                fifo.display(),
                std::io::Error::last_os_error()
            );
        }
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (path, sink) = (fifo.clone(), lines.clone());
        let reader = std::thread::spawn(move || {
            // blocks until the first end opens it for writing; ends when both
            // ends have closed it
            let Ok(f) = std::fs::File::open(&path) else {
                return;
            };
            for line in BufReader::new(f).split(b'\n').map_while(|l| l.ok()) {
                let line = String::from_utf8_lossy(&line).into_owned();
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), line));
            }
        });
        Ok(ConsoleWatch {
            fifo,
            lines,
            reader: Some(reader),
        })
    }

    /// The stall around [from, to]: the longest silence between progress
    /// ticks reaching the host, the longest tick interval before `from`
    /// (the guest's normal pace here), and the dirtier's own longest TSC
    /// gap as its last tick reports it (ms).
    fn stall(&self, from: Instant, to: Instant) -> serde_json::Value {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let khz = lines
            .iter()
            .find_map(|(_, l)| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("tsc_khz="))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        let ticks: Vec<&(Instant, String)> = lines
            .iter()
            .filter(|(_, l)| l.starts_with("R tick"))
            .collect();
        let mut silence = Duration::ZERO;
        let mut before = Duration::ZERO;
        for pair in ticks.windows(2) {
            let (a, b) = (pair[0].0, pair[1].0);
            if b >= from && a <= to {
                silence = silence.max(b - a);
            } else if b < from {
                before = before.max(b - a);
            }
        }
        let gap_cycles = |l: &str| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("max_gap_cycles="))
                .and_then(|v| v.parse::<f64>().ok())
        };
        let last_gap = ticks.last().and_then(|(_, l)| gap_cycles(l));
        let gap_before = ticks
            .iter()
            .rfind(|(t, _)| *t < from)
            .and_then(|(_, l)| gap_cycles(l));
        let ms = |c: Option<f64>| c.filter(|_| khz > 0.0).map(|c| c / khz);
        serde_json::json!({
            "ticks": ticks.len(),
            "tick_silence_ms": (ticks.len() > 1).then_some(silence.as_secs_f64() * 1000.0),
            "tick_interval_before_ms": (ticks.len() > 1).then_some(before.as_secs_f64() * 1000.0),
            "tsc_gap_ms": ms(last_gap),
            "tsc_gap_before_ms": ms(gap_before),
        })
    }
}

impl Drop for ConsoleWatch {
    fn drop(&mut self) {
        // a reader still waiting for a first writer is released by one
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.fifo);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// One scenario: a bundled guest, its memory and command line.
struct Scenario {
    name: &'static str,
    guest: &'static str,
    memory_mib: u64,
    cmdline: String,
    prefault: bool,
}

fn nfvisor_once(
    exe: &Path,
    s: &Scenario,
    o: &Options,
    dir: &Path,
    watch: &ConsoleWatch,
) -> Result<serde_json::Value> {
    let (inbound, control) = (dir.join("in.sock"), dir.join("src.sock"));
    let listen = format!("unix:{}", inbound.display());
    let fifo = watch.fifo.display().to_string();
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let token_file = dir.join("token");
    let mut receive = words(&["receive", "--listen", &listen, "--serial", &fifo]);
    if o.token {
        std::fs::write(&token_file, "nfvisor-bench-token-0123456789abcdef\n")?;
        receive.extend(["--token-file".into(), token_file.display().to_string()]);
    }
    let mut dst = spawn(exe, &receive)?;
    let mut args = words(&[
        "run",
        "--guest",
        s.guest,
        "--memory",
        &format!("{}M", s.memory_mib),
        "--cmdline",
        &s.cmdline,
        "--serial",
        &fifo,
        "--control-socket",
        control.to_str().unwrap_or_default(),
    ]);
    if s.prefault {
        args.push("--prefault".into());
    }
    if o.dirty_bitmap {
        args.push("--dirty-bitmap".into());
    }
    if let Some(bytes) = o.dirty_ring {
        args.extend(["--dirty-ring".into(), bytes.to_string()]);
    }
    let mut src = spawn(exe, &args)?;
    let result = (|| {
        wait_for(&inbound, &mut dst)?;
        wait_for(&control, &mut src)?;
        std::thread::sleep(WARMUP);
        let req = vmm::api::Request::Migrate(vmm::api::MigrateRequest {
            downtime_ms: o.downtime_ms,
            timeout_s: 5.0,
            on_timeout: vmm::api::OnTimeout::Force,
            connections: o.connections as u32,
            token_file: o.token.then(|| token_file.clone()),
            ..vmm::api::MigrateRequest::to(listen.clone())
        });
        let from = Instant::now();
        let reply = vmm::control::send(&control, &req, &mut |_| {}).map_err(anyhow::Error::msg)?;
        let to = Instant::now();
        if reply["ok"] != true {
            bail!("migration failed: {}", reply["error"]);
        }
        std::thread::sleep(AFTER);
        let m = &reply["migration"];
        Ok(serde_json::json!({
            "total_ms": m["total_ms"],
            "downtime_ms": m["downtime_ms"],
            "rounds": m["rounds"],
            "bytes": m["bytes"],
            "report": m,
            "stall": watch.stall(from, to),
        }))
    })();
    for c in [&mut src, &mut dst] {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

/// Sends one QMP command and returns its "return" (events are skipped).
/// A QMP session on QEMU's socket at `path`, capabilities negotiated.
pub(crate) fn qmp_session(path: &Path) -> Result<(UnixStream, BufReader<UnixStream>)> {
    let mut out =
        UnixStream::connect(path).with_context(|| format!("QMP at {}", path.display()))?;
    out.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut back = BufReader::new(out.try_clone()?);
    let mut greeting = String::new();
    back.read_line(&mut greeting)?;
    qmp(
        &mut out,
        &mut back,
        serde_json::json!({"execute": "qmp_capabilities"}),
    )?;
    Ok((out, back))
}

/// Polls `query-migrate` until QEMU's migration (started at `from`)
/// completes: its final state. Err: it failed, or 120 s went by.
pub(crate) fn qmp_migrated(
    out: &mut UnixStream,
    back: &mut BufReader<UnixStream>,
    from: Instant,
) -> Result<serde_json::Value> {
    loop {
        let q = qmp(out, back, serde_json::json!({"execute": "query-migrate"}))?;
        match q["status"].as_str() {
            Some("completed") => return Ok(q),
            Some("failed") | Some("cancelled") => {
                bail!("QEMU's migration {}: {q}", q["status"])
            }
            _ if from.elapsed() > Duration::from_secs(120) => {
                bail!("QEMU's migration did not end in 120 s: {q}")
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

pub(crate) fn qmp(
    out: &mut UnixStream,
    back: &mut BufReader<UnixStream>,
    cmd: serde_json::Value,
) -> Result<serde_json::Value> {
    out.write_all(format!("{cmd}\n").as_bytes())?;
    loop {
        let mut line = String::new();
        if back.read_line(&mut line)? == 0 {
            bail!("QEMU closed its QMP socket");
        }
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            bail!("QMP {}: {e}", cmd["execute"]);
        }
    }
}

fn qemu_once(
    s: &Scenario,
    o: &Options,
    dir: &Path,
    watch: &ConsoleWatch,
) -> Result<serde_json::Value> {
    let image = dir.join(format!("{}.elf", s.guest));
    let g = guests::find(s.guest).context("bundled guest")?;
    std::fs::write(&image, g.image)?;
    let (inbound, qmp_path) = (dir.join("qemu-in.sock"), dir.join("qmp.sock"));
    let common = |extra: &[String]| -> Vec<String> {
        let mut v: Vec<String> = [
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-m",
            &format!("{}M", s.memory_mib),
            "-M",
            "microvm,x-option-roms=off,rtc=off",
            "-nographic",
            "-no-reboot",
            "-serial",
            &format!("file:{}", watch.fifo.display()),
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel",
            image.to_str().unwrap_or_default(),
            "-append",
            &s.cmdline,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        if s.prefault {
            v.extend(["-mem-prealloc".to_string()]);
        }
        v.extend_from_slice(extra);
        v
    };
    let qemu = Path::new("qemu-system-x86_64");
    let mut dst = spawn(
        qemu,
        &common(&["-incoming".into(), format!("unix:{}", inbound.display())]),
    )
    .context("install qemu-system-x86 for the QEMU baseline, or pass --no-qemu")?;
    let mut src = spawn(
        qemu,
        &common(&[
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
        ]),
    )?;
    let result = (|| {
        wait_for(&inbound, &mut dst)?;
        wait_for(&qmp_path, &mut src)?;
        let (mut out, mut back) = qmp_session(&qmp_path)?;
        qmp(
            &mut out,
            &mut back,
            serde_json::json!({"execute": "migrate-set-parameters", "arguments": {
                "max-bandwidth": 1u64 << 40,
                "downtime-limit": o.downtime_ms.ceil().max(1.0) as u64,
            }}),
        )?;
        std::thread::sleep(WARMUP);
        let from = Instant::now();
        qmp(
            &mut out,
            &mut back,
            serde_json::json!({"execute": "migrate", "arguments": {"uri": format!("unix:{}", inbound.display())}}),
        )?;
        let state = qmp_migrated(&mut out, &mut back, from)?;
        let to = Instant::now();
        std::thread::sleep(AFTER);
        Ok(serde_json::json!({
            "total_ms": state["total-time"],
            "downtime_ms": state["downtime"],
            "setup_ms": state["setup-time"],
            "bytes": state["ram"]["transferred"],
            "rounds": state["ram"]["dirty-sync-count"],
            "report": state,
            "stall": watch.stall(from, to),
        }))
    })();
    for c in [&mut src, &mut dst] {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

/// How long the guest runs before the migration starts, and after it ends
/// before the stall is read.
const WARMUP: Duration = Duration::from_millis(300);
const AFTER: Duration = Duration::from_millis(300);

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (m, v[0], v[v.len() - 1])
}

/// What to measure.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// idle (a halting guest, memory mostly untouched), idle-prefault (the
    /// same with every page present), dirtier, or all.
    #[arg(long, default_value = "all")]
    pub scenario: String,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Memory of the idle guest.
    #[arg(long, default_value = "8G")]
    pub memory: String,
    /// Memory of the prefaulted idle guest (prefaulting is slow on a nested
    /// host: 1 GiB takes seconds).
    #[arg(long, default_value = "1G")]
    pub prefault_memory: String,
    /// Working set the dirtier writes, MiB.
    #[arg(long, default_value_t = 64)]
    pub dirtier_mb: u64,
    /// The downtime budget given to both VMMs (QEMU's downtime-limit).
    #[arg(long, default_value_t = 10.0)]
    pub downtime_ms: f64,
    /// Track dirty pages with KVM's bitmap instead of the dirty ring.
    #[arg(long, conflicts_with = "dirty_ring")]
    pub dirty_bitmap: bool,
    /// The source's dirty ring, bytes per vCPU (`run --dirty-ring`).
    #[arg(long, value_name = "BYTES")]
    pub dirty_ring: Option<u32>,
    /// nfvisor's streams per migration (`migrate --connections`).
    #[arg(long, default_value_t = 1)]
    pub connections: u64,
    /// Migrate with a token (both ends prove it; every frame of the stream
    /// carries its tag), to measure what authentication costs.
    #[arg(long)]
    pub token: bool,
    /// Leave out the QEMU baseline.
    #[arg(long)]
    pub no_qemu: bool,
    /// One JSON document (every run's report, medians, ratios, the
    /// downtime's steps) instead of the text summary.
    #[arg(long)]
    pub json: bool,
}

fn summary(reports: &[serde_json::Value]) -> serde_json::Value {
    let field = |f: &dyn Fn(&serde_json::Value) -> Option<f64>| {
        let (m, lo, hi) = median(reports.iter().filter_map(f).collect());
        serde_json::json!({"median": m, "min": lo, "max": hi})
    };
    // nfvisor's downtime, step by step (ms after the pause), median of each
    let phases: serde_json::Map<String, serde_json::Value> = reports
        .first()
        .and_then(|r| r["report"]["downtime_phases"].as_object())
        .map(|first| {
            first
                .keys()
                .map(|k| {
                    let at = |r: &serde_json::Value| r["report"]["downtime_phases"][k].as_f64();
                    (
                        k.clone(),
                        serde_json::json!(median(reports.iter().filter_map(at).collect()).0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "total_ms": field(&|r| r["total_ms"].as_f64()),
        "downtime_ms": field(&|r| r["downtime_ms"].as_f64()),
        "rounds": field(&|r| r["rounds"].as_f64()),
        "tick_silence_ms": field(&|r| r["stall"]["tick_silence_ms"].as_f64()),
        "tsc_gap_ms": field(&|r| r["stall"]["tsc_gap_ms"].as_f64()),
        "downtime_phases_median": phases,
        "each": reports,
    })
}

pub fn run(o: &Options) -> Result<u8> {
    let exe = std::env::current_exe().context("locating the nfvisor binary")?;
    let mib = |s: &str| -> Result<u64> {
        Ok(crate::config::parse_size(s).with_context(|| format!("memory size {s:?}"))? >> 20)
    };
    let scenarios: Vec<Scenario> = [
        Scenario {
            name: "idle",
            guest: "latency-probe",
            memory_mib: mib(&o.memory)?,
            cmdline: "samples=10000000 period_us=1000".into(),
            prefault: false,
        },
        Scenario {
            // every page present (and zero): the zero scan carries it
            name: "idle-prefault",
            guest: "latency-probe",
            memory_mib: mib(&o.prefault_memory)?,
            cmdline: "samples=10000000 period_us=1000".into(),
            prefault: true,
        },
        Scenario {
            // a tick about every 5 ms of guest progress on this host
            name: "dirtier",
            guest: "dirtier",
            memory_mib: o.dirtier_mb + 64,
            cmdline: format!("mb={} passes=0 tick=256", o.dirtier_mb),
            prefault: false,
        },
    ]
    .into_iter()
    .filter(|s| o.scenario == "all" || o.scenario == s.name)
    .collect();
    if scenarios.is_empty() {
        bail!(
            "--scenario {:?}: use idle, idle-prefault, dirtier or all",
            o.scenario
        );
    }
    let mut out = serde_json::Map::new();
    for s in &scenarios {
        let (mut ours, mut qemu) = (Vec::new(), Vec::new());
        // interleaved, so drift on a shared host hits both alike
        for i in 0..o.runs {
            tracing::info!("{}: run {}/{}", s.name, i + 1, o.runs);
            for vmm in ["nfvisor", "qemu"] {
                if vmm == "qemu" && o.no_qemu {
                    continue;
                }
                let dir = std::env::temp_dir().join(format!(
                    "nfvisor-bench-mig-{}-{}-{vmm}-{i}",
                    std::process::id(),
                    s.name
                ));
                std::fs::create_dir_all(&dir)?;
                let watch = ConsoleWatch::new(&dir)?;
                let r = if vmm == "nfvisor" {
                    nfvisor_once(&exe, s, o, &dir, &watch)
                } else {
                    qemu_once(s, o, &dir, &watch)
                };
                drop(watch);
                let _ = std::fs::remove_dir_all(&dir);
                let r = r.with_context(|| format!("{} under {vmm}", s.name))?;
                if vmm == "nfvisor" {
                    &mut ours
                } else {
                    &mut qemu
                }
                .push(r);
            }
        }
        let (ours, qemu) = (summary(&ours), (!o.no_qemu).then(|| summary(&qemu)));
        let ratio = |k: &str| {
            qemu.as_ref().and_then(|q| {
                let (a, b) = (ours[k]["median"].as_f64()?, q[k]["median"].as_f64()?);
                (a > 0.0).then_some(b / a)
            })
        };
        let (total_x, down_x) = (ratio("total_ms"), ratio("downtime_ms"));
        if !o.json {
            let line = |who: &str, v: &serde_json::Value| {
                let f = |k: &str| v[k]["median"].as_f64().unwrap_or(f64::NAN);
                println!(
                    "{:<13} {who:<8} total {:8.1} ms  downtime {:7.2} ms  rounds {:3}  tick silence {:7.1} ms  TSC gap {:7.1} ms  (medians of {})",
                    s.name,
                    f("total_ms"),
                    f("downtime_ms"),
                    f("rounds"),
                    f("tick_silence_ms"),
                    f("tsc_gap_ms"),
                    o.runs
                );
            };
            line("nfvisor", &ours);
            println!(
                "{:<13} nfvisor  downtime steps, ms after the pause: {}",
                s.name,
                crate::report::downtime_steps(&ours["downtime_phases_median"])
            );
            if let Some(q) = &qemu {
                line("qemu", q);
                println!(
                    "{:<13} QEMU / nfvisor: total x{:.1}, downtime x{:.1}",
                    s.name,
                    total_x.unwrap_or(f64::NAN),
                    down_x.unwrap_or(f64::NAN)
                );
            }
        }
        out.insert(
            s.name.to_string(),
            serde_json::json!({
                "guest": format!("{} {} MiB {}{}", s.guest, s.memory_mib, s.cmdline, if s.prefault { " prefault" } else { "" }),
                "runs": o.runs,
                "downtime_budget_ms": o.downtime_ms,
                "nfvisor": ours,
                "qemu": qemu,
                "qemu_over_nfvisor": {"total": total_x, "downtime": down_x},
            }),
        );
    }
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::Value::Object(out))?
        );
    }
    Ok(0)
}
