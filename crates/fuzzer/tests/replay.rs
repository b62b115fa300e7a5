//! Every corpus input of every target is replayed, and each target runs on
//! a few hundred seeded inputs: the suite fails if any panics.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn every_corpus_input_replays_without_a_panic() {
    for (name, target) in fuzzer::TARGETS {
        for (path, data) in fuzzer::corpus(root(), name) {
            let r = catch_unwind(AssertUnwindSafe(|| target(&data)));
            assert!(r.is_ok(), "{name}: {} panics", path.display());
        }
    }
}

#[test]
fn every_target_takes_seeded_random_input_without_a_panic() {
    for (name, target) in fuzzer::TARGETS {
        let mut rng = fuzzer::Rng::new(7);
        for i in 0..300 {
            let input = rng.input(&[], 2048);
            let r = catch_unwind(AssertUnwindSafe(|| target(&input)));
            assert!(
                r.is_ok(),
                "{name}: seeded input {i} panics ({} bytes)",
                input.len()
            );
        }
    }
}
