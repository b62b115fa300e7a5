//! The MAC table: where each source address was last seen, and when.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Learnt addresses, by port slot. Keys come from untrusted frames, so
/// the table keeps std's keyed hash (a frontend cannot aim collisions at
/// it); it is looked at once per frame under one lock per burst.
#[derive(Default)]
pub struct Fdb {
    entries: HashMap<[u8; 6], (usize, Instant)>,
}

/// The most addresses the table holds: a frontend sending from endless
/// random sources ages entries out rather than growing the table.
pub const FDB_MAX: usize = 8192;

impl Fdb {
    /// Learns `mac` on `port` (group addresses are never sources); whether
    /// the address moved to another port (a migrated VM's announce).
    pub fn learn(&mut self, mac: [u8; 6], port: usize, now: Instant) -> bool {
        if mac[0] & 1 != 0 {
            return false;
        }
        if self.entries.len() >= FDB_MAX && !self.entries.contains_key(&mac) {
            // full: the oldest entry goes (a linear pass, only when full)
            if let Some(oldest) = self.entries.iter().min_by_key(|e| e.1 .1).map(|e| *e.0) {
                self.entries.remove(&oldest);
            }
        }
        match self.entries.insert(mac, (port, now)) {
            Some((was, _)) => was != port,
            None => false,
        }
    }

    pub fn lookup(&self, mac: &[u8; 6], now: Instant, ageing: Duration) -> Option<usize> {
        self.entries
            .get(mac)
            .filter(|(_, seen)| now.duration_since(*seen) < ageing)
            .map(|(p, _)| *p)
    }

    /// Forgets what was learnt on `port` (the port was removed).
    pub fn forget_port(&mut self, port: usize) {
        self.entries.retain(|_, (p, _)| *p != port);
    }

    /// (MAC, port slot, seconds since seen), entries past `ageing`
    /// dropped.
    pub fn entries(&mut self, ageing: Duration) -> Vec<([u8; 6], usize, f64)> {
        let now = Instant::now();
        self.entries
            .retain(|_, (_, seen)| now.duration_since(*seen) < ageing);
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|(m, (p, seen))| (*m, *p, now.duration_since(*seen).as_secs_f64()))
            .collect();
        v.sort_by_key(|e| e.0);
        v
    }
}

pub use virtio::net::mac_text;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fdb_learns_unicast_sources_ages_them_and_follows_moves() {
        let mut f = Fdb::default();
        let t0 = Instant::now();
        let age = Duration::from_secs(300);
        assert!(!f.learn([2, 0, 0, 0, 0, 1], 1, t0));
        f.learn([1, 0, 0x5e, 0, 0, 1], 2, t0);
        assert_eq!(f.lookup(&[2, 0, 0, 0, 0, 1], t0, age), Some(1));
        assert_eq!(f.lookup(&[1, 0, 0x5e, 0, 0, 1], t0, age), None);
        assert_eq!(
            f.lookup(&[2, 0, 0, 0, 0, 1], t0 + Duration::from_secs(301), age),
            None
        );
        // the address shows up on another port: it moved
        assert!(f.learn([2, 0, 0, 0, 0, 1], 3, t0));
        assert_eq!(f.lookup(&[2, 0, 0, 0, 0, 1], t0, age), Some(3));
        f.forget_port(3);
        assert_eq!(f.lookup(&[2, 0, 0, 0, 0, 1], t0, age), None);
    }

    #[test]
    fn a_full_table_drops_its_oldest_entry() {
        let mut f = Fdb::default();
        let t0 = Instant::now();
        for i in 0..FDB_MAX as u32 + 1 {
            let b = i.to_be_bytes();
            f.learn(
                [2, 0, b[0], b[1], b[2], b[3]],
                0,
                t0 + Duration::from_micros(i as u64),
            );
        }
        assert_eq!(f.entries.len(), FDB_MAX);
        assert_eq!(
            f.lookup(&[2, 0, 0, 0, 0, 0], t0, Duration::from_secs(300)),
            None
        );
    }
}
