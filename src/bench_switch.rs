//! `nfvisor bench switch`: DPDK's "PVP with virtio-user" loop through
//! nfvisor's switch, beside the same loop through testpmd's own vhost PMD
//! in io-forward mode (DPDK's vhost library doing no switching: the
//! limit), in the same run, on the same two CPUs. The frontend is testpmd
//! with two virtio-user ports in `mac` forwarding, each port's peer the
//! other's MAC (so the switch learns both ends), one burst sent first.
//! Frames a second each way: what the frontend received, over the time it
//! forwarded. OVS-DPDK is not run (not installed here).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bench::testpmd::Testpmd;

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Seconds each loop forwards.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Frame size (bytes, testpmd's --txpkts).
    #[arg(long, default_value_t = 64)]
    pub size: u16,
    /// Runs of each loop, alternating.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    #[arg(long)]
    pub json: bool,
}

/// One loop's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoopFigures {
    pub through: String,
    pub run: u32,
    pub seconds: f64,
    /// Frames a second each way (the frontend's two ports' receive counts).
    pub mpps: [f64; 2],
}

fn frontend(dir: &Path, run: u32, a: &Path, b: &Path, size: u16, server: bool) -> Result<Testpmd> {
    let s = if server { ",server=1" } else { "" };
    Testpmd::start_with(
        dir,
        &format!("nfv-bench-sw-fe{run}"),
        &[],
        &[
            format!(
                "net_virtio_user0,path={}{s},mac=02:00:00:00:00:0a",
                a.display()
            ),
            format!(
                "net_virtio_user1,path={}{s},mac=02:00:00:00:00:0b",
                b.display()
            ),
        ],
        &[
            "--forward-mode=mac".into(),
            "--eth-peer=0,02:00:00:00:00:0b".into(),
            "--eth-peer=1,02:00:00:00:00:0a".into(),
            "--tx-first".into(),
            format!("--txpkts={size}"),
        ],
    )
    .map_err(|e| anyhow!("the virtio-user frontend: {e}"))
}

/// Runs the frontend's loop for `seconds` once it forwards: frames a
/// second each way.
fn measure(fe: Testpmd, seconds: u64) -> Result<(f64, [f64; 2])> {
    fe.wait_forwarding().map_err(|e| anyhow!("{e}"))?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let stats = fe.finish_ports(2).map_err(|e| anyhow!("{e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    Ok((
        secs,
        [
            stats[0].0 as f64 / secs / 1e6,
            stats[1].0 as f64 / secs / 1e6,
        ],
    ))
}

pub fn run(o: &Options) -> Result<u8> {
    anyhow::ensure!(
        o.seconds > 0 && o.runs > 0,
        "--seconds and --runs: at least 1"
    );
    let dir = std::env::temp_dir().join(format!("nfvisor-bench-switch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut results = Vec::new();
    for run in 0..o.runs {
        // nfvisor's switch, its PMD on CPU 0 (testpmd forwards on CPU 1)
        let sw_dir = dir.join(format!("sw{run}"));
        std::fs::create_dir_all(&sw_dir)?;
        let mut sw = switch::Switch::start(switch::SwitchConfig {
            socket_dir: sw_dir.clone(),
            ports: switch::parse_ports("a,b")?,
            cpus: vec![0],
            rt_priority: None,
            ageing: Duration::from_secs(300),
        })?;
        let fe = frontend(
            &dir,
            run,
            &sw_dir.join("a.sock"),
            &sw_dir.join("b.sock"),
            o.size,
            false,
        )?;
        let (secs, mpps) = measure(fe, o.seconds).context("through nfvisor's switch")?;
        sw.stop();
        results.push(LoopFigures {
            through: "nfvisor-switch".into(),
            run,
            seconds: secs,
            mpps,
        });
        // testpmd's vhost PMD in io-forward mode, forwarding on CPU 0
        let vh_dir = dir.join(format!("vh{run}"));
        std::fs::create_dir_all(&vh_dir)?;
        let (a, b) = (vh_dir.join("a.sock"), vh_dir.join("b.sock"));
        let mut vhost = Testpmd::start_with(
            &dir,
            &format!("nfv-bench-sw-vh{run}"),
            &["--main-lcore".into(), "1".into()],
            &[
                format!("net_vhost0,iface={},queues=1", a.display()),
                format!("net_vhost1,iface={},queues=1", b.display()),
            ],
            &["--forward-mode=io".into()],
        )
        .map_err(|e| anyhow!("testpmd's vhost PMD: {e}"))?;
        // (its sockets, then the frontend connects to them)
        let t0 = Instant::now();
        while !(a.exists() && b.exists()) {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "testpmd's vhost sockets did not appear"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let fe = frontend(&dir, run + 100, &a, &b, o.size, false)?;
        let measured = measure(fe, o.seconds).context("through testpmd's vhost PMD");
        vhost.kill();
        let (secs, mpps) = measured?;
        results.push(LoopFigures {
            through: "testpmd-vhost-io".into(),
            run,
            seconds: secs,
            mpps,
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    let median = |through: &str| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|r| r.through == through)
            .map(|r| (r.mpps[0] + r.mpps[1]) / 2.0)
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (sw, vh) = (median("nfvisor-switch"), median("testpmd-vhost-io"));
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "size": o.size,
                "results": results,
                "median_mpps_each_way": {"nfvisor-switch": sw, "testpmd-vhost-io": vh},
                "switch_over_vhost_io": sw / vh.max(1e-12),
            }))?
        );
    } else {
        for r in &results {
            println!(
                "{:<18} run {}: {:.3} / {:.3} Mpps each way over {:.1} s",
                r.through, r.run, r.mpps[0], r.mpps[1], r.seconds
            );
        }
        println!(
            "median each way: nfvisor switch {sw:.3} Mpps, testpmd vhost io-forward {vh:.3} Mpps (x{:.2})",
            sw / vh.max(1e-12)
        );
    }
    Ok(0)
}
