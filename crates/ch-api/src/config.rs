//! Cloud Hypervisor's VM configuration (its `VmConfig` JSON, as
//! `cloud-hypervisor.yaml` of release v53.0 and Kata Containers write it)
//! turned into nfvisor's one `VmConfig`, so the REST API means what the
//! CLI flags and the TOML file mean.
//!
//! A field nfvisor honours is mapped; a field it cannot honour is accepted
//! only at its neutral value (false, absent, an empty list, one PCI
//! segment in use) and otherwise refused by name; a field Cloud Hypervisor
//! does not know is ignored, as Cloud Hypervisor ignores it. nfvisor's own
//! real-time settings sit in `nfvisor_rt`, the TOML file's `[rt]` table.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vmm::config::RtConfig;
use vmm::VmConfig;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChVmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Vec<NetConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_console: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformConfig>,
    /// The entropy and vsock devices (checked as RngConfig and VsockConfig).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Value>,
    /// Cloud Hypervisor features nfvisor does not offer: absent, null or
    /// empty only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmem: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_devices: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdpa: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_groups: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generic_vhost_user: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segments: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtc: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock_rules: Option<Value>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub watchdog: bool,
    #[serde(default)]
    pub pvpanic: bool,
    #[serde(default)]
    pub landlock_enable: bool,
    /// nfvisor's real-time settings (the TOML file's `[rt]`, the CLI's
    /// `--cpus`, `--rt-priority`, ... flags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfvisor_rt: Option<RtConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Value>,
    #[serde(default)]
    pub kvm_hyperv: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_phys_bits: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Vec<CpuAffinity>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_scheduling: Option<String>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
            topology: None,
            kvm_hyperv: false,
            max_phys_bits: None,
            nested: None,
            affinity: None,
            features: None,
            core_scheduling: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpuAffinity {
    pub vcpu: u32,
    pub host_cpus: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub mergeable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_method: Option<String>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub reserve: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thp: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<Value>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: 512 << 20,
            hotplug_size: None,
            hotplugged_size: None,
            mergeable: false,
            hotplug_method: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            reserve: false,
            thp: None,
            zones: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub igvm: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iobase: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// ms.
    pub refill_time: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_affinity: Option<Value>,
    #[serde(default)]
    pub backing_files: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segment: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// (a guest address Cloud Hypervisor's yaml once gave a default; a TAP
    /// here is configured by whoever made it: ignored)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    #[serde(default)]
    pub vhost_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_tso: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_ufo: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_csum: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segment: Option<u16>,
    /// (Cloud Hypervisor takes descriptors only by SCM_RIGHTS; a number in
    /// a body means nothing and is dropped)
    #[serde(default, skip_serializing)]
    pub fds: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RngConfig {
    #[serde(default)]
    pub src: Option<String>,
    #[serde(default)]
    pub iommu: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: String,
    #[serde(default)]
    pub iommu: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlatformConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_pci_segments: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_segments: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_address_width: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_address_width_bits: Option<u8>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "serial_number"
    )]
    pub system_serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "uuid")]
    pub system_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oem_strings: Option<Vec<String>>,
    #[serde(default)]
    pub tdx: bool,
    #[serde(default)]
    pub sev_snp: bool,
    #[serde(default)]
    pub iommufd: bool,
}

/// The most vCPUs a VM here has (checked before anything is sized by it).
const MAX_VCPUS: u32 = 255;

/// A value that is absent in effect: null, false, 0, "", [] or {}.
fn neutral(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
    }
}

/// Why a configuration is refused: the field at fault and the reason.
pub type Refusal = String;

/// What a NIC gets its TAP from once the API has it.
pub enum TapFrom {
    Name(String),
    /// Descriptor numbers open in this process, one per queue pair.
    Fds(Vec<i32>),
}

/// How the console goes, from `serial` (None: nowhere).
#[derive(Debug, Clone, PartialEq)]
pub enum Console {
    Off,
    Tty,
    File(String),
}

impl ChVmConfig {
    /// nfvisor's configuration for this one, each NIC's TAP from `taps`
    /// (in `net` order); Err names the field nfvisor cannot honour.
    pub fn to_vm_config(&self, taps: &[TapFrom]) -> Result<(VmConfig, Console), Refusal> {
        let mut c = VmConfig::default();
        let refuse = |field: &str, why: &str| Err(format!("{field}: {why}"));
        // devices and features this build does not have
        for (name, v, why) in [
            ("balloon", &self.balloon, "nfvisor has no balloon device"),
            ("fs", &self.fs, "nfvisor has no virtio-fs"),
            ("pmem", &self.pmem, "nfvisor has no virtio-pmem"),
            ("devices", &self.devices, "nfvisor has no VFIO passthrough"),
            (
                "user_devices",
                &self.user_devices,
                "nfvisor has no vfio-user",
            ),
            ("vdpa", &self.vdpa, "nfvisor has no vDPA"),
            ("numa", &self.numa, "nfvisor does not model NUMA guests yet"),
            ("tpm", &self.tpm, "nfvisor has no TPM"),
            (
                "rate_limit_groups",
                &self.rate_limit_groups,
                "nfvisor's rate limits are per disk (disks[].rate_limiter_config)",
            ),
            (
                "generic_vhost_user",
                &self.generic_vhost_user,
                "nfvisor has no generic vhost-user devices",
            ),
            (
                "pci_segments",
                &self.pci_segments,
                "nfvisor has one PCI segment",
            ),
            ("rtc", &self.rtc, "nfvisor has no RTC device"),
            (
                "landlock_rules",
                &self.landlock_rules,
                "nfvisor has no Landlock",
            ),
        ] {
            if v.as_ref().is_some_and(|v| !neutral(v)) {
                return refuse(name, why);
            }
        }
        for (name, on) in [
            ("iommu", self.iommu),
            ("watchdog", self.watchdog),
            ("pvpanic", self.pvpanic),
            ("landlock_enable", self.landlock_enable),
        ] {
            if on {
                return refuse(name, "nfvisor does not offer it: false or absent only");
            }
        }
        // the payload
        let Some(p) = &self.payload else {
            return refuse("payload", "a kernel is needed (payload.kernel)");
        };
        if p.firmware.is_some() || p.igvm.is_some() {
            return refuse(
                "payload",
                "nfvisor boots a kernel directly (PVH or bzImage): no firmware, no IGVM",
            );
        }
        let Some(kernel) = &p.kernel else {
            return refuse("payload.kernel", "a kernel is needed");
        };
        c.kernel = Some(kernel.into());
        c.cmdline = p.cmdline.clone();
        c.initrd = p.initramfs.as_ref().map(Into::into);
        // vCPUs
        let cpus = &self.cpus;
        if cpus.boot_vcpus == 0 || cpus.boot_vcpus > MAX_VCPUS || cpus.max_vcpus < cpus.boot_vcpus {
            return refuse(
                "cpus",
                &format!(
                    "boot_vcpus {} and max_vcpus {}: boot from 1 to {MAX_VCPUS}, max at least boot",
                    cpus.boot_vcpus, cpus.max_vcpus
                ),
            );
        }
        if cpus.kvm_hyperv {
            return refuse(
                "cpus.kvm_hyperv",
                "nfvisor offers no Hyper-V enlightenments",
            );
        }
        if cpus.features.as_ref().is_some_and(|f| {
            f.as_object()
                .is_some_and(|o| o.values().any(|v| !neutral(v)))
        }) {
            return refuse(
                "cpus.features",
                "nfvisor offers no optional CPU features (amx)",
            );
        }
        c.vcpus = Some(cpus.boot_vcpus);
        let mut rt = self.nfvisor_rt.clone().unwrap_or_default();
        if let Some(aff) = &cpus.affinity {
            // one host CPU a vCPU, every vCPU named once: nfvisor's pinning
            let mut by_vcpu = vec![None; cpus.boot_vcpus as usize];
            for a in aff {
                match (by_vcpu.get_mut(a.vcpu as usize), a.host_cpus.as_slice()) {
                    (Some(slot @ None), [one]) => *slot = Some(*one),
                    _ => return refuse(
                        "cpus.affinity",
                        "nfvisor pins each vCPU to one host CPU: one entry a vCPU, one CPU in each",
                    ),
                }
            }
            let Some(list) = by_vcpu.into_iter().collect::<Option<Vec<_>>>() else {
                return refuse("cpus.affinity", "every boot vCPU needs its host CPU");
            };
            if rt.cpus.is_some() {
                return refuse(
                    "cpus.affinity",
                    "give the pinning once: here or in nfvisor_rt.cpus",
                );
            }
            rt.cpus = Some(
                list.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        // memory
        let m = &self.memory;
        if m.size == 0 || !m.size.is_multiple_of(1 << 20) {
            return refuse(
                "memory.size",
                &format!("{} bytes: a whole number of MiB", m.size),
            );
        }
        c.memory = Some(vmm::config::Size::of_bytes(m.size));
        if m.hotplugged_size.is_some_and(|s| s != 0) {
            return refuse(
                "memory.hotplugged_size",
                "nfvisor has no memory hotplug: 0 or absent",
            );
        }
        if m.mergeable {
            return refuse(
                "memory.mergeable",
                "KSM is not used for real-time guests: false",
            );
        }
        if m.zones.as_ref().is_some_and(|z| !neutral(z)) {
            return refuse("memory.zones", "nfvisor has one memory region: absent");
        }
        if m.hugepages {
            let size = match m.hugepage_size {
                None | Some(0x20_0000) => "2M",
                Some(0x4000_0000) => "1G",
                Some(other) => {
                    return refuse(
                        "memory.hugepage_size",
                        &format!("{other} bytes: 2 MiB or 1 GiB"),
                    )
                }
            };
            if rt.hugepages.is_some() {
                return refuse(
                    "memory.hugepages",
                    "give hugepages once: here or in nfvisor_rt",
                );
            }
            rt.hugepages = Some(size.into());
        }
        if m.prefault {
            rt.prefault = Some(true);
        }
        c.rt = rt;
        // consoles
        let console = match &self.serial {
            None => Console::Off,
            Some(s) => match s.mode.as_str() {
                "Off" | "Null" => Console::Off,
                "Tty" => Console::Tty,
                "File" => match &s.file {
                    Some(f) => Console::File(f.clone()),
                    None => return refuse("serial.file", "mode File needs a file"),
                },
                other => {
                    return refuse("serial.mode", &format!("{other:?}: Off, Null, Tty or File"))
                }
            },
        };
        for (name, con) in [
            ("console", &self.console),
            ("debug_console", &self.debug_console),
        ] {
            if let Some(con) = con {
                if con.mode != "Off" && con.mode != "Null" {
                    return refuse(
                        &format!("{name}.mode"),
                        &format!("{:?}: nfvisor has no virtio-console; Off or Null", con.mode),
                    );
                }
            }
        }
        if let Some(p) = &self.platform {
            if p.num_pci_segments.is_some_and(|n| n > 2) {
                return refuse("platform.num_pci_segments", "at most 2 (one is used)");
            }
            if p.iommu_segments.as_ref().is_some_and(|s| !s.is_empty()) {
                return refuse("platform.iommu_segments", "nfvisor has no virtual IOMMU");
            }
            if p.iommufd {
                return refuse("platform.iommufd", "nfvisor has no virtual IOMMU");
            }
            for (name, on) in [("platform.tdx", p.tdx), ("platform.sev_snp", p.sev_snp)] {
                if on {
                    return refuse(name, "no confidential guests in nfvisor");
                }
            }
            for (name, given) in [
                (
                    "platform.system_serial_number",
                    p.system_serial_number.is_some(),
                ),
                ("platform.system_uuid", p.system_uuid.is_some()),
                (
                    "platform.oem_strings",
                    p.oem_strings.as_ref().is_some_and(|o| !o.is_empty()),
                ),
            ] {
                if given {
                    return refuse(name, "nfvisor has no SMBIOS tables");
                }
            }
        }
        // disks
        let mut disks = Vec::new();
        for (i, d) in self.disks.iter().flatten().enumerate() {
            disks.push(disk_spec(d).map_err(|e| format!("disks[{i}].{e}"))?);
        }
        c.disk = (!disks.is_empty()).then_some(disks);
        // NICs
        let nets = self.net.as_deref().unwrap_or_default();
        if nets.len() != taps.len() {
            return refuse(
                "net",
                "each NIC needs a tap name or a descriptor from vm.add-net",
            );
        }
        let mut specs = Vec::new();
        for (i, (n, tap)) in nets.iter().zip(taps).enumerate() {
            specs.push(net_spec(n, tap).map_err(|e| format!("net[{i}].{e}"))?);
        }
        c.net = (!specs.is_empty()).then_some(specs);
        // the entropy and vsock devices
        if let Some(r) = self.rng.as_ref().filter(|v| !v.is_null()) {
            let r: RngConfig =
                serde_json::from_value(r.clone()).map_err(|e| format!("rng: {e}"))?;
            if r.iommu {
                return refuse("rng.iommu", "nfvisor has no virtual IOMMU");
            }
            // getrandom stands for the default device (/dev/urandom)
            c.rng = Some(match r.src.as_deref() {
                None | Some("/dev/urandom") => String::new(),
                Some(p) if p.contains(',') => {
                    return refuse("rng.src", "a comma in the path is not supported")
                }
                Some(p) => format!("src={p}"),
            });
        }
        if let Some(v) = self.vsock.as_ref().filter(|v| !v.is_null()) {
            let v: VsockConfig =
                serde_json::from_value(v.clone()).map_err(|e| format!("vsock: {e}"))?;
            if v.iommu {
                return refuse("vsock.iommu", "nfvisor has no virtual IOMMU");
            }
            if v.socket.contains(',') {
                return refuse("vsock.socket", "a comma in the path is not supported");
            }
            let spec = format!("cid={},socket={}", v.cid, v.socket);
            vmm::virtio_vsock::parse_vsock(&spec).map_err(|e| format!("vsock: {e}"))?;
            c.vsock = Some(spec);
        }
        Ok((c, console))
    }
}

/// A token bucket's rate a second.
fn per_second(b: &TokenBucket, what: &str) -> Result<u64, String> {
    if b.refill_time == 0 || b.size == 0 {
        return Err(format!("{what}: size and refill_time above 0"));
    }
    Ok((b.size.saturating_mul(1000) / b.refill_time).max(1))
}

/// `--disk` for a disk.
pub fn disk_spec(d: &DiskConfig) -> Result<String, String> {
    let Some(path) = &d.path else {
        return Err("path: a disk needs an image (vhost-user disks are not in nfvisor)".into());
    };
    if d.vhost_user || d.vhost_socket.is_some() {
        return Err("vhost_user: not in nfvisor".into());
    }
    if d.backing_files {
        return Err("backing_files: raw images only".into());
    }
    if d.image_type.as_deref().is_some_and(|t| t != "Raw") {
        return Err(format!(
            "image_type: {:?}: raw images only",
            d.image_type.as_deref().unwrap_or_default()
        ));
    }
    if d.rate_limit_group.is_some() {
        return Err("rate_limit_group: use rate_limiter_config".into());
    }
    if d.queue_affinity.is_some() {
        return Err("queue_affinity: not in nfvisor yet".into());
    }
    if d.iommu {
        return Err("iommu: nfvisor has no virtual IOMMU".into());
    }
    if d.pci_segment.is_some_and(|s| s != 0) {
        return Err("pci_segment: nfvisor's devices are on segment 0".into());
    }
    if path.contains(',') {
        return Err(format!(
            "path {path:?}: a comma in an image path is not supported"
        ));
    }
    let mut s = format!("path={path}");
    if d.readonly {
        s.push_str(",readonly");
    }
    if d.direct {
        s.push_str(",direct");
    }
    if let Some(id) = &d.serial {
        s.push_str(&format!(",serial={id}"));
    }
    if let Some(q) = d.num_queues {
        s.push_str(&format!(",queues={q}"));
    }
    if let Some(r) = &d.rate_limiter_config {
        if let Some(b) = &r.ops {
            s.push_str(&format!(
                ",iops={}",
                per_second(b, "rate_limiter_config.ops")?
            ));
        }
        if let Some(b) = &r.bandwidth {
            let bytes = per_second(b, "rate_limiter_config.bandwidth")?;
            s.push_str(&format!(",bw={}K", (bytes >> 10).max(1)));
        }
    }
    // (the spec is checked as `--disk` is: one parser)
    vmm::virtio_blk::parse_disk(&s).map_err(|e| e.to_string())?;
    Ok(s)
}

/// `--net` for a NIC on `tap`.
fn net_spec(n: &NetConfig, tap: &TapFrom) -> Result<String, String> {
    let vhost_user = n.vhost_user || n.vhost_socket.is_some();
    let pairs = queue_pairs(n)?;

    if n.host_mac.is_some() {
        return Err("host_mac: the TAP's MAC is whoever made it's".into());
    }
    if n.iommu {
        return Err("iommu: nfvisor has no virtual IOMMU".into());
    }
    if n.pci_segment.is_some_and(|s| s != 0) {
        return Err("pci_segment: nfvisor's devices are on segment 0".into());
    }
    let mut s = if vhost_user {
        vhost_user_spec(n)?
    } else {
        let mut s = match tap {
            TapFrom::Name(name) => format!("tap={name}"),
            TapFrom::Fds(fds) => format!(
                "fd={}",
                fds.iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            ),
        };
        if let Some(p) = pairs {
            s.push_str(&format!(",queues={p}"));
        }
        // Cloud Hypervisor's offloads: csum both ways, TSO for IPv4 and
        // IPv6 (UFO is gone from Linux: not offered, the flag ignored)
        match (n.offload_csum == Some(true), n.offload_tso == Some(true)) {
            (true, true) => s.push_str(",offload=csum+tso4+tso6"),
            (true, false) => s.push_str(",offload=csum"),
            (false, true) => return Err("offload_tso needs offload_csum".into()),
            (false, false) => {}
        }
        s
    };
    if let Some(mac) = &n.mac {
        s.push_str(&format!(",mac={mac}"));
    }
    if let Some(mtu) = n.mtu {
        s.push_str(&format!(",mtu={mtu}"));
    }
    // Cloud Hypervisor's one limiter config is each direction's bucket
    if let Some(r) = &n.rate_limiter_config {
        if let Some(b) = &r.ops {
            let pps = per_second(b, "rate_limiter_config.ops")?;
            s.push_str(&format!(",rx-pps={pps},tx-pps={pps}"));
        }
        if let Some(b) = &r.bandwidth {
            let kib = (per_second(b, "rate_limiter_config.bandwidth")? >> 10).max(1);
            s.push_str(&format!(",rx-bw={kib}K,tx-bw={kib}K"));
        }
    }
    vmm::virtio_net::parse_net(&s).map_err(|e| e.to_string())?;
    Ok(s)
}

/// The queue pairs a NIC asks for: `num_queues` counts queues, two a
/// pair, as Cloud Hypervisor's does.
fn queue_pairs(n: &NetConfig) -> Result<Option<u16>, String> {
    match n.num_queues {
        None => Ok(None),
        Some(q) if q >= 2 && q % 2 == 0 => Ok(Some(q / 2)),
        Some(q) => Err(format!("num_queues {q}: two a queue pair, at least 2")),
    }
}

/// Cloud Hypervisor's vhost-user net (`vhost_user`, `vhost_socket`,
/// `vhost_mode` client or server: who connects, as there; `num_queues`
/// counts queues, two a pair) as nfvisor's `vhost-user=` spec.
fn vhost_user_spec(n: &NetConfig) -> Result<String, String> {
    let socket = n
        .vhost_socket
        .as_deref()
        .filter(|p| !p.is_empty())
        .ok_or("vhost_user: vhost_socket (the backend's socket) is needed")?;
    if socket.contains(',') {
        return Err(format!("vhost_socket {socket:?}: a path with a comma"));
    }
    let mode = match n
        .vhost_mode
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("client") => "client",
        Some("server") => "server",
        Some(m) => return Err(format!("vhost_mode {m:?}: Client or Server")),
    };
    let mut s = format!("vhost-user={socket},mode={mode}");
    if let Some(p) = queue_pairs(n)? {
        s.push_str(&format!(",queues={p}"));
    }
    if n.tap.is_some() {
        return Err("tap and vhost_user: one or the other".into());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kata's create body (its defaults, static resource management,
    /// shared_fs "none").
    pub const KATA_BODY: &str = r#"{
      "rng": {"iommu": false, "src": "/dev/urandom"},
      "vsock": {"cid": 3, "iommu": false, "socket": "/run/vc/vm/x/clh.sock"},
      "console": {"iommu": false, "mode": "Off"},
      "cpus": {"boot_vcpus": 1, "kvm_hyperv": false, "max_vcpus": 8, "nested": true,
               "topology": {"cores_per_die": 8, "dies_per_package": 1, "packages": 1, "threads_per_core": 1}},
      "disks": [{"backing_files": false, "direct": false, "image_type": "Raw", "iommu": false,
                 "num_queues": 1, "path": "/opt/kata/share/kata-containers/kata-containers.img",
                 "queue_size": 128, "readonly": true, "sparse": true, "vhost_user": false}],
      "iommu": false,
      "landlock_enable": false,
      "memory": {"hotplug_method": "Acpi", "hotplug_size": 68719476736, "hugepages": false,
                 "mergeable": false, "prefault": false, "shared": false, "size": 2147483648, "thp": true},
      "payload": {"cmdline": "root=/dev/vda1 ro panic=1 quiet", "kernel": "/opt/kata/vmlinux.container"},
      "platform": {"num_pci_segments": 2, "sev_snp": false, "tdx": false, "iommu_address_width": 0},
      "pvpanic": false,
      "serial": {"iommu": false, "mode": "Off"},
      "watchdog": false
    }"#;

    #[test]
    fn kata_s_body_maps_to_the_same_settings_the_flags_give() {
        let ch: ChVmConfig = serde_json::from_str(KATA_BODY).unwrap();
        let (c, console) = ch.to_vm_config(&[]).unwrap();
        assert_eq!(console, Console::Off);
        assert_eq!(c.vcpus, Some(1));
        assert_eq!(c.memory.unwrap().bytes().unwrap(), 2 << 30);
        assert_eq!(
            c.kernel.unwrap().to_str(),
            Some("/opt/kata/vmlinux.container")
        );
        assert_eq!(
            c.disk.unwrap(),
            vec!["path=/opt/kata/share/kata-containers/kata-containers.img,readonly,queues=1"]
        );
        assert_eq!(c.rng.as_deref(), Some(""));
        assert_eq!(
            c.vsock.as_deref(),
            Some("cid=3,socket=/run/vc/vm/x/clh.sock")
        );
    }

    #[test]
    fn what_nfvisor_cannot_honour_is_refused_by_name() {
        let base: Value = serde_json::from_str(KATA_BODY).unwrap();
        for (patch, field) in [
            (r#"{"vsock": {"cid": 2, "socket": "/tmp/v"}}"#, "vsock"),
            (
                r#"{"rng": {"src": "/dev/urandom", "iommu": true}}"#,
                "rng.iommu",
            ),
            (r#"{"fs": [{"tag": "x", "socket": "/s"}]}"#, "fs"),
            (r#"{"watchdog": true}"#, "watchdog"),
            (
                r#"{"memory": {"size": 1048576, "zones": [{"id": "z", "size": 1}]}}"#,
                "memory.zones",
            ),
            (r#"{"memory": {"size": 1000}}"#, "memory.size"),
            (r#"{"serial": {"mode": "Pty"}}"#, "serial.mode"),
            (r#"{"console": {"mode": "Tty"}}"#, "console.mode"),
            (
                r#"{"platform": {"num_pci_segments": 3}}"#,
                "platform.num_pci_segments",
            ),
            (r#"{"payload": {"firmware": "/fw"}}"#, "payload"),
            (r#"{"cpus": {"boot_vcpus": 2, "max_vcpus": 1}}"#, "cpus"),
            (
                r#"{"disks": [{"path": "/x", "image_type": "Qcow2"}]}"#,
                "disks[0].image_type",
            ),
            (
                r#"{"disks": [{"path": "/x", "vhost_user": true}]}"#,
                "disks[0].vhost_user",
            ),
            (
                r#"{"cpus": {"boot_vcpus": 2, "max_vcpus": 2, "affinity": [{"vcpu": 0, "host_cpus": [1, 2]}]}}"#,
                "cpus.affinity",
            ),
        ] {
            let mut body = base.clone();
            for (k, v) in serde_json::from_str::<serde_json::Map<String, Value>>(patch).unwrap() {
                body[k] = v;
            }
            let ch: ChVmConfig = serde_json::from_value(body).unwrap();
            let e = ch.to_vm_config(&[]).unwrap_err();
            assert!(e.starts_with(field), "{patch}: {e}");
        }
    }

    #[test]
    fn a_vhost_user_nic_maps_to_nfvisor_s_vhost_user_spec() {
        let spec = |body: &str| {
            let n: NetConfig = serde_json::from_str(body).unwrap();
            net_spec(&n, &TapFrom::Name(String::new()))
        };
        assert_eq!(
            spec(
                r#"{"vhost_user": true, "vhost_socket": "/run/sw/a.sock", "vhost_mode": "Server",
                     "num_queues": 4, "mac": "52:54:00:00:00:02"}"#
            )
            .unwrap(),
            "vhost-user=/run/sw/a.sock,mode=server,queues=2,mac=52:54:00:00:00:02"
        );
        assert_eq!(
            spec(r#"{"vhost_user": true, "vhost_socket": "/s"}"#).unwrap(),
            "vhost-user=/s,mode=client"
        );
        for (body, why) in [
            (r#"{"vhost_user": true}"#, "vhost_socket"),
            (
                r#"{"vhost_user": true, "vhost_socket": "/s", "vhost_mode": "both"}"#,
                "vhost_mode",
            ),
            (
                r#"{"vhost_user": true, "vhost_socket": "/s", "num_queues": 3}"#,
                "num_queues 3",
            ),
            (
                r#"{"vhost_user": true, "vhost_socket": "/s", "tap": "t0"}"#,
                "tap and vhost_user",
            ),
            (
                r#"{"vhost_user": true, "vhost_socket": "/s",
                    "rate_limiter_config": {"ops": {"size": 100, "refill_time": 100}}}"#,
                "rate limits",
            ),
        ] {
            let e = spec(body).unwrap_err();
            assert!(e.contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn kata_s_queues_descriptors_and_offloads_become_the_nic_s() {
        let n: NetConfig = serde_json::from_str(
            r#"{"num_queues": 4, "offload_csum": true, "offload_tso": true, "offload_ufo": true}"#,
        )
        .unwrap();
        assert_eq!(
            net_spec(&n, &TapFrom::Fds(vec![7, 8])).unwrap(),
            "fd=7:8,queues=2,offload=csum+tso4+tso6"
        );
        let n: NetConfig = serde_json::from_str(r#"{"offload_tso": true}"#).unwrap();
        let e = net_spec(&n, &TapFrom::Name("t0".into())).unwrap_err();
        assert!(e.contains("offload_tso needs offload_csum"), "{e}");
        // two descriptors for three pairs: the one parser refuses it
        let n: NetConfig = serde_json::from_str(r#"{"num_queues": 6}"#).unwrap();
        let e = net_spec(&n, &TapFrom::Fds(vec![7, 8])).unwrap_err();
        assert!(e.contains("one descriptor per queue pair"), "{e}");
    }

    #[test]
    fn a_nic_s_rate_limiter_is_each_direction_s_bucket() {
        let n: NetConfig = serde_json::from_str(
            r#"{"mac": "52:54:00:00:00:01", "rate_limiter_config":
                {"bandwidth": {"size": 1048576, "refill_time": 1000, "one_time_burst": 0},
                 "ops": {"size": 100, "refill_time": 100}}}"#,
        )
        .unwrap();
        assert_eq!(
            net_spec(&n, &TapFrom::Name("tap0".into())).unwrap(),
            "tap=tap0,mac=52:54:00:00:00:01,rx-pps=1000,tx-pps=1000,rx-bw=1024K,tx-bw=1024K"
        );
    }

    #[test]
    fn affinity_rate_limits_and_hugepages_map_to_nfvisor_settings() {
        let ch: ChVmConfig = serde_json::from_str(
            r#"{"payload": {"kernel": "/k"},
                "cpus": {"boot_vcpus": 2, "max_vcpus": 2,
                         "affinity": [{"vcpu": 1, "host_cpus": [5]}, {"vcpu": 0, "host_cpus": [4]}]},
                "memory": {"size": 67108864, "hugepages": true, "prefault": true},
                "disks": [{"path": "/d.img", "serial": "s1",
                           "rate_limiter_config": {"ops": {"size": 100, "refill_time": 100},
                                                   "bandwidth": {"size": 1048576, "refill_time": 1000}}}],
                "nfvisor_rt": {"rt_priority": 80, "mlock": true}}"#,
        )
        .unwrap();
        let (c, _) = ch.to_vm_config(&[]).unwrap();
        assert_eq!(c.rt.cpus.as_deref(), Some("4,5"));
        assert_eq!(c.rt.hugepages.as_deref(), Some("2M"));
        assert_eq!(c.rt.prefault, Some(true));
        assert_eq!(c.rt.rt_priority, Some(80));
        assert_eq!(
            c.disk.unwrap(),
            vec!["path=/d.img,serial=s1,iops=1000,bw=1024K"]
        );
    }
}
