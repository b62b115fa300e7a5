//! The DMA probe: a debug device that writes guest memory when the guest
//! asks, as a DMA-capable device (a NIC's receive path, a used ring) would.
//! It exists to prove that what the VMM writes into guest memory is
//! tracked as dirty and reaches a migration's destination, which KVM's
//! dirty log alone would miss.
//!
//! Ports (32-bit accesses): +0 write: the guest physical address of the
//! next write (4-byte aligned); +4 write: the value to store there, through
//! vm-memory's checked accessors. Reads: +0 the writes done, +4 those
//! refused (an address outside guest memory or misaligned: counted, logged
//! once, nothing written).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress};

use crate::BusDevice;

pub const PORT_LEN: u64 = 8;

pub struct DmaProbe<M> {
    mem: M,
    addr: AtomicU64,
    pub done: AtomicU64,
    pub refused: AtomicU64,
    warned: AtomicBool,
}

impl<M: Bytes<GuestAddress> + Send + Sync> DmaProbe<M> {
    pub fn new(mem: M) -> Self {
        DmaProbe {
            mem,
            addr: AtomicU64::new(0),
            done: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        }
    }

    fn store(&self, value: u32) {
        let addr = self.addr.load(Ordering::Acquire);
        let ok = addr.is_multiple_of(4) && self.mem.write_obj(value, GuestAddress(addr)).is_ok();
        if ok {
            self.done.fetch_add(1, Ordering::Relaxed);
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "dma-probe: write to {addr:#x} refused (outside guest memory or misaligned); further ones are only counted"
                );
            }
        }
    }
}

/// The probe's state: the address latched for the next write (a VM saved
/// between the guest's two port writes must write where it was told).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DmaProbeState {
    pub addr: u64,
}

impl<M: Bytes<GuestAddress> + Send + Sync> crate::Persist for DmaProbe<M> {
    const KIND: &'static str = "dma-probe";
    const VERSION: u16 = 1;
    type State = DmaProbeState;

    fn save(&self) -> DmaProbeState {
        DmaProbeState {
            addr: self.addr.load(Ordering::Acquire),
        }
    }

    fn validate(s: &DmaProbeState) -> Result<(), crate::state::BadField> {
        if s.addr > u32::MAX as u64 {
            return Err(crate::state::BadField::new(
                "addr",
                format!("{:#x}", s.addr),
                "the guest latches 32-bit addresses",
            ));
        }
        Ok(())
    }

    fn restore(&self, s: DmaProbeState) -> Result<(), String> {
        self.addr.store(s.addr, Ordering::Release);
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("writes", self.done.load(Ordering::Relaxed)),
            ("refused_writes", self.refused.load(Ordering::Relaxed)),
        ]
    }
}

fn u32_of(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl<M: Bytes<GuestAddress> + Send + Sync> BusDevice for DmaProbe<M> {
    fn name(&self) -> &str {
        "dma-probe"
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.done.load(Ordering::Relaxed),
            4 => self.refused.load(Ordering::Relaxed),
            _ => u64::MAX,
        } as u32;
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data.fill(0xff);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match offset {
            0 => self.addr.store(u32_of(data) as u64, Ordering::Release),
            4 => self.store(u32_of(data)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn writes_land_in_guest_memory_and_bad_addresses_are_refused() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let dev = DmaProbe::new(mem.clone());
        dev.write(0, &0x1000u32.to_le_bytes());
        dev.write(4, &0xdead_beefu32.to_le_bytes());
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        for bad in [0x2000u32, 0x1ffe, 0x1001, u32::MAX] {
            dev.write(0, &bad.to_le_bytes());
            dev.write(4, &1u32.to_le_bytes());
        }
        let mut r = [0u8; 4];
        dev.read(0, &mut r);
        assert_eq!(u32::from_le_bytes(r), 1);
        dev.read(4, &mut r);
        assert_eq!(u32::from_le_bytes(r), 4);
    }

    #[test]
    fn the_latched_address_is_its_state() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let dev = DmaProbe::new(mem.clone());
        dev.write(0, &0x1800u32.to_le_bytes());
        let fresh = DmaProbe::new(mem.clone());
        crate::state::suite::check(&dev, &fresh);
        fresh.write(4, &7u32.to_le_bytes());
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1800)).unwrap(), 7);
    }
}
