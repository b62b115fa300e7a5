//! KVM's per-vCPU binary statistics (KVM_GET_STATS_FD): the exits KVM
//! handles in the kernel (HLT, CPUID, MSR, timer, halt polling, ...).
//!
//! Parsed by hand: kvm-ioctls has no wrapper for the stats fd. Layout from
//! the kernel's Documentation/virt/kvm/api.rst (kvm_stats_header, _desc).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

const STAT_TYPE_MASK: u32 = 0xf;
const STAT_TYPE_CUMULATIVE: u32 = 0;
const STAT_TYPE_INSTANT: u32 = 1;
const STAT_TYPE_PEAK: u32 = 2;

/// An open stats fd and its descriptors, read once; values are re-read.
pub struct KvmStats {
    file: File,
    /// (name, byte offset of the value)
    scalars: Vec<(String, u64)>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

impl KvmStats {
    /// Opens the stats of `vcpu`. None where KVM has no binary stats.
    pub fn open(vcpu: &VcpuFd) -> std::io::Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0)?;
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u32_at(&header, 16) as u64;
        let data_offset = u32_at(&header, 20) as u64;
        let desc_size = 16 + name_size;
        let mut descs = vec![0u8; desc_size * num_desc];
        file.read_exact_at(&mut descs, desc_offset)?;
        let mut scalars = Vec::new();
        for d in descs.chunks_exact(desc_size) {
            let flags = u32_at(d, 0);
            let size = u16::from_le_bytes([d[6], d[7]]);
            let offset = u32_at(d, 8) as u64;
            let kind = flags & STAT_TYPE_MASK;
            if size != 1
                || !matches!(
                    kind,
                    STAT_TYPE_CUMULATIVE | STAT_TYPE_INSTANT | STAT_TYPE_PEAK
                )
            {
                continue; // histograms are left out
            }
            let name = &d[16..];
            let name = String::from_utf8_lossy(
                &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())],
            );
            scalars.push((name.into_owned(), data_offset + offset));
        }
        Ok(KvmStats { file, scalars })
    }

    /// Current value of every scalar statistic.
    pub fn read(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (name, off) in &self.scalars {
            let mut v = [0u8; 8];
            if self.file.read_exact_at(&mut v, *off).is_ok() {
                out.insert(name.clone(), u64::from_le_bytes(v));
            }
        }
        out
    }
}
