//! A shared memory region (a file in /dev/shm or any path) mapped into the
//! guest as ivshmem's BAR2: a KVM memory slot, read-only on request. The
//! slot is present while the window is open (the control socket closes and
//! opens it) and BAR2 decodes (the guest may move it or turn decoding off).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::{Error, Result};

/// The largest region: the device manager's large-BAR window.
pub const MAX_SIZE: u64 = crate::layout::PCI_LARGE_BARS.1 - crate::layout::PCI_LARGE_BARS.0;

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

/// A shared region, as the host knows it: the same file is the same region.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IvshmemIdentity {
    pub path: String,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
}

pub struct SharedRegion {
    pub spec: IvshmemSpec,
    ptr: *mut u8,
    slot: u32,
    /// The backing file's (device, inode): the same pair is the same region.
    identity: (u64, u64),
    /// The region cannot shrink under the guest (a memfd sealed with
    /// F_SEAL_SHRINK, as `nfvisor ivshmem-server` without --shm makes it):
    /// a file that can is a SIGBUS waiting for whoever shrinks it.
    pub sealed: bool,
    mapping: Mutex<Mapping>,
}

/// A file's seals (F_GET_SEALS; 0 for a file that takes none).
fn seals(file: &std::fs::File) -> i32 {
    // SAFETY: F_GET_SEALS reads the file's seals; no memory is passed.
    let s = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    s.max(0)
}

fn identity(file: &std::fs::File) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    file.metadata()
        .map(|m| (m.dev(), m.ino()))
        .unwrap_or((0, 0))
}

/// What decides where (and whether) the slot is in the guest.
struct Mapping {
    /// Where BAR2 decodes (None: decoding off, or being sized).
    bar: Option<u64>,
    /// The window is open (the control socket's map/unmap).
    open: bool,
    /// Where the slot is registered now.
    registered: Option<u64>,
}

// SAFETY: the mapping is plain shared memory; the pointer is only used to
// register the slot and to unmap it.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; no interior state.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Maps the region a server handed out (its size is the file's), to
    /// become memory slot `slot`.
    pub fn from_fd(
        fd: &std::os::fd::OwnedFd,
        spec: &IvshmemSpec,
        slot: u32,
    ) -> Result<SharedRegion> {
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
        let region = Self::map(
            &file,
            IvshmemSpec {
                size,
                ..spec.clone()
            },
            slot,
            &format!("the region of {what}"),
        )?;
        if !region.sealed {
            tracing::info!(
                "ivshmem server {what}: its region can shrink (not a sealed memfd): a peer that shrinks it stops this VM"
            );
        }
        Ok(region)
    }

    /// Maps `spec.size` bytes of `file` shared (read-only for a read-only
    /// region), to become memory slot `slot` at BAR2.
    fn map(file: &std::fs::File, spec: IvshmemSpec, slot: u32, what: &str) -> Result<SharedRegion> {
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
            spec,
            ptr: ptr as *mut u8,
            slot,
            identity: identity(file),
            sealed: seals(file) & libc::F_SEAL_SHRINK != 0,
            mapping: Mutex::new(Mapping {
                bar: None,
                open: true,
                registered: None,
            }),
        })
    }

    /// Opens (creating it if absent) and maps the region, to become memory
    /// slot `slot`.
    pub fn open(spec: &IvshmemSpec, slot: u32) -> Result<SharedRegion> {
        let what = spec.path.display().to_string();
        check_size(spec.size, &format!("--ivshmem {what}: size"))?;
        // a region it creates is the user's alone (0600, whatever the
        // umask): other VMs of the same user share it
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!spec.readonly)
            .create(!spec.readonly)
            .truncate(false)
            .mode(0o600)
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
        Self::map(&file, spec.clone(), slot, &what)
    }

    /// Opens or closes the window (the slot leaves the guest while closed:
    /// its accesses then exit to the VMM, which drops them).
    pub fn set_window(&self, vm: &VmFd, open: bool) -> Result<()> {
        self.update(vm, |m| m.open = open)
    }

    /// BAR2 now decodes at `bar` (None: not at all).
    pub fn set_bar(&self, vm: &VmFd, bar: Option<u64>) -> Result<()> {
        self.update(vm, |m| m.bar = bar)
    }

    /// The region as a stream names it.
    pub fn identity(&self) -> IvshmemIdentity {
        IvshmemIdentity {
            path: self.spec.path.display().to_string(),
            size: self.spec.size,
            dev: self.identity.0,
            ino: self.identity.1,
        }
    }

    /// Whether the window is open (the control socket's map/unmap).
    pub fn window_open(&self) -> bool {
        self.mapping.lock().unwrap_or_else(|e| e.into_inner()).open
    }

    /// Where the slot is in the guest now.
    pub fn registered_at(&self) -> Option<u64> {
        self.mapping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .registered
    }

    /// Registers the slot at `bar` (BAR2's address), at creation.
    pub fn register_at(&self, vm: &VmFd, bar: u64) -> Result<()> {
        self.update(vm, |m| m.bar = Some(bar))
    }

    fn update(&self, vm: &VmFd, change: impl FnOnce(&mut Mapping)) -> Result<()> {
        let mut m = self.mapping.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut m);
        let want = if m.open { m.bar } else { None };
        if want == m.registered {
            return Ok(());
        }
        // KVM cannot move a slot: delete it (size 0), then add it anew
        if let Some(at) = m.registered {
            self.set_slot(vm, at, 0)?;
            m.registered = None;
        }
        if let Some(at) = want {
            self.set_slot(vm, at, self.spec.size)?;
            m.registered = Some(at);
        }
        Ok(())
    }

    fn set_slot(&self, vm: &VmFd, at: u64, size: u64) -> Result<()> {
        let r = kvm_userspace_memory_region {
            slot: self.slot,
            flags: if self.spec.readonly && size != 0 {
                KVM_MEM_READONLY
            } else {
                0
            },
            guest_phys_addr: at,
            memory_size: size,
            userspace_addr: self.ptr as u64,
        };
        // SAFETY: the mapping is live for as long as the VM (the Vm owns
        // this region); size 0 deletes the slot. KVM refuses a slot that
        // overlaps another (guest RAM), which surfaces as the error below.
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| {
            Error::Kvm(format!(
                "KVM_SET_USER_MEMORY_REGION for ivshmem ({} bytes at {at:#x}): {e}",
                size
            ))
        })
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.spec.size as usize) };
    }
}
