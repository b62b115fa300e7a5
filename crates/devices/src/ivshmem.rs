//! The ivshmem PCI device as QEMU defines it (vendor 0x1af4, device 0x1110):
//! BAR0 the registers (interrupt mask/status, IVPosition, Doorbell), BAR1
//! MSI-X (doorbell mode only, as in QEMU's ivshmem-doorbell), BAR2 the
//! shared memory. The memory itself is a KVM memory slot the VMM maps at
//! BAR2, and doorbells are ioeventfds and irqfds the VMM wires; this device
//! holds the configuration space, the registers and the MSI-X table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::msix::Msix;

use crate::pci::{BarObserver, ConfigSpace, PciFunction};
use crate::BusDevice;

pub const VENDOR: u16 = 0x1af4;
pub const DEVICE: u16 = 0x1110;
pub const BAR0_SIZE: u64 = 256;

pub struct Ivshmem {
    config: ConfigSpace,
    /// Doorbell mode: the MSI-X table (BAR1) and its capability's offset.
    msix: Option<(Arc<Msix>, u8)>,
    /// Guest writes to a read-only region (KVM_MEM_READONLY turns them into
    /// MMIO exits that land here): dropped and counted.
    pub dropped_writes: AtomicU64,
    /// Told when the guest moves a BAR or turns decoding off and on.
    bar_observer: OnceLock<Arc<dyn BarObserver>>,
    /// Doorbell writes that reached the VMM: no ioeventfd matched them (a
    /// peer or vector that is not there). Ignored, as QEMU does; counted.
    pub doorbell_writes: AtomicU64,
}

impl Ivshmem {
    /// `msix`: doorbell mode's table and the address of BAR1, which holds it.
    pub fn new(bar0: u64, msix: Option<(Arc<Msix>, u64)>, bar2: u64, size: u64) -> Ivshmem {
        let mut config = ConfigSpace::new(VENDOR, DEVICE, 0x05_00_00, 1);
        config.set_bar(0, bar0, BAR0_SIZE, false, false);
        config.set_bar(2, bar2, size, true, true);
        // interrupt line and pin INTA (the legacy interrupt while MSI-X is off)
        config.set_register(0x3c, (1 << 8) | IRQ_PIN);
        let msix = msix.map(|(table, bar1)| {
            config.set_bar(1, bar1, crate::msix::BAR_SIZE, false, false);
            let (body, writable) = table.capability(1);
            let at = config.add_capability(crate::msix::CAP_ID, &body, &writable);
            (table, at)
        });
        Ivshmem {
            config,
            msix,
            dropped_writes: AtomicU64::new(0),
            bar_observer: OnceLock::new(),
            doorbell_writes: AtomicU64::new(0),
        }
    }

    pub fn bar2(&self) -> u64 {
        self.config.bar_addr(2)
    }

    /// Where BAR `index` decodes now.
    pub fn decoded_bar(&self, index: usize) -> Option<u64> {
        self.config.decoded_bar(index)
    }

    /// The configuration space, for a snapshot or a migration.
    pub fn config_registers(&self) -> Vec<u32> {
        self.config.registers()
    }

    /// Puts back what `config_registers` saved, as the guest's own writes
    /// would (BARs first, then the command register and the rest): only
    /// writable bits change, and the BARs' backing moves with them.
    pub fn restore_config(&self, regs: &[u32]) {
        let order = (4..10).chain(1..4).chain(10..regs.len().min(64));
        for i in order {
            if let Some(v) = regs.get(i) {
                self.config_write((i * 4) as u8, 0, &v.to_le_bytes());
            }
        }
    }

    pub fn set_bar_observer(&self, observer: Arc<dyn BarObserver>) {
        let _ = self.bar_observer.set(observer);
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
        self.config
            .write_observed(reg, offset, data, self.bar_observer.get());
        if let Some((table, at)) = &self.msix {
            if reg & !3 == *at {
                table.control_written((self.config.read(*at) >> 16) as u16);
            }
        }
    }
}

/// BAR0: the registers. IVPosition (offset 8) reads this VM's peer id; the
/// doorbell (offset 12) is an ioeventfd per peer and vector in doorbell
/// mode, so a doorbell to a peer that is there never reaches here; mask and
/// status read zero (MSI-X carries the interrupts).
pub struct IvshmemRegs {
    pub peer_id: u32,
    pub device: Arc<Ivshmem>,
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
    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 12 && self.device.doorbell_writes.fetch_add(1, Ordering::Relaxed) == 0 {
            let mut v = [0u8; 4];
            for (d, s) in v.iter_mut().zip(data) {
                *d = *s;
            }
            let v = u32::from_le_bytes(v);
            tracing::warn!(
                "ivshmem: the guest rang peer {} vector {}, which is not there: ignored (logged once, counted)",
                v >> 16,
                v & 0xffff
            );
        }
    }
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
