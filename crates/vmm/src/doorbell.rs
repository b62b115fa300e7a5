//! ivshmem doorbell mode: this VM's vectors are irqfds, each on a GSI of its
//! own that is routed as the device's MSI-X state says (the legacy IOAPIC
//! pin `IRQ_PIN + vector` while MSI-X is off, the guest's message when on,
//! detached while masked); every peer's vectors are ioeventfds on the
//! Doorbell register with datamatch (peer << 16 | vector): a doorbell goes
//! guest -> ioeventfd -> the peer's irqfd -> the peer guest's interrupt, with
//! no VMM userspace on the path. A watcher thread follows peers joining and
//! leaving.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::msix::{MsiRouter, VectorRoute};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::irq_routes::{GsiRoutes, Route, FIRST_DEVICE_GSI};
use crate::shared_region::BAR0_ADDR;
use crate::{Error, Result};

const DOORBELL: u64 = BAR0_ADDR + 12;

fn eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: the descriptor is an eventfd the server created, now owned here.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

pub struct Doorbells {
    stream: UnixStream,
    own: Arc<OwnVectors>,
    peers: Vec<(i64, u32, EventFd)>,
}

/// This VM's vectors: the server's eventfds as irqfds on GSIs
/// FIRST_DEVICE_GSI + vector, routed by the device's MSI-X state.
pub struct OwnVectors {
    vm: Arc<VmFd>,
    routes: Arc<GsiRoutes>,
    evts: Vec<EventFd>,
    attached: Mutex<Vec<bool>>,
    legacy_pin: u32,
}

impl OwnVectors {
    pub fn count(&self) -> usize {
        self.evts.len()
    }

    /// Routes vector `v` as `route` says, attaching or detaching its irqfd.
    /// A masked vector's irqfd is detached: a doorbell then stays counted in
    /// the eventfd, and KVM injects it when the irqfd is attached again.
    pub fn apply(&self, v: u16, route: VectorRoute) -> Result<()> {
        let gsi = FIRST_DEVICE_GSI + v as u32;
        let evt = self
            .evts
            .get(v as usize)
            .ok_or_else(|| Error::Device(format!("ivshmem has no vector {v}")))?;
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        let to = match route {
            VectorRoute::Masked => {
                if attached[v as usize] {
                    self.vm.unregister_irqfd(evt, gsi).map_err(|e| {
                        Error::Kvm(format!("detaching the irqfd of ivshmem vector {v}: {e}"))
                    })?;
                    attached[v as usize] = false;
                }
                return Ok(());
            }
            VectorRoute::Intx => Route::Ioapic(self.legacy_pin + v as u32),
            VectorRoute::Msi { address, data } => Route::Msi { address, data },
        };
        self.routes.set(&self.vm, gsi, Some(to))?;
        if !attached[v as usize] {
            self.vm
                .register_irqfd(evt, gsi)
                .map_err(|e| Error::Kvm(format!("irqfd for ivshmem vector {v}: {e}")))?;
            attached[v as usize] = true;
        }
        Ok(())
    }
}

impl MsiRouter for OwnVectors {
    fn route(&self, vector: u16, route: VectorRoute) {
        // a guest's MSI-X write cannot fail back to the guest: say it here
        match self.apply(vector, route) {
            Ok(()) => tracing::debug!("ivshmem vector {vector}: {route:?}"),
            Err(e) => tracing::warn!("ivshmem vector {vector} to {route:?}: {e}"),
        }
    }
}

fn datamatch(peer: i64, vector: u32) -> u32 {
    ((peer as u32) << 16) | (vector & 0xffff)
}

fn ring_to(vm: &VmFd, peer: i64, vector: u32, evt: &EventFd) -> Result<()> {
    vm.register_ioevent(
        evt,
        &IoEventAddress::Mmio(DOORBELL),
        datamatch(peer, vector),
    )
    .map_err(|e| {
        Error::Kvm(format!(
            "ioeventfd for the doorbell of peer {peer} vector {vector}: {e}"
        ))
    })
}

impl Doorbells {
    /// Wires what `join` brought: own vectors to the legacy pins from
    /// `pin` (MSI-X starts off), peers to doorbells.
    pub fn wire(
        vm: &Arc<VmFd>,
        routes: Arc<GsiRoutes>,
        joined: devices::ivshmem_proto::Joined,
        stream: UnixStream,
        pin: u32,
    ) -> Result<(Doorbells, Arc<OwnVectors>, OwnedFd, u32)> {
        let own = Arc::new(OwnVectors {
            vm: vm.clone(),
            routes,
            attached: Mutex::new(vec![false; joined.own.len()]),
            evts: joined.own.into_iter().map(eventfd).collect(),
            legacy_pin: pin,
        });
        for v in 0..own.count() {
            own.apply(v as u16, VectorRoute::Intx)?;
        }
        let mut peers = Vec::new();
        for (peer, v, fd) in joined.peers {
            let evt = eventfd(fd);
            ring_to(vm, peer, v, &evt)?;
            peers.push((peer, v, evt));
        }
        Ok((
            Doorbells {
                stream,
                own: own.clone(),
                peers,
            },
            own,
            joined.shm,
            joined.id as u32,
        ))
    }

    /// Follows the server: new peers' doorbells registered, departed
    /// peers' removed, until `stop`.
    pub fn watch(self, vm: Arc<VmFd>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let Doorbells {
                stream,
                own,
                mut peers,
            } = self;
            let _own = own; // kept alive with the VM
            let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
            while !stop.load(Ordering::Acquire) {
                match devices::ivshmem_proto::recv(&stream) {
                    Ok(Some((peer, Some(fd)))) => {
                        let v = peers.iter().filter(|p| p.0 == peer).count() as u32;
                        let evt = eventfd(fd);
                        match ring_to(&vm, peer, v, &evt) {
                            Ok(()) => tracing::info!("ivshmem: peer {peer} vector {v} can be rung"),
                            Err(e) => tracing::warn!("{e}"),
                        }
                        peers.push((peer, v, evt));
                    }
                    Ok(Some((peer, None))) => {
                        peers.retain(|(p, v, evt)| {
                            if *p == peer {
                                let _ = vm.unregister_ioevent(
                                    evt,
                                    &IoEventAddress::Mmio(DOORBELL),
                                    datamatch(*p, *v),
                                );
                                false
                            } else {
                                true
                            }
                        });
                        tracing::info!("ivshmem: peer {peer} left");
                    }
                    Ok(None) => {
                        tracing::warn!(
                            "ivshmem: the server closed the connection; doorbells stay as they are"
                        );
                        break;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => {
                        tracing::warn!("ivshmem server: {e}");
                        break;
                    }
                }
            }
            // keep the eventfds until the VM ends
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    }
}
