//! A shared memory region (a file in /dev/shm or any path) mapped into the
//! guest as ivshmem's BAR2: a KVM memory slot, read-only on request.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

use crate::{Error, Result};

/// Where ivshmem's BARs live (in the MMIO hole below 4 GiB).
pub const BAR2_ADDR: u64 = 0xc000_0000;
pub const BAR0_ADDR: u64 = 0xe000_0000;
/// MSI-X (doorbell mode).
pub const BAR1_ADDR: u64 = 0xe000_1000;
/// The largest region that fits below the benchmark page at 0xd0000000.
pub const MAX_SIZE: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct IvshmemSpec {
    pub path: PathBuf,
    pub size: u64,
    pub readonly: bool,
    /// Doorbell mode: the ivshmem-server socket (path and size then come
    /// from the server's shared memory descriptor).
    pub server: Option<PathBuf>,
    pub vectors: u32,
}

/// A region's size: a power of two from 4 KiB to MAX_SIZE.
fn check_size(size: u64, what: &str) -> Result<()> {
    if !size.is_power_of_two() || !(4096..=MAX_SIZE).contains(&size) {
        return Err(Error::Config(format!(
            "{what} of {size} bytes must be a power of two between 4 KiB and {} MiB",
            MAX_SIZE >> 20
        )));
    }
    Ok(())
}

pub struct SharedRegion {
    pub spec: IvshmemSpec,
    ptr: *mut u8,
}

// SAFETY: the mapping is plain shared memory; the pointer is only used to
// register the slot and to unmap it.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; no interior state.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Maps the region a server handed out (its size is the file's).
    pub fn from_fd(fd: &std::os::fd::OwnedFd, spec: &IvshmemSpec) -> Result<SharedRegion> {
        let what = spec
            .server
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let file = std::fs::File::from(
            fd.try_clone()
                .map_err(|e| Error::Device(format!("ivshmem server {what}: {e}")))?,
        );
        let size = file
            .metadata()
            .map_err(|e| Error::Device(format!("ivshmem server {what}: {e}")))?
            .len();
        check_size(size, &format!("ivshmem server {what}: its region"))?;
        // SAFETY: a new shared mapping of `size` bytes of the server's file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Memory(format!(
                "mapping the region of {what}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(SharedRegion {
            spec: IvshmemSpec {
                size,
                ..spec.clone()
            },
            ptr: ptr as *mut u8,
        })
    }

    /// Opens (creating it if absent) and maps the region.
    pub fn open(spec: &IvshmemSpec) -> Result<SharedRegion> {
        let what = spec.path.display().to_string();
        check_size(spec.size, &format!("--ivshmem {what}: size"))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!spec.readonly)
            .create(!spec.readonly)
            .truncate(false)
            .open(&spec.path)
            .map_err(|e| Error::Config(format!("--ivshmem {what}: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| Error::Config(format!("--ivshmem {what}: {e}")))?
            .len();
        if len < spec.size {
            if spec.readonly {
                return Err(Error::Config(format!(
                    "--ivshmem {what}: the file has {len} bytes, {} asked, and a read-only region cannot grow it",
                    spec.size
                )));
            }
            file.set_len(spec.size)
                .map_err(|e| Error::Config(format!("--ivshmem {what}: {e}")))?;
        }
        let prot = if spec.readonly {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: a new shared mapping of `size` bytes of an open file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                spec.size as usize,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Memory(format!(
                "mapping {what}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(SharedRegion {
            spec: spec.clone(),
            ptr: ptr as *mut u8,
        })
    }

    /// Takes the region out of the guest (KVM deletes a slot of size 0):
    /// its accesses then exit to the VMM, which drops them.
    pub fn unregister(&self, vm: &VmFd, slot: u32) -> Result<()> {
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: BAR2_ADDR,
            memory_size: 0,
            userspace_addr: self.ptr as u64,
        };
        // SAFETY: deleting a slot this VM registered; no memory is handed to KVM.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| Error::Kvm(format!("removing the ivshmem slot: {e}")))
    }

    /// Registers the region as memory slot `slot` at BAR2.
    pub fn register(&self, vm: &VmFd, slot: u32) -> Result<()> {
        let r = kvm_userspace_memory_region {
            slot,
            flags: if self.spec.readonly {
                KVM_MEM_READONLY
            } else {
                0
            },
            guest_phys_addr: BAR2_ADDR,
            memory_size: self.spec.size,
            userspace_addr: self.ptr as u64,
        };
        // SAFETY: the mapping is live for as long as the VM (the Vm owns
        // this region) and does not overlap guest RAM (it sits in the MMIO hole).
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| Error::Kvm(format!("KVM_SET_USER_MEMORY_REGION for ivshmem: {e}")))
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.spec.size as usize) };
    }
}
