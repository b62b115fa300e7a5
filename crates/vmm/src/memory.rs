//! Guest memory: one memfd (shmem, or hugetlb with MFD_HUGETLB) mapped
//! MAP_SHARED, so a device process or a vhost-user backend can map the same
//! pages; optionally locked, prefaulted and bound to a NUMA node; registered
//! with KVM as memory slots.
//!
//! Layout: RAM from 0 up to 3 GiB, the rest from 4 GiB; the hole between is
//! left for MMIO (LAPIC, IOAPIC, PCI). Both ranges are windows of the one
//! memfd (file offset 0 and 3 GiB).
//!
//! Every write the VMM itself makes into guest memory through vm-memory's
//! accessors (a device's DMA, a used ring, a restore) is marked in the
//! region's [`VmmDirty`] bitmap: KVM's dirty log sees only the guest's own
//! writes, and migration merges this bitmap into each round.

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::{Error, Result, Setting};

/// The VM's guest memory: vm-memory's mmap backend, each region carrying
/// the bitmap of pages the VMM wrote.
pub type GuestRam = vm_memory::GuestMemoryMmap<VmmDirty>;

/// The VMM's dirty bitmap of one region of guest memory.
pub fn vmm_dirty(region: &GuestRegionMmap<VmmDirty>) -> &VmmDirty {
    // (the mapping's own bitmap; GuestMemoryRegion::bitmap gives a slice)
    std::ops::Deref::deref(region).bitmap()
}

/// Pages the VMM wrote into one guest memory region (one bit per 4 KiB
/// page, the layout of KVM's dirty log), marked by vm-memory on every write
/// through its accessors.
///
/// Not vm-memory's `AtomicBitmap`: that one can hand its words out only as
/// a freshly allocated vector, and the stop-and-copy merges this bitmap
/// inside the downtime, where a fresh allocation's page faults cost more
/// than the merge; this one ORs itself into the caller's bitmap in place,
/// and skips the walk altogether while nothing was written.
#[derive(Debug)]
pub struct VmmDirty {
    words: Vec<AtomicU64>,
    /// Set by any write since the last drain.
    any: AtomicBool,
}

const PAGE: usize = 4096;

impl VmmDirty {
    fn with_pages(pages: usize) -> Self {
        VmmDirty {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            any: AtomicBool::new(false),
        }
    }

    /// ORs the pages written since the last drain into `into` (same
    /// layout) and forgets them; returns how many were set.
    pub fn drain_into(&self, into: &mut [u64]) -> u64 {
        if !self.any.swap(false, Ordering::AcqRel) {
            return 0;
        }
        let mut n = 0;
        for (w, out) in self.words.iter().zip(into.iter_mut()) {
            if w.load(Ordering::Relaxed) != 0 {
                let bits = w.swap(0, Ordering::AcqRel);
                n += bits.count_ones() as u64;
                *out |= bits;
            }
        }
        n
    }

    /// Forgets every page marked so far.
    pub fn clear(&self) {
        self.any.store(false, Ordering::Release);
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }
}

impl Default for VmmDirty {
    fn default() -> Self {
        VmmDirty::with_pages(0)
    }
}

impl Clone for VmmDirty {
    fn clone(&self) -> Self {
        VmmDirty {
            words: self
                .words
                .iter()
                .map(|w| AtomicU64::new(w.load(Ordering::Acquire)))
                .collect(),
            any: AtomicBool::new(self.any.load(Ordering::Acquire)),
        }
    }
}

impl NewBitmap for VmmDirty {
    fn with_len(len: usize) -> Self {
        VmmDirty::with_pages(len.div_ceil(PAGE))
    }
}

impl<'a> WithBitmapSlice<'a> for VmmDirty {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for VmmDirty {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let (first, last) = (offset / PAGE, (offset + len - 1) / PAGE);
        for page in first..=last {
            // (past the end: vm-memory checks ranges before it marks them)
            if let Some(w) = self.words.get(page / 64) {
                w.fetch_or(1 << (page % 64), Ordering::AcqRel);
            }
        }
        self.any.store(true, Ordering::Release);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset / PAGE;
        self.words
            .get(page / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

pub const MMIO_HOLE_START: u64 = 3 << 30;
pub const HIGH_RAM_START: u64 = 4 << 30;

/// Hugepage sizes we can back guest memory with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HugePageSize {
    #[serde(rename = "2M")]
    Size2M,
    #[serde(rename = "1G")]
    Size1G,
}

impl HugePageSize {
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }

    fn sysfs_dir(self) -> &'static str {
        match self {
            HugePageSize::Size2M => "hugepages-2048kB",
            HugePageSize::Size1G => "hugepages-1048576kB",
        }
    }

    fn memfd_flags(self) -> libc::c_uint {
        let shift = self.bytes().trailing_zeros();
        libc::MFD_HUGETLB | (shift << libc::MFD_HUGE_SHIFT)
    }
}

impl std::str::FromStr for HugePageSize {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "2M" | "2m" | "2MB" => Ok(HugePageSize::Size2M),
            "1G" | "1g" | "1GB" => Ok(HugePageSize::Size1G),
            _ => Err(format!("unknown hugepage size {s:?} (use 2M or 1G)")),
        }
    }
}

/// How guest memory is backed.
#[derive(Debug, Clone, Default)]
pub struct MemoryOptions {
    pub size: u64,
    pub hugepages: Option<HugePageSize>,
    pub mlock: bool,
    pub prefault: bool,
    pub numa_node: Option<u32>,
}

/// The RAM ranges for `size` bytes of guest memory.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(HIGH_RAM_START), size - MMIO_HOLE_START),
        ]
    }
}

fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn free_hugepages(size: HugePageSize) -> u64 {
    let path = format!(
        "/sys/kernel/mm/hugepages/{}/free_hugepages",
        size.sysfs_dir()
    );
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Maps guest memory as asked. Returns the memory and the settings applied.
/// A setting that cannot be applied is an error unless `best_effort`, in
/// which case it is reported as failed and the VM goes on without it.
pub fn create(
    opts: &MemoryOptions,
    best_effort: bool,
    settings: &mut Vec<Setting>,
) -> Result<GuestRam> {
    const MIN: u64 = 2 << 20;
    if opts.size < MIN {
        return Err(Error::Config(format!(
            "memory {} MiB is too small: at least 2 MiB",
            opts.size >> 20
        )));
    }
    if let Some(host) = host_memory_bytes() {
        if opts.size > host {
            return Err(Error::Config(format!(
                "memory {} MiB is larger than this host's {} MiB",
                opts.size >> 20,
                host >> 20
            )));
        }
    }
    let mut flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
    let mut memfd_flags = libc::MFD_CLOEXEC;
    if let Some(hp) = opts.hugepages {
        let need = opts.size.div_ceil(hp.bytes());
        let free = free_hugepages(hp);
        let what = format!("hugepages {hp:?}");
        if !opts.size.is_multiple_of(hp.bytes()) {
            return Err(Error::Config(format!(
                "memory {} MiB is not a multiple of the {} MiB hugepage size",
                opts.size >> 20,
                hp.bytes() >> 20
            )));
        }
        if free < need {
            let why = format!(
                "{need} free {hp:?} hugepages needed, {free} free; reserve them with `echo {need} > /sys/kernel/mm/hugepages/{}/nr_hugepages`",
                hp.sysfs_dir()
            );
            Setting::fail(settings, &what, why, best_effort)?;
        } else {
            memfd_flags |= hp.memfd_flags();
            flags &= !libc::MAP_NORESERVE;
            settings.push(Setting::applied(&what, format!("{need} pages")));
        }
    }
    let file = Arc::new(guest_memfd(opts.size, memfd_flags)?);
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (base, len) in ram_ranges(opts.size) {
        let region =
            MmapRegionBuilder::new_with_bitmap(len as usize, VmmDirty::with_len(len as usize))
                .with_file_offset(FileOffset::from_arc(file.clone(), file_offset))
                .with_hugetlbfs(memfd_flags & libc::MFD_HUGETLB != 0)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .build()
                .map_err(|e| {
                    Error::Memory(format!(
                        "mapping {} MiB of guest memory at {:#x}: {e}",
                        len >> 20,
                        base.0
                    ))
                })?;
        regions.push(
            GuestRegionMmap::new(region, base)
                .ok_or_else(|| Error::Memory("guest memory region overflows".into()))?,
        );
        file_offset += len;
    }
    let mem = GuestRam::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))?;

    for region in mem.iter() {
        let (ptr, len) = (region.as_ptr(), region.len() as usize);
        if let Some(node) = opts.numa_node {
            let r = rt::bind_memory_to_node(ptr as usize, len, node)
                .map(|()| format!("memory bound to node {node}"))
                .map_err(|e| e.to_string());
            Setting::record(settings, "numa-node", r, best_effort)?;
        }
        if opts.mlock {
            // SAFETY: the range is a live mapping owned by `mem`.
            let r = if unsafe { libc::mlock(ptr as *const libc::c_void, len) } != 0 {
                let e = std::io::Error::last_os_error();
                Err(format!(
                    "mlock of {} MiB failed: {e} (raise RLIMIT_MEMLOCK or run as root)",
                    len >> 20
                ))
            } else {
                Ok(format!("{} MiB locked", len >> 20))
            };
            Setting::record(settings, "mlock", r, best_effort)?;
        }
        if opts.prefault && !opts.mlock {
            // mlock already faults every page in; otherwise touch each one.
            let step = opts.hugepages.map_or(4096, |h| h.bytes() as usize);
            for off in (0..len).step_by(step) {
                // SAFETY: `off` is inside the mapping; a volatile write of a
                // zero byte to fresh (all-zero) guest memory changes nothing
                // the guest can see.
                unsafe { std::ptr::write_volatile(ptr.add(off), 0) };
            }
            settings.push(Setting::applied(
                "prefault",
                format!("{} MiB touched", len >> 20),
            ));
        }
    }
    Ok(mem)
}

/// The memfd that backs guest memory, `size` bytes long.
fn guest_memfd(size: u64, flags: libc::c_uint) -> Result<std::fs::File> {
    // SAFETY: the name is a NUL-terminated string; memfd_create reads it only.
    let fd = unsafe { libc::memfd_create(c"nfvisor-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::Memory(format!(
            "memfd_create for {} MiB of guest memory: {}",
            size >> 20,
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| {
        Error::Memory(format!(
            "sizing the guest memory memfd to {} MiB: {e}",
            size >> 20
        ))
    })?;
    Ok(file)
}

/// Registers every region of `mem` with KVM, one slot each.
pub fn register_slots(vm: &VmFd, mem: &GuestRam, flags: u32) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes that
        // outlives the VM (the Vm owns `mem`), and slots do not overlap.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| Error::Kvm(format!("KVM_SET_USER_MEMORY_REGION slot {slot}: {e}")))?;
    }
    Ok(())
}

/// Per region, one byte per 4 KiB page: bit 0 set where the page has ever
/// been touched. A page never touched reads as zero: a migration's first
/// round skips it without reading it. None for a region that cannot be
/// answered for: then every page counts.
///
/// Shared memory (shmem): from the memfd's holes (SEEK_DATA/SEEK_HOLE): a
/// page is data once anyone wrote or faulted it, through this mapping or
/// another process's (a vhost-user backend's), and stays data when swapped
/// out. hugetlbfs has no SEEK_DATA (the whole file reads as data), so
/// hugepage memory is answered from this process's page tables
/// (/proc/self/pagemap), which miss what another process wrote through its
/// own mapping and never faulted here.
pub fn residency(mem: &GuestRam) -> Vec<Option<Vec<u8>>> {
    mem.iter()
        .map(|region| {
            let pages = region.len() as usize / PAGE;
            let hugetlb = std::ops::Deref::deref(region).is_hugetlbfs() == Some(true);
            match region.file_offset() {
                Some(fo) if !hugetlb => file_data_pages(fo.file(), fo.start(), pages)
                    .or_else(|| pagemap_pages(region.as_ptr() as u64, pages)),
                _ => pagemap_pages(region.as_ptr() as u64, pages),
            }
        })
        .collect()
}

/// `pages` pages of `file` from `start`: 1 where the file holds data.
fn file_data_pages(file: &std::fs::File, start: u64, pages: usize) -> Option<Vec<u8>> {
    let end = start + (pages * PAGE) as u64;
    let mut map = vec![0u8; pages];
    let mut at = start;
    while at < end {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data from here to the end of the file
            return (e.raw_os_error() == Some(libc::ENXIO)).then_some(map);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let hole = (hole as u64).min(end);
        let (first, last) = (
            (data - start) as usize / PAGE,
            (hole - start).div_ceil(PAGE as u64) as usize,
        );
        map[first..last.min(pages)].fill(1);
        at = hole.max(data + 1);
    }
    Some(map)
}

/// `pages` pages of this process's mapping at `addr`: 1 where present or
/// swapped (/proc/self/pagemap).
fn pagemap_pages(addr: u64, pages: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let f = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut raw = vec![0u8; pages * 8];
    f.read_exact_at(&mut raw, (addr / PAGE as u64) * 8).ok()?;
    Some(
        raw.chunks_exact(8)
            .map(|e| {
                let v = u64::from_le_bytes(e.try_into().unwrap_or_default());
                u8::from(v & (PRESENT | SWAPPED) != 0)
            })
            .collect(),
    )
}

/// Bytes of guest memory resident in host RAM right now.
pub fn resident_bytes(mem: &GuestRam) -> u64 {
    residency(mem)
        .iter()
        .flatten()
        .map(|v| v.iter().filter(|&&b| b & 1 == 1).count() as u64 * 4096)
        .sum()
}

/// This process's resident set, in bytes.
pub fn process_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        let r = ram_ranges(5 << 30);
        assert_eq!(r[1], (GuestAddress(HIGH_RAM_START), 2 << 30));
    }

    #[test]
    fn memory_larger_than_the_host_is_refused() {
        let opts = MemoryOptions {
            size: 1 << 50,
            ..Default::default()
        };
        let e = create(&opts, false, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than this host"), "{e}");
    }
}
