//! `nfvisor bench migration`: both ends on this host, driven through the
//! product's own commands (`receive`, `run --control-socket`, `migrate`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn spawn(exe: &Path, args: &[&str]) -> Result<Child> {
    Command::new(exe)
        .args(args)
        .env("NFVISOR_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))
}

fn wait_for(path: &Path) -> Result<()> {
    let t = Instant::now();
    while !path.exists() {
        // prefaulting a large guest takes a while on a nested host
        if t.elapsed() > Duration::from_secs(300) {
            bail!("{} did not appear", path.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// One migration of a guest started with `guest_args`; the migration report.
pub fn once(
    exe: &Path,
    guest_args: &[&str],
    downtime_ms: f64,
    timeout_s: f64,
    warmup: Duration,
) -> Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!(
        "nfvisor-bench-mig-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    let (inbound, control) = (dir.join("in.sock"), dir.join("src.sock"));
    let listen = format!("unix:{}", inbound.display());
    let mut dst = spawn(
        exe,
        &["receive", "--listen", &listen, "--serial", "/dev/null"],
    )?;
    let mut args = vec![
        "run",
        "--serial",
        "/dev/null",
        "--control-socket",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(guest_args);
    let mut src = spawn(exe, &args)?;
    let result = (|| {
        wait_for(&inbound)?;
        wait_for(&control)?;
        std::thread::sleep(warmup);
        let req = serde_json::json!({"v": 1, "cmd": "migrate", "to": listen, "downtime_ms": downtime_ms, "timeout_s": timeout_s, "on_timeout": "force"});
        let reply = vmm::control::request(&control, req).map_err(anyhow::Error::msg)?;
        if reply["ok"] != true {
            bail!("migration failed: {}", reply["error"]);
        }
        Ok(reply["migration"].clone())
    })();
    let _ = src.kill();
    let _ = dst.kill();
    let _ = src.wait();
    let _ = dst.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
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
    #[arg(long, default_value_t = 10.0)]
    pub downtime_ms: f64,
    /// Track dirty pages with KVM's bitmap instead of the dirty ring.
    #[arg(long)]
    pub dirty_bitmap: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(o: &Options) -> Result<u8> {
    let Options {
        scenario,
        runs,
        memory,
        prefault_memory,
        dirtier_mb,
        downtime_ms,
        dirty_bitmap,
        json,
    } = o;
    let (runs, dirtier_mb, downtime_ms, dirty_bitmap, json) =
        (*runs, *dirtier_mb, *downtime_ms, *dirty_bitmap, *json);
    let exe = std::env::current_exe().context("locating the nfvisor binary")?;
    let dirtier_cmdline = format!("mb={dirtier_mb} passes=0");
    let dirtier_mem = format!("{}M", dirtier_mb + 64);
    let scenarios: Vec<(&str, Vec<&str>)> = [
        (
            "idle",
            vec![
                "--memory",
                memory,
                "--cmdline",
                "samples=10000000 period_us=1000",
            ],
        ),
        (
            // every page present (and zero): the zero scan carries it
            "idle-prefault",
            vec![
                "--memory",
                prefault_memory,
                "--prefault",
                "--cmdline",
                "samples=10000000 period_us=1000",
            ],
        ),
        (
            "dirtier",
            vec![
                "--guest",
                "dirtier",
                "--memory",
                &dirtier_mem,
                "--cmdline",
                &dirtier_cmdline,
            ],
        ),
    ]
    .into_iter()
    .filter(|(name, _)| scenario == "all" || scenario == *name)
    .collect();
    if scenarios.is_empty() {
        bail!("--scenario {scenario:?}: use idle, idle-prefault, dirtier or all");
    }
    let mut out = serde_json::Map::new();
    for (name, mut args) in scenarios {
        if dirty_bitmap {
            args.push("--dirty-bitmap");
        }
        let mut reports = Vec::new();
        for i in 0..runs {
            tracing::info!("{name}: run {}/{runs}", i + 1);
            reports.push(once(
                &exe,
                &args,
                downtime_ms,
                5.0,
                Duration::from_millis(300),
            )?);
        }
        let field = |k: &str| {
            reports
                .iter()
                .map(|r| r[k].as_f64().unwrap_or(0.0))
                .collect::<Vec<_>>()
        };
        let (total, tmin, tmax) = median(field("total_ms"));
        let (down, dmin, dmax) = median(field("downtime_ms"));
        let (rounds, _, _) = median(field("rounds"));
        let summary = serde_json::json!({
            "guest": args.join(" "),
            "runs": runs,
            "total_ms": {"median": total, "min": tmin, "max": tmax},
            "downtime_ms": {"median": down, "min": dmin, "max": dmax},
            "rounds_median": rounds,
            "each": reports,
        });
        if !json {
            println!(
                "{name:<8} total median {total:.1} ms ({tmin:.1}..{tmax:.1}), downtime median {down:.2} ms ({dmin:.2}..{dmax:.2}), rounds {rounds}, {runs} runs: {}",
                args.join(" ")
            );
        }
        out.insert(name.to_string(), summary);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::Value::Object(out))?
        );
    }
    Ok(0)
}
