//! What backs the ivshmem BARs follows the guest: when it moves a BAR or
//! turns memory decoding off and on, BAR0 (registers and the doorbell
//! ioeventfds), BAR1 (the MSI-X table) and BAR2 (the shared memory slot,
//! and the range that catches its exiting accesses) move with it.

use std::sync::{Arc, OnceLock, Weak};

use devices::pci::BarObserver;
use devices::MovableId;
use kvm_ioctls::VmFd;

use crate::doorbell::PeerBells;
use crate::shared_region::SharedRegion;
use crate::vcpu::IoContext;

pub struct IvshmemBars {
    pub vm: Arc<VmFd>,
    pub region: Arc<SharedRegion>,
    /// Doorbell mode: the peers' ioeventfds.
    pub peers: Option<Arc<PeerBells>>,
    /// The bus ranges of BAR0, BAR1 and BAR2.
    pub ranges: [Option<MovableId>; 3],
    /// The MMIO bus (set once it exists; weak, as the bus holds the device
    /// that holds this).
    pub io: OnceLock<Weak<IoContext>>,
}

impl BarObserver for IvshmemBars {
    fn bar_moved(&self, bar: usize, from: Option<u64>, to: Option<u64>) {
        let at = |a: Option<u64>| a.map_or("nowhere".to_string(), |a| format!("{a:#x}"));
        tracing::info!("ivshmem: BAR{bar} moves from {} to {}", at(from), at(to));
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
            tracing::warn!("ivshmem: moving BAR{bar} to {}: {e}", at(to));
        }
    }
}
