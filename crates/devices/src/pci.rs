//! PCI bus 0: a host bridge and whatever devices are attached, reached
//! through the legacy configuration ports (0xCF8 address, 0xCFC data) and
//! through ECAM (memory-mapped, announced by an ACPI MCFG table). The
//! general mechanism for PCI devices (ivshmem now; virtio and VFIO later).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::BusDevice;

/// A function's configuration space as the guest sees it.
pub trait PciFunction: Send + Sync {
    fn name(&self) -> &str;
    /// Reads the 32-bit register at `reg` (a multiple of 4).
    fn config_read(&self, reg: u8) -> u32;
    /// Writes `value` at `reg + offset` (1, 2 or 4 bytes).
    fn config_write(&self, reg: u8, offset: u8, data: &[u8]);
}

/// A configuration space with BARs that size and move like hardware's.
pub struct ConfigSpace {
    regs: Mutex<[u32; 64]>,
    /// Per register: the bits a guest may write (the rest are read-only).
    writable: [u32; 64],
    /// Per BAR: size (0 = none), and the read-only low bits.
    bars: [(u64, u32); 6],
    /// Where the next capability goes (0x40 up), and the last one's offset.
    next_cap: u8,
    last_cap: u8,
}

/// Command register bits the VMM, acting as firmware, sets at start: memory
/// decoding and bus mastering (the BARs are assigned before the guest runs).
pub const COMMAND_MEMORY: u32 = 1 << 1;
pub const COMMAND_MASTER: u32 = 1 << 2;
const STATUS_CAPABILITIES: u32 = 1 << 20;

impl ConfigSpace {
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut regs = [0u32; 64];
        regs[0] = (device as u32) << 16 | vendor as u32;
        regs[2] = (class << 8) | revision as u32;
        regs[0x2c / 4] = (device as u32) << 16 | vendor as u32; // subsystem
        regs[1] = COMMAND_MEMORY | COMMAND_MASTER;
        let mut writable = [0u32; 64];
        writable[1] = 0x0000_ffff; // command (status is read-only here)
        writable[3] = 0x0000_ffff; // cache line size, latency timer
        writable[15] = 0x0000_00ff; // interrupt line
        ConfigSpace {
            regs: Mutex::new(regs),
            writable,
            bars: [(0, 0); 6],
            next_cap: 0x40,
            last_cap: 0,
        }
    }

    /// Sets a register as the VMM (firmware) does, read-only bits included.
    pub fn set_register(&mut self, reg: u8, value: u32) {
        self.regs.get_mut().unwrap_or_else(|e| e.into_inner())[(reg as usize / 4) & 63] = value;
    }

    /// Appends a capability: `body` is its registers from the ID byte on
    /// (the ID and next-pointer bytes are filled in), `writable` the bits a
    /// guest may change, per dword of the body. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u32], writable: &[u32]) -> u8 {
        let at = self.next_cap;
        let regs = self.regs.get_mut().unwrap_or_else(|e| e.into_inner());
        for (k, v) in body.iter().enumerate() {
            let i = at as usize / 4 + k;
            regs[i] = *v;
            let mask = writable.get(k).copied().unwrap_or(0);
            // the ID and next-pointer bytes are never writable
            self.writable[i] = if k == 0 { mask & !0xffff } else { mask };
        }
        regs[at as usize / 4] = (regs[at as usize / 4] & !0xffff) | id as u32;
        if self.last_cap == 0 {
            regs[0x34 / 4] = at as u32;
            regs[1] |= STATUS_CAPABILITIES;
        } else {
            regs[self.last_cap as usize / 4] |= (at as u32) << 8;
        }
        self.last_cap = at;
        self.next_cap = at + 4 * body.len() as u8;
        at
    }

    /// Declares BAR `index` of `size` bytes (a power of two) at `addr`;
    /// 64-bit memory BARs take two slots.
    pub fn set_bar(&mut self, index: usize, addr: u64, size: u64, mem64: bool, prefetch: bool) {
        let flags = (if mem64 { 0x4 } else { 0 }) | (if prefetch { 0x8 } else { 0 });
        let regs = self.regs.get_mut().unwrap_or_else(|e| e.into_inner());
        regs[4 + index] = (addr as u32 & !0xf) | flags;
        self.bars[index] = (size, flags);
        if mem64 {
            regs[5 + index] = (addr >> 32) as u32;
            self.bars[index + 1] = (size, u32::MAX); // the high half
        }
    }

    /// Where BAR `index` decodes now: None while memory decoding is off in
    /// the command register or the BAR holds the sizing pattern (all ones
    /// written, the size mask read back), as when a guest sizes BARs.
    pub fn decoded_bar(&self, index: usize) -> Option<u64> {
        let regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        self.decoded_in(&regs, index)
    }

    fn decoded_in(&self, regs: &[u32; 64], index: usize) -> Option<u64> {
        let (size, flags) = *self.bars.get(index)?;
        if size == 0 || flags == u32::MAX || regs[1] & COMMAND_MEMORY == 0 {
            return None;
        }
        let low = regs[4 + index];
        if low == (!((size - 1) as u32) & !0xf) | flags {
            return None;
        }
        Some(self.addr_in(regs, index))
    }

    /// Every register, for a snapshot.
    pub fn registers(&self) -> Vec<u32> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner()).to_vec()
    }

    /// Every BAR's decoded address (see `decoded_bar`), read under one lock.
    pub fn decoded_bars(&self) -> [Option<u64>; 6] {
        let regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        std::array::from_fn(|i| self.decoded_in(&regs, i))
    }

    /// The address BAR `index` holds now.
    pub fn bar_addr(&self, index: usize) -> u64 {
        let regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        self.addr_in(&regs, index)
    }

    fn addr_in(&self, regs: &[u32; 64], index: usize) -> u64 {
        let low = (regs[4 + index] & !0xf) as u64;
        if self.bars[index].1 & 0x4 != 0 {
            low | (regs[5 + index] as u64) << 32
        } else {
            low
        }
    }

    pub fn read(&self, reg: u8) -> u32 {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())[(reg as usize / 4) & 63]
    }

    /// A guest's write, after which `observer` (if any) hears of every BAR
    /// that now decodes elsewhere, or no longer decodes.
    pub fn write_observed(
        &self,
        reg: u8,
        offset: u8,
        data: &[u8],
        observer: Option<&Arc<dyn BarObserver>>,
    ) {
        let before = self.decoded_bars();
        self.write(reg, offset, data);
        if let Some(observer) = observer {
            for (bar, (from, to)) in before.into_iter().zip(self.decoded_bars()).enumerate() {
                if from != to {
                    observer.bar_moved(bar, from, to);
                }
            }
        }
    }

    pub fn write(&self, reg: u8, offset: u8, data: &[u8]) {
        let i = (reg as usize / 4) & 63;
        let mut regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = regs[i].to_le_bytes();
        for (k, b) in data.iter().enumerate() {
            if let Some(slot) = v.get_mut(offset as usize + k) {
                *slot = *b;
            }
        }
        let mut v = u32::from_le_bytes(v);
        match i {
            4..=9 => {
                let (size, flags) = self.bars[i - 4];
                if size == 0 {
                    return;
                }
                if flags == u32::MAX {
                    // high half of a 64-bit BAR: sized by the upper bits
                    v &= !((size.saturating_sub(1) >> 32) as u32);
                } else {
                    // sizing (all ones) reads back the size mask
                    v = (v & !((size - 1) as u32) & !0xf) | flags;
                }
            }
            _ => v = (regs[i] & !self.writable[i]) | (v & self.writable[i]),
        }
        regs[i] = v;
    }
}

/// Told when a BAR starts decoding at another address or stops decoding:
/// the VMM moves what backs it (a memory slot, a bus range, ioeventfds).
pub trait BarObserver: Send + Sync {
    fn bar_moved(&self, bar: usize, from: Option<u64>, to: Option<u64>);
}

/// The host bridge at 00:00.0 (Intel 440FX's IDs, as QEMU uses).
pub struct HostBridge(ConfigSpace);

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge(ConfigSpace::new(0x8086, 0x1237, 0x06_00_00, 2))
    }
}

impl PciFunction for HostBridge {
    fn name(&self) -> &str {
        "pci-host-bridge"
    }
    fn config_read(&self, reg: u8) -> u32 {
        self.0.read(reg)
    }
    fn config_write(&self, reg: u8, offset: u8, data: &[u8]) {
        self.0.write(reg, offset, data)
    }
}

/// Bus 0 as both configuration mechanisms see it: the host bridge at
/// 00:00.0, then the attached devices, one function each.
pub struct PciRoot {
    slots: Vec<Option<Arc<dyn PciFunction>>>,
}

impl PciRoot {
    /// Devices by slot number (00:00.0 is the host bridge).
    pub fn new(devices: Vec<Arc<dyn PciFunction>>) -> Arc<PciRoot> {
        PciRoot::with_slots(devices.into_iter().map(Some).collect())
    }

    /// Devices in slots 1 up (None: an empty slot).
    pub fn with_slots(devices: Vec<Option<Arc<dyn PciFunction>>>) -> Arc<PciRoot> {
        let mut slots: Vec<Option<Arc<dyn PciFunction>>> =
            vec![Some(Arc::new(HostBridge::default()))];
        slots.extend(devices);
        slots.resize_with(32, || None);
        Arc::new(PciRoot { slots })
    }

    fn function(&self, bus: u32, dev: u32, func: u32) -> Option<&Arc<dyn PciFunction>> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(dev as usize)?.as_ref()
    }

    /// Reads `data.len()` bytes at byte `reg` of a function's space; an
    /// absent function reads all-ones, the extended space (0x100 up, PCIe
    /// only) zero.
    pub fn read(&self, bus: u32, dev: u32, func: u32, reg: u32, data: &mut [u8]) {
        let Some(f) = self.function(bus, dev, func) else {
            data.fill(0xff);
            return;
        };
        if reg >= 0x100 {
            data.fill(0);
            return;
        }
        let v = f.config_read((reg & 0xfc) as u8).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get((reg & 3) as usize + i).copied().unwrap_or(0xff);
        }
    }

    pub fn write(&self, bus: u32, dev: u32, func: u32, reg: u32, data: &[u8]) {
        if let Some(f) = self.function(bus, dev, func) {
            if reg < 0x100 {
                f.config_write((reg & 0xfc) as u8, (reg & 3) as u8, data);
            }
        }
    }
}

/// The 0xCF8/0xCFC configuration mechanism.
pub struct PciConfigPorts {
    address: AtomicU32,
    root: Arc<PciRoot>,
}

impl PciConfigPorts {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigPorts {
            address: AtomicU32::new(0),
            root,
        }
    }

    /// (bus, device, function, register) the address register selects.
    fn target(&self) -> Option<(u32, u32, u32, u32)> {
        let a = self.address.load(Ordering::Relaxed);
        (a >> 31 == 1).then_some(((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7, a & 0xfc))
    }
}

impl BusDevice for PciConfigPorts {
    fn name(&self) -> &str {
        "pci-config"
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            let v = self.address.load(Ordering::Relaxed).to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = v.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        match self.target() {
            Some((bus, dev, func, reg)) => {
                self.root
                    .read(bus, dev, func, reg + (offset as u32 - 4), data)
            }
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            self.address.store(
                u32::from_le_bytes(data.try_into().unwrap()),
                Ordering::Relaxed,
            );
            return;
        }
        if offset >= 4 {
            if let Some((bus, dev, func, reg)) = self.target() {
                self.root
                    .write(bus, dev, func, reg + (offset as u32 - 4), data);
            }
        }
    }
}

/// ECAM: each function's configuration space memory-mapped, 4 KiB apiece
/// (bus << 20 | device << 15 | function << 12), as an ACPI MCFG table
/// announces it. Only bus 0 is decoded.
pub struct PciEcam(pub Arc<PciRoot>);

/// ECAM's size for bus 0.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

impl PciEcam {
    fn split(offset: u64) -> (u32, u32, u32, u32) {
        let o = offset as u32;
        (o >> 20, (o >> 15) & 0x1f, (o >> 12) & 7, o & 0xfff)
    }
}

impl BusDevice for PciEcam {
    fn name(&self) -> &str {
        "pci-ecam"
    }
    fn read(&self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = Self::split(offset);
        self.0.read(bus, dev, func, reg, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg) = Self::split(offset);
        self.0.write(bus, dev, func, reg, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read(p: &PciConfigPorts, dev: u32, reg: u32) -> u32 {
        p.write(0, &((1 << 31) | (dev << 11) | reg).to_le_bytes());
        let mut d = [0u8; 4];
        p.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn cfg_write(p: &PciConfigPorts, dev: u32, reg: u32, v: u32) {
        p.write(0, &((1 << 31) | (dev << 11) | reg).to_le_bytes());
        p.write(4, &v.to_le_bytes());
    }

    struct Dev(ConfigSpace);
    impl PciFunction for Dev {
        fn name(&self) -> &str {
            "t"
        }
        fn config_read(&self, reg: u8) -> u32 {
            self.0.read(reg)
        }
        fn config_write(&self, reg: u8, offset: u8, data: &[u8]) {
            self.0.write(reg, offset, data)
        }
    }

    #[test]
    fn config_space_ids_and_bar_sizing() {
        let mut cs = ConfigSpace::new(0x1af4, 0x1110, 0x05_00_00, 1);
        cs.set_bar(0, 0xe000_0000, 256, false, false);
        cs.set_bar(2, 0x1_0000_0000, 1 << 21, true, true);
        let root = PciRoot::new(vec![Arc::new(Dev(cs))]);
        let p = PciConfigPorts::new(root.clone());
        let ecam = PciEcam(root);
        assert_eq!(cfg_read(&p, 0, 0), 0x1237_8086);
        assert_eq!(cfg_read(&p, 1, 0), 0x1110_1af4);
        assert_eq!(cfg_read(&p, 2, 0), u32::MAX, "an empty slot reads all-ones");
        assert_eq!(cfg_read(&p, 1, 0x10), 0xe000_0000);
        cfg_write(&p, 1, 0x10, u32::MAX);
        assert_eq!(cfg_read(&p, 1, 0x10), !(256 - 1) & !0xf);
        cfg_write(&p, 1, 0x18, u32::MAX);
        assert_eq!(cfg_read(&p, 1, 0x18), (!((1u32 << 21) - 1) & !0xf) | 0xc);
        cfg_write(&p, 1, 0x18, 0xc000_0000);
        cfg_write(&p, 1, 0x1c, 0);
        assert_eq!(cfg_read(&p, 1, 0x18) & !0xf, 0xc000_0000);
        // ids stay
        cfg_write(&p, 1, 0, 0);
        assert_eq!(cfg_read(&p, 1, 0), 0x1110_1af4);
        // ECAM sees the same space, at any access size
        let mut d = [0u8; 4];
        ecam.read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1110_1af4);
        let mut w = [0u8; 2];
        ecam.read((1 << 15) + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1110);
        ecam.read((1 << 15) + 0x18, &mut d);
        assert_eq!(u32::from_le_bytes(d) & !0xf, 0xc000_0000);
        ecam.read(2 << 15, &mut d);
        assert_eq!(d, [0xff; 4], "an empty slot");
        ecam.read((1 << 15) + 0x100, &mut d);
        assert_eq!(d, [0; 4], "no extended space");
        // the command register is writable, the status register is not
        ecam.write((1 << 15) + 4, &0xffff_ffffu32.to_le_bytes());
        ecam.read((1 << 15) + 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff);
    }
}
