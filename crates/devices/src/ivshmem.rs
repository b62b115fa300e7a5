//! The ivshmem PCI device as QEMU defines it (vendor 0x1af4, device 0x1110),
//! plain mode: BAR0 the registers (interrupt mask/status, IVPosition,
//! Doorbell), BAR2 the shared memory. The memory itself is a KVM memory slot
//! the VMM maps at BAR2; this device holds the configuration space and the
//! registers. Doorbells (MSI-X, the ivshmem-server protocol) are not built
//! yet: the registers read zero and ignore writes.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::pci::{ConfigSpace, PciFunction};
use crate::BusDevice;

pub const VENDOR: u16 = 0x1af4;
pub const DEVICE: u16 = 0x1110;
pub const BAR0_SIZE: u64 = 256;

pub struct Ivshmem {
    config: ConfigSpace,
    /// Guest writes to a read-only region (KVM_MEM_READONLY turns them into
    /// MMIO exits that land here): dropped and counted.
    pub dropped_writes: AtomicU64,
}

impl Ivshmem {
    pub fn new(bar0: u64, bar2: u64, size: u64) -> Ivshmem {
        let mut config = ConfigSpace::new(VENDOR, DEVICE, 0x05_00_00, 1);
        config.set_bar(0, bar0, BAR0_SIZE, false, false);
        config.set_bar(2, bar2, size, true, true);
        // interrupt line and pin INTA, for doorbell mode
        config.write(0x3c, 0, &[IRQ_PIN as u8, 1]);
        Ivshmem {
            config,
            dropped_writes: AtomicU64::new(0),
        }
    }

    pub fn bar2(&self) -> u64 {
        self.config.bar_addr(2)
    }
}

impl PciFunction for Ivshmem {
    fn name(&self) -> &str {
        "ivshmem"
    }
    fn config_read(&self, reg: u8) -> u32 {
        self.config.read(reg)
    }
    fn config_write(&self, reg: u8, offset: u8, data: &[u8]) {
        self.config.write(reg, offset, data)
    }
}

/// BAR0: the registers (all read zero in plain mode; writes ignored).
/// IVPosition (offset 8) reads this VM's peer id; the doorbell (offset 12)
/// is an ioeventfd in doorbell mode, so a write never reaches here; mask and
/// status read zero.
pub struct IvshmemRegs {
    pub peer_id: u32,
}

impl BusDevice for IvshmemRegs {
    fn name(&self) -> &str {
        "ivshmem-regs"
    }
    fn read(&self, offset: u64, data: &mut [u8]) {
        let v = if offset == 8 { self.peer_id } else { 0 };
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.to_le_bytes().get(i).copied().unwrap_or(0);
        }
    }
    fn write(&self, _offset: u64, _data: &[u8]) {}
}

/// The IOAPIC pin of vector 0 (vector v is on pin + v): PCI interrupt line.
pub const IRQ_PIN: u32 = 11;

/// BAR2 as the VMM sees it: writes to a read-only region, and any access
/// while the window is unmapped, exit to here: reads return all-ones,
/// writes are dropped and counted (logged once).
pub struct ReadOnlyWindow(pub std::sync::Arc<Ivshmem>);

impl BusDevice for ReadOnlyWindow {
    fn name(&self) -> &str {
        "ivshmem-readonly"
    }
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if self.0.dropped_writes.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "ivshmem: the guest wrote {} bytes at offset {offset:#x} of a read-only or unmapped region: dropped (logged once, counted)",
                data.len()
            );
        }
    }
}
