//! The I/O bus: address ranges mapped to devices, for port I/O and MMIO.
//!
//! Written here rather than taken from `vm-device`: the exit accounting needs
//! the index of the device that served an access (exits are counted per
//! device), and a lookup that neither allocates nor locks, since it sits on
//! every vCPU exit. Devices use interior mutability where they keep state.

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

/// A sorted set of non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
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

    /// Finds the device serving `addr`.
    pub fn lookup(&self, addr: u64) -> Option<Hit<'_>> {
        let i = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let e = &self.entries[i];
        (addr - e.base < e.len).then(|| Hit {
            index: i,
            offset: addr - e.base,
            device: e.device.as_ref(),
        })
    }

    /// Device names by bus index, for reports.
    pub fn names(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| e.device.name().to_string())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
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
    }
}
