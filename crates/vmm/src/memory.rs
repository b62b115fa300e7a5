//! Guest memory: anonymous or hugetlb mappings, optionally locked, prefaulted
//! and bound to a NUMA node, registered with KVM as memory slots.
//!
//! Layout: RAM from 0 up to 3 GiB, the rest from 4 GiB; the hole between is
//! left for MMIO (LAPIC, IOAPIC, PCI later).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::{Error, Result, Setting};

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

    fn mmap_flag(self) -> i32 {
        let shift = self.bytes().trailing_zeros() as i32;
        libc::MAP_HUGETLB | (shift << libc::MAP_HUGE_SHIFT)
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
) -> Result<GuestMemoryMmap> {
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
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
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
            flags |= hp.mmap_flag();
            flags &= !libc::MAP_NORESERVE;
            settings.push(Setting::applied(&what, format!("{need} pages")));
        }
    }
    let mut regions = Vec::new();
    for (base, len) in ram_ranges(opts.size) {
        let region = MmapRegionBuilder::new(len as usize)
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
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))?;

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
                // zero byte to fresh anonymous memory changes nothing the
                // guest can see.
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

/// Registers every region of `mem` with KVM, one slot each.
pub fn register_slots(vm: &VmFd, mem: &GuestMemoryMmap, flags: u32) -> Result<()> {
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

/// Per region, one byte per 4 KiB page: bit 0 set where the guest has ever
/// touched the page, from /proc/self/pagemap (present or swapped). A page
/// never touched reads as zero: a migration's first round skips it without
/// reading it. (mincore alone would also call a swapped-out page untouched.)
/// None for a region that cannot be answered for: then every page counts.
pub fn residency(mem: &GuestMemoryMmap) -> Vec<Option<Vec<u8>>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok();
    mem.iter()
        .map(|region| {
            let f = pagemap.as_ref()?;
            let pages = region.len() as usize / 4096;
            let mut raw = vec![0u8; pages * 8];
            let offset = (region.as_ptr() as u64 / 4096) * 8;
            f.read_exact_at(&mut raw, offset).ok()?;
            Some(
                raw.chunks_exact(8)
                    .map(|e| {
                        let v = u64::from_le_bytes(e.try_into().unwrap());
                        u8::from(v & (PRESENT | SWAPPED) != 0)
                    })
                    .collect(),
            )
        })
        .collect()
}

/// Bytes of guest memory resident in host RAM right now.
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
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
