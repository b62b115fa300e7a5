//! The I/O bus: address ranges mapped to devices, for port I/O and MMIO.
//!
//! Written here rather than taken from `vm-device`: the exit accounting needs
//! the index of the device that served an access (exits are counted per
//! device), and a lookup that neither allocates nor locks, since it sits on
//! every vCPU exit. Devices use interior mutability where they keep state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A device on the bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send + Sync {
    /// Name used in logs and in the exit accounting.
    fn name(&self) -> &str;
    /// A guest read; fill `data`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("device {new} at {base:#x}+{len:#x} overlaps device {existing}")]
    Overlap {
        new: String,
        existing: String,
        base: u64,
        len: u64,
    },
    #[error("device {0} has an empty address range")]
    Empty(String),
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// A range whose base the guest may move (a PCI BAR): looked up after the
/// fixed ranges, which therefore win where the two overlap.
struct Movable {
    /// u64::MAX while unmapped (BAR decoding off, or being sized).
    base: AtomicU64,
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// A movable range's handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MovableId(usize);

const UNMAPPED: u64 = u64::MAX;

/// A sorted set of non-overlapping fixed ranges, and a few movable ones.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
    movable: Vec<Movable>,
}

/// What a lookup found: the device, its index on the bus and the offset.
pub struct Hit<'a> {
    pub index: usize,
    pub offset: u64,
    pub device: &'a dyn BusDevice,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(device.name().to_string()));
        }
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(BusError::Overlap {
                new: device.name().to_string(),
                existing: e.device.name().to_string(),
                base,
                len,
            });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    /// Adds a movable range of `len` bytes at `base` (None: unmapped).
    pub fn insert_movable(
        &mut self,
        base: Option<u64>,
        len: u64,
        device: Arc<dyn BusDevice>,
    ) -> Result<MovableId, BusError> {
        if len == 0 {
            return Err(BusError::Empty(device.name().to_string()));
        }
        self.movable.push(Movable {
            base: AtomicU64::new(base.unwrap_or(UNMAPPED)),
            len,
            device,
        });
        Ok(MovableId(self.movable.len() - 1))
    }

    /// Moves a movable range (None: unmaps it). Lock-free: vCPUs looking
    /// up at the same time see the old or the new base.
    pub fn move_to(&self, id: MovableId, base: Option<u64>) {
        if let Some(m) = self.movable.get(id.0) {
            m.base.store(base.unwrap_or(UNMAPPED), Ordering::Release);
        }
    }

    /// Finds the device serving `addr`.
    pub fn lookup(&self, addr: u64) -> Option<Hit<'_>> {
        let fixed = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)
            .and_then(|i| {
                let e = &self.entries[i];
                (addr - e.base < e.len).then(|| Hit {
                    index: i,
                    offset: addr - e.base,
                    device: e.device.as_ref(),
                })
            });
        fixed.or_else(|| {
            self.movable.iter().enumerate().find_map(|(i, m)| {
                let base = m.base.load(Ordering::Acquire);
                (base != UNMAPPED && addr >= base && addr - base < m.len).then(|| Hit {
                    index: self.entries.len() + i,
                    offset: addr - base,
                    device: m.device.as_ref(),
                })
            })
        })
    }

    /// Device names by bus index, for reports.
    pub fn names(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| e.device.name().to_string())
            .chain(self.movable.iter().map(|m| m.device.name().to_string()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len() + self.movable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Sink;

    #[test]
    fn lookup_finds_ranges_and_rejects_overlaps() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, Arc::new(Sink::new("a"))).unwrap();
        bus.insert(0xf4, 4, Arc::new(Sink::new("b"))).unwrap();
        assert!(bus.insert(0x3fa, 2, Arc::new(Sink::new("c"))).is_err());
        assert!(bus.insert(0x10, 0, Arc::new(Sink::new("d"))).is_err());
        let hit = bus.lookup(0x3fd).unwrap();
        assert_eq!((hit.device.name(), hit.offset, hit.index), ("a", 5, 1));
        assert_eq!(bus.lookup(0xf4).unwrap().device.name(), "b");
        assert!(bus.lookup(0x400).is_none());
        assert!(bus.lookup(0xf3).is_none());
        assert!(bus.lookup(0).is_none());
        // a movable range: found where it is, gone when unmapped, and never
        // in front of a fixed one
        let m = bus
            .insert_movable(Some(0x1000), 0x100, Arc::new(Sink::new("m")))
            .unwrap();
        let hit = bus.lookup(0x1010).unwrap();
        assert_eq!((hit.device.name(), hit.offset, hit.index), ("m", 0x10, 2));
        bus.move_to(m, Some(0x3f0));
        assert!(bus.lookup(0x1010).is_none());
        assert_eq!(bus.lookup(0x3f0).unwrap().device.name(), "m");
        assert_eq!(bus.lookup(0x3f8).unwrap().device.name(), "a");
        bus.move_to(m, None);
        assert!(bus.lookup(0x3f0).is_none());
        assert_eq!(bus.names(), ["b", "a", "m"]);
    }
}
