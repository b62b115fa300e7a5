//! ivshmem in a VM: the PCI device (devices::ivshmem) attached through the
//! device manager over a shared region (plain mode) or an ivshmem server's
//! (doorbell mode), its state (configuration space and window) beside it.
//!
//! What backs the BARs follows the guest: when it moves a BAR or turns
//! memory decoding off and on, BAR0 (registers and the doorbell
//! ioeventfds), BAR1 (the MSI-X table) and BAR2 (the shared memory slot,
//! and the range that catches its exiting accesses) move with it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use devices::pci::BarObserver;
use devices::state::BadField;
use devices::MovableId;
use kvm_ioctls::VmFd;

use crate::device_manager::{BusLink, DeviceManager};
use crate::doorbell::{Doorbells, PeerBells};
use crate::irq_routes::GsiRoutes;
use crate::shared_region::{IvshmemSpec, SharedRegion};
use crate::{Error, Result};

pub struct IvshmemBars {
    pub vm: Arc<VmFd>,
    pub region: Arc<SharedRegion>,
    /// Doorbell mode: the peers' ioeventfds.
    pub peers: Option<Arc<PeerBells>>,
    /// The bus ranges of BAR0, BAR1 and BAR2.
    pub ranges: [Option<MovableId>; 3],
    /// The VM's buses (the device manager's link).
    pub io: BusLink,
}

impl BarObserver for IvshmemBars {
    fn bar_moved(&self, bar: usize, from: Option<u64>, to: Option<u64>) {
        let at = |a: Option<u64>| a.map_or("nowhere".to_string(), |a| format!("{a:#x}"));
        // the guest decides how often: debug, and rate-limited
        devices::limited!(
            debug,
            "ivshmem: BAR{bar} moves from {} to {}",
            at(from),
            at(to)
        );
        if let (Some(io), Some(Some(range))) =
            (self.io.get().and_then(Weak::upgrade), self.ranges.get(bar))
        {
            io.mmio.move_to(*range, to);
        }
        let moved = match bar {
            0 => self.peers.as_ref().map_or(Ok(()), |p| p.move_to(to)),
            2 => self.region.set_bar(&self.vm, to),
            _ => Ok(()),
        };
        if let Err(e) = moved {
            // the guest's write cannot fail back to it: say so here
            devices::limited!(warn, "ivshmem: moving BAR{bar} to {}: {e}", at(to));
        }
    }
}

/// The ivshmem device as the VM keeps it: the PCI function, its region,
/// and whether it is in doorbell mode.
pub struct IvshmemDevice {
    vm: Arc<VmFd>,
    pub region: Arc<SharedRegion>,
    pub device: Arc<devices::ivshmem::Ivshmem>,
    doorbell_mode: bool,
}

/// ivshmem as the guest left it: its configuration space (BARs, command
/// register) and whether the window was open.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IvshmemState {
    pub config: Vec<u32>,
    pub window_open: bool,
}

/// Registers in a configuration space.
const CONFIG_REGISTERS: usize = 64;

impl devices::Persist for IvshmemDevice {
    const KIND: &'static str = "ivshmem";
    const VERSION: u16 = 1;
    type State = IvshmemState;

    fn save(&self) -> IvshmemState {
        IvshmemState {
            config: self.device.config_registers(),
            window_open: self.region.window_open(),
        }
    }

    fn validate(s: &IvshmemState) -> std::result::Result<(), BadField> {
        if s.config.len() != CONFIG_REGISTERS {
            return Err(BadField::new(
                "config",
                format!("{} registers", s.config.len()),
                format!("a configuration space has {CONFIG_REGISTERS}"),
            ));
        }
        Ok(())
    }

    fn restore(&self, s: IvshmemState) -> std::result::Result<(), String> {
        self.device.restore_config(&s.config);
        self.region
            .set_window(&self.vm, s.window_open)
            .map_err(|e| e.to_string())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            (
                "dropped_writes",
                self.device.dropped_writes.load(Ordering::Relaxed),
            ),
            (
                "doorbell_writes",
                self.device.doorbell_writes.load(Ordering::Relaxed),
            ),
            ("region_sealed", self.region.sealed as u64),
        ]
    }

    /// Doorbell mode cannot move: peer ids belong to the server connection,
    /// so the guest would lose its IVPosition and its peers' doorbells. (A
    /// plain region moves to a destination attached to the same region;
    /// the stream names it.)
    fn unmovable(&self) -> Option<String> {
        self.doorbell_mode.then(|| {
            "ivshmem in doorbell mode: its peer id belongs to its connection to the ivshmem server, so it cannot be saved or migrated (plain-mode regions can)".into()
        })
    }

    /// Opens (`map`) or closes (`unmap`) the window while the guest runs:
    /// KVM4NFV's "open the window when needed, close it immediately".
    fn control(&self, action: &str) -> std::result::Result<String, String> {
        let open = match action {
            "map" => true,
            "unmap" => false,
            other => return Err(format!("ivshmem takes map or unmap, not {other:?}")),
        };
        self.region
            .set_window(&self.vm, open)
            .map_err(|e| e.to_string())?;
        Ok(if open { "mapped" } else { "unmapped" }.into())
    }
}

/// What attaching ivshmem leaves to the VM: the device and the server
/// link to watch (doorbell mode).
pub struct Attached {
    pub device: Arc<IvshmemDevice>,
    pub doorbells: Option<Doorbells>,
}

/// Attaches ivshmem as `spec` says: a PCI slot, BAR0 (registers), BAR1
/// (MSI-X, doorbell mode) and BAR2 (the region, memory slot `mem_slot`)
/// from the device manager, GSIs for doorbell mode's vectors.
pub fn attach(
    dm: &mut DeviceManager,
    vm: &Arc<VmFd>,
    gsi_routes: Arc<GsiRoutes>,
    spec: &IvshmemSpec,
    mem_slot: u32,
) -> Result<Attached> {
    let pci_slot = dm.resources.pci_slot()?;
    let bar0 = dm.resources.bar(devices::ivshmem::BAR0_SIZE, false)?;
    let mut msix = None;
    let mut msix_range = None;
    let mut peer_bells = None;
    let mut doorbells = None;
    let (region, peer_id) = match &spec.server {
        Some(sock) => {
            let (joined, stream) = devices::ivshmem_proto::join(sock, spec.vectors)
                .map_err(|e| Error::Device(format!("ivshmem server {}: {e}", sock.display())))?;
            let first_gsi = dm.resources.gsis(joined.own.len() as u32)?;
            let crate::doorbell::Wired {
                doorbells: bells,
                own,
                peers,
                shm,
                id,
            } = Doorbells::wire(
                vm,
                gsi_routes,
                joined,
                stream,
                devices::ivshmem::IRQ_PIN,
                bar0,
                first_gsi,
            )?;
            let table = Arc::new(devices::msix::Msix::new(own.count() as u16));
            table.set_router(own);
            let bar1 = dm.resources.bar(devices::msix::BAR_SIZE, false)?;
            msix_range = Some(dm.attach_bar(bar1, devices::msix::BAR_SIZE, table.clone())?);
            msix = Some((table, bar1));
            doorbells = Some(bells);
            peer_bells = Some(peers);
            tracing::info!("ivshmem: peer {id} on {}", sock.display());
            (SharedRegion::from_fd(&shm, spec, mem_slot)?, id)
        }
        None => (SharedRegion::open(spec, mem_slot)?, 0),
    };
    let size = region.spec.size;
    let bar2 = dm.resources.bar(size, true)?;
    region.register_at(vm, bar2)?;
    let dev = Arc::new(devices::ivshmem::Ivshmem::new(bar0, msix, bar2, size));
    let regs_range = dm.attach_bar(
        bar0,
        devices::ivshmem::BAR0_SIZE,
        Arc::new(devices::ivshmem::IvshmemRegs {
            peer_id,
            device: dev.clone(),
        }),
    )?;
    // catches BAR2 accesses that exit: read-only writes, and all of them
    // while the window is unmapped
    let window_range = dm.attach_bar(
        bar2,
        size,
        Arc::new(devices::ivshmem::ReadOnlyWindow(dev.clone())),
    )?;
    let region = Arc::new(region);
    let bars = Arc::new(IvshmemBars {
        vm: vm.clone(),
        region: region.clone(),
        peers: peer_bells,
        ranges: [Some(regs_range), msix_range, Some(window_range)],
        io: dm.bus_link.clone(),
    });
    dev.set_bar_observer(bars.clone());
    dm.attach_pci(pci_slot, dev.clone());
    let device = Arc::new(IvshmemDevice {
        vm: vm.clone(),
        region,
        device: dev,
        doorbell_mode: spec.server.is_some(),
    });
    dm.register(&format!("ivshmem{}", pci_slot - 1), device.clone())?;
    Ok(Attached { device, doorbells })
}
