//! `nfvisor run` settings: command-line flags, each an entry of
//! `vmm::VmConfig` (the same type as the TOML file and a stream's
//! configuration), laid over the file's.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use vmm::config::{RtConfig, Size};
use vmm::VmConfig;

pub use vmm::config::{parse_ivshmem, parse_size};

/// Flags of `nfvisor run` (and of the benchmarks that boot a VM).
#[derive(Debug, Args, Default, Clone)]
pub struct RunArgs {
    /// Settings file (TOML); flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A bundled guest by name (see `nfvisor guests`); default latency-probe.
    #[arg(long, conflicts_with = "kernel")]
    pub guest: Option<String>,
    /// A kernel: PVH ELF (vmlinux) or Linux bzImage.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// An initial ramdisk for the kernel.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, or the bundled guest's parameters ("samples=500 period_us=100").
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory: 64M, 1G, or a number of MiB.
    #[arg(long)]
    pub memory: Option<String>,
    /// Number of vCPUs.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Send the guest console to FILE instead of the terminal.
    #[arg(long, value_name = "FILE")]
    pub serial: Option<PathBuf>,
    /// Serve the control socket here (pause, resume, snapshot, status).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    #[command(flatten)]
    pub dirty: DirtyTracking,
    /// Shared memory with other VMs: path=/dev/shm/NAME,size=2M[,readonly]
    /// (an ivshmem PCI device, plain mode).
    #[arg(long, value_name = "SPEC")]
    pub ivshmem: Option<String>,
    /// A NIC (virtio-net on PCI): tap=NAME[,mac=52:54:00:..][,mtu=N], or
    /// fd=N for a TAP a parent process opened. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<String>,
    /// A disk (virtio-blk on PCI) on a raw image:
    /// path=FILE[,readonly][,direct][,serial=ID][,queues=N][,iops=N]
    /// [,bw=SIZE][,aio=io_uring|threads]. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<String>,
    /// A vsock device (hybrid, as Firecracker and Cloud Hypervisor do it):
    /// cid=N,socket=PATH. A host process connects to PATH and writes
    /// `CONNECT <port>\n`; a guest connection to port P reaches PATH_P.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<String>,
    /// An entropy device (virtio-rng): getrandom, or src=PATH; rate=BYTES
    /// a second caps it.
    #[arg(long, value_name = "SPEC", num_args = 0..=1, default_missing_value = "")]
    pub rng: Option<String>,
    /// Serve Cloud Hypervisor's REST API (HTTP/1.1 under /api/v1) on this
    /// UNIX socket. Alone, nfvisor waits for vm.create and vm.boot; with a
    /// VM's flags it boots that VM and serves the API for it.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP at HOST:PORT (GET /metrics; port
    /// 0 picks a free one, logged).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    /// Add the DMA probe debug device (port 0x9e8: the VMM writes guest
    /// memory where the guest asks; the dirtier's dma_mb=N uses it).
    #[arg(long)]
    pub dma_probe: bool,
    #[command(flatten)]
    pub rt: RtArgs,
}

/// The real-time flags, shared by `run` and the benchmarks that boot a VM.
#[derive(Debug, Args, Default, Clone)]
pub struct RtArgs {
    /// Host CPUs for the vCPUs: vCPU i runs on the i-th CPU listed ("2,3" or "2-5").
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
    /// Host CPUs for the VMM's own threads (main loop, console).
    #[arg(long, value_name = "LIST")]
    pub housekeeping_cpus: Option<String>,
    /// SCHED_FIFO priority (1-99) for the vCPU threads only.
    #[arg(long, value_name = "N")]
    pub rt_priority: Option<i32>,
    /// Only these vCPUs get the FIFO priority ("1-3"); the others stay
    /// ordinary (Nova's hw:cpu_realtime_mask).
    #[arg(long, value_name = "LIST")]
    pub realtime_vcpus: Option<String>,
    /// Lock guest memory (mlock).
    #[arg(long)]
    pub mlock: bool,
    /// Back guest memory with hugetlb pages: 2M or 1G.
    #[arg(long, value_name = "SIZE")]
    pub hugepages: Option<String>,
    /// Touch every guest page before the guest starts.
    #[arg(long)]
    pub prefault: bool,
    /// Bind guest memory to this NUMA node (and check the vCPU CPUs are on it).
    #[arg(long, value_name = "N")]
    pub numa_node: Option<u32>,
    /// Exits to disable on dedicated cores: hlt,pause,cstate (mwait where the host allows).
    #[arg(long, value_name = "LIST")]
    pub disable_exits: Option<String>,
    /// KVM halt-polling time for this VM, in ns.
    #[arg(long, value_name = "NS")]
    pub halt_poll_ns: Option<u64>,
    /// Report a real-time setting that cannot be applied instead of failing.
    #[arg(long)]
    pub rt_best_effort: bool,
}

/// How a VM tracks the pages its guest dirties (for migrating it on): chosen
/// when the VM is created, on `run` and on `receive`/`restore` alike.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct DirtyTracking {
    /// Size of the KVM dirty ring per vCPU (dirty-page tracking for
    /// migration; the default, 64 KiB, measured better than the bitmap).
    #[arg(long, value_name = "BYTES", conflicts_with = "dirty_bitmap")]
    pub dirty_ring: Option<u32>,
    /// Track dirty pages with KVM's per-slot bitmap instead of the ring.
    #[arg(long)]
    pub dirty_bitmap: bool,
}

/// A flag that is off unless given: given, it says so; absent, it leaves
/// the setting to what lies below.
fn given(flag: bool) -> Option<bool> {
    flag.then_some(true)
}

impl RtArgs {
    /// These flags as configuration.
    pub fn to_config(&self) -> RtConfig {
        RtConfig {
            cpus: self.cpus.clone(),
            housekeeping_cpus: self.housekeeping_cpus.clone(),
            rt_priority: self.rt_priority,
            realtime_vcpus: self.realtime_vcpus.clone(),
            mlock: given(self.mlock),
            hugepages: self.hugepages.clone(),
            prefault: given(self.prefault),
            numa_node: self.numa_node,
            disable_exits: self.disable_exits.clone().map(|s| vec![s]),
            halt_poll_ns: self.halt_poll_ns,
            best_effort: given(self.rt_best_effort),
        }
    }

    /// The RT settings from flags alone (the benchmarks).
    pub fn to_spec(&self) -> Result<(vmm::vm::RtSpec, vmm::memory::MemoryOptions)> {
        Ok(self.to_config().resolve()?)
    }

    /// Whether any RT flag was given.
    pub fn any(&self) -> bool {
        self.to_config().any()
    }
}

impl DirtyTracking {
    /// These flags as configuration (over a VmConfig with nothing else).
    pub fn to_config(&self) -> VmConfig {
        VmConfig {
            dirty_ring: self.dirty_ring,
            dirty_bitmap: given(self.dirty_bitmap),
            ..Default::default()
        }
    }
}

/// The resolved run: the VM spec and how to present it.
pub struct Resolved {
    pub spec: vmm::VmSpec,
    /// The bundled guest's name, when the kernel is one.
    pub bundled: Option<&'static str>,
}

/// A bundled guest's image by name.
pub fn bundled_image(name: &str) -> Option<&'static [u8]> {
    guests::find(name).map(|g| g.image)
}

impl RunArgs {
    /// These flags as configuration.
    pub fn to_config(&self) -> VmConfig {
        VmConfig {
            guest: self.guest.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            memory: self.memory.clone().map(Size::Text),
            vcpus: self.vcpus,
            serial: self.serial.clone(),
            control_socket: self.control_socket.clone(),
            ivshmem: self.ivshmem.clone(),
            dma_probe: given(self.dma_probe),
            metrics_listen: self.metrics_listen.clone(),
            net: (!self.net.is_empty()).then(|| self.net.clone()),
            disk: (!self.disk.is_empty()).then(|| self.disk.clone()),
            vsock: self.vsock.clone(),
            rng: self.rng.clone(),
            rt: self.rt.to_config(),
            ..self.dirty.to_config()
        }
    }

    /// The flags over the TOML file (if any), resolved into a VM spec.
    /// The flags over the TOML file: the VM's one configuration.
    pub fn config_over_file(&self) -> Result<VmConfig> {
        let file: VmConfig = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("config file {}: cannot read it", path.display()))?;
                toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?
            }
            None => VmConfig::default(),
        };
        Ok(self.to_config().over(file))
    }

    pub fn resolve(&self, json: bool) -> Result<Resolved> {
        let config = self.config_over_file()?;
        let spec = vmm::VmSpec::from_config(&config, &bundled_image, json)?;
        let bundled = spec
            .kernel_name
            .strip_prefix("bundled:")
            .and_then(guests::find)
            .map(|g| g.name);
        Ok(Resolved { spec, bundled })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("nfv-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.toml");
        std::fs::write(&path, "guest = \"hello\"\nmemory = \"48M\"\nvcpus = 2\n[rt]\ncpus = \"0\"\ndisable_exits = [\"hlt\"]\n").unwrap();
        let args = RunArgs {
            config: Some(path),
            vcpus: Some(1),
            ..Default::default()
        };
        let r = args.resolve(false).unwrap();
        assert_eq!(r.bundled, Some("hello"));
        assert_eq!(r.spec.vcpus, 1);
        assert_eq!(r.spec.memory.size, 48 << 20);
        assert_eq!(r.spec.rt.cpus, Some(vec![0]));
        assert!(r.spec.rt.disable_exits.hlt);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
