//! The latency-probe guest's block port. After each block of samples the
//! guest writes its running maximum (ns) at offset 4 and the block number at
//! offset 0; a preemption run first writes its effective gap threshold (ns)
//! at offset 8. The device logs progress and, when asked, runs the host
//! baseline block right there: on the vCPU thread, so on the same CPU at the
//! same priority, while the guest waits, never at the same time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rt::sampler::{self, LatencyHist};

use crate::BusDevice;

/// What the host measures between the guest's blocks.
#[derive(Debug, Clone, Copy)]
pub enum Baseline {
    /// `per_block` clock_nanosleep wake-ups of `period`.
    Timer { period: Duration, per_block: u64 },
    /// `per_block` windows of 1 ms spinning, gaps above `threshold`.
    Preempt { threshold: Duration, per_block: u64 },
}

/// Host-side results, filled block by block.
#[derive(Debug, Default, Clone)]
pub struct HostResults {
    pub main: LatencyHist,
    /// Preemption: every gap.
    pub gaps: LatencyHist,
}

pub struct LatencyPort {
    baseline: Option<Baseline>,
    blocks: u64,
    running_max_ns: AtomicU64,
    /// The guest's effective preemption threshold (ns), so the host counts
    /// the same gaps.
    guest_threshold_ns: AtomicU64,
    blocks_done: AtomicU64,
    results: Mutex<HostResults>,
}

impl LatencyPort {
    pub fn new(baseline: Option<Baseline>, blocks: u64) -> Self {
        LatencyPort {
            baseline,
            blocks,
            running_max_ns: AtomicU64::new(0),
            guest_threshold_ns: AtomicU64::new(0),
            blocks_done: AtomicU64::new(0),
            results: Mutex::new(HostResults::default()),
        }
    }

    pub fn results(&self) -> HostResults {
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn blocks_done(&self) -> u64 {
        self.blocks_done.load(Ordering::Relaxed)
    }

    fn run_baseline(&self) {
        let Some(b) = self.baseline else { return };
        let mut r = self.results.lock().unwrap_or_else(|e| e.into_inner());
        let r = &mut *r;
        match b {
            Baseline::Timer { period, per_block } => {
                sampler::timer_block(period, per_block, &mut r.main)
            }
            Baseline::Preempt {
                threshold,
                per_block,
            } => {
                let guest = Duration::from_nanos(self.guest_threshold_ns.load(Ordering::Relaxed));
                sampler::preempt_block(per_block, threshold.max(guest), &mut r.main, &mut r.gaps)
            }
        }
    }
}

impl BusDevice for LatencyPort {
    fn name(&self) -> &str {
        "latency-port"
    }

    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b) as u64;
        match offset {
            4 => self.running_max_ns.store(v, Ordering::Relaxed),
            8 => self.guest_threshold_ns.store(v, Ordering::Relaxed),
            0 => {
                let done = self.blocks_done.fetch_add(1, Ordering::Relaxed) + 1;
                let of = if self.blocks > 0 {
                    format!("/{}", self.blocks)
                } else {
                    String::new()
                };
                tracing::info!(
                    "latency block {done}{of}: guest running max {:.1} us",
                    self.running_max_ns.load(Ordering::Relaxed) as f64 / 1000.0
                );
                self.run_baseline();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_block_runs_a_host_block() {
        let port = LatencyPort::new(
            Some(Baseline::Timer {
                period: Duration::from_micros(100),
                per_block: 10,
            }),
            3,
        );
        port.write(4, &5000u32.to_le_bytes());
        port.write(0, &0u32.to_le_bytes());
        port.write(0, &1u32.to_le_bytes());
        assert_eq!(port.blocks_done(), 2);
        assert_eq!(port.results().main.count, 20);
        // no baseline: only progress
        let quiet = LatencyPort::new(None, 1);
        quiet.write(0, &[0, 0, 0, 0]);
        assert_eq!(quiet.results().main.count, 0);
    }
}
