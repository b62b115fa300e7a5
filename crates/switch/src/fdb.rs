//! The MAC table: where each source address was last seen, and when.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The most addresses the table holds.
pub const FDB_MAX: usize = 8192;
/// The most addresses one port may have learnt: a frontend sending from
/// endless random sources fills its own share, and is refused past it,
/// rather than evicting the other ports' addresses (which would flood
/// their unicast traffic, to it among others).
pub const PORT_MAX: usize = 1024;

/// Learnt addresses, by port slot. Keys come from untrusted frames, so
/// the table keeps std's keyed hash (a frontend cannot aim collisions at
/// it); it is looked at under one lock per burst.
#[derive(Default)]
pub struct Fdb {
    entries: HashMap<[u8; 6], (usize, Instant)>,
    per_port: HashMap<usize, usize>,
    /// When aged entries were last dropped (at most once a second, and
    /// only when the table or a port's share is full).
    purged: Option<Instant>,
}

/// What learning a source address did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Learnt {
    /// Known there already (or a group address, never learnt).
    Same,
    New,
    /// It was on another port: a migrated VM's traffic from its new port.
    Moved,
    /// The table, or the port's share of it, is full.
    Refused,
}

impl Fdb {
    /// Learns `mac` on `port` (group addresses are never sources).
    pub fn learn(&mut self, mac: [u8; 6], port: usize, now: Instant, ageing: Duration) -> Learnt {
        if mac[0] & 1 != 0 {
            return Learnt::Same;
        }
        if let Some(e) = self.entries.get_mut(&mac) {
            if e.0 == port {
                e.1 = now;
                return Learnt::Same;
            }
        }
        if self.full(port) {
            self.purge(now, ageing);
            if self.full(port) {
                return Learnt::Refused;
            }
        }
        match self.entries.insert(mac, (port, now)) {
            Some((was, _)) => {
                self.count(was, -1);
                self.count(port, 1);
                Learnt::Moved
            }
            None => {
                self.count(port, 1);
                Learnt::New
            }
        }
    }

    fn full(&self, port: usize) -> bool {
        self.entries.len() >= FDB_MAX || self.per_port.get(&port).copied().unwrap_or(0) >= PORT_MAX
    }

    fn count(&mut self, port: usize, by: isize) {
        let n = self.per_port.entry(port).or_default();
        *n = n.saturating_add_signed(by);
    }

    /// Drops the entries past `ageing`, at most once a second.
    fn purge(&mut self, now: Instant, ageing: Duration) {
        if self
            .purged
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.purged = Some(now);
        self.entries
            .retain(|_, (_, seen)| now.duration_since(*seen) < ageing);
        self.per_port.clear();
        let ports: Vec<usize> = self.entries.values().map(|(p, _)| *p).collect();
        for p in ports {
            self.count(p, 1);
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
        self.per_port.remove(&port);
    }

    /// The entries as they are (copied out under the caller's lock; see
    /// [`live`] for the rest).
    pub fn snapshot(&self) -> Vec<([u8; 6], usize, Instant)> {
        self.entries
            .iter()
            .map(|(m, (p, seen))| (*m, *p, *seen))
            .collect()
    }
}

/// (MAC, port slot, seconds since seen) of the entries not past `ageing`,
/// sorted: done on a snapshot, outside the table's lock.
pub fn live(
    mut snapshot: Vec<([u8; 6], usize, Instant)>,
    ageing: Duration,
) -> Vec<([u8; 6], usize, f64)> {
    let now = Instant::now();
    snapshot.retain(|(_, _, seen)| now.duration_since(*seen) < ageing);
    snapshot.sort_unstable_by_key(|e| e.0);
    snapshot
        .into_iter()
        .map(|(m, p, seen)| (m, p, now.duration_since(seen).as_secs_f64()))
        .collect()
}

pub use virtio::net::mac_text;

#[cfg(test)]
mod tests {
    use super::*;

    const AGE: Duration = Duration::from_secs(300);

    #[test]
    fn the_fdb_learns_unicast_sources_ages_them_and_follows_moves() {
        let mut f = Fdb::default();
        let t0 = Instant::now();
        assert_eq!(f.learn([2, 0, 0, 0, 0, 1], 1, t0, AGE), Learnt::New);
        assert_eq!(f.learn([2, 0, 0, 0, 0, 1], 1, t0, AGE), Learnt::Same);
        f.learn([1, 0, 0x5e, 0, 0, 1], 2, t0, AGE);
        assert_eq!(f.lookup(&[2, 0, 0, 0, 0, 1], t0, AGE), Some(1));
        assert_eq!(f.lookup(&[1, 0, 0x5e, 0, 0, 1], t0, AGE), None);
        assert_eq!(
            f.lookup(&[2, 0, 0, 0, 0, 1], t0 + Duration::from_secs(301), AGE),
            None
        );
        // the address shows up on another port: it moved
        assert_eq!(f.learn([2, 0, 0, 0, 0, 1], 3, t0, AGE), Learnt::Moved);
        assert_eq!(f.lookup(&[2, 0, 0, 0, 0, 1], t0, AGE), Some(3));
        f.forget_port(3);
        assert_eq!(f.lookup(&[2, 0, 0, 0, 0, 1], t0, AGE), None);
    }

    #[test]
    fn a_port_flooding_sources_fills_its_share_only() {
        let mut f = Fdb::default();
        let t0 = Instant::now();
        f.learn([2, 0, 0, 0, 0xaa, 0xaa], 0, t0, AGE);
        let mut refused = 0;
        for i in 0..(PORT_MAX as u32 + 100) {
            let b = i.to_be_bytes();
            if f.learn([2, 1, b[0], b[1], b[2], b[3]], 1, t0, AGE) == Learnt::Refused {
                refused += 1;
            }
        }
        assert_eq!(refused, 100);
        // the other port's address stays, and it still learns
        assert_eq!(f.lookup(&[2, 0, 0, 0, 0xaa, 0xaa], t0, AGE), Some(0));
        assert_eq!(f.learn([2, 0, 0, 0, 0xbb, 0xbb], 0, t0, AGE), Learnt::New);
        // once port 1's entries aged, it learns again
        let later = t0 + AGE + Duration::from_secs(2);
        assert_eq!(f.learn([2, 9, 9, 9, 9, 9], 1, later, AGE), Learnt::New);
        // (the purge dropped every entry aged by then: only that one is left)
        assert_eq!(live(f.snapshot(), AGE).len(), 1);
    }
}
