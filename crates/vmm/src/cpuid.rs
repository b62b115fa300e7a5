//! The guest's CPUID: KVM's supported list, filtered and completed with the
//! topology, the hypervisor bit and KVM's paravirtual leaves.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::{Error, Result};

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;

const ECX_CX16: u32 = 1 << 13;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_HINTS_REALTIME: u32 = 1 << 0;

/// What shapes the guest's CPUID beyond KVM's supported list.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuidOptions {
    pub vcpus: u32,
    /// Hide CMPXCHG16B (hosts whose instruction emulator lacks it).
    pub hide_cx16: bool,
    /// HLT exits are disabled: PV unhalt would never be woken.
    pub hlt_exits_disabled: bool,
    /// vCPUs are dedicated real-time vCPUs: tell the guest (KVM_HINTS_REALTIME).
    pub realtime_hint: bool,
}

/// One CPUID feature register as a guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeatureWord {
    pub leaf: u32,
    pub index: u32,
    /// "eax", "ebx", "ecx" or "edx"
    pub reg: char,
    pub bits: u32,
}

/// The feature registers of leaves 1 and 7.0 of a vCPU's CPUID.
pub fn feature_words(cpuid: &CpuId) -> Vec<FeatureWord> {
    let mut out = Vec::new();
    for e in cpuid.as_slice() {
        let regs: &[(char, u32)] = match (e.function, e.index) {
            (LEAF_FEATURES, 0) => &[('c', e.ecx), ('d', e.edx)],
            (7, 0) => &[('b', e.ebx), ('c', e.ecx), ('d', e.edx)],
            _ => continue,
        };
        for &(reg, bits) in regs {
            out.push(FeatureWord {
                leaf: e.function,
                index: e.index,
                reg,
                bits,
            });
        }
    }
    out
}

/// The features `guest` uses that `host` does not offer, as readable text;
/// empty when the host offers them all. (The hypervisor bit is ours to set.)
pub fn missing_features(guest: &[FeatureWord], host: &[FeatureWord]) -> Vec<String> {
    guest
        .iter()
        .filter_map(|g| {
            let have = host
                .iter()
                .find(|h| h.leaf == g.leaf && h.index == g.index && h.reg == g.reg)
                .map_or(0, |h| h.bits);
            let mut lacking = g.bits & !have;
            if g.leaf == LEAF_FEATURES && g.reg == 'c' {
                lacking &= !ECX_HYPERVISOR;
            }
            (lacking != 0).then(|| {
                format!(
                    "CPUID {:#x}.{} e{}x bits {lacking:#010x}",
                    g.leaf, g.index, g.reg
                )
            })
        })
        .collect()
}

/// KVM's supported CPUID, the base every vCPU's CPUID is made from.
pub fn supported(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm(format!("KVM_GET_SUPPORTED_CPUID: {e}")))
}

/// Bits needed to number `n` items (x2APIC ID shift).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The CPUID of vCPU `id`, one socket with `opts.vcpus` cores, no SMT.
pub fn for_vcpu(base: &CpuId, id: u32, opts: &CpuidOptions) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (opts.vcpus.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if opts.hide_cx16 {
                    e.ecx &= !ECX_CX16;
                }
                if opts.vcpus > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                e.eax = (e.eax & 0x03ff_ffff) | ((opts.vcpus.max(1) - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                // level 0: SMT (one thread per core); level 1: cores
                let (shift, count, kind) = match e.index {
                    0 => (0, 1, 1),
                    1 => (id_bits(opts.vcpus), opts.vcpus, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (kind << 8) | (e.index & 0xff);
                e.edx = id;
            }
            KVM_SIGNATURE_LEAF => {
                // "KVMKVMKVM\0\0\0"
                e.ebx = u32::from_le_bytes(*b"KVMK");
                e.ecx = u32::from_le_bytes(*b"VMKV");
                e.edx = u32::from_le_bytes(*b"M\0\0\0");
                e.eax = e.eax.max(KVM_FEATURES_LEAF);
            }
            KVM_FEATURES_LEAF => {
                if opts.hlt_exits_disabled {
                    e.eax &= !KVM_FEATURE_PV_UNHALT;
                }
                if opts.realtime_hint {
                    e.edx |= KVM_HINTS_REALTIME;
                } else {
                    e.edx &= !KVM_HINTS_REALTIME;
                }
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx: ECX_CX16,
            ..Default::default()
        }
    }

    #[test]
    fn missing_features_are_named() {
        let host = [FeatureWord {
            leaf: 7,
            index: 0,
            reg: 'b',
            bits: 0b0101,
        }];
        let guest = [FeatureWord {
            leaf: 7,
            index: 0,
            reg: 'b',
            bits: 0b0111,
        }];
        let m = missing_features(&guest, &host);
        assert_eq!(m.len(), 1);
        assert!(
            m[0].contains("0x7.0 ebx") && m[0].contains("0x00000002"),
            "{m:?}"
        );
        assert!(missing_features(&host, &guest).is_empty());
    }

    #[test]
    fn topology_hypervisor_bit_cx16_and_pv_hints() {
        let base = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(KVM_SIGNATURE_LEAF, 0),
            kvm_cpuid_entry2 {
                function: KVM_FEATURES_LEAF,
                eax: KVM_FEATURE_PV_UNHALT | 1,
                ..Default::default()
            },
        ])
        .unwrap();
        let opts = CpuidOptions {
            vcpus: 3,
            hide_cx16: true,
            hlt_exits_disabled: true,
            realtime_hint: true,
        };
        let c = for_vcpu(&base, 2, &opts);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[0].ecx & ECX_CX16, 0);
        assert_eq!((e[2].eax, e[2].ebx, e[2].edx), (2, 3, 2));
        assert_eq!(e[3].ebx.to_le_bytes(), *b"KVMK");
        assert_eq!(e[4].eax & KVM_FEATURE_PV_UNHALT, 0);
        assert_eq!(e[4].edx & KVM_HINTS_REALTIME, 1);
        // without the quirk, CX16 stays
        let c = for_vcpu(
            &base,
            0,
            &CpuidOptions {
                vcpus: 1,
                ..Default::default()
            },
        );
        assert_ne!(c.as_slice()[0].ecx & ECX_CX16, 0);
    }
}
