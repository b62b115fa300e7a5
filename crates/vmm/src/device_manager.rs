//! The device manager: the one way a device enters a VM. It hands out the
//! resources a device needs (PCI slots, BAR addresses in the MMIO hole,
//! GSIs), puts the device's ranges on the port or MMIO bus, and keeps every
//! device by id for what is done to all of them alike: save and restore
//! their state, read their counters, refuse a migration one of them cannot
//! make.
//!
//! Adding a device: a module with the device and its `…State` beside it
//! (devices::Persist), a config flag, and one `attach_*` call here.

use std::collections::BTreeMap;
use std::sync::Arc;

use devices::pci::PciFunction;
use devices::{Bus, BusDevice, DeviceStates, MovableId, StateError, Stateful};

use crate::layout;
use crate::{Error, Result};

/// A range of guest physical addresses handed out in order, each piece
/// aligned to its size (as a BAR must be).
#[derive(Debug, Clone)]
struct RangeAllocator {
    what: &'static str,
    next: u64,
    end: u64,
}

impl RangeAllocator {
    fn allocate(&mut self, size: u64) -> Result<u64> {
        // at least a page: ioeventfds and MSI-X tables never share one
        let size = size.max(4096).next_power_of_two();
        let at = self.next.div_ceil(size) * size;
        match at.checked_add(size) {
            Some(end) if end <= self.end => {
                self.next = end;
                Ok(at)
            }
            _ => Err(Error::Device(format!(
                "no room for a {size:#x}-byte BAR in the {} window ({:#x}..{:#x} has {:#x} left)",
                self.what,
                self.next,
                self.end,
                self.end.saturating_sub(self.next)
            ))),
        }
    }
}

/// What the manager hands out.
#[derive(Debug, Clone)]
pub struct Resources {
    next_pci_slot: u32,
    /// Large BARs (shared memory windows).
    large: RangeAllocator,
    /// Register BARs and MSI-X tables.
    small: RangeAllocator,
    next_gsi: u32,
    /// The next PCI device's legacy interrupt pin.
    next_intx: u32,
}

/// The IOAPIC pins PCI devices' legacy interrupts use (16-23).
const INTX_PINS: std::ops::RangeInclusive<u32> = 16..=23;

impl Default for Resources {
    fn default() -> Self {
        Resources {
            // 00:00.0 is the host bridge
            next_pci_slot: 1,
            large: RangeAllocator {
                what: "large-BAR",
                next: layout::PCI_LARGE_BARS.0,
                end: layout::PCI_LARGE_BARS.1,
            },
            small: RangeAllocator {
                what: "small-BAR",
                next: layout::PCI_SMALL_BARS.0,
                end: layout::PCI_SMALL_BARS.1,
            },
            next_gsi: crate::irq_routes::FIRST_DEVICE_GSI,
            next_intx: *INTX_PINS.start(),
        }
    }
}

impl Resources {
    /// A PCI slot on bus 0.
    pub fn pci_slot(&mut self) -> Result<u32> {
        if self.next_pci_slot >= 32 {
            return Err(Error::Device(
                "bus 0 has no free PCI slot (32 in all)".into(),
            ));
        }
        self.next_pci_slot += 1;
        Ok(self.next_pci_slot - 1)
    }

    /// A BAR's address: `large` for memory windows (up to 256 MiB).
    pub fn bar(&mut self, size: u64, large: bool) -> Result<u64> {
        if large {
            self.large.allocate(size)
        } else {
            self.small.allocate(size)
        }
    }

    /// A legacy interrupt pin (used while a device's MSI-X is off): each
    /// device its own until the eight are taken, then shared round-robin.
    pub fn intx_pin(&mut self) -> u32 {
        let pin = self.next_intx;
        self.next_intx = if pin == *INTX_PINS.end() {
            *INTX_PINS.start()
        } else {
            pin + 1
        };
        pin
    }

    /// `n` consecutive GSIs for MSI routes (above KVM's default routes).
    pub fn gsis(&mut self, n: u32) -> Result<u32> {
        let first = self.next_gsi;
        match first.checked_add(n) {
            Some(end) if end <= MAX_GSI => {
                self.next_gsi = end;
                Ok(first)
            }
            _ => Err(Error::Device(format!(
                "no {n} free GSIs (at most {MAX_GSI}; {first} taken)"
            ))),
        }
    }
}

/// KVM's routing table size here (KVM_CAP_IRQ_ROUTING).
const MAX_GSI: u32 = 4096;

/// Every device of a running VM, by id, for what is done to all alike.
#[derive(Default)]
pub struct Devices {
    by_id: BTreeMap<String, Arc<dyn Stateful>>,
}

impl Devices {
    /// Every device's state, keyed by id.
    pub fn save(&self) -> DeviceStates {
        self.by_id
            .iter()
            .map(|(id, d)| (id.clone(), d.save_blob()))
            .collect()
    }

    /// Checks every device's state in `states` (kind, version, every
    /// field; none missing, none extra) without taking any.
    pub fn check(&self, states: &DeviceStates) -> std::result::Result<(), StateError> {
        if let Some(id) = states.keys().find(|id| !self.by_id.contains_key(*id)) {
            return Err(StateError::Unknown { id: id.clone() });
        }
        for (id, dev) in &self.by_id {
            let blob = states
                .get(id)
                .ok_or_else(|| StateError::Missing { id: id.clone() })?;
            dev.check_blob(id, blob)?;
        }
        Ok(())
    }

    /// Restores every device from `states`: all are checked first, then
    /// applied, so a refused state changes no device. (One that fails
    /// while it takes a checked state, as ivshmem's window can, leaves the
    /// others restored: the VM then never runs.)
    pub fn restore(&self, states: &DeviceStates) -> std::result::Result<(), StateError> {
        self.check(states)?;
        for (id, dev) in &self.by_id {
            dev.restore_blob(id, &states[id])?;
        }
        Ok(())
    }

    /// Each device's counters, by id (devices that count nothing left out).
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.by_id
            .iter()
            .filter_map(|(id, d)| {
                let c = d.counters();
                (!c.is_empty()).then(|| {
                    (
                        id.clone(),
                        c.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                    )
                })
            })
            .collect()
    }

    /// Each device's own threads, by id (devices without any left out).
    pub fn threads(&self) -> BTreeMap<String, Vec<devices::state::DeviceThread>> {
        self.by_id
            .iter()
            .map(|(id, d)| (id.clone(), d.threads()))
            .filter(|(_, t)| !t.is_empty())
            .collect()
    }

    /// Every device stops touching guest memory (the VM pauses).
    pub fn pause(&self) {
        for d in self.by_id.values() {
            d.pause();
        }
    }

    /// And goes on (the VM resumes).
    pub fn resume(&self) {
        for d in self.by_id.values() {
            d.resume();
        }
    }

    /// Migration: every device's outside writers log the pages they write
    /// (vhost-user backends). Err: one cannot (the others are turned off
    /// again).
    pub fn start_dirty_log(&self) -> Result<()> {
        for (id, d) in &self.by_id {
            if let Err(e) = d.dirty_log(true) {
                self.stop_dirty_log();
                return Err(Error::Device(format!("device {id}: {e}")));
            }
        }
        Ok(())
    }

    pub fn stop_dirty_log(&self) {
        for d in self.by_id.values() {
            let _ = d.dirty_log(false);
        }
    }

    /// The pages the devices' outside writers logged since the last call.
    pub fn harvest_dirty(&self, mark: &mut dyn FnMut(u64, u64)) -> u64 {
        self.by_id.values().map(|d| d.harvest_dirty(mark)).sum()
    }

    /// The first device that cannot be saved or migrated, and why.
    pub fn unmovable(&self) -> Option<String> {
        self.by_id
            .iter()
            .find_map(|(id, d)| d.unmovable().map(|why| format!("device {id}: {why}")))
    }

    /// A device-specific action (ivshmem's window map/unmap).
    pub fn control(&self, id: &str, action: &str) -> Result<String> {
        let dev = self.by_id.get(id).ok_or_else(|| {
            Error::Config(format!(
                "this VM has no device {id} (it has: {})",
                self.by_id.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        dev.control(action)
            .map_err(|e| Error::Config(format!("device {id}: {e}")))
    }

    /// The ids of the devices of one kind.
    pub fn of_kind(&self, kind: &str) -> Vec<String> {
        self.by_id
            .iter()
            .filter(|(_, d)| d.kind() == kind)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Builds a VM's devices: resources, buses, the PCI functions, and the
/// registry of devices by id.
#[derive(Default)]
pub struct DeviceManager {
    pub resources: Resources,
    pub pio: Bus,
    pub mmio: Bus,
    pci: Vec<(u32, Arc<dyn PciFunction>)>,
    devices: Devices,
    /// The VM's buses, set once they exist: a BAR observer moves its
    /// ranges there when the guest moves a BAR.
    pub bus_link: BusLink,
}

/// The VM's buses as a device's BAR observer reaches them (weak: the bus
/// holds the device that holds this; set once, when the buses exist).
pub type BusLink = Arc<std::sync::OnceLock<std::sync::Weak<crate::vcpu::IoContext>>>;

fn bus_err(e: devices::BusError) -> Error {
    Error::Device(e.to_string())
}

impl DeviceManager {
    /// Registers a device's state, counters and controls under `id`.
    pub fn register(&mut self, id: &str, dev: Arc<dyn Stateful>) -> Result<()> {
        if self.devices.by_id.contains_key(id) {
            return Err(Error::Device(format!("two devices with the id {id}")));
        }
        self.devices.by_id.insert(id.to_string(), dev);
        Ok(())
    }

    /// A port-I/O device with state: on the bus at `base`, registered as `id`.
    pub fn attach_port_device<D: BusDevice + Stateful + 'static>(
        &mut self,
        id: &str,
        base: u64,
        len: u64,
        dev: Arc<D>,
    ) -> Result<()> {
        self.pio.insert(base, len, dev.clone()).map_err(bus_err)?;
        self.register(id, dev)
    }

    /// A port range with no state of its own (a benchmark sink, a bridge).
    pub fn attach_port(&mut self, base: u64, len: u64, dev: Arc<dyn BusDevice>) -> Result<()> {
        self.pio.insert(base, len, dev).map_err(bus_err)
    }

    /// A fixed MMIO range with no state of its own.
    pub fn attach_mmio(&mut self, base: u64, len: u64, dev: Arc<dyn BusDevice>) -> Result<()> {
        self.mmio.insert(base, len, dev).map_err(bus_err)
    }

    /// A BAR's MMIO range, which moves when the guest moves the BAR.
    pub fn attach_bar(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<dyn BusDevice>,
    ) -> Result<MovableId> {
        self.mmio
            .insert_movable(Some(base), len, dev)
            .map_err(bus_err)
    }

    /// A PCI function in `slot` (from `resources.pci_slot()`).
    pub fn attach_pci(&mut self, slot: u32, f: Arc<dyn PciFunction>) {
        self.pci.push((slot, f));
    }

    /// Puts PCI bus 0 (every attached function) behind both configuration
    /// mechanisms, ports 0xcf8 and ECAM; returns the buses and the registry.
    pub fn finish(mut self) -> Result<(Bus, Bus, Devices)> {
        let mut slots: Vec<Option<Arc<dyn PciFunction>>> = Vec::new();
        for (slot, f) in std::mem::take(&mut self.pci) {
            let i = slot as usize - 1;
            if slots.len() <= i {
                slots.resize_with(i + 1, || None);
            }
            slots[i] = Some(f);
        }
        let root = devices::pci::PciRoot::with_slots(slots);
        self.attach_port(
            0xcf8,
            8,
            Arc::new(devices::pci::PciConfigPorts::new(root.clone())),
        )?;
        self.attach_mmio(
            layout::ECAM_ADDR,
            devices::pci::ECAM_BUS_SIZE,
            Arc::new(devices::pci::PciEcam(root)),
        )?;
        Ok((self.pio, self.mmio, self.devices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_aligned_to_their_size_and_the_window_runs_out() {
        let mut r = Resources::default();
        let a = r.bar(256, false).unwrap();
        let b = r.bar(0x1000, false).unwrap();
        assert_eq!(a % 0x1000, 0);
        assert_eq!(b, a + 0x1000);
        let big = r.bar(64 << 20, true).unwrap();
        assert_eq!(big % (64 << 20), 0);
        let e = r.bar(1 << 40, true).unwrap_err().to_string();
        assert!(e.contains("no room"), "{e}");
    }

    #[test]
    fn slots_and_gsis_run_out_with_a_clear_error() {
        let mut r = Resources::default();
        for s in 1..32 {
            assert_eq!(r.pci_slot().unwrap(), s);
        }
        assert!(r
            .pci_slot()
            .unwrap_err()
            .to_string()
            .contains("no free PCI slot"));
        let first = r.gsis(8).unwrap();
        assert_eq!(r.gsis(1).unwrap(), first + 8);
        assert!(r.gsis(10_000).is_err());
    }
}
