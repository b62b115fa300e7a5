//! `nfvisor-fuzz TARGET [--seconds N] [--seed S] [--max-len B] [--hang-s H]
//! [--keep K] [--replay FILE]`:
//! runs a target on generated inputs for N seconds; a panicking input is
//! saved under fuzz/seeds/TARGET/crash-* and counted, an input still
//! running after H seconds (10) is saved as hang-* and ends the run.
//! Prints one JSON line.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every depth counter the targets keep, summed.
fn depth() -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    use virtio::fuzzing as f;
    [
        &f::BLK_HANDLED,
        &f::NET_RX,
        &f::NET_TX,
        &f::RNG_REQUESTS,
        &f::PCI_ACTIVATED,
        &fuzzer::DEPTH[0],
        &fuzzer::DEPTH[1],
        &switch::fuzzing::RINGS_MAPPED,
        &switch::fuzzing::CHAINS_WALKED,
    ]
    .iter()
    .map(|c| c.load(Relaxed))
    .sum()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first() else {
        eprintln!(
            "usage: nfvisor-fuzz TARGET [--seconds N] [--seed S] [--max-len B]; targets: {}",
            fuzzer::TARGETS
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::process::exit(2);
    };
    let Some(target) = fuzzer::find(name) else {
        eprintln!("no target {name:?}");
        std::process::exit(2);
    };
    let opt = |flag: &str, default: u64| -> u64 {
        args.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| {
                w[1].parse().unwrap_or_else(|_| {
                    eprintln!("{flag} {:?} is not a number", w[1]);
                    std::process::exit(2)
                })
            })
            .unwrap_or(default)
    };
    let seconds = opt("--seconds", 60);
    let seed = opt("--seed", 1);
    let max_len = opt("--max-len", 4096) as usize;
    let root = std::env::current_dir().expect("the working directory");
    let corpus: Vec<Vec<u8>> = fuzzer::corpus(&root, name)
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    // --replay FILE: that one input, its panic shown (a finding's check)
    if let Some(w) = args.windows(2).find(|w| w[0] == "--replay") {
        let input = std::fs::read(&w[1]).unwrap_or_else(|e| {
            eprintln!("{}: {e}", w[1]);
            std::process::exit(2)
        });
        let t = Instant::now();
        target(&input);
        println!("{name}: {} ran in {:?}", w[1], t.elapsed());
        return;
    }
    // a panic's message goes to stderr once, not once per input
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = fuzzer::Rng::new(seed);
    let until = Instant::now() + Duration::from_secs(seconds);
    let (mut execs, mut crashes, mut slow) = (0u64, 0u64, 0u64);
    // a hang is a finding too: an input still running after --hang-s
    // seconds is saved as hang-* and the run ends
    let hang_s = opt("--hang-s", 10);
    let current: Arc<Mutex<(Instant, Vec<u8>, u64)>> =
        Arc::new(Mutex::new((Instant::now(), Vec::new(), 0)));
    {
        let current = current.clone();
        let dir = root.join(fuzzer::CORPUS).join(name);
        let name = name.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let c = current.lock().unwrap_or_else(|e| e.into_inner());
            if c.0.elapsed() > Duration::from_secs(hang_s) {
                let _ = std::fs::create_dir_all(&dir);
                let path = dir.join(format!("hang-{seed}-{}", c.2));
                let _ = std::fs::write(&path, &c.1);
                eprintln!(
                    "{name}: an input ran over {hang_s} s; it is {}",
                    path.display()
                );
                std::process::exit(3);
            }
        });
    }
    // --keep K: up to K inputs that took the target deeper than any before
    // (its depth counters grew) are saved as seed-* (a seed corpus)
    let keep = opt("--keep", 0);
    let (mut kept, mut reached) = (0u64, depth());
    while Instant::now() < until {
        let input = rng.input(&corpus, max_len);
        execs += 1;
        *current.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), input.clone(), execs);
        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| target(&input)));
        if t.elapsed() > Duration::from_secs(1) {
            slow += 1;
        }
        if kept < keep {
            let d = depth();
            if d > reached {
                reached = d;
                kept += 1;
                let dir = root.join(fuzzer::CORPUS).join(name);
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(dir.join(format!("seed-{seed}-{execs}")), &input);
            }
        }
        if r.is_err() {
            crashes += 1;
            let dir = root.join(fuzzer::CORPUS).join(name);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("crash-{seed}-{execs}"));
            let _ = std::fs::write(&path, &input);
            eprintln!("{name}: a panic; the input is {}", path.display());
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "target": name,
            "seconds": seconds,
            "seed": seed,
            "execs": execs,
            "crashes": crashes,
            "inputs_over_1s": slow,
            "execs_per_s": execs / seconds.max(1),
            "corpus": corpus.len(),
            "blk_requests_handled": virtio::fuzzing::BLK_HANDLED.load(std::sync::atomic::Ordering::Relaxed),
            "blk_requests_refused": virtio::fuzzing::BLK_REFUSED.load(std::sync::atomic::Ordering::Relaxed),
            "net_frames": [
                virtio::fuzzing::NET_RX.load(std::sync::atomic::Ordering::Relaxed),
                virtio::fuzzing::NET_TX.load(std::sync::atomic::Ordering::Relaxed),
            ],
            "rng_requests_bytes": [
                virtio::fuzzing::RNG_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
                virtio::fuzzing::RNG_BYTES.load(std::sync::atomic::Ordering::Relaxed),
            ],
            "pci_answered_activated": [
                virtio::fuzzing::PCI_ANSWERED.load(std::sync::atomic::Ordering::Relaxed),
                virtio::fuzzing::PCI_ACTIVATED.load(std::sync::atomic::Ordering::Relaxed),
            ],
            "depth": [
                fuzzer::DEPTH[0].load(std::sync::atomic::Ordering::Relaxed),
                fuzzer::DEPTH[1].load(std::sync::atomic::Ordering::Relaxed),
            ],
            "switch_rings_mapped_chains_walked": [
                switch::fuzzing::RINGS_MAPPED.load(std::sync::atomic::Ordering::Relaxed),
                switch::fuzzing::CHAINS_WALKED.load(std::sync::atomic::Ordering::Relaxed),
            ],
        })
    );
}
