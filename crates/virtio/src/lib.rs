//! virtio devices: the modern virtio-pci transport (virtio 1.2, section
//! 4.1) and the devices behind it, written so every virtio device shares
//! them. A [`VirtioDevice`] knows no transport: it offers features, queue
//! sizes and a configuration space, and is activated with its queues, the
//! guest memory and an [`Interrupt`] that hides MSI-X. No KVM inside: the
//! VMM wires the notifications (ioeventfds) and interrupts (irqfds).

pub mod blk;
pub mod block_io;
pub mod disk;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod net;
pub mod net_ctrl;
pub mod pci;
pub mod rate_limiter;
pub mod rng;
pub mod tap;
pub mod vhost_user_net;
pub mod vsock;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

/// Feature bits every device here may offer.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const F_RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device status bits (section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

/// What a device raises.
pub trait Interrupt: Send + Sync {
    /// The driver should look at queue `index`'s used ring.
    fn queue(&self, index: u16);
    /// The device's configuration changed (or it needs a reset).
    fn config(&self);
    /// An eventfd whose write raises queue `index`'s interrupt without
    /// this process (an irqfd), for queues another process serves
    /// (vhost-user). None where raising it takes this process (no MSI-X,
    /// or no vector for the queue): the device relays then.
    fn queue_eventfd(&self, index: u16) -> Option<EventFd> {
        let _ = index;
        None
    }
}

/// A queue as a device takes it on activation: the queue (its addresses
/// validated by the transport) and the eventfd the guest's notifications
/// arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub kick: EventFd,
}

/// A device's worker thread and the eventfd that stops it: the one way
/// every device here runs its queues' worker and stops it (at a pause, a
/// reset or the device's end), getting back what the worker hands over.
pub struct WorkerThread<T> {
    stop: EventFd,
    handle: std::thread::JoinHandle<Option<T>>,
}

impl<T: Send + 'static> WorkerThread<T> {
    /// Runs `run` on a thread named `name` under `role`'s seccomp filter,
    /// stopped through `stop`.
    pub fn spawn(
        name: String,
        role: seccomp::Role,
        stop: EventFd,
        run: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Self, String> {
        let handle =
            seccomp::spawn(name, role, run).map_err(|e| format!("spawning the worker: {e}"))?;
        Ok(WorkerThread { stop, handle })
    }

    /// Tells the worker to stop (it finishes what is in flight first).
    pub fn signal(&self) {
        let _ = self.stop.write(1);
    }

    /// Waits for the worker's end: what it handed back (None: it panicked,
    /// or its filter could not go in and it never ran).
    pub fn join(self) -> Option<T> {
        self.handle.join().ok().flatten()
    }

    /// `signal`, then `join`.
    pub fn stop(self) -> Option<T> {
        self.signal();
        self.join()
    }
}

/// The stop eventfd a worker waits on: (the WorkerThread's end, the
/// worker's clone).
pub fn worker_stop_pair() -> Result<(EventFd, EventFd), String> {
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
    let clone = stop.try_clone().map_err(|e| e.to_string())?;
    Ok((stop, clone))
}

/// Answers a read of a device's configuration space `space` at `offset`
/// (bytes past its end read 0).
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| space.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// What signalling a queue's used entries did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Sent,
    /// The driver asked not to be told yet (EVENT_IDX, NO_INTERRUPT).
    Suppressed,
}

/// Signals queue `index` to the driver if it wants to hear of its new used
/// entries; the one rule every device here follows. Err: the ring could not
/// be read (the caller counts it).
pub fn signal_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    interrupt: &dyn Interrupt,
    index: u16,
) -> Result<Signal, String> {
    use virtio_queue::QueueT;
    match queue.needs_notification(mem) {
        Ok(true) => {
            interrupt.queue(index);
            Ok(Signal::Sent)
        }
        Ok(false) => Ok(Signal::Suppressed),
        Err(e) => Err(format!("{e:?}")),
    }
}

/// A virtio device, whatever its transport.
pub trait VirtioDevice<M>: Send {
    /// The virtio device ID (1: network card).
    fn device_type(&self) -> u16;
    /// The features offered.
    fn features(&self) -> u64;
    /// Each queue's largest size.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes it (most devices' is read-only: ignored).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Starts the device with the features the driver accepted.
    fn activate(
        &mut self,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        acked_features: u64,
    ) -> Result<(), String>;
    /// Stops the device; returns its queues as it left them (positions
    /// included) once nothing will touch the old rings any more.
    fn reset(&mut self) -> Vec<ActiveQueue>;
    /// The driver reset the device (after `reset` stopped it): what the
    /// driver set up beyond the queues goes back to its start.
    fn driver_reset(&mut self) {}
    /// What the device counts.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// The device's own threads and where they run.
    fn threads(&self) -> Vec<devices::state::DeviceThread> {
        Vec::new()
    }
    /// A device-specific action (virtio-net: link-up, link-down); Ok(true)
    /// when the configuration changed (the driver is told).
    fn control(&mut self, action: &str) -> Result<bool, String> {
        Err(format!("no action {action:?}"))
    }
    /// Migration: logs the guest pages something outside this process
    /// writes for the device (a vhost-user backend), from `on` until off.
    /// Err: the device cannot log them (the migration is refused).
    fn dirty_log(&mut self, on: bool) -> Result<(), String> {
        let _ = on;
        Ok(())
    }
    /// Hands over the pages logged since the last call, as words of 64
    /// pages: `mark(first page's guest-physical page number, bits)`.
    /// Returns how many pages.
    fn harvest_dirty(&mut self, mark: &mut dyn FnMut(u64, u64)) -> u64 {
        let _ = mark;
        0
    }
    /// The device's own state beyond its queues (opaque to the transport).
    fn state(&self) -> Vec<u8> {
        Vec::new()
    }
    fn set_state(&mut self, state: &[u8]) -> Result<(), String> {
        let _ = state;
        Ok(())
    }
}

/// What a look at a queue's available ring found.
pub enum Popped<C> {
    Chain(C),
    /// Nothing posted; the driver will notify for the next one.
    Empty,
    /// The ring cannot be served (why): the caller counts a bad queue.
    Broken(String),
}

/// The next chain on `queue`, the one way every worker takes chains. When
/// the ring looks empty, notifications go back on (with EVENT_IDX: the
/// avail event) and the ring is looked at once more, so a chain posted
/// meanwhile is not missed. An available index that yields no chain on
/// that second look is the driver's (more than a queue ahead of the
/// device): retried for ever, the worker would spin and never see its
/// stop (the fuzzer found it), so it is Broken.
pub fn pop_chain<'a, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'a M,
) -> Popped<virtio_queue::DescriptorChain<&'a M>> {
    use virtio_queue::QueueT;
    for _ in 0..2 {
        if let Some(chain) = queue.pop_descriptor_chain(mem) {
            return Popped::Chain(chain);
        }
        match queue.enable_notification(mem) {
            Ok(true) => {}
            Ok(false) => return Popped::Empty,
            Err(e) => return Popped::Broken(format!("{e:?}")),
        }
    }
    Popped::Broken("an available index more than a queue ahead of the device".into())
}

/// The next chain on `queue` for a poll-mode worker: notifications stay
/// as they are (the worker holds them off itself). An available index
/// more than a queue ahead of the device is Broken, as in [`pop_chain`].
pub fn pop_chain_polled<'a, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'a M,
) -> Popped<virtio_queue::DescriptorChain<&'a M>> {
    use virtio_queue::QueueT;
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Popped::Chain(chain);
    }
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) if idx.0.wrapping_sub(queue.next_avail()) > queue.size() => {
            Popped::Broken("an available index more than a queue ahead of the device".into())
        }
        Ok(_) => Popped::Empty,
        Err(e) => Popped::Broken(format!("{e:?}")),
    }
}

/// A chain's descriptors, or None when it does not end where it should:
/// virtio-queue's iterator stops quietly at a loop, after as many
/// descriptors as the queue holds, at an index past the table or an
/// unreadable descriptor, so a chain whose last descriptor still points on
/// was cut short there.
pub fn whole_chain<M>(
    chain: virtio_queue::DescriptorChain<M>,
) -> Option<Vec<virtio_queue::desc::split::Descriptor>>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let descs: Vec<_> = chain.collect();
    match descs.last() {
        Some(d) if !d.has_next() => Some(descs),
        _ => None,
    }
}

#[cfg(test)]
mod pop_chain_tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn an_index_a_queue_ahead_is_broken_not_spun_on() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(matches!(pop_chain(&mut q, &mem), Popped::Empty));
        // one real chain, then nothing
        let d = Descriptor::new(0x8_0000, 64, 0, 0);
        vq.desc_table().store(0, RawDescriptor::from(d)).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        assert!(matches!(pop_chain(&mut q, &mem), Popped::Chain(_)));
        assert!(matches!(pop_chain(&mut q, &mem), Popped::Empty));
        // the driver's index 100 ahead of a 16-entry queue: said, not looped on
        vq.avail().idx().store(101);
        match pop_chain(&mut q, &mem) {
            Popped::Broken(why) => assert!(why.contains("ahead"), "{why}"),
            _ => panic!("an index a queue ahead must be Broken"),
        }
    }
}
