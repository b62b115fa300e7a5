//! The dirty bitmap with manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
//! used when the VM has no dirty ring. KVM_GET_DIRTY_LOG then only reads
//! the bitmap, and KVM_CLEAR_DIRTY_LOG re-protects just the pages harvested,
//! one chunk at a time: KVM holds its MMU lock per call, so a large slot is
//! never write-protected in one hold (each hold stalls the vCPUs' page
//! faults, KVM4NFV's complaint). With INITIALLY_SET, turning dirty logging
//! on does not write-protect all of memory either: every page starts dirty
//! and the migration clears the slots chunk by chunk before its first
//! round. Hand-written: kvm-ioctls has no KVM_CLEAR_DIRTY_LOG.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::{Error, Result};

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Pages re-protected per KVM_CLEAR_DIRTY_LOG: 1 GiB of 4 KiB pages.
const CHUNK_PAGES: u64 = 1 << 18;

/// How the dirty bitmap is read and cleared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManualProtect {
    /// KVM_GET_DIRTY_LOG leaves protection to KVM_CLEAR_DIRTY_LOG.
    pub enabled: bool,
    /// Logging starts with every page dirty (nothing write-protected).
    pub initially_set: bool,
}

/// Turns manual protection on where KVM offers it (before any slot logs);
/// without it the plain bitmap serves.
pub fn enable(vm: &VmFd) -> ManualProtect {
    let offered = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as _) as u32;
    if offered & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
        return ManualProtect::default();
    }
    let flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | (offered & KVM_DIRTY_LOG_INITIALLY_SET);
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = flags as u64;
    match vm.enable_cap(&cap) {
        Ok(()) => ManualProtect {
            enabled: true,
            initially_set: flags & KVM_DIRTY_LOG_INITIALLY_SET != 0,
        },
        Err(e) => {
            tracing::warn!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: {e}; the plain dirty bitmap serves");
            ManualProtect::default()
        }
    }
}

/// Clears (and write-protects again) the pages set in `bitmap`, a slot's
/// bitmap of `pages` pages, chunk by chunk; chunks with nothing set are
/// skipped.
pub fn clear(vm: &VmFd, slot: u32, pages: u64, bitmap: &[u64]) -> Result<()> {
    let words_per_chunk = (CHUNK_PAGES / 64) as usize;
    for (i, chunk) in bitmap.chunks(words_per_chunk).enumerate() {
        if chunk.iter().all(|&w| w == 0) {
            continue;
        }
        let first_page = i as u64 * CHUNK_PAGES;
        // KVM wants a multiple of 64 pages, or the rest of the slot
        let num_pages = (chunk.len() as u64 * 64).min(pages - first_page);
        let arg = kvm_clear_dirty_log {
            slot,
            num_pages: num_pages as u32,
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: chunk.as_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: `arg` points at `chunk`, which holds a bit for each of the
        // `num_pages` pages from `first_page`; KVM only reads it.
        let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if rc < 0 {
            return Err(Error::Kvm(format!(
                "KVM_CLEAR_DIRTY_LOG slot {slot} pages {first_page}..{}: {}",
                first_page + num_pages,
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Clears every page of a slot (a migration's start, with INITIALLY_SET).
pub fn clear_all(vm: &VmFd, slot: u32, pages: u64) -> Result<()> {
    let mut all = vec![u64::MAX; pages.div_ceil(64) as usize];
    if !pages.is_multiple_of(64) {
        if let Some(last) = all.last_mut() {
            *last = (1u64 << (pages % 64)) - 1;
        }
    }
    clear(vm, slot, pages, &all)
}
