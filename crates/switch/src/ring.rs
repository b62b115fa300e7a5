//! A split virtqueue as the PMD reads and writes it: its three areas
//! mapped once into host pointers, read and written in place.
//!
//! Written by hand rather than through `virtio-queue`'s accessors: those
//! go through `vm-memory`'s generic, checked path for every 2-byte index
//! and every 16-byte descriptor (a region lookup, an iterator, a volatile
//! copy each), about half of a 64-byte frame's cost in the PMD. The
//! queue's state (its addresses, size, readiness, next indexes) stays
//! the `vhost-user-backend` crate's, read and written back under the
//! vring's lock once per burst, so GET_VRING_BASE and a new connection
//! see what the PMD did. Every index the frontend writes is checked here
//! before it is used; the buffer addresses in its descriptors are checked
//! by the PMD as it takes a chain (pmd.rs).

use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use crate::dirty_log::DirtyLog;
use crate::port::Mem;

type Guard = <Mem as GuestAddressSpace>::T;

const DESC_SIZE: usize = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// The most descriptors a chain may have: a frame without offloads needs
/// one or two; a longer chain only costs the PMD (and every port it
/// serves) a lookup and a copy per descriptor.
pub(crate) const MAX_CHAIN: u16 = 64;
/// VRING_USED_F_NO_NOTIFY: the PMD polls; the driver need not kick.
const NO_NOTIFY: u16 = 1;
/// VRING_AVAIL_F_NO_INTERRUPT: the driver polls its used ring.
const NO_INTERRUPT: u16 = 1;

/// One descriptor, as read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Why a ring or a chain cannot be used: the frontend broke the rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RingError {
    /// A ring size that is not a power of two (or 0).
    Size(u16),
    /// An area (at this guest address, this long) outside the frontend's
    /// memory, or not aligned (in the guest or in this process).
    Unmapped(&'static str, u64, usize),
    /// The available index ran more than a ring ahead.
    AvailIndex,
    /// A head or next index past the ring, a chain longer than the ring,
    /// an indirect descriptor (not offered), a buffer of the wrong
    /// direction.
    Chain,
}

/// A mapped split ring. Holds the memory it was mapped in, so the
/// pointers stay valid (and cannot alias a newer mapping) while it lives.
pub(crate) struct Mapped {
    mem: Guard,
    desc_gpa: u64,
    avail_gpa: u64,
    used_gpa: u64,
    size: u16,
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    /// The used ring's region bitmap and offset there (the dirty log of a
    /// migrating frontend).
    used_log: (DirtyLog, usize),
}

// SAFETY: the pointers are into a shared mapping that `mem` keeps alive;
// all access through them is volatile or atomic, as the frontend writes
// the same memory concurrently anyway.
unsafe impl Send for Mapped {}

impl Mapped {
    /// Maps `q`'s areas in `mem`: each must lie in one region, aligned as
    /// the virtio spec says.
    pub(crate) fn new(q: &Queue, mem: &Guard) -> Result<Mapped, RingError> {
        let size = q.size();
        if size == 0 || !size.is_power_of_two() {
            return Err(RingError::Size(size));
        }
        let n = size as usize;
        let area = |what: &'static str, gpa: u64, len: usize, align: u64| {
            let unmapped = RingError::Unmapped(what, gpa, len);
            if !gpa.is_multiple_of(align) {
                return Err(unmapped);
            }
            let s = mem
                .get_slice(GuestAddress(gpa), len)
                .map_err(|_| unmapped)?;
            let host = s.ptr_guard_mut().as_ptr();
            // (a region's guest base is the frontend's choice: an aligned
            // guest address may still map to a misaligned host one)
            if !(host as u64).is_multiple_of(align) {
                return Err(unmapped);
            }
            Ok(host)
        };
        let desc = area("descriptor table", q.desc_table(), DESC_SIZE * n, 16)?;
        let avail = area("available ring", q.avail_ring(), 6 + 2 * n, 2)?;
        let used = area("used ring", q.used_ring(), 6 + 8 * n, 4)?;
        let (region, offset) = mem
            .to_region_addr(GuestAddress(q.used_ring()))
            .ok_or(RingError::Unmapped("used ring", q.used_ring(), 6 + 8 * n))?;
        Ok(Mapped {
            mem: mem.clone(),
            desc_gpa: q.desc_table(),
            avail_gpa: q.avail_ring(),
            used_gpa: q.used_ring(),
            size,
            desc,
            avail,
            used,
            used_log: (
                std::ops::Deref::deref(region).bitmap().clone(),
                offset.raw_value() as usize,
            ),
        })
    }

    /// Whether this mapping is still `q`'s in `mem` (the frontend may move
    /// its rings or its memory).
    pub(crate) fn is_of(&self, q: &Queue, mem: &Guard) -> bool {
        std::ptr::eq(&**mem, &*self.mem)
            && q.desc_table() == self.desc_gpa
            && q.avail_ring() == self.avail_gpa
            && q.used_ring() == self.used_gpa
            && q.size() == self.size
    }

    fn u16_at(&self, base: *const u8, off: usize) -> &AtomicU16 {
        // SAFETY: `base + off` is inside an area mapped and bounds-checked
        // in `new` (callers pass offsets within it), 2-aligned (the area's
        // base is, and offsets are even), and lives as long as `self.mem`.
        unsafe { &*(base.add(off) as *const AtomicU16) }
    }

    /// The driver's available index.
    pub(crate) fn avail_idx(&self) -> u16 {
        u16::from_le(self.u16_at(self.avail, 2).load(Ordering::Acquire))
    }

    /// The head at available slot `next` (its index checked).
    pub(crate) fn avail_head(&self, next: u16) -> Result<u16, RingError> {
        let slot = (next % self.size) as usize;
        let head = u16::from_le(
            self.u16_at(self.avail, 4 + 2 * slot)
                .load(Ordering::Relaxed),
        );
        match head < self.size {
            true => Ok(head),
            false => Err(RingError::Chain),
        }
    }

    /// How many chains are waiting from `next` on.
    pub(crate) fn pending(&self, next: u16) -> Result<u16, RingError> {
        let n = self.avail_idx().wrapping_sub(next);
        match n <= self.size {
            true => Ok(n),
            false => Err(RingError::AvailIndex),
        }
    }

    fn desc(&self, i: u16) -> Desc {
        // SAFETY: i < size (checked by the callers), so the 16 bytes are
        // inside the descriptor table mapped in `new`; a volatile read, as
        // the driver owns the table.
        let raw = unsafe {
            std::ptr::read_volatile(self.desc.add(DESC_SIZE * i as usize) as *const [u8; 16])
        };
        Desc {
            addr: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
            flags: u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes")),
            next: u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes")),
        }
    }

    /// Walks the chain at `head`, handing each descriptor to `each`; every
    /// descriptor must be write-only (`writable`) or read-only (not), and
    /// the chain at most [`MAX_CHAIN`] long.
    pub(crate) fn walk(
        &self,
        head: u16,
        writable: bool,
        mut each: impl FnMut(&Desc) -> bool,
    ) -> Result<(), RingError> {
        let mut i = head;
        for _ in 0..self.size.min(MAX_CHAIN) {
            let d = self.desc(i);
            if d.flags & F_INDIRECT != 0 || (d.flags & F_WRITE != 0) != writable {
                return Err(RingError::Chain);
            }
            if !each(&d) {
                return Ok(());
            }
            if d.flags & F_NEXT == 0 {
                return Ok(());
            }
            if d.next >= self.size {
                return Err(RingError::Chain);
            }
            i = d.next;
        }
        // longer than the ring (a loop) or than MAX_CHAIN
        Err(RingError::Chain)
    }

    /// Writes used slot `at` (the caller's next used index).
    pub(crate) fn put_used(&self, at: u16, id: u16, len: u32) {
        let slot = (at % self.size) as usize;
        let off = 4 + 8 * slot;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&(id as u32).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        // SAFETY: `off + 8` is inside the used ring mapped in `new` (slot <
        // size), 4-aligned; a volatile write, as the driver reads it.
        unsafe { std::ptr::write_volatile(self.used.add(off) as *mut [u8; 8], elem) };
        self.used_log.0.mark_dirty(self.used_log.1 + off, 8);
    }

    /// Publishes the used index (after the elements it covers).
    pub(crate) fn publish_used(&self, idx: u16) {
        self.u16_at(self.used, 2)
            .store(idx.to_le(), Ordering::Release);
        self.used_log.0.mark_dirty(self.used_log.1 + 2, 2);
    }

    /// Tells the driver not to kick: the PMD polls.
    pub(crate) fn quiet(&self) {
        self.u16_at(self.used, 0)
            .store(NO_NOTIFY.to_le(), Ordering::Release);
        self.used_log.0.mark_dirty(self.used_log.1, 2);
    }

    /// Whether the driver wants an interrupt for new used entries (it sets
    /// NO_INTERRUPT when it polls, as DPDK's virtio PMD does).
    pub(crate) fn wants_interrupt(&self) -> bool {
        fence(Ordering::SeqCst);
        u16::from_le(self.u16_at(self.avail, 0).load(Ordering::Acquire)) & NO_INTERRUPT == 0
    }
}
