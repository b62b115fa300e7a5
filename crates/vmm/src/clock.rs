//! Clocks: CLOCK_REALTIME as both ends of a migration time-stamp with it,
//! and the guest's TSC as KVM keeps it.

use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::{Error, Result};

pub const IA32_TSC: u32 = 0x10;

const KVMIO: u32 = 0xAE;
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_DEVICE_ATTR,
    KVMIO,
    0xe1,
    kvm_bindings::kvm_device_attr
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_GET_DEVICE_ATTR,
    KVMIO,
    0xe2,
    kvm_bindings::kvm_device_attr
);

/// CLOCK_REALTIME in ns: both ends of a migration time-stamp with it.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// This host's CLOCK_REALTIME as a destination reports it to its source.
/// Test-only: `NFVISOR_TEST_CLOCK_SKEW_MS` shifts it, standing for a
/// destination host whose clock is that far ahead.
pub fn reported_ns(real_ns: u128) -> u128 {
    static SKEW_NS: std::sync::OnceLock<i128> = std::sync::OnceLock::new();
    let skew = *SKEW_NS.get_or_init(|| {
        crate::fault::test_hook("NFVISOR_TEST_CLOCK_SKEW_MS")
            .and_then(|v| v.parse::<i128>().ok())
            .map_or(0, |ms| ms * 1_000_000)
    });
    (real_ns as i128 + skew).max(0) as u128
}

/// IA32_TSC alone, holding `data`.
pub(crate) fn tsc_msr(data: u64) -> Result<Msrs> {
    Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_TSC,
        data,
        ..Default::default()
    }])
    .map_err(|e| Error::Kvm(format!("MSR list: {e:?}")))
}

/// The guest's TSC as KVM has it (IA32_TSC).
pub fn guest_tsc(vcpu: &VcpuFd) -> Result<u64> {
    let mut msrs = tsc_msr(0)?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Ok(msrs.as_slice()[0].data),
        Ok(_) => Err(Error::Kvm("KVM_GET_MSRS: IA32_TSC not read".into())),
        Err(e) => Err(Error::Kvm(format!("KVM_GET_MSRS IA32_TSC: {e}"))),
    }
}

/// Nanoseconds as cycles of a TSC running at `tsc_khz`.
pub fn ns_to_cycles(ns: u64, tsc_khz: u64) -> u64 {
    (ns as u128 * tsc_khz as u128 / 1_000_000) as u64
}

/// The vCPU's KVM_VCPU_TSC_OFFSET, or None where KVM lacks it. (kvm-ioctls
/// wraps vCPU device attributes on aarch64 only: hand-written.)
pub fn tsc_offset(vcpu: &VcpuFd) -> Option<u64> {
    let mut offset = 0u64;
    let attr = kvm_bindings::kvm_device_attr {
        group: kvm_bindings::KVM_VCPU_TSC_CTRL,
        attr: kvm_bindings::KVM_VCPU_TSC_OFFSET as u64,
        addr: &mut offset as *mut u64 as u64,
        flags: 0,
    };
    // SAFETY: `attr.addr` points at a u64 that outlives the call, the size
    // KVM writes for this attribute.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, KVM_GET_DEVICE_ATTR(), &attr) };
    (rc == 0).then_some(offset)
}

/// Sets the vCPU's KVM_VCPU_TSC_OFFSET.
pub fn set_tsc_offset(vcpu: &VcpuFd, id: u32, offset: u64) -> Result<()> {
    let attr = kvm_bindings::kvm_device_attr {
        group: kvm_bindings::KVM_VCPU_TSC_CTRL,
        attr: kvm_bindings::KVM_VCPU_TSC_OFFSET as u64,
        addr: &offset as *const u64 as u64,
        flags: 0,
    };
    // SAFETY: `attr.addr` points at a u64 that outlives the call; KVM only
    // reads it.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, KVM_SET_DEVICE_ATTR(), &attr) };
    if rc != 0 {
        return Err(Error::Kvm(format!(
            "vCPU {id}: setting KVM_VCPU_TSC_OFFSET: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
