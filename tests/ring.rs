//! The packet ring between two processes on two CPUs (`bench ivshmem`).

mod common;
use common::*;
use std::time::Duration;

#[test]
fn the_ring_benchmark_delivers_every_packet_in_order() {
    let r = nfvisor(
        &[
            "bench",
            "ivshmem",
            "--seconds",
            "0.3",
            "--batch",
            "1,32",
            "--json",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = json(&r);
    assert!(doc["streaming_gb_s"].as_f64().unwrap() > 0.0);
    assert_ne!(doc["producer_cpu"], doc["consumer_cpu"]);
    for b in doc["results"].as_array().unwrap() {
        assert_eq!(b["verified"], true, "{b}");
        assert!(b["packets"].as_u64().unwrap() > 1000, "{b}");
        let (p50, p99) = (
            b["latency_p50_ns"].as_u64().unwrap(),
            b["latency_p99_ns"].as_u64().unwrap(),
        );
        assert!(p50 > 0 && p50 <= p99, "{b}");
    }
}

#[test]
fn bad_ring_options_are_refused() {
    let r = nfvisor(
        &["bench", "ivshmem", "--batch", "0"],
        Duration::from_secs(30),
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("--batch"), "{}", r.stderr);
    let r = nfvisor(
        &["bench", "ivshmem", "--seconds", "0"],
        Duration::from_secs(30),
    );
    assert_ne!(r.code, 0);
}
