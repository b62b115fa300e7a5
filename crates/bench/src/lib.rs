//! The measurement suite. Every figure is measured in one run beside its
//! baseline (the bare KVM_RUN floor, QEMU on the same guest), interleaved,
//! and reported as medians with their spread; nothing is asserted by a timer.

pub mod exits;
pub mod latency;
pub mod ovs;
pub mod plot;
pub mod ring_bench;
pub mod startup;
pub mod testpmd;
pub mod vhost_frontend;
pub mod zero_scan;

/// Median and spread of a set of samples.
#[derive(Debug, Clone, Copy, serde::Serialize, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let mid = v.len() / 2;
        let median = if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
            samples: v.len(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Vm(#[from] vmm::Error),
    #[error("{what}: {why}")]
    Run { what: String, why: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_median() {
        let s = Spread::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.samples), (3.0, 1.0, 5.0, 3));
        assert_eq!(Spread::of(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert!(Spread::of(&[]).is_none());
    }
}
