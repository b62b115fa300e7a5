//! Host-side latency samplers, the baseline the guest's figures stand
//! beside: the same measurement by a host thread (same CPU, same priority).

use std::time::Duration;

/// A latency histogram with 1 us buckets, as the guest keeps it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LatencyHist {
    pub buckets: Vec<u64>,
    pub count: u64,
    pub overflow: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    pub sum_ns: u64,
}

pub const BUCKETS: usize = 4096;

impl Default for LatencyHist {
    fn default() -> Self {
        LatencyHist {
            buckets: vec![0; BUCKETS],
            count: 0,
            overflow: 0,
            min_ns: u64::MAX,
            max_ns: 0,
            sum_ns: 0,
        }
    }
}

impl LatencyHist {
    pub fn add(&mut self, ns: u64) {
        match self.buckets.get_mut((ns / 1000) as usize) {
            Some(b) => *b += 1,
            None => self.overflow += 1,
        }
        self.count += 1;
        self.sum_ns += ns;
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }
}

fn now(clock: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for the write.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts
}

fn ns(ts: &libc::timespec) -> i128 {
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

fn add_ns(ts: &mut libc::timespec, d: u64) {
    let total = ts.tv_nsec as u64 + d;
    ts.tv_sec += (total / 1_000_000_000) as libc::time_t;
    ts.tv_nsec = (total % 1_000_000_000) as libc::c_long;
}

/// cyclictest's measurement: `n` absolute sleeps of `period` on
/// CLOCK_MONOTONIC, each recording (wake-up time - requested time).
pub fn timer_block(period: Duration, n: u64, hist: &mut LatencyHist) {
    let mut next = now(libc::CLOCK_MONOTONIC);
    for _ in 0..n {
        add_ns(&mut next, period.as_nanos() as u64);
        // SAFETY: `next` is a valid timespec; TIMER_ABSTIME with no remainder.
        unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &next,
                std::ptr::null_mut(),
            )
        };
        let woke = now(libc::CLOCK_MONOTONIC);
        hist.add((ns(&woke) - ns(&next)).max(0) as u64);
        // a late wake-up does not make the next deadline a burst of catch-ups
        if ns(&woke) > ns(&next) + period.as_nanos() as i128 {
            next = woke;
        }
    }
}

/// osnoise's measurement: spin reading the clock for `windows` windows of
/// 1 ms; each gap above `threshold` between two reads is preemption. Per
/// window the lost time goes to `per_window`, every gap to `gaps`.
pub fn preempt_block(
    windows: u64,
    threshold: Duration,
    per_window: &mut LatencyHist,
    gaps: &mut LatencyHist,
) {
    let threshold = threshold.as_nanos() as i128;
    for _ in 0..windows {
        let start = ns(&now(libc::CLOCK_MONOTONIC));
        let (mut prev, mut lost) = (start, 0i128);
        while prev - start < 1_000_000 {
            let t = ns(&now(libc::CLOCK_MONOTONIC));
            if t - prev > threshold {
                lost += t - prev;
                gaps.add((t - prev) as u64);
            }
            prev = t;
        }
        per_window.add(lost as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_timer_block_takes_the_samples_asked() {
        let mut h = LatencyHist::default();
        timer_block(Duration::from_micros(200), 50, &mut h);
        assert_eq!(h.count, 50);
        assert_eq!(h.buckets.iter().sum::<u64>() + h.overflow, 50);
        assert!(h.min_ns <= h.max_ns);
    }

    #[test]
    fn host_preempt_block_measures_windows() {
        let (mut w, mut g) = (LatencyHist::default(), LatencyHist::default());
        preempt_block(5, Duration::from_micros(5), &mut w, &mut g);
        assert_eq!(w.count, 5);
    }
}
