//! `nfvisor bench latency` on the real /dev/kvm. Runs that pin a SCHED_FIFO
//! vCPU take a lock: one at a time.

mod common;
use common::*;
use std::sync::Mutex;
use std::time::Duration;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
const T: Duration = Duration::from_secs(300);

fn last_cpu() -> usize {
    *rt::online_cpus().unwrap().last().unwrap()
}

#[test]
fn each_metric_returns_its_samples_with_ordered_percentiles() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let r = nfvisor(
        &[
            "bench",
            "latency",
            "--samples",
            "300",
            "--blocks",
            "3",
            "--json",
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    let results = doc["results"].as_array().unwrap();
    let metrics: Vec<&str> = results
        .iter()
        .map(|m| m["metric"].as_str().unwrap())
        .collect();
    assert_eq!(metrics, ["timer", "irq", "preempt"]);
    for m in results {
        // the interrupt's host side is the injector: no host series
        let sides: &[&str] = if m["metric"] == "irq" {
            &["guest"]
        } else {
            &["guest", "host"]
        };
        for &side in sides {
            let s = &m[side];
            assert_eq!(s["samples"], 300, "{} {side}", m["metric"]);
            let v = |k: &str| s[k].as_f64().unwrap();
            assert!(
                v("min_us") <= v("p50_us")
                    && v("p50_us") <= v("p99_us")
                    && v("p99_us") <= v("p999_us")
                    && v("p999_us") <= v("max_us"),
                "{s}"
            );
        }
        assert!(!m["verdicts"].as_array().unwrap().is_empty());
    }
    // every interrupt sent was received and acknowledged (the run fails otherwise)
    assert!(results[1]["tsc_offset_from"].as_str().is_some());
    assert!(doc["environment"]["note"].as_str().unwrap().len() > 10);
}

/// Spins on `cpu` at SCHED_FIFO 50 for `spin` after `delay`.
fn inject(cpu: usize, delay: Duration, spin: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        rt::pin_current_thread(&[cpu]).unwrap();
        rt::set_current_thread_fifo(50).unwrap();
        let t = std::time::Instant::now();
        while t.elapsed() < spin {
            std::hint::spin_loop();
        }
    })
}

fn run_with_injection(metric: &str, samples: &str, spin: Duration) -> serde_json::Value {
    let cpu = last_cpu();
    let mut vm = Running::start(&[
        "bench",
        "latency",
        "--metric",
        metric,
        "--samples",
        samples,
        "--blocks",
        "1",
        "--no-host-baseline",
        "--cpus",
        &cpu.to_string(),
        "--rt-priority",
        "10",
        "--json",
    ]);
    vm.wait_for("vCPU 0 runs on host thread");
    inject(cpu, Duration::from_millis(300), spin)
        .join()
        .unwrap();
    let out = vm.finish(T);
    assert_eq!(out.code, 0, "{}", out.stderr);
    json(&out)
}

#[test]
fn an_injected_preemption_shows_as_a_gap_of_its_length() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let spin = Duration::from_millis(30);
    let doc = run_with_injection("preempt", "3000", spin);
    let longest = doc["results"][0]["guest_gaps"]["max_us"].as_f64().unwrap();
    assert!(
        longest >= 29_000.0,
        "a 30 ms preemption, longest gap seen {longest} us"
    );
}

#[test]
fn an_injected_delay_shows_in_the_timer_max() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let doc = run_with_injection("timer", "5000", Duration::from_millis(30));
    let max = doc["results"][0]["guest"]["max_us"].as_f64().unwrap();
    assert!(
        max >= 25_000.0,
        "a 30 ms preemption while waiting for the timer, max seen {max} us"
    );
}

#[test]
fn histogram_parses_back_and_plot_is_svg() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("latency-out");
    let (hist, plot) = (dir.join("h.txt"), dir.join("p.svg"));
    let r = nfvisor(
        &[
            "bench",
            "latency",
            "--metric",
            "timer",
            "--samples",
            "200",
            "--json",
            "--histogram",
            hist.to_str().unwrap(),
            "--plot",
            plot.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    let parsed =
        bench::latency::parse_histogram_file(&std::fs::read_to_string(&hist).unwrap()).unwrap();
    for (col, side) in [("timer-guest", "guest"), ("timer-host", "host")] {
        let want: std::collections::BTreeMap<u64, u64> = doc["results"][0][side]["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b[0].as_u64().unwrap(), b[1].as_u64().unwrap()))
            .collect();
        assert_eq!(parsed[col], want, "{col}");
        assert_eq!(
            want.values().sum::<u64>() + doc["results"][0][side]["overflow"].as_u64().unwrap(),
            200
        );
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "not an SVG"
    );
    assert!(svg.contains("timer-guest") && svg.contains("timer-host"));
    // only the two outputs: no temporary files left
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
}

#[test]
fn bad_input_is_refused_and_leaves_no_files() {
    for (args, needle) in [
        (vec!["--period-us", "0"], "--period-us 0"),
        (vec!["--samples", "0"], "--samples 0"),
        (vec!["--period-us", "5"], "cannot honour a period"),
        (vec!["--metric", "jitter"], "--metric \"jitter\""),
        (vec!["--duration", "10"], "--duration"),
    ] {
        let mut a = vec!["bench", "latency"];
        a.extend(args.iter());
        let r = nfvisor(&a, T);
        assert_ne!(r.code, 0, "{args:?}");
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
    }
    let dir = scratch("latency-bad");
    let hist = dir.join("h.txt");
    let r = nfvisor(
        &[
            "bench",
            "latency",
            "--samples",
            "10",
            "--histogram",
            hist.to_str().unwrap(),
            "--plot",
            "/nonexistent/dir/p.svg",
        ],
        T,
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("/nonexistent/dir/p.svg"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "a partial or temporary file was left behind"
    );
}
