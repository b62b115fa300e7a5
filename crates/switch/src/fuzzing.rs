//! The switch's fuzz targets (`crates/fuzzer` runs them): what a frontend
//! controls in the rings the PMD reads in place, and what a control
//! client sends.

use arbitrary::{Arbitrary, Unstructured};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::ring::Mapped;

const MEM_SIZE: u64 = 1 << 20;

/// How deep the ring target got: rings mapped, chains walked to their end.
pub static RINGS_MAPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static CHAINS_WALKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One thing the PMD does with a ring whose every byte the frontend wrote.
#[derive(Debug, Arbitrary)]
enum RingOp {
    Pending(u16),
    Head(u16),
    Walk { head: u16, writable: bool },
    Used { at: u16, id: u16, len: u32 },
    Publish(u16),
    WantsInterrupt,
}

/// A ring laid anywhere (aligned or not, in memory or not), its areas
/// full of arbitrary bytes, then read and written as the PMD does: no
/// panic, every index checked, no chain longer than the ring.
pub fn ring(u: &mut Unstructured) -> arbitrary::Result<()> {
    // (a frontend chooses its regions' guest bases: an odd one maps
    // aligned guest addresses to misaligned host ones)
    let base = [0u64, 1, 3, 0x1001][u.int_in_range(0..=3usize)?];
    let mem: GuestMemoryMmap<crate::dirty_log::DirtyLog> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(base), MEM_SIZE as usize)]).expect("memory");
    let atomic = GuestMemoryAtomic::new(mem);
    let guard = atomic.memory();
    let size: u16 = 1 << (u.int_in_range(0..=10u16)?);
    let mut q = Queue::new(1024).expect("a queue");
    let asked = if u.arbitrary::<bool>()? {
        size
    } else {
        u.arbitrary()?
    };
    q.set_size(asked);
    let addr = |u: &mut Unstructured| -> arbitrary::Result<(u32, u32)> {
        let a: u64 = if u.arbitrary::<u8>()? < 240 {
            u.int_in_range(0..=MEM_SIZE)? & !0xf
        } else {
            u.arbitrary()?
        };
        Ok((a as u32, (a >> 32) as u32))
    };
    let (d, a, us) = (addr(u)?, addr(u)?, addr(u)?);
    q.set_desc_table_address(Some(d.0), Some(d.1));
    q.set_avail_ring_address(Some(a.0), Some(a.1));
    q.set_used_ring_address(Some(us.0), Some(us.1));
    q.set_ready(true);
    // the frontend's bytes: where the areas are, and around them
    for _ in 0..u.int_in_range(0..=8u8)? {
        let at: u64 = u.int_in_range(0..=MEM_SIZE - 1)?;
        let bytes: Vec<u8> = u.arbitrary()?;
        let n = bytes.len().min((MEM_SIZE - at) as usize);
        let _ = vm_memory::Bytes::write_slice(&*guard, &bytes[..n], GuestAddress(at));
    }
    let Ok(ring) = Mapped::new(&q, &guard) else {
        return Ok(());
    };
    RINGS_MAPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ring_size = q.size();
    for _ in 0..u.int_in_range(0..=32u8)? {
        match RingOp::arbitrary(u)? {
            RingOp::Pending(next) => {
                if let Ok(n) = ring.pending(next) {
                    assert!(n <= ring_size);
                }
            }
            RingOp::Head(next) => {
                if let Ok(h) = ring.avail_head(next) {
                    assert!(h < ring_size);
                }
            }
            RingOp::Walk { head, writable } => {
                let mut n = 0u32;
                let walked = ring.walk(head % ring_size, writable, |_| {
                    n += 1;
                    true
                });
                if walked.is_ok() {
                    CHAINS_WALKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                assert!(
                    n <= ring_size as u32,
                    "{n} descriptors in a ring of {ring_size}"
                );
            }
            RingOp::Used { at, id, len } => ring.put_used(at, id, len),
            RingOp::Publish(idx) => ring.publish_used(idx),
            RingOp::WantsInterrupt => {
                let _ = ring.wants_interrupt();
            }
        }
    }
    Ok(())
}

/// A control client's line: a request or not, and the port it names.
pub fn control(u: &mut Unstructured) -> arbitrary::Result<()> {
    let line: String = u.arbitrary()?;
    if let Ok(crate::Request::AddPort { port }) = serde_json::from_str::<crate::Request>(&line) {
        let _ = crate::parse_port(&port);
    }
    let spec: String = u.arbitrary()?;
    if let Ok(p) = crate::parse_port(&spec) {
        assert!(crate::port::check_port_name(&p.name).is_ok(), "{spec:?}");
    }
    let _ = crate::parse_ports(&spec);
    Ok(())
}
