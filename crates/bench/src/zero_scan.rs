//! `nfvisor bench zero-scan`: the zero-page scan of a snapshot or a
//! migration's first round, page by page (4 KiB) over a buffer larger than
//! the caches whose pages are all present and zero (as with `--prefault`),
//! for each implementation this CPU has. Reports GB/s, the median of the
//! rounds, and each one's speed relative to the scalar loop.

use std::time::Instant;

use vmm::zero_page::Scan;

#[derive(Debug, serde::Serialize)]
pub struct ScanFigure {
    pub implementation: &'static str,
    pub gb_per_s: f64,
    /// GB/s of each round, in order.
    pub rounds_gb_per_s: Vec<f64>,
    pub vs_scalar: f64,
    /// Whether migration and snapshots use this one here.
    pub used: bool,
    /// It found every page zero in every round.
    pub verified: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct ZeroScanReport {
    pub buffer_mib: usize,
    pub page_bytes: usize,
    pub rounds: usize,
    pub figures: Vec<ScanFigure>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

pub fn run(buffer_mib: usize, rounds: usize) -> ZeroScanReport {
    let bytes = buffer_mib << 20;
    // every page written, so each is present and its own (a calloc'ed
    // buffer would read the kernel's one shared zero page, from cache)
    let mut buf = vec![1u8; bytes];
    buf.fill(0);
    let scans: Vec<Scan> = [Scan::Scalar, Scan::Avx2, Scan::Avx512]
        .into_iter()
        .filter(|s| s.available())
        .collect();
    let mut per_scan: Vec<Vec<f64>> = vec![Vec::new(); scans.len()];
    let mut verified = vec![true; scans.len()];
    // interleaved, so drift on a shared host hits every implementation alike
    for _ in 0..rounds {
        for (i, s) in scans.iter().enumerate() {
            let t = Instant::now();
            let zero = buf.chunks_exact(4096).filter(|p| s.is_zero(p)).count();
            let secs = t.elapsed().as_secs_f64().max(1e-9);
            verified[i] &= zero == bytes / 4096;
            per_scan[i].push(bytes as f64 / secs / 1e9);
        }
    }
    let scalar = median(&per_scan[0]);
    let best = vmm::zero_page::best();
    ZeroScanReport {
        buffer_mib,
        page_bytes: 4096,
        rounds,
        figures: scans
            .iter()
            .zip(per_scan)
            .zip(verified)
            .map(|((s, r), verified)| ScanFigure {
                implementation: s.name(),
                gb_per_s: median(&r),
                vs_scalar: median(&r) / scalar,
                rounds_gb_per_s: r,
                used: *s == best,
                verified,
            })
            .collect(),
    }
}
