//! `nfvisor-fuzz TARGET [--seconds N] [--seed S] [--max-len B]`: runs a
//! target on generated inputs for N seconds; a panicking input is saved
//! under fuzz/corpus/TARGET/crash-* and counted. Prints one JSON line.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

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
    // a panic's message goes to stderr once, not once per input
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = fuzzer::Rng::new(seed);
    let until = Instant::now() + Duration::from_secs(seconds);
    let (mut execs, mut crashes) = (0u64, 0u64);
    while Instant::now() < until {
        let input = rng.input(&corpus, max_len);
        execs += 1;
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            crashes += 1;
            let dir = root.join("fuzz/corpus").join(name);
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
            "corpus": corpus.len(),
            "blk_requests_handled": virtio::fuzzing::BLK_HANDLED.load(std::sync::atomic::Ordering::Relaxed),
            "blk_requests_refused": virtio::fuzzing::BLK_REFUSED.load(std::sync::atomic::Ordering::Relaxed),
            "depth": [
                fuzzer::DEPTH[0].load(std::sync::atomic::Ordering::Relaxed),
                fuzzer::DEPTH[1].load(std::sync::atomic::Ordering::Relaxed),
            ],
        })
    );
}
