//! ivshmem doorbell mode: this VM's vectors are irqfds (IOAPIC pins from
//! `IRQ_PIN`), every peer's vectors are ioeventfds on the Doorbell register
//! with datamatch (peer << 16 | vector): a doorbell goes guest -> ioeventfd
//! -> the peer's irqfd -> the peer guest's interrupt, with no VMM userspace
//! on the path. A watcher thread follows peers joining and leaving.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::shared_region::BAR0_ADDR;
use crate::{Error, Result};

const DOORBELL: u64 = BAR0_ADDR + 12;

fn eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: the descriptor is an eventfd the server created, now owned here.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

pub struct Doorbells {
    stream: UnixStream,
    own: Vec<EventFd>,
    peers: Vec<(i64, u32, EventFd)>,
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
    /// Wires what `join` brought: own vectors to pins, peers to doorbells.
    pub fn wire(
        vm: &VmFd,
        joined: devices::ivshmem_proto::Joined,
        stream: UnixStream,
        pin: u32,
    ) -> Result<(Doorbells, OwnedFd, u32)> {
        let mut own = Vec::new();
        for (v, fd) in joined.own.into_iter().enumerate() {
            let evt = eventfd(fd);
            vm.register_irqfd(&evt, pin + v as u32)
                .map_err(|e| Error::Kvm(format!("irqfd for ivshmem vector {v}: {e}")))?;
            own.push(evt);
        }
        let mut peers = Vec::new();
        for (peer, v, fd) in joined.peers {
            let evt = eventfd(fd);
            ring_to(vm, peer, v, &evt)?;
            peers.push((peer, v, evt));
        }
        Ok((
            Doorbells { stream, own, peers },
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
