//! `nfvisor run` settings: command-line flags over an optional TOML file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;
use vmm::memory::MemoryOptions;
use vmm::vm::{ConsoleSink, DisableExits, RtSpec};
use vmm::{HugePageSize, VmSpec};

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

/// The TOML file: the same settings, with the real-time ones under [rt].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    guest: Option<String>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    memory: Option<toml::Value>,
    vcpus: Option<u32>,
    serial: Option<PathBuf>,
    #[serde(default)]
    rt: FileRt,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRt {
    cpus: Option<String>,
    housekeeping_cpus: Option<String>,
    rt_priority: Option<i32>,
    mlock: Option<bool>,
    hugepages: Option<String>,
    prefault: Option<bool>,
    numa_node: Option<u32>,
    disable_exits: Option<Vec<String>>,
    halt_poll_ns: Option<u64>,
    best_effort: Option<bool>,
}

/// Parses "64M", "1G", "512K" or a plain number of MiB into bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => bail!("memory size {s:?}: unknown unit {c:?} (use K, M or G)"),
            };
            (&t[..i], m)
        }
        _ => (t, 1 << 20),
    };
    let n: u64 = num.trim().parse().with_context(|| {
        format!("memory size {s:?} is not a number with an optional K/M/G unit")
    })?;
    n.checked_mul(mult)
        .with_context(|| format!("memory size {s:?} is too large"))
}

fn parse_exits(items: &[String]) -> Result<DisableExits> {
    let mut d = DisableExits::default();
    for item in items
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match item {
            "hlt" => d.hlt = true,
            "pause" => d.pause = true,
            "cstate" => d.cstate = true,
            "mwait" => d.mwait = true,
            other => {
                bail!("--disable-exits: unknown exit {other:?} (use hlt, pause, cstate, mwait)")
            }
        }
    }
    Ok(d)
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

impl DirtyTracking {
    /// The ring size per vCPU, or None for the bitmap.
    pub fn ring_bytes(&self) -> Option<u32> {
        (!self.dirty_bitmap).then(|| self.dirty_ring.unwrap_or(DEFAULT_DIRTY_RING))
    }
}

/// Bytes of dirty ring per vCPU unless told otherwise (4096 entries).
pub const DEFAULT_DIRTY_RING: u32 = 64 << 10;

/// Parses `path=P,size=S[,readonly]` or `server=SOCKET[,vectors=N]`.
pub fn parse_ivshmem(spec: &str) -> Result<vmm::shared_region::IvshmemSpec> {
    let (mut path, mut size, mut readonly, mut server, mut vectors) =
        (None, None, false, None, 1u32);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
            Some(("size", s)) => size = Some(parse_size(s).with_context(|| format!("--ivshmem {spec:?}"))?),
            Some(("server", p)) if !p.is_empty() => server = Some(PathBuf::from(p)),
            Some(("vectors", n)) => {
                vectors = n
                    .parse()
                    .ok()
                    .filter(|v| (1..=8).contains(v))
                    .with_context(|| format!("--ivshmem {spec:?}: vectors must be 1 to 8"))?
            }
            None if part == "readonly" => readonly = true,
            _ => bail!("--ivshmem {spec:?}: unknown part {part:?} (use path=...,size=...[,readonly] or server=...[,vectors=N])"),
        }
    }
    if let Some(server) = server {
        if path.is_some() || size.is_some() || readonly {
            bail!("--ivshmem {spec:?}: with server=, the region comes from the server (no path, size or readonly)");
        }
        return Ok(vmm::shared_region::IvshmemSpec {
            path: server.clone(),
            size: 0,
            readonly: false,
            server: Some(server),
            vectors,
        });
    }
    Ok(vmm::shared_region::IvshmemSpec {
        path: path.with_context(|| format!("--ivshmem {spec:?}: no path=..."))?,
        size: size.with_context(|| format!("--ivshmem {spec:?}: no size=..."))?,
        readonly,
        server: None,
        vectors: 0,
    })
}

fn cpu_list(flag: &str, list: &str) -> Result<Vec<usize>> {
    rt::parse_cpu_list(list).with_context(|| format!("--{flag}"))
}

fn read_file(what: &str, path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{what} {}: cannot read it", path.display()))
}

impl RtArgs {
    /// The RT settings: these flags over the TOML file's [rt] table. The
    /// memory part comes back as `MemoryOptions` without a size.
    fn resolve(&self, rt: &FileRt) -> Result<(RtSpec, MemoryOptions)> {
        let cpus = match self.cpus.as_ref().or(rt.cpus.as_ref()) {
            Some(l) => Some(cpu_list("cpus", l)?),
            None => None,
        };
        let housekeeping_cpus = match self
            .housekeeping_cpus
            .as_ref()
            .or(rt.housekeeping_cpus.as_ref())
        {
            Some(l) => Some(cpu_list("housekeeping-cpus", l)?),
            None => None,
        };
        let hugepages = match self.hugepages.as_ref().or(rt.hugepages.as_ref()) {
            Some(s) => Some(
                s.parse::<HugePageSize>()
                    .map_err(|e| anyhow::anyhow!("--hugepages: {e}"))?,
            ),
            None => None,
        };
        let disable_exits = match (&self.disable_exits, &rt.disable_exits) {
            (Some(s), _) => parse_exits(std::slice::from_ref(s))?,
            (None, Some(v)) => parse_exits(v)?,
            (None, None) => DisableExits::default(),
        };
        let spec = RtSpec {
            cpus,
            housekeeping_cpus,
            priority: self.rt_priority.or(rt.rt_priority),
            disable_exits,
            halt_poll_ns: self.halt_poll_ns.or(rt.halt_poll_ns),
            best_effort: self.rt_best_effort || rt.best_effort.unwrap_or(false),
        };
        let memory = MemoryOptions {
            size: 0,
            hugepages,
            mlock: self.mlock || rt.mlock.unwrap_or(false),
            prefault: self.prefault || rt.prefault.unwrap_or(false),
            numa_node: self.numa_node.or(rt.numa_node),
        };
        Ok((spec, memory))
    }

    /// The RT settings from flags alone (the benchmarks, restore).
    pub fn to_spec(&self) -> Result<(RtSpec, MemoryOptions)> {
        self.resolve(&FileRt::default())
    }

    /// Whether any RT flag was given.
    pub fn any(&self) -> bool {
        self.cpus.is_some()
            || self.housekeeping_cpus.is_some()
            || self.rt_priority.is_some()
            || self.mlock
            || self.hugepages.is_some()
            || self.prefault
            || self.numa_node.is_some()
            || self.disable_exits.is_some()
            || self.halt_poll_ns.is_some()
    }
}

/// The resolved run: the VM spec and how to present it.
pub struct Resolved {
    pub spec: VmSpec,
    /// The bundled guest's name, when the kernel is one.
    pub bundled: Option<&'static str>,
}

impl RunArgs {
    /// Merges the TOML file (if any) under the flags and builds the VM spec.
    pub fn resolve(&self, json: bool) -> Result<Resolved> {
        let file: FileConfig = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("config file {}: cannot read it", path.display()))?;
                toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let kernel_path = self.kernel.clone().or(if self.guest.is_some() {
            None
        } else {
            file.kernel.clone()
        });
        let guest_name = self.guest.clone().or(if self.kernel.is_some() {
            None
        } else {
            file.guest.clone()
        });
        let (kernel_name, kernel, bundled) = match (&kernel_path, &guest_name) {
            (Some(_), Some(_)) => {
                bail!("config: give either a kernel or a bundled guest, not both")
            }
            (Some(path), None) => (path.display().to_string(), read_file("kernel", path)?, None),
            (None, name) => {
                let name = name.as_deref().unwrap_or(guests::DEFAULT);
                let g = guests::find(name).with_context(|| {
                    format!(
                        "no bundled guest {name:?}; there are: {}",
                        guests::names().join(", ")
                    )
                })?;
                (
                    format!("bundled:{}", g.name),
                    g.image.to_vec(),
                    Some(g.name),
                )
            }
        };
        let initrd = match self.initrd.as_ref().or(file.initrd.as_ref()) {
            Some(p) => Some((p.display().to_string(), read_file("initrd", p)?)),
            None => None,
        };
        let memory = match (&self.memory, &file.memory) {
            (Some(s), _) => parse_size(s)?,
            (None, Some(toml::Value::String(s))) => parse_size(s).context("config: memory")?,
            (None, Some(toml::Value::Integer(n))) if *n > 0 => (*n as u64) << 20,
            (None, Some(v)) => {
                bail!("config: memory = {v} is not a size (use \"64M\" or a number of MiB)")
            }
            (None, None) => {
                if bundled.is_some() {
                    32 << 20
                } else {
                    256 << 20
                }
            }
        };
        let (rt_spec, mem_rt) = self.rt.resolve(&file.rt)?;
        let console = match self.serial.as_ref().or(file.serial.as_ref()) {
            Some(p) => ConsoleSink::File(p.clone()),
            None if json => ConsoleSink::Stderr,
            None => ConsoleSink::Stdout,
        };
        let spec = VmSpec {
            kernel_name,
            kernel,
            initrd,
            cmdline: self
                .cmdline
                .clone()
                .or(file.cmdline.clone())
                .unwrap_or_default(),
            append_tsc_khz: bundled.is_some(),
            memory: MemoryOptions {
                size: memory,
                ..mem_rt
            },
            vcpus: self.vcpus.or(file.vcpus).unwrap_or(1),
            rt: rt_spec,
            console,
            transcript_limit: 8 << 20,
            process_start: None,
            latency_port: None,
            irq_bench: None,
            control_socket: self.control_socket.clone(),
            ivshmem: self.ivshmem.as_deref().map(parse_ivshmem).transpose()?,
            dirty_ring: self.dirty.ring_bytes(),
            restore_from: None,
            on_start: None,
            on_prepared: None,
        };
        Ok(Resolved { spec, bundled })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("128").unwrap(), 128 << 20);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("lots").is_err());
    }

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
