//! One VM's configuration: the one serde type behind the command-line
//! flags, the TOML file (the same keys) and the configuration a snapshot
//! or a migration stream carries. Flags lie over the file, a restore's
//! local settings over the stream's (only `VmConfig::guest_part` of a
//! stream is taken); `VmSpec::from_config` turns the result into the spec
//! a VM is created from, checking every value and naming the one at fault.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::memory::{HugePageSize, MemoryOptions};
use crate::shared_region::IvshmemSpec;
use crate::{Error, Result};

/// A memory size as a user gives it: "64M", "1G", "512K", or a number of
/// MiB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size {
    MiB(u64),
    Text(String),
}

impl Size {
    pub fn bytes(&self) -> Result<u64> {
        match self {
            Size::MiB(n) if *n > 0 => n
                .checked_mul(1 << 20)
                .ok_or_else(|| Error::Config(format!("memory {n} MiB is too large"))),
            Size::MiB(n) => Err(Error::Config(format!(
                "memory = {n} is not a size (use \"64M\" or a number of MiB)"
            ))),
            Size::Text(s) => parse_size(s).map_err(|e| Error::Config(format!("memory {e}"))),
        }
    }

    /// Exactly `bytes` (a whole number of KiB), as a stream carries it.
    pub fn of_bytes(bytes: u64) -> Size {
        Size::Text(format!("{}K", bytes >> 10))
    }
}

/// Parses "64M", "1G", "512K" or a plain number of MiB into bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => {
                    return Err(Error::Config(format!(
                        "size {s:?}: unknown unit {c:?} (use K, M or G)"
                    )))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1 << 20),
    };
    let n: u64 = num.trim().parse().map_err(|_| {
        Error::Config(format!(
            "size {s:?} is not a number with an optional K/M/G unit"
        ))
    })?;
    n.checked_mul(mult)
        .ok_or_else(|| Error::Config(format!("size {s:?} is too large")))
}

/// The real-time settings (the TOML file's `[rt]` table).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RtConfig {
    /// vCPU i runs on the i-th CPU listed ("2,3" or "2-5").
    pub cpus: Option<String>,
    /// Where the VMM's own threads run.
    pub housekeeping_cpus: Option<String>,
    /// SCHED_FIFO priority of the vCPU threads (1-99).
    pub rt_priority: Option<i32>,
    /// Which vCPUs get that priority ("0-3", "1,3"); every vCPU when absent.
    pub realtime_vcpus: Option<String>,
    pub mlock: Option<bool>,
    /// "2M" or "1G".
    pub hugepages: Option<String>,
    pub prefault: Option<bool>,
    pub numa_node: Option<u32>,
    /// hlt, pause, cstate, mwait (each entry may hold a comma list).
    pub disable_exits: Option<Vec<String>>,
    pub halt_poll_ns: Option<u64>,
    /// A setting that cannot be applied is reported, not fatal.
    pub best_effort: Option<bool>,
}

/// Everything that says what a VM is (see the module's text).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// A bundled guest by name.
    pub guest: Option<String>,
    /// A kernel: PVH ELF (vmlinux) or Linux bzImage.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The kernel command line, or a bundled guest's parameters.
    pub cmdline: Option<String>,
    pub memory: Option<Size>,
    pub vcpus: Option<u32>,
    /// The guest console goes to this file.
    pub serial: Option<PathBuf>,
    /// The control socket (status, pause, snapshot, migrate, ...).
    pub control_socket: Option<PathBuf>,
    /// `path=P,size=S[,readonly]` or `server=SOCKET[,vectors=N]`.
    pub ivshmem: Option<String>,
    /// Bytes of KVM dirty ring per vCPU (migration's dirty tracking).
    pub dirty_ring: Option<u32>,
    /// Track dirty pages with KVM's bitmap instead of the ring.
    pub dirty_bitmap: Option<bool>,
    /// The DMA probe debug device (devices::dma_probe): the VMM writes
    /// guest memory where the guest asks.
    pub dma_probe: Option<bool>,
    /// NICs: `tap=NAME[,mac=..][,mtu=N]` or `fd=N[,...]`, one each.
    pub net: Option<Vec<String>>,
    /// Disks: `path=FILE[,readonly][,direct][,serial=ID][,queues=N]
    /// [,iops=N][,bw=SIZE][,aio=io_uring|threads]`, one each.
    pub disk: Option<Vec<String>>,
    /// The vsock device: `cid=N,socket=PATH` (hybrid: the host side on a
    /// UNIX socket).
    pub vsock: Option<String>,
    /// An entropy device: `[src=PATH][,rate=BYTES]` ("" for getrandom).
    pub rng: Option<String>,
    /// Serve Prometheus metrics over HTTP here (HOST:PORT).
    pub metrics_listen: Option<String>,
    pub rt: RtConfig,
}

/// Bytes of dirty ring per vCPU unless told otherwise (4096 entries).
pub const DEFAULT_DIRTY_RING: u32 = 64 << 10;

macro_rules! over {
    ($top:expr, $base:expr, $($f:ident),*) => {
        $( if $top.$f.is_none() { $top.$f = $base.$f; } )*
    };
}

impl VmConfig {
    /// This configuration over `base`: every setting given here wins.
    pub fn over(mut self, base: VmConfig) -> VmConfig {
        // a kernel here replaces the base's bundled guest, and the reverse
        if self.guest.is_some() || self.kernel.is_some() {
            // (the base's kernel choice does not apply)
        } else {
            self.guest = base.guest;
            self.kernel = base.kernel;
        }
        over!(
            self,
            base,
            initrd,
            cmdline,
            memory,
            vcpus,
            serial,
            control_socket,
            ivshmem,
            dirty_ring,
            dirty_bitmap,
            dma_probe,
            net,
            disk,
            vsock,
            rng,
            metrics_listen
        );
        over!(
            self.rt,
            base.rt,
            cpus,
            housekeeping_cpus,
            rt_priority,
            realtime_vcpus,
            mlock,
            hugepages,
            prefault,
            numa_node,
            disable_exits,
            halt_poll_ns,
            best_effort
        );
        self
    }

    /// Only what says what the guest is (its kernel, command line, memory,
    /// vCPUs, guest-visible debug devices, disks): what a destination takes from
    /// a stream. The rest (console file, control socket, placement, shared
    /// regions, tracking) is the destination's own, and a stream that sets
    /// it does not get to (it could name any file or socket path there).
    pub fn guest_part(&self) -> VmConfig {
        VmConfig {
            guest: self.guest.clone(),
            kernel: self.kernel.clone(),
            cmdline: self.cmdline.clone(),
            memory: self.memory.clone(),
            vcpus: self.vcpus,
            dma_probe: self.dma_probe,
            // the guest's disks: a destination on this host opens the same
            // images unless told others (`receive --disk`)
            disk: self.disk.clone(),
            // the guest's vsock and entropy devices (a destination on this
            // host gives its own vsock socket: `receive --vsock`)
            vsock: self.vsock.clone(),
            rng: self.rng.clone(),
            ..Default::default()
        }
    }

    /// The ring size per vCPU, or None for the bitmap.
    pub fn dirty_ring_bytes(&self) -> Option<u32> {
        (!self.dirty_bitmap.unwrap_or(false)).then(|| self.dirty_ring.unwrap_or(DEFAULT_DIRTY_RING))
    }
}

/// Exits that can be disabled on dedicated cores (KVM_CAP_X86_DISABLE_EXITS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DisableExits {
    pub hlt: bool,
    pub pause: bool,
    pub cstate: bool,
    pub mwait: bool,
}

impl DisableExits {
    pub fn flags(&self) -> u32 {
        use kvm_bindings::*;
        let mut f = 0;
        if self.mwait {
            f |= KVM_X86_DISABLE_EXITS_MWAIT;
        }
        if self.hlt {
            f |= KVM_X86_DISABLE_EXITS_HLT;
        }
        if self.pause {
            f |= KVM_X86_DISABLE_EXITS_PAUSE;
        }
        if self.cstate {
            f |= KVM_X86_DISABLE_EXITS_CSTATE;
        }
        f
    }
}

/// Real-time placement of the VM's threads.
#[derive(Debug, Clone, Default)]
pub struct RtSpec {
    /// vCPU i runs on host CPU cpus[i].
    pub cpus: Option<Vec<usize>>,
    /// Where the VMM's own threads (main, console) run.
    pub housekeeping_cpus: Option<Vec<usize>>,
    /// SCHED_FIFO priority of the vCPU threads,
    pub priority: Option<i32>,
    /// of these vCPUs only (None: of every vCPU). Nova's
    /// hw:cpu_realtime_mask: some vCPUs real-time, the others ordinary.
    pub realtime_vcpus: Option<Vec<usize>>,
    pub disable_exits: DisableExits,
    pub halt_poll_ns: Option<u64>,
    /// Report a setting that cannot be applied instead of failing.
    pub best_effort: bool,
}

/// The guest `nfvisor run` boots when given no kernel.
pub const DEFAULT_GUEST: &str = "latency-probe";

fn cpu_list(flag: &str, list: &str) -> Result<Vec<usize>> {
    rt::parse_cpu_list(list).map_err(|e| Error::Config(format!("--{flag}: {e}")))
}

/// Parses exit names (each entry may be a comma list).
pub fn parse_exits(items: &[String]) -> Result<DisableExits> {
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
                return Err(Error::Config(format!(
                    "--disable-exits: unknown exit {other:?} (use hlt, pause, cstate, mwait)"
                )))
            }
        }
    }
    Ok(d)
}

impl RtConfig {
    /// The real-time settings, checked; the memory part comes back as
    /// `MemoryOptions` without a size.
    pub fn resolve(&self) -> Result<(RtSpec, MemoryOptions)> {
        let cpus = self
            .cpus
            .as_deref()
            .map(|l| cpu_list("cpus", l))
            .transpose()?;
        let housekeeping_cpus = self
            .housekeeping_cpus
            .as_deref()
            .map(|l| cpu_list("housekeeping-cpus", l))
            .transpose()?;
        let hugepages = match &self.hugepages {
            Some(s) => Some(
                s.parse::<HugePageSize>()
                    .map_err(|e| Error::Config(format!("--hugepages: {e}")))?,
            ),
            None => None,
        };
        let disable_exits = match &self.disable_exits {
            Some(v) => parse_exits(v)?,
            None => DisableExits::default(),
        };
        let realtime_vcpus = self
            .realtime_vcpus
            .as_deref()
            .map(|l| cpu_list("realtime-vcpus", l))
            .transpose()?;
        let spec = RtSpec {
            cpus,
            housekeeping_cpus,
            priority: self.rt_priority,
            realtime_vcpus,
            disable_exits,
            halt_poll_ns: self.halt_poll_ns,
            best_effort: self.best_effort.unwrap_or(false),
        };
        let memory = MemoryOptions {
            size: 0,
            hugepages,
            mlock: self.mlock.unwrap_or(false),
            prefault: self.prefault.unwrap_or(false),
            numa_node: self.numa_node,
        };
        Ok((spec, memory))
    }

    /// Whether any setting is given.
    pub fn any(&self) -> bool {
        *self != RtConfig::default()
    }
}

/// Parses `path=P,size=S[,readonly]` or `server=SOCKET[,vectors=N]`.
pub fn parse_ivshmem(spec: &str) -> Result<IvshmemSpec> {
    let bad = |why: String| Error::Config(format!("--ivshmem {spec:?}: {why}"));
    let (mut path, mut size, mut readonly, mut server, mut vectors) =
        (None, None, false, None, 1u32);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
            Some(("size", s)) => size = Some(parse_size(s).map_err(|e| bad(e.to_string()))?),
            Some(("server", p)) if !p.is_empty() => server = Some(PathBuf::from(p)),
            Some(("vectors", n)) => {
                vectors = n
                    .parse()
                    .ok()
                    .filter(|v| (1..=8).contains(v))
                    .ok_or_else(|| bad("vectors must be 1 to 8".into()))?
            }
            None if part == "readonly" => readonly = true,
            _ => return Err(bad(format!("unknown part {part:?} (use path=...,size=...[,readonly] or server=...[,vectors=N])"))),
        }
    }
    if let Some(server) = server {
        if path.is_some() || size.is_some() || readonly {
            return Err(bad(
                "with server=, the region comes from the server (no path, size or readonly)".into(),
            ));
        }
        return Ok(IvshmemSpec {
            path: server.clone(),
            size: 0,
            readonly: false,
            server: Some(server),
            vectors,
        });
    }
    Ok(IvshmemSpec {
        path: path.ok_or_else(|| bad("no path=...".into()))?,
        size: size.ok_or_else(|| bad("no size=...".into()))?,
        readonly,
        server: None,
        vectors: 0,
    })
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
        assert_eq!(Size::of_bytes(48 << 20).bytes().unwrap(), 48 << 20);
        assert!(Size::MiB(0).bytes().is_err());
    }

    #[test]
    fn settings_on_top_win_and_the_rest_comes_from_below() {
        let file = VmConfig {
            guest: Some("hello".into()),
            memory: Some(Size::Text("48M".into())),
            vcpus: Some(2),
            rt: RtConfig {
                cpus: Some("0".into()),
                mlock: Some(true),
                ..Default::default()
            },
            ..Default::default()
        };
        let flags = VmConfig {
            vcpus: Some(1),
            rt: RtConfig {
                mlock: Some(false),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = flags.over(file.clone());
        assert_eq!(c.guest.as_deref(), Some("hello"));
        assert_eq!(c.vcpus, Some(1));
        assert_eq!(c.rt.cpus.as_deref(), Some("0"));
        assert_eq!(c.rt.mlock, Some(false));
        // a kernel on top replaces the bundled guest below
        let k = VmConfig {
            kernel: Some("vmlinux".into()),
            ..Default::default()
        }
        .over(file);
        assert_eq!((k.guest, k.kernel), (None, Some("vmlinux".into())));
    }

    #[test]
    fn a_stream_gives_only_what_the_guest_is() {
        let theirs = VmConfig {
            guest: Some("dirtier".into()),
            memory: Some(Size::Text("32M".into())),
            vcpus: Some(2),
            serial: Some("/etc/passwd".into()),
            control_socket: Some("/run/other.sock".into()),
            ivshmem: Some("path=/dev/shm/x,size=4K".into()),
            rt: RtConfig {
                cpus: Some("0".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let g = theirs.guest_part();
        assert_eq!((g.serial, g.control_socket, g.ivshmem), (None, None, None));
        assert_eq!(g.rt, RtConfig::default());
        assert_eq!((g.guest.as_deref(), g.vcpus), (Some("dirtier"), Some(2)));
    }

    #[test]
    fn the_file_format_is_this_type() {
        let c: VmConfig = toml::from_str(
            "guest = \"hello\"\nmemory = \"48M\"\nvcpus = 2\n[rt]\ncpus = \"0\"\ndisable_exits = [\"hlt\"]\n",
        )
        .unwrap();
        assert_eq!(c.memory, Some(Size::Text("48M".into())));
        let (rt, _) = c.rt.resolve().unwrap();
        assert!(rt.disable_exits.hlt);
        assert_eq!(rt.cpus, Some(vec![0]));
        let n: VmConfig = toml::from_str("memory = 64").unwrap();
        assert_eq!(n.memory.unwrap().bytes().unwrap(), 64 << 20);
        let e = toml::from_str::<VmConfig>("memroy = 64")
            .unwrap_err()
            .to_string();
        assert!(e.contains("memroy"), "{e}");
        // and it round-trips (a stream carries it)
        let again: VmConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn bad_values_are_named() {
        for (c, why) in [
            (
                VmConfig {
                    rt: RtConfig {
                        disable_exits: Some(vec!["hlt,nap".into()]),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "unknown exit \"nap\"",
            ),
            (
                VmConfig {
                    rt: RtConfig {
                        hugepages: Some("3M".into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "--hugepages",
            ),
            (
                VmConfig {
                    ivshmem: Some("path=/x".into()),
                    ..Default::default()
                },
                "no size",
            ),
            (
                VmConfig {
                    kernel: Some("/nonexistent/vmlinux".into()),
                    ..Default::default()
                },
                "/nonexistent/vmlinux",
            ),
            (
                VmConfig {
                    guest: Some("nope".into()),
                    ..Default::default()
                },
                "no bundled guest \"nope\"",
            ),
        ] {
            let e = crate::vm::VmSpec::from_config(&c, &|_| None, false)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
