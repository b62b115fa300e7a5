//! Per-vCPU VM-exit accounting: every exit that reaches the VMM, counted by
//! reason and (for PIO and MMIO) by device, with the time spent handling it.
//! Each vCPU thread owns its `ExitStats`: no lock, no atomic, and no
//! allocation on the exit path (histograms are sized up front).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hdrhistogram::Histogram;

/// Why a vCPU came back to the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    PioIn,
    PioOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
    Interrupted,
    IrqWindowOpen,
    SystemEvent,
    FailEntry,
    InternalError,
    /// The dirty ring filled during a migration (the vCPU emptied it).
    DirtyRingFull,
    Other,
}

impl ExitReason {
    pub const ALL: [ExitReason; 13] = [
        ExitReason::PioIn,
        ExitReason::PioOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Hlt,
        ExitReason::Shutdown,
        ExitReason::Interrupted,
        ExitReason::IrqWindowOpen,
        ExitReason::SystemEvent,
        ExitReason::FailEntry,
        ExitReason::InternalError,
        ExitReason::DirtyRingFull,
        ExitReason::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitReason::PioIn => "pio_in",
            ExitReason::PioOut => "pio_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Hlt => "hlt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::Interrupted => "interrupted",
            ExitReason::IrqWindowOpen => "irq_window_open",
            ExitReason::SystemEvent => "system_event",
            ExitReason::FailEntry => "fail_entry",
            ExitReason::InternalError => "internal_error",
            ExitReason::DirtyRingFull => "dirty_ring_full",
            ExitReason::Other => "other",
        }
    }
}

/// Count and handling time of one kind of exit.
pub struct Timing {
    count: u64,
    total_ns: u64,
    min_ns: u64,
    max_ns: u64,
    hist: Histogram<u32>,
}

const HIST_MAX_NS: u64 = 1_000_000_000;

impl Timing {
    fn new() -> Self {
        Timing {
            count: 0,
            total_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
            // 2 significant digits up to 1 s; never resized, so recording never allocates
            hist: Histogram::new_with_bounds(1, HIST_MAX_NS, 2).expect("static histogram bounds"),
        }
    }

    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.count += 1;
        self.total_ns += ns;
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
        self.hist.saturating_record(ns.clamp(1, HIST_MAX_NS));
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn report(&self) -> TimingReport {
        let q = |p: f64| self.hist.value_at_quantile(p);
        TimingReport {
            count: self.count,
            total_ns: self.total_ns,
            min_ns: if self.count > 0 { self.min_ns } else { 0 },
            avg_ns: self.total_ns.checked_div(self.count).unwrap_or(0),
            p50_ns: q(0.5),
            p99_ns: q(0.99),
            max_ns: self.max_ns,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TimingReport {
    pub count: u64,
    pub total_ns: u64,
    pub min_ns: u64,
    pub avg_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

/// One vCPU's exit counts by reason, readable while it runs (the control
/// socket's `status`). A relaxed atomic add per exit: noise next to the
/// exit itself.
#[derive(Default)]
pub struct LiveExits {
    by_reason: [AtomicU64; ExitReason::ALL.len()],
    /// Time the VMM spent handling them (ns), by reason.
    ns_by_reason: [AtomicU64; ExitReason::ALL.len()],
}

impl LiveExits {
    /// Counts by reason name (reasons never seen left out) and the total.
    pub fn read(&self) -> (BTreeMap<&'static str, u64>, u64) {
        let mut out = BTreeMap::new();
        let mut total = 0;
        for (r, c) in ExitReason::ALL.iter().zip(&self.by_reason) {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                out.insert(r.name(), n);
                total += n;
            }
        }
        (out, total)
    }

    /// Time spent handling them (ns), by reason name (reasons never seen
    /// left out).
    pub fn handling_ns(&self) -> BTreeMap<&'static str, u64> {
        ExitReason::ALL
            .iter()
            .zip(self.by_reason.iter().zip(&self.ns_by_reason))
            .filter(|(_, (n, _))| n.load(Ordering::Relaxed) > 0)
            .map(|(r, (_, ns))| (r.name(), ns.load(Ordering::Relaxed)))
            .collect()
    }
}

/// One vCPU's exits.
pub struct ExitStats {
    live: Arc<LiveExits>,
    by_reason: Vec<Timing>,
    pio_by_device: Vec<Timing>,
    mmio_by_device: Vec<Timing>,
    device_names: Vec<String>,
}

impl ExitStats {
    /// `pio_devices` and `mmio_devices` name the bus entries by index; one
    /// more slot counts accesses no device serves.
    pub fn new(pio_devices: Vec<String>, mmio_devices: Vec<String>) -> Self {
        let slots = |n: usize| (0..=n).map(|_| Timing::new()).collect();
        let mut device_names = pio_devices.clone();
        device_names.extend(mmio_devices.iter().cloned());
        ExitStats {
            live: Arc::default(),
            by_reason: ExitReason::ALL.iter().map(|_| Timing::new()).collect(),
            pio_by_device: slots(pio_devices.len()),
            mmio_by_device: slots(mmio_devices.len()),
            device_names: {
                let mut names = pio_devices;
                names.push("unknown".into());
                names.extend(mmio_devices);
                names.push("unknown".into());
                names
            },
        }
    }

    /// The counts others may read while this vCPU runs.
    pub fn live(&self) -> Arc<LiveExits> {
        self.live.clone()
    }

    #[inline]
    pub fn record(&mut self, reason: ExitReason, device: Option<usize>, ns: u64) {
        self.live.by_reason[reason as usize].fetch_add(1, Ordering::Relaxed);
        self.live.ns_by_reason[reason as usize].fetch_add(ns, Ordering::Relaxed);
        self.by_reason[reason as usize].record(ns);
        let per_device = match reason {
            ExitReason::PioIn | ExitReason::PioOut => &mut self.pio_by_device,
            ExitReason::MmioRead | ExitReason::MmioWrite => &mut self.mmio_by_device,
            _ => return,
        };
        let last = per_device.len() - 1;
        per_device[device.unwrap_or(last).min(last)].record(ns);
    }

    pub fn count(&self, reason: ExitReason) -> u64 {
        self.by_reason[reason as usize].count()
    }

    pub fn report(&self) -> ExitReport {
        let mut by_reason = BTreeMap::new();
        for (r, t) in ExitReason::ALL.iter().zip(&self.by_reason) {
            if t.count() > 0 {
                by_reason.insert(r.name().to_string(), t.report());
            }
        }
        let pio_names = &self.device_names[..self.pio_by_device.len()];
        let mmio_names = &self.device_names[self.pio_by_device.len()..];
        let per_device = |names: &[String], timings: &[Timing]| {
            names
                .iter()
                .zip(timings)
                .filter(|(_, t)| t.count() > 0)
                .map(|(n, t)| (n.clone(), t.report()))
                .collect()
        };
        ExitReport {
            total: self.by_reason.iter().map(Timing::count).sum(),
            by_reason,
            pio_by_device: per_device(pio_names, &self.pio_by_device),
            mmio_by_device: per_device(mmio_names, &self.mmio_by_device),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ExitReport {
    pub total: u64,
    pub by_reason: BTreeMap<String, TimingReport>,
    pub pio_by_device: BTreeMap<String, TimingReport>,
    pub mmio_by_device: BTreeMap<String, TimingReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_counted_by_reason_and_device() {
        let mut s = ExitStats::new(
            vec!["com1".into(), "bench-port".into()],
            vec!["bench-mmio".into()],
        );
        s.record(ExitReason::PioOut, Some(1), 100);
        s.record(ExitReason::PioOut, Some(1), 300);
        s.record(ExitReason::PioIn, None, 50);
        s.record(ExitReason::MmioWrite, Some(0), 70);
        s.record(ExitReason::Hlt, None, 10);
        let r = s.report();
        assert_eq!(r.total, 5);
        let out = &r.by_reason["pio_out"];
        assert_eq!(
            (out.count, out.min_ns, out.avg_ns, out.max_ns),
            (2, 100, 200, 300)
        );
        assert_eq!(r.pio_by_device["bench-port"].count, 2);
        assert_eq!(r.pio_by_device["unknown"].count, 1);
        assert_eq!(r.mmio_by_device["bench-mmio"].count, 1);
        assert!(!r.pio_by_device.contains_key("com1"));
    }
}
