//! A virtio device in a VM, whatever the device: behind the modern
//! virtio-pci transport, attached through the device manager: a PCI slot,
//! BAR 1 (MSI-X) and BAR 4 (the virtio registers), one GSI per MSI-X
//! vector, one ioeventfd per queue at its notify address (a kick never
//! exits to this process), all moved when the guest moves the BARs. The
//! one way every virtio device (net, blk, ...) is attached.

use std::marker::PhantomData;
use std::sync::{Arc, Weak};

use devices::pci::BarObserver;
use devices::MovableId;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio::pci::{VirtioBar, VirtioPci, MSIX_BAR, NOTIFY_MULTIPLIER, NOTIFY_OFFSET, VIRTIO_BAR};
use virtio::VirtioDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::{BusLink, DeviceManager};
use crate::irq_routes::GsiRoutes;
use crate::memory::GuestRam;
use crate::{Error, Result};

/// What a kind of virtio device is called in a stream.
pub trait VirtioKind: Send + Sync + 'static {
    const KIND: &'static str;
    const VERSION: u16;
}

/// Declares a kind of virtio device: `virtio_kind!(Name, "kind", version,
/// "what the device's own state holds")`.
#[macro_export]
macro_rules! virtio_kind {
    ($name:ident, $kind:literal, $version:literal, $doc:literal) => {
        #[doc = concat!("A ", $kind, " device in a stream (", $doc, ").")]
        pub struct $name;

        impl $crate::virtio_pci::VirtioKind for $name {
            const KIND: &'static str = $kind;
            const VERSION: u16 = $version;
        }
    };
}

/// A virtio device as the VM keeps it: its transport, for state, counters,
/// control and pause.
pub struct VirtioFunction<K> {
    pub pci: Arc<VirtioPci<GuestRam>>,
    _kind: PhantomData<K>,
}

impl<K: VirtioKind> devices::Persist for VirtioFunction<K> {
    const KIND: &'static str = K::KIND;
    const VERSION: u16 = K::VERSION;
    /// The transport's registers, MSI-X table, every queue's addresses and
    /// positions, and the device's own state. What backs the device (a
    /// TAP, an image) is the host's: a destination attaches its own.
    type State = virtio::pci::VirtioPciState;

    fn save(&self) -> Self::State {
        self.pci.save_state()
    }

    fn validate(s: &Self::State) -> std::result::Result<(), devices::state::BadField> {
        use devices::state::BadField;
        if s.config.len() != 64 {
            return Err(BadField::new(
                "config",
                format!("{} registers", s.config.len()),
                "a configuration space has 64",
            ));
        }
        if s.queues.is_empty() || s.queues.len() > 64 {
            return Err(BadField::new(
                "queues",
                s.queues.len(),
                "a virtio device here has from 1 to 64 queues",
            ));
        }
        Ok(())
    }

    /// Checks the state against this device (MSI-X table size, queue
    /// count and sizes, features, the device's own), then takes it.
    fn restore(&self, s: Self::State) -> std::result::Result<(), String> {
        self.pci
            .check_state(&s)
            .map_err(|(field, value, why)| format!("{field} = {value} is out of range: {why}"))?;
        self.pci.restore_state(s)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.pci.counters()
    }

    fn threads(&self) -> Vec<devices::state::DeviceThread> {
        self.pci.threads()
    }

    fn control(&self, action: &str) -> std::result::Result<String, String> {
        self.pci.control(action)
    }

    /// Stops the device: its workers finish what is in flight first.
    fn pause(&self) {
        self.pci.pause()
    }

    fn resume(&self) {
        self.pci.resume()
    }

    fn dirty_log(&self, on: bool) -> std::result::Result<(), String> {
        self.pci.dirty_log(on)
    }

    fn harvest_dirty(&self, mark: &mut dyn FnMut(u64, u64)) -> u64 {
        self.pci.harvest_dirty(mark)
    }
}

/// Moves what backs the BARs with them: the bus ranges and the
/// notification ioeventfds.
struct VirtioBars {
    name: String,
    vm: Arc<VmFd>,
    kicks: Vec<(u16, EventFd)>,
    ranges: [MovableId; 2],
    io: BusLink,
}

fn notify_addr(bar4: u64, q: u16) -> IoEventAddress {
    IoEventAddress::Mmio(bar4 + NOTIFY_OFFSET + q as u64 * NOTIFY_MULTIPLIER as u64)
}

impl VirtioBars {
    fn register(&self, bar4: u64) -> Result<()> {
        for (q, k) in &self.kicks {
            self.vm
                .register_ioevent(k, &notify_addr(bar4, *q), NoDatamatch)
                .map_err(|e| Error::Kvm(format!("{}: ioeventfd for queue {q}: {e}", self.name)))?;
        }
        Ok(())
    }
}

impl BarObserver for VirtioBars {
    fn bar_moved(&self, bar: usize, from: Option<u64>, to: Option<u64>) {
        let range = match bar {
            MSIX_BAR => self.ranges[0],
            VIRTIO_BAR => self.ranges[1],
            _ => return,
        };
        if let Some(io) = self.io.get().and_then(Weak::upgrade) {
            io.mmio.move_to(range, to);
        }
        if bar == VIRTIO_BAR {
            if let Some(old) = from {
                for (q, k) in &self.kicks {
                    let _ = self
                        .vm
                        .unregister_ioevent(k, &notify_addr(old, *q), NoDatamatch);
                }
            }
            if let Some(new) = to {
                if let Err(e) = self.register(new) {
                    devices::limited!(
                        warn,
                        "{}: moving its notifications to {new:#x}: {e}",
                        self.name
                    );
                }
            }
        }
    }
}

/// Attaches `device` as `name` (net0, blk1, ...) on PCI bus 0.
pub fn attach<K: VirtioKind>(
    dm: &mut DeviceManager,
    vm: &Arc<VmFd>,
    gsi_routes: Arc<GsiRoutes>,
    mem: &GuestRam,
    name: &str,
    device: Box<dyn VirtioDevice<GuestRam>>,
) -> Result<Arc<VirtioPci<GuestRam>>> {
    let queues = device.queue_max_sizes().len() as u32;
    // one vector a queue and one for configuration changes
    let vectors = queues + 1;
    let slot = dm.resources.pci_slot()?;
    let bar1 = dm.resources.bar(devices::msix::BAR_SIZE, false)?;
    let bar4 = dm.resources.bar(virtio::pci::VIRTIO_BAR_SIZE, false)?;
    let first_gsi = dm.resources.gsis(vectors)?;
    let pin = dm.resources.intx_pin();
    let evts: Vec<EventFd> = (0..vectors)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::Device(format!("{name}: interrupt eventfds: {e}")))?;
    let clones = evts
        .iter()
        .map(|e| e.try_clone())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::Device(format!("{name}: interrupt eventfds: {e}")))?;
    let pci = Arc::new(
        VirtioPci::new(name, device, mem.clone(), bar1, bar4, clones, pin as u8)
            .map_err(Error::Device)?,
    );
    let router = crate::doorbell::OwnVectors::new(vm, gsi_routes, first_gsi, evts, pin, true)?;
    pci.msix.set_router(router);
    let msix_range = dm.attach_bar(bar1, devices::msix::BAR_SIZE, pci.msix.clone())?;
    let bar_range = dm.attach_bar(
        bar4,
        virtio::pci::VIRTIO_BAR_SIZE,
        Arc::new(VirtioBar(pci.clone())),
    )?;
    let bars = Arc::new(VirtioBars {
        name: name.to_string(),
        vm: vm.clone(),
        kicks: pci.kick_fds(),
        ranges: [msix_range, bar_range],
        io: dm.bus_link.clone(),
    });
    bars.register(bar4)?;
    pci.set_bar_observer(bars.clone());
    dm.attach_pci(slot, pci.clone());
    dm.register(
        name,
        Arc::new(VirtioFunction::<K> {
            pci: pci.clone(),
            _kind: PhantomData,
        }),
    )?;
    Ok(pci)
}
