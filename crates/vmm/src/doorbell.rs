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

use crate::irq_routes::{GsiRoutes, Route};
use crate::{Error, Result};

/// The Doorbell register's offset in BAR0.
const DOORBELL: u64 = 12;

fn eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: the descriptor is an eventfd the server created, now owned here.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

pub struct Doorbells {
    stream: UnixStream,
    own: Arc<OwnVectors>,
    peers: Arc<PeerBells>,
}

/// Every peer's vectors as ioeventfds on the Doorbell register, wherever
/// BAR0 decodes now (none while it does not).
pub struct PeerBells {
    vm: Arc<VmFd>,
    state: Mutex<PeerState>,
}

/// Where BAR0 decodes, and (peer, vector, eventfd) for each peer vector.
type PeerState = (Option<u64>, Vec<(i64, u32, EventFd)>);

/// What `Doorbells::wire` makes: the server link, this VM's vectors, the
/// peers' doorbells, the region's descriptor and this VM's peer id.
pub struct Wired {
    pub doorbells: Doorbells,
    pub own: Arc<OwnVectors>,
    pub peers: Arc<PeerBells>,
    pub shm: OwnedFd,
    pub id: u32,
}

impl PeerBells {
    fn add(&self, peer: i64, v: u32, evt: EventFd) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let r = match st.0 {
            Some(bar0) => ring_to(&self.vm, bar0, peer, v, &evt),
            None => Ok(()),
        };
        st.1.push((peer, v, evt));
        r
    }

    /// The vectors peer `peer` has now (the next one it sends is this).
    fn vectors_of(&self, peer: i64) -> u32 {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1.iter().filter(|p| p.0 == peer).count() as u32
    }

    fn remove(&self, peer: i64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let bar0 = st.0;
        st.1.retain(|(p, v, evt)| {
            if *p != peer {
                return true;
            }
            if let Some(bar0) = bar0 {
                let _ = self.vm.unregister_ioevent(
                    evt,
                    &IoEventAddress::Mmio(bar0 + DOORBELL),
                    datamatch(*p, *v),
                );
            }
            false
        });
    }

    /// BAR0 now decodes at `bar0` (None: not at all): every ioeventfd moves.
    pub fn move_to(&self, bar0: Option<u64>) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 == bar0 {
            return Ok(());
        }
        if let Some(old) = st.0 {
            for (p, v, evt) in &st.1 {
                self.vm
                    .unregister_ioevent(
                        evt,
                        &IoEventAddress::Mmio(old + DOORBELL),
                        datamatch(*p, *v),
                    )
                    .map_err(|e| Error::Kvm(format!("moving the doorbell of peer {p}: {e}")))?;
            }
        }
        st.0 = None;
        if let Some(new) = bar0 {
            for (p, v, evt) in &st.1 {
                ring_to(&self.vm, new, *p, *v, evt)?;
            }
            st.0 = Some(new);
        }
        Ok(())
    }
}

/// This VM's vectors: the server's eventfds as irqfds on GSIs
/// `first_gsi` + vector (the device manager's), routed by the device's
/// MSI-X state.
pub struct OwnVectors {
    vm: Arc<VmFd>,
    first_gsi: u32,
    routes: Arc<GsiRoutes>,
    evts: Vec<EventFd>,
    attached: Mutex<Vec<bool>>,
    legacy_pin: u32,
    /// Every vector's legacy route is the one pin (a virtio device's INTx),
    /// rather than pin + vector (ivshmem's).
    shared_pin: bool,
}

impl OwnVectors {
    /// `evts` as irqfds on GSIs `first_gsi` + vector, each on the legacy
    /// pin `legacy_pin` + vector to start with (MSI-X starts off). Any
    /// MSI-X device's vectors are wired so (ivshmem's come from its server,
    /// a virtio device's are its own).
    pub fn new(
        vm: &Arc<VmFd>,
        routes: Arc<GsiRoutes>,
        first_gsi: u32,
        evts: Vec<EventFd>,
        legacy_pin: u32,
        shared_pin: bool,
    ) -> Result<Arc<OwnVectors>> {
        let own = Arc::new(OwnVectors {
            vm: vm.clone(),
            first_gsi,
            routes,
            attached: Mutex::new(vec![false; evts.len()]),
            evts,
            legacy_pin,
            shared_pin,
        });
        for v in 0..own.count() {
            own.apply(v as u16, VectorRoute::Intx)?;
        }
        Ok(own)
    }

    pub fn count(&self) -> usize {
        self.evts.len()
    }

    /// Routes vector `v` as `route` says, attaching or detaching its irqfd.
    /// A masked vector's irqfd is detached: a doorbell then stays counted in
    /// the eventfd, and KVM injects it when the irqfd is attached again.
    pub fn apply(&self, v: u16, route: VectorRoute) -> Result<()> {
        let gsi = self.first_gsi + v as u32;
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
            VectorRoute::Intx if self.shared_pin => Route::Ioapic(self.legacy_pin),
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
            Err(e) => devices::limited!(warn, "ivshmem vector {vector} to {route:?}: {e}"),
        }
    }
}

fn datamatch(peer: i64, vector: u32) -> u32 {
    ((peer as u32) << 16) | (vector & 0xffff)
}

fn ring_to(vm: &VmFd, bar0: u64, peer: i64, vector: u32, evt: &EventFd) -> Result<()> {
    vm.register_ioevent(
        evt,
        &IoEventAddress::Mmio(bar0 + DOORBELL),
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
    /// `pin` (MSI-X starts off), peers to doorbells in BAR0 at `bar0`.
    pub fn wire(
        vm: &Arc<VmFd>,
        routes: Arc<GsiRoutes>,
        joined: devices::ivshmem_proto::Joined,
        stream: UnixStream,
        pin: u32,
        bar0: u64,
        first_gsi: u32,
    ) -> Result<Wired> {
        let own = OwnVectors::new(
            vm,
            routes,
            first_gsi,
            joined.own.into_iter().map(eventfd).collect(),
            pin,
            false,
        )?;
        let peers = Arc::new(PeerBells {
            vm: vm.clone(),
            state: Mutex::new((Some(bar0), Vec::new())),
        });
        for (peer, v, fd) in joined.peers {
            peers.add(peer, v, eventfd(fd))?;
        }
        Ok(Wired {
            doorbells: Doorbells {
                stream,
                own: own.clone(),
                peers: peers.clone(),
            },
            own,
            peers,
            shm: joined.shm,
            id: joined.id as u32,
        })
    }

    /// Follows the server: new peers' doorbells registered, departed
    /// peers' removed, until `stop`.
    pub fn watch(self, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let Doorbells { stream, own, peers } = self;
            let _own = own; // kept alive with the VM
            let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
            while !stop.load(Ordering::Acquire) {
                match devices::ivshmem_proto::recv(&stream) {
                    Ok(Some((peer, Some(fd)))) => {
                        let v = peers.vectors_of(peer);
                        match peers.add(peer, v, eventfd(fd)) {
                            Ok(()) => tracing::info!("ivshmem: peer {peer} vector {v} can be rung"),
                            Err(e) => tracing::warn!("{e}"),
                        }
                    }
                    Ok(Some((peer, None))) => {
                        peers.remove(peer);
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
