//! `nfvisor bench switch`: DPDK's "PVP with virtio-user" loop through
//! nfvisor's switch, beside the same loop through (a) testpmd's own vhost
//! PMD in io-forward mode (DPDK's vhost library doing no switching: the
//! limit) and (b) OVS-DPDK (NORMAL action, two dpdkvhostuserclient
//! ports), in the same run, on the same two CPUs: each switch polls on
//! CPU 0, the frontend forwards on CPU 1. The frontend is testpmd with two
//! virtio-user ports in `mac` forwarding, each port's peer the other's MAC
//! (so a learning switch learns both ends), one burst sent first. Frames a
//! second each way: what the frontend received, over the time it
//! forwarded; each side's busy-poll fraction says which side saturates.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bench::testpmd::Testpmd;

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Seconds each loop forwards.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Frame sizes (bytes, testpmd's --txpkts), comma-separated.
    #[arg(long, default_value = "64")]
    pub sizes: String,
    /// Runs of each loop, alternating.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Baselines: testpmd (its vhost PMD, io-forward), ovs (OVS-DPDK);
    /// one not installed is skipped, and said so.
    #[arg(long, default_value = "testpmd,ovs")]
    pub peers: String,
    /// Round trips timed for latency, per frame size and path (0: none).
    #[arg(long, default_value_t = 20000)]
    pub latency_count: u32,
    #[arg(long)]
    pub json: bool,
}

/// One loop's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoopFigures {
    pub through: String,
    pub size: u16,
    pub run: u32,
    pub seconds: f64,
    /// Frames a second each way (the frontend's two ports' receive counts).
    pub mpps: [f64; 2],
    /// The frontend's forwarding core: the fraction of its time spent on
    /// bursts that carried frames (testpmd's --record-core-cycles).
    pub frontend_busy: Option<f64>,
    /// The switch's PMD: the fraction of its polling time spent in rounds
    /// that moved frames (nfvisor's switch only).
    pub switch_busy: Option<f64>,
}

fn frontend(
    dir: &Path,
    name: &str,
    a: &Path,
    b: &Path,
    size: u16,
    server: bool,
) -> Result<Testpmd> {
    Testpmd::virtio_user_mac_loop(
        dir,
        name,
        a,
        b,
        server,
        &["--record-core-cycles".into(), format!("--txpkts={size}")],
    )
    .map_err(|e| anyhow!("the virtio-user frontend: {e}"))
}

/// What one loop measured: the seconds, frames a second each way, the
/// frontend's busy fraction, and what the caller read at the start and
/// the end of the window.
type Measured<T> = (f64, [f64; 2], Option<f64>, [T; 2]);

/// Runs the frontend's loop for `seconds` once it forwards (`during` is
/// called at the start and the end of the window).
fn measure<T>(fe: Testpmd, seconds: u64, mut during: impl FnMut() -> T) -> Result<Measured<T>> {
    fe.wait_forwarding().map_err(|e| anyhow!("{e}"))?;
    let t0 = Instant::now();
    let first = during();
    std::thread::sleep(Duration::from_secs(seconds));
    let last = during();
    let log_path = fe.log_path();
    let stats = fe.finish_ports(2).map_err(|e| anyhow!("{e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    Ok((
        secs,
        [
            stats[0].0 as f64 / secs / 1e6,
            stats[1].0 as f64 / secs / 1e6,
        ],
        busy_fraction(&log, secs),
        [first, last],
    ))
}

/// Round-trip times through one path, one frame in flight: a frontend of
/// the bench's own on each port, the first sends, the second sends each
/// frame back as it arrives.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyFigures {
    pub through: String,
    pub size: u16,
    pub round_trips: u64,
    /// Frames that did not come back within 100 ms (dropped).
    pub lost: u64,
    pub rtt_us_p50: f64,
    pub rtt_us_p99: f64,
    pub rtt_us_p999: f64,
    pub rtt_us_max: f64,
}

/// Times `count` round trips between frontends on `a` and `b` (after a
/// few untimed ones that let a learning switch learn both addresses), the
/// timing thread on `cpu`.
fn round_trips(
    through: &str,
    a: &Path,
    b: &Path,
    size: u16,
    count: u32,
    cpu: usize,
) -> Result<LatencyFigures> {
    use bench::vhost_frontend::Frontend;
    let _ = rt::pin_current_thread(&[cpu]);
    let fa = Frontend::connect(a).map_err(|e| anyhow!("{e}"))?;
    let fb = Frontend::connect(b).map_err(|e| anyhow!("{e}"))?;
    time_round_trips(through, fa, fb, size, count)
}

/// Times `count` round trips between two set-up frontends.
fn time_round_trips(
    through: &str,
    mut fa: bench::vhost_frontend::Frontend,
    mut fb: bench::vhost_frontend::Frontend,
    size: u16,
    count: u32,
) -> Result<LatencyFigures> {
    use bench::vhost_frontend::{Frontend, HDR};
    let frame = |dst: u8, src: u8| {
        let mut f = vec![0u8; HDR + size as usize];
        f[HDR..HDR + 6].copy_from_slice(&[0x02, 0, 0, 0, 0, dst]);
        f[HDR + 6..HDR + 12].copy_from_slice(&[0x02, 0, 0, 0, 0, src]);
        f[HDR + 12..HDR + 14].copy_from_slice(&0x88b5u16.to_be_bytes());
        f
    };
    let (to_b, to_a) = (frame(0x0b, 0x0a), frame(0x0a, 0x0b));
    let wait = |f: &mut Frontend| {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(100) {
            if f.poll().is_some() {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    };
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("a histogram");
    let mut lost = 0u64;
    // (untimed: both addresses learnt, the rings mapped)
    let warm = 200u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..warm + count {
        anyhow::ensure!(
            Instant::now() < deadline,
            "latency through {through}: {count} round trips took over 60 s"
        );
        let t0 = Instant::now();
        if !fa.send(&to_b) || !wait(&mut fb) || !fb.send(&to_a) || !wait(&mut fa) {
            if i >= warm {
                lost += 1;
            }
            // (whatever is still in flight arrives or is gone by now)
            while fa.poll().is_some() || fb.poll().is_some() {}
            continue;
        }
        if i >= warm {
            let _ = hist.record(t0.elapsed().as_nanos() as u64);
        }
    }
    anyhow::ensure!(
        !hist.is_empty(),
        "latency through {through}: no frame came back ({lost} lost)"
    );
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(LatencyFigures {
        through: through.into(),
        size,
        round_trips: hist.len(),
        lost,
        rtt_us_p50: us(0.5),
        rtt_us_p99: us(0.99),
        rtt_us_p999: us(0.999),
        rtt_us_max: hist.max() as f64 / 1000.0,
    })
}

/// Latency through nfvisor's switch (PMD on CPU 0, the frontends on 1).
fn latency_switch(dir: &Path, size: u16, count: u32) -> Result<LatencyFigures> {
    let (mut sw, sw_dir) = start_switch(dir, &format!("l{size}"))?;
    let r = round_trips(
        "nfvisor-switch",
        &sw_dir.join("a.sock"),
        &sw_dir.join("b.sock"),
        size,
        count,
        1,
    );
    sw.stop();
    r
}

/// Latency through OVS-DPDK (its PMD on CPU 0): the frontends listen,
/// its dpdkvhostuserclient ports connect to them.
fn latency_ovs(dir: &Path, size: u16, count: u32) -> Result<LatencyFigures> {
    use bench::vhost_frontend::Frontend;
    let ovs_dir = dir.join(format!("lovs{size}"));
    std::fs::create_dir_all(&ovs_dir)?;
    let (a, b) = (ovs_dir.join("a.sock"), ovs_dir.join("b.sock"));
    let la = std::os::unix::net::UnixListener::bind(&a).with_context(|| a.display().to_string())?;
    let lb = std::os::unix::net::UnixListener::bind(&b).with_context(|| b.display().to_string())?;
    let ovs = bench::ovs::Ovs::start(
        &ovs_dir,
        &format!("nfv-bench-lovs{size}"),
        0,
        1,
        &[a.clone(), b.clone()],
    )?;
    let limit = Duration::from_secs(30);
    let _ = rt::pin_current_thread(&[1]);
    let r = Frontend::accept(&la, &a, limit)
        .and_then(|fa| Ok((fa, Frontend::accept(&lb, &b, limit)?)))
        .map_err(|e| anyhow!("{e}"))
        .and_then(|(fa, fb)| time_round_trips("ovs-dpdk", fa, fb, size, count));
    drop(ovs);
    r
}

/// Latency through testpmd's vhost PMD in io-forward mode (forwarding on
/// CPU 0, the frontends on 1).
fn latency_testpmd(dir: &Path, size: u16, count: u32) -> Result<LatencyFigures> {
    let (mut vhost, a, b) = vhost_io(dir, &format!("l{size}"))?;
    let waited = vhost.wait_forwarding().map_err(|e| anyhow!("{e}"));
    let r = waited.and_then(|()| round_trips("testpmd-vhost-io", &a, &b, size, count, 1));
    vhost.kill();
    r
}

/// nfvisor's switch with ports a and b, its PMD on CPU 0: (the switch,
/// its socket directory).
fn start_switch(dir: &Path, tag: &str) -> Result<(switch::Switch, PathBuf)> {
    let sw_dir = dir.join(format!("sw{tag}"));
    std::fs::create_dir_all(&sw_dir)?;
    let sw = switch::Switch::start(switch::SwitchConfig {
        socket_dir: sw_dir.clone(),
        ports: switch::parse_ports("a,b")?,
        cpus: vec![0],
        rt_priority: None,
        ageing: Duration::from_secs(300),
    })?;
    Ok((sw, sw_dir))
}

/// testpmd with two vhost ports in io-forward mode, forwarding on CPU 0,
/// its sockets there: (testpmd, socket a, socket b).
fn vhost_io(dir: &Path, tag: &str) -> Result<(Testpmd, PathBuf, PathBuf)> {
    let vh_dir = dir.join(format!("vh{tag}"));
    std::fs::create_dir_all(&vh_dir)?;
    let (a, b) = (vh_dir.join("a.sock"), vh_dir.join("b.sock"));
    let vhost = Testpmd::start_with(
        dir,
        &format!("nfv-bench-sw-vh{tag}"),
        &["--main-lcore".into(), "1".into()],
        &[
            format!("net_vhost0,iface={},queues=1", a.display()),
            format!("net_vhost1,iface={},queues=1", b.display()),
        ],
        &["--forward-mode=io".into()],
    )
    .map_err(|e| anyhow!("testpmd's vhost PMD: {e}"))?;
    // (its sockets, then a frontend connects to them)
    wait_paths(&[a.clone(), b.clone()], "testpmd's vhost sockets")?;
    Ok((vhost, a, b))
}

/// testpmd's "(total cycles=N / ...) at M MHz": the cycles it spent on
/// bursts with frames, over the cycles in `secs`.
fn busy_fraction(log: &str, secs: f64) -> Option<f64> {
    let at = log.rfind("total cycles=")?;
    let rest = &log[at + "total cycles=".len()..];
    let cycles: f64 = rest.split_whitespace().next()?.parse().ok()?;
    let mhz: f64 = rest
        .split(" at ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((cycles / (mhz * 1e6 * secs)).min(1.0))
}

pub fn run(o: &Options) -> Result<u8> {
    anyhow::ensure!(
        o.seconds > 0 && o.runs > 0,
        "--seconds and --runs: at least 1"
    );
    let sizes: Vec<u16> = o
        .sizes
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| (64..=9000).contains(n))
                .ok_or_else(|| {
                    anyhow!(
                        "--sizes {:?}: {s:?} is not a frame size (64 to 9000)",
                        o.sizes
                    )
                })
        })
        .collect::<Result<_>>()?;
    let mut peers = Vec::new();
    for p in o.peers.split(',').filter(|p| !p.is_empty()) {
        anyhow::ensure!(
            matches!(p, "testpmd" | "ovs"),
            "--peers {:?}: {p:?} is not one of testpmd, ovs",
            o.peers
        );
        peers.push(p);
    }
    let dir = std::env::temp_dir().join(format!("nfvisor-bench-switch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut results = Vec::new();
    let mut latencies = Vec::new();
    let mut skipped = serde_json::Map::new();
    for &size in &sizes {
        if o.latency_count > 0 {
            latencies.push(latency_switch(&dir, size, o.latency_count)?);
            if peers.contains(&"testpmd") {
                latencies.push(latency_testpmd(&dir, size, o.latency_count)?);
            }
            if peers.contains(&"ovs") {
                latencies.extend(unless_missing(&mut skipped, || {
                    latency_ovs(&dir, size, o.latency_count)
                })?);
            }
        }
        for run in 0..o.runs {
            let tag = format!("{size}-{run}");
            results.push(through_switch(&dir, &tag, size, o.seconds, run)?);
            if peers.contains(&"testpmd") {
                results.push(through_testpmd(&dir, &tag, size, o.seconds, run)?);
            }
            if peers.contains(&"ovs") {
                results.extend(unless_missing(&mut skipped, || {
                    through_ovs(&dir, &tag, size, o.seconds, run)
                })?);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let median = |through: &str, size: u16| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|r| r.through == through && r.size == size)
            .map(|r| (r.mpps[0] + r.mpps[1]) / 2.0)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let mut summary = Vec::new();
    for &size in &sizes {
        let sw = median("nfvisor-switch", size).unwrap_or(0.0);
        let vh = median("testpmd-vhost-io", size);
        let ovs = median("ovs-dpdk", size);
        summary.push(serde_json::json!({
            "size": size,
            "median_mpps_each_way": {"nfvisor-switch": sw, "testpmd-vhost-io": vh, "ovs-dpdk": ovs},
            "switch_over_vhost_io": vh.map(|v| sw / v.max(1e-12)),
            "switch_over_ovs": ovs.map(|v| sw / v.max(1e-12)),
        }));
    }
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "results": results,
                "latency": latencies,
                "summary": summary,
                "skipped": skipped,
            }))?
        );
    } else {
        let pct = |f: Option<f64>| {
            f.map(|f| format!("{:.0}%", f * 100.0))
                .unwrap_or("-".into())
        };
        for r in &results {
            println!(
                "{:<18} {:>5} B run {}: {:.3} / {:.3} Mpps each way over {:.1} s (busy: frontend {}, switch {})",
                r.through, r.size, r.run, r.mpps[0], r.mpps[1], r.seconds,
                pct(r.frontend_busy), pct(r.switch_busy)
            );
        }
        for s in &summary {
            println!(
                "median each way, {} B: {}",
                s["size"], s["median_mpps_each_way"]
            );
        }
        for l in &latencies {
            println!(
                "{:<18} {:>5} B round trip: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us ({} timed, {} lost)",
                l.through, l.size, l.rtt_us_p50, l.rtt_us_p99, l.rtt_us_p999, l.rtt_us_max,
                l.round_trips, l.lost
            );
        }
        for (peer, why) in &skipped {
            println!("{peer}: skipped: {}", why.as_str().unwrap_or(""));
        }
    }
    Ok(0)
}

/// An OVS-DPDK measurement, unless OVS-DPDK is not installed: then none,
/// and `skipped` says why (once; it is not tried again).
fn unless_missing<T>(
    skipped: &mut serde_json::Map<String, serde_json::Value>,
    measure: impl FnOnce() -> Result<T>,
) -> Result<Option<T>> {
    if skipped.contains_key("ovs") {
        return Ok(None);
    }
    match measure() {
        Ok(r) => Ok(Some(r)),
        Err(e)
            if e.downcast_ref::<bench::ovs::OvsError>()
                .is_some_and(|e| matches!(e, bench::ovs::OvsError::Missing)) =>
        {
            skipped.insert("ovs".into(), e.to_string().into());
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// nfvisor's switch, its PMD on CPU 0 (testpmd forwards on CPU 1).
fn through_switch(dir: &Path, tag: &str, size: u16, seconds: u64, run: u32) -> Result<LoopFigures> {
    let (mut sw, sw_dir) = start_switch(dir, tag)?;
    let fe = frontend(
        dir,
        &format!("nfv-bench-sw-fe{tag}"),
        &sw_dir.join("a.sock"),
        &sw_dir.join("b.sock"),
        size,
        false,
    )?;
    let state = sw.state.clone();
    let (secs, mpps, fe_busy, rounds) =
        measure(fe, seconds, || state.pmd_time()[0]).context("through nfvisor's switch")?;
    sw.stop();
    let (r, b) = (rounds[1].0 - rounds[0].0, rounds[1].1 - rounds[0].1);
    Ok(LoopFigures {
        through: "nfvisor-switch".into(),
        size,
        run,
        seconds: secs,
        mpps,
        frontend_busy: fe_busy,
        switch_busy: (r > 0).then(|| b as f64 / r as f64),
    })
}

/// testpmd's vhost PMD in io-forward mode, forwarding on CPU 0.
fn through_testpmd(
    dir: &Path,
    tag: &str,
    size: u16,
    seconds: u64,
    run: u32,
) -> Result<LoopFigures> {
    let (mut vhost, a, b) = vhost_io(dir, tag)?;
    let fe = frontend(dir, &format!("nfv-bench-sw-fv{tag}"), &a, &b, size, false)?;
    let measured = measure(fe, seconds, || ()).context("through testpmd's vhost PMD");
    vhost.kill();
    let (secs, mpps, fe_busy, _) = measured?;
    Ok(LoopFigures {
        through: "testpmd-vhost-io".into(),
        size,
        run,
        seconds: secs,
        mpps,
        frontend_busy: fe_busy,
        switch_busy: None,
    })
}

/// OVS-DPDK, its PMD on CPU 0; the frontend's ports are the servers.
fn through_ovs(dir: &Path, tag: &str, size: u16, seconds: u64, run: u32) -> Result<LoopFigures> {
    let ovs_dir = dir.join(format!("ovs{tag}"));
    std::fs::create_dir_all(&ovs_dir)?;
    let (a, b) = (ovs_dir.join("a.sock"), ovs_dir.join("b.sock"));
    // (server mode: the frontend waits for OVS to connect)
    let fe = frontend(dir, &format!("nfv-bench-sw-fo{tag}"), &a, &b, size, true)?;
    // (it makes its second socket once the first is connected)
    wait_paths(
        std::slice::from_ref(&a),
        "the frontend's first server socket",
    )?;
    let ovs = bench::ovs::Ovs::start(&ovs_dir, &format!("nfv-bench-ovs{tag}"), 0, 1, &[a, b])?;
    let measured = measure(fe, seconds, || ()).context("through OVS-DPDK");
    let fdb = ovs.fdb();
    drop(ovs);
    let (secs, mpps, fe_busy, _) = measured?;
    tracing::debug!("OVS-DPDK's MAC table: {fdb}");
    Ok(LoopFigures {
        through: "ovs-dpdk".into(),
        size,
        run,
        seconds: secs,
        mpps,
        frontend_busy: fe_busy,
        switch_busy: None,
    })
}

fn wait_paths(paths: &[PathBuf], what: &str) -> Result<()> {
    let t0 = Instant::now();
    while !paths.iter().all(|p| p.exists()) {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "{what} did not appear"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
