//! A lock-free single-producer/single-consumer ring of fixed-size packet
//! slots, laid out in one shared memory region (an ivshmem BAR, a memfd, a
//! hugepage), so a host process or a VNF in a guest can pass packets to its
//! neighbour. `no_std`: only `core`.
//!
//! Layout (offsets in bytes, every field on its own cache line so the two
//! sides never write the same line):
//! ```text
//!   0  header: magic u32, version u32, slot_size u32, capacity u32
//!  64  head: u64, written by the producer only (slots published)
//! 128  tail: u64, written by the consumer only (slots released)
//! 256  slots: capacity x slot_size bytes (slot_size a multiple of 64)
//! ```
//! Both sides keep a cached copy of the other's index and read the shared
//! one only when the cache says the ring is full (producer) or empty
//! (consumer), and publish their own index once per batch: with batches,
//! the cross-core traffic is the slots themselves plus two lines per batch.
//!
//! In a Linux guest, map the ivshmem BAR2 (`resource2_wc` or
//! `/dev/uioN`) write-back cacheable — on AMD the guest's memory type is
//! honoured, and an uncached `resource2` mapping would make every slot
//! access a bus transaction.
#![cfg_attr(not(test), no_std)]

use core::sync::atomic::{AtomicU64, Ordering};

pub const MAGIC: u32 = 0x4e46_5652; // "NFVR"
pub const VERSION: u32 = 1;
pub const LINE: usize = 64;
pub const HEADER: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// The slot size is zero or not a multiple of 64.
    SlotSize(usize),
    /// The capacity is not a power of two of at least 2.
    Capacity(usize),
    /// The region cannot hold the header and the slots.
    TooSmall { need: usize, have: usize },
    /// The region holds no ring of this version.
    NotARing,
    /// The region's base is not 64-byte aligned.
    Alignment,
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RingError::SlotSize(s) => write!(f, "slot size {s} is not a non-zero multiple of 64"),
            RingError::Capacity(c) => write!(f, "capacity {c} is not a power of two (at least 2)"),
            RingError::TooSmall { need, have } => {
                write!(f, "the region has {have} bytes, the ring needs {need}")
            }
            RingError::NotARing => {
                write!(f, "the region holds no nfvisor ring of version {VERSION}")
            }
            RingError::Alignment => write!(f, "the region is not 64-byte aligned"),
        }
    }
}

/// Bytes a ring of `capacity` slots of `slot_size` bytes needs.
pub const fn region_size(capacity: usize, slot_size: usize) -> usize {
    HEADER + capacity * slot_size
}

/// A view of a ring in a region this process has mapped.
#[derive(Clone, Copy)]
struct Shared {
    base: *mut u8,
    slot_size: usize,
    capacity: usize,
}

// SAFETY: the ring is shared memory designed for two threads or processes;
// the head and tail are atomics and each slot is owned by exactly one side
// at a time (the producer between tail and head+capacity, the consumer
// between tail and head).
unsafe impl Send for Shared {}

impl Shared {
    fn head(&self) -> &AtomicU64 {
        // SAFETY: `base` points at a live, 64-byte aligned region of at least
        // HEADER bytes (checked by `init`/`attach`), so the u64 at 64 is in
        // bounds and aligned; AtomicU64 has the layout of u64.
        unsafe { &*(self.base.add(LINE) as *const AtomicU64) }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: as for `head`, at offset 128.
        unsafe { &*(self.base.add(2 * LINE) as *const AtomicU64) }
    }

    fn slot(&self, index: u64) -> *mut u8 {
        let i = (index as usize) & (self.capacity - 1);
        // SAFETY: i < capacity, and the region holds capacity slots after HEADER.
        unsafe { self.base.add(HEADER + i * self.slot_size) }
    }
}

/// Writes a new, empty ring into `[base, base + len)` and returns its two
/// ends.
///
/// # Safety
/// `base` must point at `len` writable bytes that stay mapped while either
/// end is in use, with no other user of the ring yet.
pub unsafe fn init(
    base: *mut u8,
    len: usize,
    slot_size: usize,
    capacity: usize,
) -> Result<(Producer, Consumer), RingError> {
    if slot_size == 0 || !slot_size.is_multiple_of(LINE) {
        return Err(RingError::SlotSize(slot_size));
    }
    if capacity < 2 || !capacity.is_power_of_two() {
        return Err(RingError::Capacity(capacity));
    }
    if !(base as usize).is_multiple_of(LINE) {
        return Err(RingError::Alignment);
    }
    let need = region_size(capacity, slot_size);
    if len < need {
        return Err(RingError::TooSmall { need, have: len });
    }
    let words = base as *mut u32;
    // SAFETY: the caller gives `len >= HEADER` writable bytes at `base`.
    unsafe {
        core::ptr::write_bytes(base, 0, HEADER);
        words.add(1).write_volatile(VERSION);
        words.add(2).write_volatile(slot_size as u32);
        words.add(3).write_volatile(capacity as u32);
        // the magic last: a reader attaching sees a complete header
        core::sync::atomic::fence(Ordering::Release);
        words.write_volatile(MAGIC);
    }
    let shared = Shared {
        base,
        slot_size,
        capacity,
    };
    Ok((Producer::new(shared), Consumer::new(shared)))
}

/// Reads the header of a ring another side wrote.
///
/// # Safety
/// As for [`init`], and the ring must have been initialised by `init`.
unsafe fn attach(base: *mut u8, len: usize) -> Result<Shared, RingError> {
    if !(base as usize).is_multiple_of(LINE) {
        return Err(RingError::Alignment);
    }
    if len < HEADER {
        return Err(RingError::TooSmall {
            need: HEADER,
            have: len,
        });
    }
    let words = base as *const u32;
    // SAFETY: the caller gives `len >= HEADER` readable bytes.
    let (magic, version, slot_size, capacity) = unsafe {
        (
            words.read_volatile(),
            words.add(1).read_volatile(),
            words.add(2).read_volatile() as usize,
            words.add(3).read_volatile() as usize,
        )
    };
    core::sync::atomic::fence(Ordering::Acquire);
    if magic != MAGIC
        || version != VERSION
        || slot_size == 0
        || !slot_size.is_multiple_of(LINE)
        || !capacity.is_power_of_two()
    {
        return Err(RingError::NotARing);
    }
    let need = region_size(capacity, slot_size);
    if len < need {
        return Err(RingError::TooSmall { need, have: len });
    }
    Ok(Shared {
        base,
        slot_size,
        capacity,
    })
}

/// The producing end.
pub struct Producer {
    s: Shared,
    head: u64,
    cached_tail: u64,
}

/// The consuming end.
pub struct Consumer {
    s: Shared,
    tail: u64,
    cached_head: u64,
}

impl Producer {
    fn new(s: Shared) -> Self {
        let head = s.head().load(Ordering::Relaxed);
        let cached_tail = s.tail().load(Ordering::Acquire);
        Producer {
            s,
            head,
            cached_tail,
        }
    }

    /// The producing end of a ring `init` wrote (in another process).
    ///
    /// # Safety
    /// As for [`init`]; at most one producer may use a ring.
    pub unsafe fn attach(base: *mut u8, len: usize) -> Result<Producer, RingError> {
        // SAFETY: forwarded from the caller.
        Ok(Producer::new(unsafe { attach(base, len) }?))
    }

    pub fn slot_size(&self) -> usize {
        self.s.slot_size
    }

    pub fn capacity(&self) -> usize {
        self.s.capacity
    }

    fn free(&mut self) -> usize {
        let cap = self.s.capacity as u64;
        if self.head - self.cached_tail == cap {
            self.cached_tail = self.s.tail().load(Ordering::Acquire);
        }
        (cap - (self.head - self.cached_tail)) as usize
    }

    /// Publishes up to `packets.len() / slot_size` slots from `packets`
    /// (whole slots, back to back); returns how many went in.
    pub fn push_batch(&mut self, packets: &[u8]) -> usize {
        let ss = self.s.slot_size;
        let want = packets.len() / ss;
        let mut n = self.free().min(want);
        if n < want {
            // the cache may be stale: look once more before giving up room
            self.cached_tail = self.s.tail().load(Ordering::Acquire);
            n = self.free().min(want);
        }
        for i in 0..n {
            let dst = self.s.slot(self.head + i as u64);
            // SAFETY: slot head+i is the producer's (free, checked above);
            // the source range is inside `packets`.
            unsafe { core::ptr::copy_nonoverlapping(packets.as_ptr().add(i * ss), dst, ss) };
        }
        if n > 0 {
            self.head += n as u64;
            self.s.head().store(self.head, Ordering::Release);
        }
        n
    }

    /// Fills up to `max` free slots in place with `fill(slot)` and publishes
    /// them together; returns how many (zero-copy producing).
    pub fn fill_batch(&mut self, max: usize, mut fill: impl FnMut(&mut [u8])) -> usize {
        let n = self.free().min(max);
        for i in 0..n {
            // SAFETY: slot head+i is the producer's; slot_size bytes long.
            let slot = unsafe {
                core::slice::from_raw_parts_mut(self.s.slot(self.head + i as u64), self.s.slot_size)
            };
            fill(slot);
        }
        if n > 0 {
            self.head += n as u64;
            self.s.head().store(self.head, Ordering::Release);
        }
        n
    }
}

impl Consumer {
    fn new(s: Shared) -> Self {
        let tail = s.tail().load(Ordering::Relaxed);
        let cached_head = s.head().load(Ordering::Acquire);
        Consumer {
            s,
            tail,
            cached_head,
        }
    }

    /// The consuming end of a ring `init` wrote (in another process).
    ///
    /// # Safety
    /// As for [`init`]; at most one consumer may use a ring.
    pub unsafe fn attach(base: *mut u8, len: usize) -> Result<Consumer, RingError> {
        // SAFETY: forwarded from the caller.
        Ok(Consumer::new(unsafe { attach(base, len) }?))
    }

    pub fn slot_size(&self) -> usize {
        self.s.slot_size
    }

    fn available(&mut self) -> usize {
        if self.cached_head == self.tail {
            self.cached_head = self.s.head().load(Ordering::Acquire);
        }
        (self.cached_head - self.tail) as usize
    }

    /// Hands up to `max` published slots to `read(slot)` in order, then
    /// releases them together; returns how many (zero-copy consuming).
    pub fn drain_batch(&mut self, max: usize, mut read: impl FnMut(&[u8])) -> usize {
        let n = self.available().min(max);
        for i in 0..n {
            // SAFETY: slot tail+i is published (tail + i < head) and the
            // consumer's until the tail moves past it.
            let slot = unsafe {
                core::slice::from_raw_parts(self.s.slot(self.tail + i as u64), self.s.slot_size)
            };
            read(slot);
        }
        if n > 0 {
            self.tail += n as u64;
            self.s.tail().store(self.tail, Ordering::Release);
        }
        n
    }

    /// Copies up to `out.len() / slot_size` slots into `out`; returns how many.
    pub fn pop_batch(&mut self, out: &mut [u8]) -> usize {
        let ss = self.s.slot_size;
        let mut i = 0;
        self.drain_batch(out.len() / ss, |slot| {
            out[i * ss..(i + 1) * ss].copy_from_slice(slot);
            i += 1;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn region(bytes: usize) -> Vec<u64> {
        vec![0u64; bytes.div_ceil(8) + 8]
    }

    fn aligned(v: &mut [u64]) -> *mut u8 {
        let p = v.as_mut_ptr() as usize;
        ((p + 63) & !63) as *mut u8
    }

    #[test]
    fn bad_geometry_is_refused() {
        let mut v = region(region_size(8, 64));
        let base = aligned(&mut v);
        // SAFETY: `v` outlives the calls and holds the region.
        unsafe {
            assert_eq!(
                init(base, 1 << 20, 100, 8).err(),
                Some(RingError::SlotSize(100))
            );
            assert_eq!(
                init(base, 1 << 20, 64, 6).err(),
                Some(RingError::Capacity(6))
            );
            assert!(matches!(
                init(base, 300, 64, 8).err(),
                Some(RingError::TooSmall { .. })
            ));
            assert_eq!(
                init(base.add(8), 1 << 20, 64, 8).err(),
                Some(RingError::Alignment)
            );
            assert_eq!(
                Consumer::attach(base, region_size(8, 64)).err(),
                Some(RingError::NotARing)
            );
        }
    }

    #[test]
    fn full_and_empty() {
        let mut v = region(region_size(4, 64));
        let base = aligned(&mut v);
        // SAFETY: `v` outlives both ends.
        let (mut p, mut c) = unsafe { init(base, region_size(4, 64), 64, 4) }.unwrap();
        let pkts = vec![7u8; 64 * 6];
        assert_eq!(p.push_batch(&pkts), 4);
        assert_eq!(p.push_batch(&pkts), 0);
        let mut out = vec![0u8; 64 * 3];
        assert_eq!(c.pop_batch(&mut out), 3);
        assert_eq!(p.push_batch(&pkts), 3);
        let mut n = 0;
        loop {
            let got = c.drain_batch(2, |_| {});
            if got == 0 {
                break;
            }
            n += got;
        }
        assert_eq!(n, 4);
        assert_eq!(c.pop_batch(&mut out), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// No loss, no duplication, order kept, with random batch sizes on
        /// both sides and the two ends on different threads.
        #[test]
        fn every_packet_arrives_once_in_order(
            capacity_log in 1u32..8,
            push_batches in proptest::collection::vec(1usize..40, 1..20),
            pop_batches in proptest::collection::vec(1usize..40, 1..20),
            total in 1u64..20_000,
        ) {
            let capacity = 1usize << capacity_log;
            let mut v = region(region_size(capacity, 64));
            let base = aligned(&mut v) as usize;
            // SAFETY: `v` outlives both threads (joined below).
            let (mut p, mut c) = unsafe { init(base as *mut u8, region_size(capacity, 64), 64, capacity) }.unwrap();
            let producer = std::thread::spawn(move || {
                let mut next = 0u64;
                let mut i = 0;
                while next < total {
                    let want = push_batches[i % push_batches.len()].min((total - next) as usize);
                    i += 1;
                    let mut k = next;
                    let n = p.fill_batch(want, |slot| {
                        slot[..8].copy_from_slice(&k.to_le_bytes());
                        slot[8..16].copy_from_slice(&(!k).to_le_bytes());
                        k += 1;
                    });
                    next += n as u64;
                    if n == 0 { std::hint::spin_loop(); }
                }
            });
            let mut expect = 0u64;
            let mut i = 0;
            let mut bad = None;
            while expect < total {
                let max = pop_batches[i % pop_batches.len()];
                i += 1;
                c.drain_batch(max, |slot| {
                    let a = u64::from_le_bytes(slot[..8].try_into().unwrap());
                    let b = u64::from_le_bytes(slot[8..16].try_into().unwrap());
                    if a != expect || b != !expect { bad.get_or_insert((expect, a)); }
                    expect += 1;
                });
            }
            producer.join().unwrap();
            prop_assert_eq!(bad, None);
            prop_assert_eq!(c.drain_batch(1, |_| {}), 0);
        }
    }
}
