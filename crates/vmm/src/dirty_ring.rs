//! The KVM dirty ring (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]): each vCPU pushes
//! the pages it dirties into a ring shared with the VMM, instead of KVM
//! keeping a bitmap per slot. Chosen when the VM is created (before any
//! vCPU); KVM_GET_DIRTY_LOG is then unavailable. Hand-written: kvm-ioctls
//! wraps only the capability, not the ring.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use crate::{Error, Result};

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

const DIRTY: u32 = 1;
const RESET: u32 = 2;

/// Turns the dirty ring on for a VM that has no vCPU yet; `bytes` per vCPU.
pub fn enable(vm: &VmFd, bytes: u32) -> Result<()> {
    let (cap, max) = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .iter()
        .map(|&c| (c, vm.check_extension_raw(c as _)))
        .find(|&(_, max)| max > 0)
        .ok_or_else(|| Error::Kvm("this host's KVM has no dirty ring".into()))?;
    let entries = bytes as usize / std::mem::size_of::<kvm_dirty_gfn>();
    if !entries.is_power_of_two() || bytes as i32 > max || entries < 16 {
        return Err(Error::Config(format!(
            "--dirty-ring {bytes}: a power of two of 16-byte entries, at most {max} bytes here"
        )));
    }
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = bytes as u64;
    vm.enable_cap(&c)
        .map_err(|e| Error::Kvm(format!("enabling the dirty ring: {e}")))
}

/// One vCPU's ring, mapped from its fd.
pub struct DirtyRing {
    ptr: *mut kvm_dirty_gfn,
    entries: u32,
    /// The next entry to harvest (harvesters take turns).
    next: Mutex<u32>,
}

// SAFETY: the ring is shared memory designed for the vCPU (KVM) and one
// harvester; entries are claimed with acquire/release on their flags.
unsafe impl Send for DirtyRing {}
// SAFETY: as above; `next` is behind a mutex.
unsafe impl Sync for DirtyRing {}

impl DirtyRing {
    pub fn map(vcpu: &VcpuFd, bytes: u32) -> Result<DirtyRing> {
        let page = 4096i64;
        // SAFETY: mapping the vCPU's dirty ring at the offset KVM documents,
        // of the size enabled; shared with KVM.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET as i64 * page,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Kvm(format!(
                "mapping a vCPU's dirty ring: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(DirtyRing {
            ptr: ptr as *mut kvm_dirty_gfn,
            entries: bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32,
            next: Mutex::new(0),
        })
    }

    /// Hands every published entry to `mark` (slot, page in slot) and
    /// marks it for reset; returns how many.
    pub fn harvest(&self, mut mark: impl FnMut(usize, u64)) -> u64 {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        loop {
            // SAFETY: the index is reduced modulo the ring size, inside the mapping.
            let e = unsafe { self.ptr.add((*next % self.entries) as usize) };
            // SAFETY: `flags` is a u32 inside the live mapping; AtomicU32
            // has its layout; KVM publishes entries with release semantics.
            let flags = unsafe { &*(std::ptr::addr_of!((*e).flags) as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is published (DIRTY) and ours until reset.
            let (slot, offset) = unsafe { ((*e).slot & 0xffff, (*e).offset) };
            mark(slot as usize, offset);
            flags.store(RESET, Ordering::Release);
            *next = next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: unmapping the ring this value owns.
        unsafe {
            libc::munmap(
                self.ptr as *mut libc::c_void,
                self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            )
        };
    }
}

/// Every vCPU's ring, and what was harvested from them since the last
/// collection. A vCPU whose ring fills (KVM_EXIT_DIRTY_RING_FULL) empties
/// all of them here itself and goes straight back to its guest: waiting
/// for the migration's next harvest instead stalled it for up to a whole
/// round, which is vCPU throttling by another name.
pub struct DirtyRings {
    rings: Vec<DirtyRing>,
    /// Per slot, a bit per page, set by whichever thread harvested it;
    /// made when a migration starts (`prepare`), not with every VM.
    harvested: std::sync::OnceLock<Vec<Vec<AtomicU64>>>,
    slot_pages: Vec<u64>,
    /// A bit was set since the last collection.
    pending: AtomicBool,
    /// Harvests made by vCPUs on a full ring.
    full_exits: AtomicU64,
    vm: Arc<VmFd>,
}

impl DirtyRings {
    /// `slot_pages`: the pages in each memory slot.
    pub fn new(rings: Vec<DirtyRing>, slot_pages: &[u64], vm: Arc<VmFd>) -> DirtyRings {
        DirtyRings {
            rings,
            harvested: std::sync::OnceLock::new(),
            slot_pages: slot_pages.to_vec(),
            pending: AtomicBool::new(false),
            full_exits: AtomicU64::new(0),
            vm,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }

    /// Makes the harvest bitmaps (before dirty logging starts, so a vCPU
    /// with a full ring never allocates them on its exit path).
    pub fn prepare(&self) {
        self.harvested();
    }

    fn harvested(&self) -> &[Vec<AtomicU64>] {
        self.harvested.get_or_init(|| {
            self.slot_pages
                .iter()
                .map(|&p| (0..p.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
                .collect()
        })
    }

    /// Harvests every ring and lets KVM reuse (and write-protect again)
    /// the entries.
    fn absorb(&self) -> Result<()> {
        let (mut n, harvested) = (0, self.harvested());
        for ring in &self.rings {
            n += ring.harvest(|slot, page| {
                if let Some(word) = harvested
                    .get(slot)
                    .and_then(|bits| bits.get((page / 64) as usize))
                {
                    word.fetch_or(1 << (page % 64), Ordering::Relaxed);
                }
            });
        }
        if n > 0 {
            // after the bits: whoever sees the flag sees them
            self.pending.store(true, Ordering::Release);
        }
        reset(&self.vm)
    }

    /// A vCPU's ring is full: empty them all now, from that vCPU's thread.
    pub fn on_full(&self) -> Result<()> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        self.absorb()
    }

    /// How many times vCPUs emptied full rings themselves.
    pub fn full_exits(&self) -> u64 {
        self.full_exits.load(Ordering::Relaxed)
    }

    /// Adds every page dirtied since the last collection to `maps` (a
    /// bitmap per slot).
    pub fn collect(&self, maps: &mut [Vec<u64>]) -> Result<()> {
        self.absorb()?;
        if self.pending.swap(false, Ordering::AcqRel) {
            for (map, bits) in maps.iter_mut().zip(self.harvested()) {
                for (m, b) in map.iter_mut().zip(bits) {
                    if b.load(Ordering::Relaxed) != 0 {
                        *m |= b.swap(0, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Tells KVM the harvested entries may be reused.
pub fn reset(vm: &VmFd) -> Result<()> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument.
    let rc = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if rc < 0 {
        return Err(Error::Kvm(format!(
            "KVM_RESET_DIRTY_RINGS: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
