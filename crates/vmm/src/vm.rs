//! A VM from spec to report: create it, apply the real-time settings, boot,
//! run the vCPU threads, and collect what happened.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::memory::GuestRam;
use devices::{ConsoleBuffer, DebugExit, GuestExit, SerialConsole, Sink};
use kvm_bindings::{kvm_enable_cap, kvm_pit_config, kvm_regs, kvm_sregs, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::boot::{self, BootEntry, BootProtocol, KernelImage};
use crate::config::VmConfig;
pub use crate::config::{DisableExits, RtSpec};
use crate::cpuid::{self, CpuidOptions};
use crate::device_manager::{DeviceManager, Devices};
use crate::exits::{ExitReport, ExitStats};
use crate::kvm_stats::KvmStats;
use crate::layout::*;
use crate::memory::{self, MemoryOptions};
use crate::snapshot::SnapshotConfig;
use crate::vcpu::{self, Flow, IoContext, UnknownAccesses, VcpuEnd};
use crate::vm_handle::{RunState, VcpuCmd, VmHandle};
use crate::{acpi, Error, Result, Setting};

/// Where the guest console goes.
#[derive(Debug, Clone)]
pub enum ConsoleSink {
    Stdout,
    Stderr,
    File(PathBuf),
    /// Only kept in the report's transcript.
    None,
}

/// Told when the vCPUs were released (CLOCK_REALTIME ns of the BSP's run
/// loop) and given the running VM's handle.
pub type OnStart = Box<dyn FnOnce(u128, &VmHandle) + Send>;

/// Everything needed to run a VM.
pub struct VmSpec {
    pub kernel_name: String,
    pub kernel: Vec<u8>,
    pub initrd: Option<(String, Vec<u8>)>,
    pub cmdline: String,
    /// Append `tsc_khz=` (KVM_GET_TSC_KHZ) to the command line (bundled guests).
    pub append_tsc_khz: bool,
    pub memory: MemoryOptions,
    pub vcpus: u32,
    pub rt: RtSpec,
    pub console: ConsoleSink,
    /// Keep at most this many console bytes in the report's transcript.
    pub transcript_limit: usize,
    /// When the process started (main), for the start-up figure.
    pub process_start: Option<Instant>,
    /// latency-probe's block port; a plain one (progress only) when None.
    pub latency_port: Option<Arc<devices::LatencyPort>>,
    /// Interrupt latency: run the injector thread beside the guest.
    pub irq_bench: Option<crate::irq_bench::IrqBenchSpec>,
    /// Track dirty pages with the KVM dirty ring (this many bytes per vCPU)
    /// instead of the per-slot bitmap.
    pub dirty_ring: Option<u32>,
    /// An ivshmem device (plain mode) over this shared region.
    pub ivshmem: Option<crate::shared_region::IvshmemSpec>,
    /// The DMA probe debug device.
    pub dma_probe: bool,
    /// virtio-net NICs.
    pub net: Vec<crate::virtio_net::NetSpec>,
    /// virtio-blk disks.
    pub disks: Vec<crate::virtio_blk::DiskSpec>,
    /// The virtio-vsock device.
    pub vsock: Option<crate::virtio_vsock::VsockSpec>,
    /// The virtio-rng device.
    pub rng: Option<crate::virtio_rng::RngSpec>,
    /// Serve Prometheus metrics here (HOST:PORT).
    pub metrics_listen: Option<String>,
    /// Serve the control socket (pause, resume, snapshot, status) here.
    pub control_socket: Option<PathBuf>,
    /// Restore this stream (snapshot or migration) instead of booting.
    pub restore_from: Option<crate::snapshot::RestoreSource>,
    /// Called once the vCPUs have been released, with when the BSP entered
    /// its run loop (CLOCK_REALTIME ns): a migration's destination confirms
    /// it runs, and that is where its downtime ends.
    pub on_start: Option<OnStart>,
    /// Called when the VM exists and is about to read `restore_from` (a
    /// migration's destination tells the source to start sending, so
    /// creating the VM stays out of the downtime).
    /// It is told what reading and writing back every vCPU's and device's
    /// state took here (ns), measured on the fresh VM: the part of a
    /// migration's downtime the source cannot see.
    pub on_prepared: Option<Box<dyn FnOnce(u64) + Send>>,
    /// Given the running VM's handle as soon as it exists (the REST API
    /// drives a VM it booted through it).
    pub on_handle: Option<Box<dyn FnOnce(Arc<VmHandle>) + Send>>,
}

impl VmSpec {
    /// A VM of `memory` running `kernel` (named `kernel_name` in reports),
    /// one vCPU, no placement, the console on stdout, no devices beyond
    /// the platform's; the rest is set field by field.
    pub fn new(kernel_name: impl Into<String>, kernel: Vec<u8>, memory: MemoryOptions) -> VmSpec {
        VmSpec {
            kernel_name: kernel_name.into(),
            kernel,
            initrd: None,
            cmdline: String::new(),
            append_tsc_khz: false,
            memory,
            vcpus: 1,
            rt: RtSpec::default(),
            console: ConsoleSink::Stdout,
            transcript_limit: 8 << 20,
            process_start: None,
            latency_port: None,
            irq_bench: None,
            dirty_ring: None,
            ivshmem: None,
            dma_probe: false,
            net: Vec::new(),
            disks: Vec::new(),
            vsock: None,
            rng: None,
            metrics_listen: None,
            control_socket: None,
            restore_from: None,
            on_start: None,
            on_prepared: None,
            on_handle: None,
        }
    }

    /// What a snapshot or a migration stream carries of this VM: what the
    /// guest is (kernel, command line as it was booted, memory, vCPUs). The
    /// destination's own settings (console, placement, control socket)
    /// stay its own.
    pub fn stream_config(&self, cmdline: &str) -> VmConfig {
        let (guest, kernel) = match self.kernel_name.strip_prefix("bundled:") {
            Some(g) => (Some(g.to_string()), None),
            None => (None, Some(PathBuf::from(&self.kernel_name))),
        };
        VmConfig {
            guest,
            kernel,
            dma_probe: self.dma_probe.then_some(true),
            cmdline: Some(cmdline.to_string()),
            memory: Some(crate::config::Size::of_bytes(self.memory.size)),
            vcpus: Some(self.vcpus),
            disk: (!self.disks.is_empty())
                .then(|| self.disks.iter().map(|d| d.to_string()).collect()),
            vsock: self.vsock.as_ref().map(|v| v.to_string()),
            rng: self.rng.as_ref().map(|r| r.to_string()),
            ..Default::default()
        }
    }

    /// The VM spec for a boot: the kernel read (a bundled guest's image
    /// from `bundled`), every value checked. `json`: the console goes to
    /// stderr unless a serial file is given (stdout carries the report).
    pub fn from_config(
        config: &VmConfig,
        bundled: &dyn Fn(&str) -> Option<&'static [u8]>,
        json: bool,
    ) -> Result<VmSpec> {
        if config.kernel.is_some() && config.guest.is_some() {
            return Err(Error::Config(
                "config: give either a kernel or a bundled guest, not both".into(),
            ));
        }
        // a bundled guest unless a kernel is given; every setting checked
        // before a (large) kernel is read
        let guest = config
            .guest
            .as_deref()
            .unwrap_or(crate::config::DEFAULT_GUEST);
        let mut spec = match &config.kernel {
            Some(path) => {
                let name = path.display().to_string();
                let mut spec = VmSpec::from_config_common(config, name, 256 << 20, json)?;
                spec.kernel = read_file("kernel", path)?;
                spec
            }
            None => {
                let mut spec =
                    VmSpec::from_config_common(config, format!("bundled:{guest}"), 32 << 20, json)?;
                spec.kernel = bundled(guest)
                    .ok_or_else(|| {
                        Error::Config(format!("no bundled guest {guest:?} (see `nfvisor guests`)"))
                    })?
                    .to_vec();
                spec.append_tsc_khz = true;
                spec
            }
        };
        spec.initrd = match &config.initrd {
            Some(p) => Some((p.display().to_string(), read_file("initrd", p)?)),
            None => None,
        };
        Ok(spec)
    }

    /// The VM spec for a restore: the guest comes from the stream, so no
    /// kernel is read; the rest as for a boot.
    pub fn from_stream_config(config: &VmConfig, json: bool) -> Result<VmSpec> {
        let name = match (&config.guest, &config.kernel) {
            (Some(g), _) => format!("bundled:{g}"),
            (None, Some(k)) => k.display().to_string(),
            (None, None) => "restored".into(),
        };
        let memory = config
            .memory
            .as_ref()
            .ok_or_else(|| {
                Error::Config("the stream does not say how much memory the guest has".into())
            })?
            .bytes()?;
        VmSpec::from_config_common(config, name, memory, json)
    }

    /// Everything but the kernel's bytes (read by the caller).
    fn from_config_common(
        config: &VmConfig,
        kernel_name: String,
        default_memory: u64,
        json: bool,
    ) -> Result<VmSpec> {
        let size = match &config.memory {
            Some(m) => m.bytes()?,
            None => default_memory,
        };
        let (rt, memory) = config.rt.resolve()?;
        let mut spec = VmSpec::new(kernel_name, Vec::new(), MemoryOptions { size, ..memory });
        spec.cmdline = config.cmdline.clone().unwrap_or_default();
        spec.vcpus = config.vcpus.unwrap_or(1);
        spec.rt = rt;
        spec.console = match &config.serial {
            Some(p) => ConsoleSink::File(p.clone()),
            None if json => ConsoleSink::Stderr,
            None => ConsoleSink::Stdout,
        };
        spec.control_socket = config.control_socket.clone();
        spec.ivshmem = config
            .ivshmem
            .as_deref()
            .map(crate::config::parse_ivshmem)
            .transpose()?;
        spec.dirty_ring = config.dirty_ring_bytes();
        spec.dma_probe = config.dma_probe.unwrap_or(false);
        spec.metrics_listen = config.metrics_listen.clone();
        spec.net = config
            .net
            .iter()
            .flatten()
            .map(|n| crate::virtio_net::parse_net(n))
            .collect::<Result<_>>()?;
        spec.disks = config
            .disk
            .iter()
            .flatten()
            .map(|d| crate::virtio_blk::parse_disk(d))
            .collect::<Result<_>>()?;
        spec.vsock = config
            .vsock
            .as_deref()
            .map(crate::virtio_vsock::parse_vsock)
            .transpose()?;
        spec.rng = config
            .rng
            .as_deref()
            .map(crate::virtio_rng::parse_rng)
            .transpose()?;
        Ok(spec)
    }
}

fn read_file(what: &str, path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Kernel {
        path: path.display().to_string(),
        why: format!("cannot read this {what}: {e}"),
    })
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StopReason {
    /// The guest wrote its status to the debug-exit port.
    GuestExit {
        status: u32,
    },
    /// Triple fault or shutdown request, with the vCPU's state.
    Shutdown {
        vcpu: u32,
        state: String,
    },
    FailEntry {
        vcpu: u32,
        hardware_reason: u64,
    },
    InternalError {
        vcpu: u32,
        state: String,
    },
    SystemEvent {
        vcpu: u32,
        event: u32,
    },
    /// The guest moved to another host and runs there.
    Migrated {
        to: String,
    },
    Error {
        vcpu: u32,
        message: String,
    },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VcpuReport {
    pub id: u32,
    /// Host thread id of the vCPU thread.
    pub tid: i32,
    pub host_cpu: Option<usize>,
    pub sched: Option<rt::ThreadSched>,
    pub exits: ExitReport,
    /// KVM's own per-vCPU counters (exits handled in the kernel).
    pub kvm_stats: BTreeMap<String, u64>,
    /// From /proc: time the thread ran, and the part of it in the guest.
    pub user_ms: u64,
    pub system_ms: u64,
    pub guest_ms: u64,
    pub wall_ms: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Timings {
    /// From `VmSpec` received to the BSP's first KVM_RUN.
    pub setup_us: u64,
    /// From the start of main() to the BSP's first KVM_RUN.
    pub process_to_first_run_us: Option<u64>,
    /// From the first KVM_RUN to the end.
    pub run_us: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub stop: StopReason,
    pub kernel: String,
    pub boot: BootEntry,
    pub cmdline: String,
    pub memory_mib: u64,
    pub tsc_khz: u32,
    pub kvm_kind: rt::KvmKind,
    pub cx16_hidden: bool,
    pub settings: Vec<Setting>,
    pub vcpus: Vec<VcpuReport>,
    pub unknown_accesses: u64,
    pub irq_bench: Option<crate::irq_bench::IrqBenchResult>,
    /// Each device's counters, by device id.
    pub devices: BTreeMap<String, BTreeMap<String, u64>>,
    /// The devices' own threads (queue workers) and where they ran, by
    /// device id.
    pub device_threads: BTreeMap<String, Vec<devices::state::DeviceThread>>,
    /// Things the user should know about this run (settings a host accepted
    /// but did not honour, ...).
    pub warnings: Vec<String>,
    pub console_bytes: u64,
    pub console_dropped: u64,
    pub timings: Timings,
    /// Resident memory at the end: the whole process, and the guest's part.
    pub process_rss_kib: u64,
    pub guest_resident_kib: u64,
    /// Descriptors the VMM holds at the end (a leak shows here).
    pub open_fds: u64,
    #[serde(skip)]
    pub transcript: Vec<u8>,
}

/// A created VM, ready to run.
pub struct Vm {
    kvm: Arc<Kvm>,
    vm: Arc<VmFd>,
    /// Every device, by id.
    devices: Arc<Devices>,
    /// Doorbell mode: the server link, watched while the VM runs.
    doorbells: Option<crate::doorbell::Doorbells>,
    /// The ivshmem device, whose region the stream names.
    ivshmem: Option<Arc<crate::ivshmem::IvshmemDevice>>,
    /// The disks' images (their locks move at a migration's hand-over).
    disks: Vec<Arc<virtio::disk::DiskImage>>,
    /// Per-vCPU dirty rings, when the VM tracks dirty pages with them.
    rings: Arc<crate::dirty_ring::DirtyRings>,
    /// Without rings: how the dirty bitmap is protected.
    dirty_manual: crate::dirty_log::ManualProtect,
    /// The CPU features the guest is given (carried in snapshots/streams).
    guest_features: Vec<cpuid::FeatureWord>,
    /// MSRs a snapshot saves.
    msrs: Arc<std::sync::OnceLock<Vec<u32>>>,
    mem: GuestRam,
    vcpus: Vec<VcpuFd>,
    io: Arc<IoContext>,
    console: Arc<ConsoleBuffer>,
    boot: BootEntry,
    cmdline: String,
    tsc_khz: u32,
    kvm_kind: rt::KvmKind,
    cx16_hidden: bool,
    settings: Vec<Setting>,
    spec: VmSpec,
    created: Instant,
    /// The injector's irqfd and the guest TSC offset, for the irq metric.
    irq: Option<(EventFd, u64, &'static str)>,
    /// Decides, once every vCPU thread is set up and waiting, whether they
    /// start (a migration's destination says READY and waits for GO here,
    /// so setting the threads up stays out of the downtime).
    gate: Option<Gate>,
}

/// When the BSP entered its run loop (CLOCK_REALTIME ns), waiting up to a
/// second for it to get there once released.
fn entered_run_loop(first_run: &Mutex<Option<Instant>>) -> u128 {
    let t0 = Instant::now();
    loop {
        if let Some(at) = *first_run.lock().unwrap_or_else(|e| e.into_inner()) {
            return crate::clock::now_ns().saturating_sub(at.elapsed().as_nanos());
        }
        if t0.elapsed() > Duration::from_secs(1) {
            return crate::clock::now_ns();
        }
        thread::sleep(Duration::from_micros(20));
    }
}

/// See `Vm::set_gate`: told the restore's outcome (or why the VM cannot
/// start), it says READY or refuses, and returns whether the guest starts.
pub type Gate = Box<dyn FnOnce(std::result::Result<&Restored, &Error>) -> Result<()> + Send>;

/// When a restored VM's stream ended and its state was in KVM
/// (CLOCK_REALTIME ns): the destination's side of a migration's downtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct Restored {
    pub stream_end_ns: u128,
    pub applied_ns: u128,
}

/// Reads the rest of `src` into the VM: memory, the vCPUs' and the VM's
/// state, then every device's (each checks its own before any is taken),
/// all verified before anything runs.
fn apply_restore(
    src: &mut crate::snapshot::RestoreSource,
    vm: &VmFd,
    mem: &GuestRam,
    vcpus: &[VcpuFd],
    tsc_khz: u32,
    devices: &Devices,
) -> Result<Restored> {
    let check = |s: &devices::DeviceStates| devices.check(s).map_err(Error::from);
    let (states, stream_end_ns) =
        crate::snapshot::apply(src, vm, mem, vcpus, tsc_khz as u64, &check)?;
    devices.restore(&states)?;
    Ok(Restored {
        stream_end_ns,
        applied_ns: crate::clock::now_ns(),
    })
}

/// A guest attached to a shared region resumes only attached to that same
/// region (its peers share it, so it is never in the stream); one without
/// ivshmem only where there is none.
fn check_same_region(
    source: &str,
    wanted: Option<&crate::shared_region::IvshmemIdentity>,
    here: Option<&Arc<crate::shared_region::SharedRegion>>,
) -> Result<()> {
    let here = here.map(|r| r.identity());
    match (wanted, here) {
        (None, None) => Ok(()),
        (Some(w), Some(h)) if (w.dev, w.ino, w.size) == (h.dev, h.ino, h.size) => Ok(()),
        (Some(w), None) => Err(Error::Config(format!(
            "the guest of {source} is attached to the ivshmem region {} ({} bytes): attach this VM to that same region (--ivshmem path={},size={})",
            w.path, w.size, w.path, w.size
        ))),
        (Some(w), Some(h)) => Err(Error::Config(format!(
            "the guest of {source} is attached to the ivshmem region {} ({} bytes, inode {}), but this VM's --ivshmem is {} ({} bytes, inode {}): another region",
            w.path, w.size, w.ino, h.path, h.size, h.ino
        ))),
        (None, Some(h)) => Err(Error::Config(format!(
            "the guest of {source} has no ivshmem device, but this VM has --ivshmem {}: drop it",
            h.path
        ))),
    }
}

fn kvm_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> Error + '_ {
    move |e| Error::Kvm(format!("{what}: {e}"))
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn enable_cap(vm: &VmFd, cap: u32, arg: u64) -> std::result::Result<(), kvm_ioctls::Error> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg;
    vm.enable_cap(&c)
}

impl Vm {
    pub fn create(mut spec: VmSpec) -> Result<Vm> {
        let created = Instant::now();
        if spec.vcpus == 0 {
            return Err(Error::Config(
                "--vcpus 0: a VM needs at least one vCPU".into(),
            ));
        }
        if spec.vcpus > 254 {
            return Err(Error::Config(format!(
                "--vcpus {}: at most 254 (xAPIC IDs)",
                spec.vcpus
            )));
        }
        let mut settings = Vec::new();
        let rt_spec = spec.rt.clone();
        if let Some(cpus) = &rt_spec.cpus {
            if cpus.len() < spec.vcpus as usize {
                return Err(Error::Config(format!(
                    "--cpus lists {} CPUs for {} vCPUs: one host CPU per vCPU is needed",
                    cpus.len(),
                    spec.vcpus
                )));
            }
            rt::check_cpus_exist(cpus).map_err(|e| Error::Config(format!("--cpus: {e}")))?;
            if let Some(node) = spec.memory.numa_node {
                let node_cpus =
                    rt::node_cpus(node).map_err(|e| Error::Config(format!("--numa-node: {e}")))?;
                if let Some(c) = cpus.iter().find(|c| !node_cpus.contains(c)) {
                    Setting::fail(
                        &mut settings,
                        "numa-node",
                        format!(
                            "vCPU CPU {c} is not on NUMA node {node} (its CPUs: {node_cpus:?})"
                        ),
                        rt_spec.best_effort,
                    )?;
                }
            }
        }
        if let Some(hk) = &rt_spec.housekeeping_cpus {
            rt::check_cpus_exist(hk)
                .map_err(|e| Error::Config(format!("--housekeeping-cpus: {e}")))?;
            let r = rt::pin_current_thread(hk)
                .map(|()| format!("VMM threads on CPUs {hk:?}"))
                .map_err(|e| e.to_string());
            Setting::record(&mut settings, "housekeeping-cpus", r, rt_spec.best_effort)?;
        }
        if let Some(v) = rt_spec
            .realtime_vcpus
            .iter()
            .flatten()
            .find(|&&v| v >= spec.vcpus as usize)
        {
            return Err(Error::Config(format!(
                "--realtime-vcpus names vCPU {v}, but the VM has {} vCPU(s)",
                spec.vcpus
            )));
        }
        if rt_spec.realtime_vcpus.is_some() && rt_spec.priority.is_none() {
            return Err(Error::Config(
                "--realtime-vcpus without --rt-priority: which priority should they get?".into(),
            ));
        }
        if let Some(p) = rt_spec.priority {
            if !(1..=99).contains(&p) {
                return Err(Error::Config(format!(
                    "--rt-priority {p}: SCHED_FIFO priorities are 1 to 99"
                )));
            }
        }

        // a NIC's busy or SCHED_FIFO queue worker on a vCPU's CPU would
        // starve the vCPU (or be starved by it)
        let mut taken: Vec<(usize, usize)> = Vec::new();
        for (i, n) in spec.net.iter().enumerate() {
            let exclusive = n.mode == virtio::net::NetMode::Poll || n.rt_priority.is_some();
            if exclusive {
                for &c in &n.cpus {
                    if let Some((other, _)) = taken.iter().find(|(_, t)| *t == c) {
                        return Err(Error::Config(format!(
                            "--net net{i} cpus=: CPU {c} already runs net{other}'s polling or SCHED_FIFO worker; each needs a CPU of its own"
                        )));
                    }
                    taken.push((i, c));
                }
            }
            if let (true, Some(vcpu_cpus)) = (exclusive, rt_spec.cpus.as_ref()) {
                if let Some(c) = n.cpus.iter().find(|c| vcpu_cpus.contains(c)) {
                    return Err(Error::Config(format!(
                        "--net net{i} cpus=: CPU {c} is a vCPU's (--cpus {vcpu_cpus:?}); a polling or SCHED_FIFO queue worker needs a CPU of its own"
                    )));
                }
            }
        }
        let kvm = Kvm::new().map_err(|e| Error::Kvm(format!("opening /dev/kvm: {e}")))?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        let kvm_kind = rt::KvmKind::detect();

        // Before any vCPU exists: disabled exits and halt polling.
        let flags = rt_spec.disable_exits.flags();
        if flags != 0 {
            let supported =
                vm.check_extension_raw(kvm_bindings::KVM_CAP_X86_DISABLE_EXITS as _) as u32;
            let name = "disable-exits";
            let r = if flags & !supported != 0 {
                Err(format!("this host can disable exit mask {supported:#x}, asked for {flags:#x} (MWAIT=1 HLT=2 PAUSE=4 CSTATE=8)"))
            } else {
                enable_cap(&vm, kvm_bindings::KVM_CAP_X86_DISABLE_EXITS, flags as u64)
                    .map(|()| format!("{:?}", rt_spec.disable_exits))
                    .map_err(|e| format!("KVM_CAP_X86_DISABLE_EXITS: {e}"))
            };
            Setting::record(&mut settings, name, r, rt_spec.best_effort)?;
        }
        if let Some(ns) = rt_spec.halt_poll_ns {
            let r = enable_cap(&vm, kvm_bindings::KVM_CAP_HALT_POLL, ns)
                .map(|()| format!("{ns} ns"))
                .map_err(|e| format!("KVM_CAP_HALT_POLL: {e}"));
            Setting::record(&mut settings, "halt-poll-ns", r, rt_spec.best_effort)?;
        }

        // the dirty ring is an optimisation: without it, the bitmap serves
        let dirty_ring = match spec.dirty_ring {
            Some(bytes) => match crate::dirty_ring::enable(&vm, bytes) {
                Ok(()) => {
                    settings.push(Setting::applied(
                        "dirty-ring",
                        format!("{bytes} bytes per vCPU"),
                    ));
                    Some(bytes)
                }
                Err(e) => {
                    Setting::fail(
                        &mut settings,
                        "dirty-ring",
                        format!("{e}; the dirty bitmap is used"),
                        true,
                    )?;
                    None
                }
            },
            None => None,
        };
        // without the ring, the bitmap: manually protected where KVM can
        let dirty_manual = match dirty_ring {
            Some(_) => Default::default(),
            None => crate::dirty_log::enable(&vm),
        };

        let mem = memory::create(&spec.memory, rt_spec.best_effort, &mut settings)?;
        memory::register_slots(&vm, &mem, 0)?;
        vm.set_tss_address(KVM_TSS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        // Devices, each through the device manager.
        let guest_exit = Arc::new(GuestExit::default());
        let console = ConsoleBuffer::new(4 << 20);
        let com1_irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Error::Device(format!("COM1 eventfd: {e}")))?;
        vm.register_irqfd(&com1_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD for COM1"))?;
        let mut dm = DeviceManager::default();
        dm.attach_port_device(
            "com1",
            COM1_PORT,
            8,
            Arc::new(SerialConsole::new(com1_irq, console.clone())),
        )?;
        dm.attach_port_device(
            "debug-exit",
            DEBUG_EXIT_PORT,
            4,
            Arc::new(DebugExit::new(guest_exit.clone())),
        )?;
        if spec.dma_probe {
            dm.attach_port_device(
                "dma-probe",
                DMA_PROBE_PORT,
                devices::dma_probe::PORT_LEN,
                Arc::new(devices::dma_probe::DmaProbe::new(mem.clone())),
            )?;
        }
        dm.attach_port(BENCH_PORT, 4, Arc::new(Sink::new("bench-port")))?;
        let latency_port = spec
            .latency_port
            .clone()
            .unwrap_or_else(|| Arc::new(devices::LatencyPort::new(None, 0)));
        dm.attach_port(LATENCY_PORT, 12, latency_port)?;
        dm.attach_mmio(BENCH_MMIO, 0x1000, Arc::new(Sink::new("bench-mmio")))?;
        // the VM's one routing table (KVM replaces it whole on each change)
        let gsi_routes = Arc::new(crate::irq_routes::GsiRoutes::default());
        let ivshmem = match &spec.ivshmem {
            Some(ispec) => Some(crate::ivshmem::attach(
                &mut dm,
                &vm,
                gsi_routes.clone(),
                ispec,
                mem.num_regions() as u32,
            )?),
            None => None,
        };
        for (i, n) in spec.net.iter().enumerate() {
            crate::virtio_net::attach(&mut dm, &vm, gsi_routes.clone(), &mem, n, i)?;
        }
        // a migration's destination takes the images' locks at the
        // hand-over, once the source has let them go
        let live = spec.restore_from.as_ref().is_some_and(|r| r.live);
        let disks = spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                crate::virtio_blk::attach(&mut dm, &vm, gsi_routes.clone(), &mem, d, i, !live)
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(v) = &spec.vsock {
            crate::virtio_vsock::attach(&mut dm, &vm, gsi_routes.clone(), &mem, v)?;
        }
        if let Some(r) = &spec.rng {
            crate::virtio_rng::attach(&mut dm, &vm, gsi_routes.clone(), &mem, r)?;
        }
        let bus_link = dm.bus_link.clone();
        let (pio, mmio, devices) = dm.finish()?;
        let io = Arc::new(IoContext {
            pio,
            mmio,
            guest_exit,
            unknown: UnknownAccesses::default(),
            dirty_rings: Default::default(),
        });
        // (what moves BARs on the bus reaches it from now on)
        let _ = bus_link.set(Arc::downgrade(&io));
        let (doorbells, ivshmem) = match ivshmem {
            Some(a) => (a.doorbells, Some(a.device)),
            None => (None, None),
        };
        let devices = Arc::new(devices);

        // vCPUs.
        let cx16_hidden = kvm_kind.needs_cx16_hidden();
        if cx16_hidden {
            tracing::info!("guest code is emulated on this host ({kvm_kind:?}): CX16 hidden from the guest CPUID");
        }
        let base_cpuid = cpuid::supported(&kvm)?;
        let cpuid_opts = CpuidOptions {
            vcpus: spec.vcpus,
            hide_cx16: cx16_hidden,
            hlt_exits_disabled: rt_spec.disable_exits.hlt,
            realtime_hint: rt_spec.priority.is_some() && rt_spec.cpus.is_some(),
        };
        let guest_features = cpuid::feature_words(&cpuid::for_vcpu(&base_cpuid, 0, &cpuid_opts));
        if let Some(src) = &spec.restore_from {
            let missing = cpuid::missing_features(&src.cpu_features, &guest_features);
            if !missing.is_empty() {
                return Err(Error::Config(format!(
                    "the guest of {} uses CPU features this host lacks: {}",
                    src.name,
                    missing.join(", ")
                )));
            }
            check_same_region(
                &src.name,
                src.ivshmem.as_ref(),
                ivshmem.as_ref().map(|d| &d.region),
            )?;
        }
        let mut vcpus = Vec::new();
        let mut rings = Vec::new();
        for id in 0..spec.vcpus {
            let v = vm.create_vcpu(id as u64).map_err(|e| Error::Vcpu {
                id,
                why: format!("KVM_CREATE_VCPU: {e}"),
            })?;
            let verr = |what: &'static str| {
                move |e: kvm_ioctls::Error| Error::Vcpu {
                    id,
                    why: format!("{what}: {e}"),
                }
            };
            v.set_cpuid2(&cpuid::for_vcpu(&base_cpuid, id, &cpuid_opts))
                .map_err(verr("KVM_SET_CPUID2"))?;
            vcpu::set_boot_msrs(&v, id);
            v.set_fpu(&vcpu::boot_fpu()).map_err(verr("KVM_SET_FPU"))?;
            vcpu::set_lint(&v).map_err(verr("KVM_SET_LAPIC"))?;
            if let Some(bytes) = dirty_ring {
                rings.push(crate::dirty_ring::DirtyRing::map(&v, bytes)?);
            }
            vcpus.push(v);
        }
        let slot_pages: Vec<u64> = mem
            .iter()
            .map(|r| vm_memory::GuestMemoryRegion::len(r) / 4096)
            .collect();
        let rings = Arc::new(crate::dirty_ring::DirtyRings::new(
            rings,
            &slot_pages,
            vm.clone(),
        ));
        if !rings.is_empty() {
            let _ = io.dirty_rings.set(rings.clone());
        }
        let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);
        let irq = match &spec.irq_bench {
            Some(_) => {
                let evt = EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| Error::Device(format!("irq bench eventfd: {e}")))?;
                vm.register_irqfd(&evt, crate::irq_bench::IRQ_GSI)
                    .map_err(kvm_err("KVM_IRQFD for the irq bench"))?;
                let (offset, from) = crate::irq_bench::tsc_offset(&vcpus[0]);
                Some((evt, offset, from))
            }
            None => None,
        };

        // The MSRs a save reads, probed with an ioctl per MSR (slow on a nested
        // host, BENCHMARKS.md):
        // before the guest runs when it can be saved or migrated (it has a
        // control socket), so the probe never lands in a migration's
        // downtime; otherwise on the first save, keeping start-up short.
        let msrs = Arc::new(std::sync::OnceLock::new());
        if spec.control_socket.is_some() {
            if let Some(v) = vcpus.first() {
                let _ = msrs.set(crate::snapshot::msr_list(&kvm, v));
            }
        }
        let (boot, cmdline) = match spec.restore_from.as_mut() {
            Some(_) => {
                // the stream is read in `run`, once the vCPU threads are set
                // up: whatever the last of it brings is then all that stands
                // between the source's pause and the resume here
                if let Some(f) = spec.on_prepared.take() {
                    let list = msrs.get_or_init(|| crate::snapshot::msr_list(&kvm, &vcpus[0]));
                    // a measurement: it never stops the migration (the
                    // real restore checks the state for itself)
                    let state_ns = crate::snapshot::time_state_round_trip(&vm, &vcpus, list)
                        .unwrap_or_else(|e| {
                            tracing::warn!("timing a state save-and-restore here: {e}");
                            0
                        });
                    f(state_ns);
                }
                let entry = BootEntry {
                    protocol: BootProtocol::Restore,
                    entry: 0,
                    params: 0,
                    kernel_end: 0,
                };
                (entry, spec.cmdline.clone())
            }
            None => {
                let rsdp = acpi::write_tables(&mem, spec.vcpus)?;
                let mut cmdline = spec.cmdline.clone();
                if spec.append_tsc_khz && tsc_khz > 0 {
                    if !cmdline.is_empty() {
                        cmdline.push(' ');
                    }
                    cmdline.push_str(&format!("tsc_khz={tsc_khz}"));
                }
                let image = KernelImage {
                    name: spec.kernel_name.clone(),
                    bytes: &spec.kernel,
                };
                let initrd = spec
                    .initrd
                    .as_ref()
                    .map(|(n, b)| (n.as_str(), b.as_slice()));
                let boot = boot::load(&mem, spec.memory.size, &image, &cmdline, initrd, rsdp)?;
                let mut sregs: kvm_sregs = vcpus[0].get_sregs().map_err(|e| Error::Vcpu {
                    id: 0,
                    why: format!("KVM_GET_SREGS: {e}"),
                })?;
                let regs: kvm_regs = boot::bsp_state(&mem, &boot, &mut sregs)?;
                vcpus[0].set_sregs(&sregs).map_err(|e| Error::Vcpu {
                    id: 0,
                    why: format!("KVM_SET_SREGS: {e}"),
                })?;
                vcpus[0].set_regs(&regs).map_err(|e| Error::Vcpu {
                    id: 0,
                    why: format!("KVM_SET_REGS: {e}"),
                })?;
                (boot, cmdline)
            }
        };

        Ok(Vm {
            kvm: Arc::new(kvm),
            vm,
            devices,
            msrs,
            rings,
            dirty_manual,
            guest_features,
            doorbells,
            ivshmem,
            disks,
            mem,
            vcpus,
            io,
            console,
            boot,
            cmdline,
            tsc_khz,
            kvm_kind,
            cx16_hidden,
            settings,
            spec,
            created,
            irq,
            gate: None,
        })
    }

    /// Sets what runs once the vCPUs are released.
    pub fn set_on_start(&mut self, f: OnStart) {
        self.spec.on_start = Some(f);
    }

    /// Sets what decides, once every vCPU thread is set up and waiting,
    /// whether the guest starts: an error ends the VM before it runs.
    pub fn set_gate(&mut self, gate: Gate) {
        self.gate = Some(gate);
    }

    /// Runs vCPU 0 alone in the bare floor loop of the exit benchmark (no
    /// devices, no accounting); returns the guest status and its console.
    pub fn run_floor(mut self) -> Result<(u32, Vec<u8>)> {
        let mut console = Vec::new();
        let status = vcpu::run_loop_floor(&mut self.vcpus[0], &mut console)
            .map_err(|why| Error::Vcpu { id: 0, why })?;
        Ok((status, console))
    }

    /// Runs the VM to its end and reports.
    pub fn run(mut self) -> Result<RunReport> {
        let on_start = self.spec.on_start.take();
        let Vm {
            kvm,
            vm,
            devices,
            msrs,
            rings,
            dirty_manual,
            guest_features,
            doorbells,
            ivshmem,
            disks,
            mem,
            vcpus,
            io,
            console,
            boot,
            cmdline,
            tsc_khz,
            kvm_kind,
            cx16_hidden,
            mut settings,
            mut spec,
            created,
            irq,
            gate,
        } = self;
        register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| Error::Kvm(format!("installing the vCPU kick signal handler: {e}")))?;

        let stop = Arc::new(AtomicBool::new(false));
        let console_done = Arc::new(AtomicBool::new(false));
        let console_thread = spawn_console(&spec, console.clone(), console_done.clone())?;
        let first_run = Arc::new(Mutex::new(None::<Instant>));
        let (ack_tx, ack_rx) = mpsc::channel::<u32>();
        let mut cmd_txs = Vec::new();
        let mut cmd_rxs = Vec::new();
        for _ in 0..vcpus.len() {
            let (tx, rx) = mpsc::channel::<VcpuCmd>();
            cmd_txs.push(tx);
            cmd_rxs.push(rx);
        }
        let mut exit_stats: Vec<ExitStats> = (0..spec.vcpus)
            .map(|_| ExitStats::new(io.pio.names(), io.mmio.names()))
            .collect();
        let live_exits = exit_stats.iter().map(ExitStats::live).collect();
        exit_stats.reverse(); // popped in vCPU order below
        let handle = Arc::new(VmHandle {
            kvm_stats: (0..spec.vcpus)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            live_exits,
            migration: Mutex::new(None),
            last_migration: Mutex::new(None),
            vcpu_tids: std::sync::OnceLock::new(),
            pause: AtomicBool::new(false),
            stop: stop.clone(),
            cmds: cmd_txs,
            acks: Mutex::new(ack_rx),
            pthreads: Mutex::new(Vec::new()),
            vm: vm.clone(),
            mem: mem.clone(),
            devices: devices.clone(),
            disks: disks.clone(),
            disk_locks_released: AtomicBool::new(false),
            config: SnapshotConfig {
                vm: spec.stream_config(&cmdline),
                tsc_khz,
                cpu_features: guest_features.clone(),
                ivshmem: ivshmem.as_ref().map(|d| d.region.identity()),
                connections: 1,
            },
            kernel_name: spec.kernel_name.clone(),
            state: Mutex::new(RunState::Running),
            started: Instant::now(),
            migrated: Mutex::new(None),
            failed_migration: Mutex::new(None),
            rings,
            dirty_manual,
        });

        // Each vCPU thread applies its placement, reports, then waits for go.
        let (ready_tx, ready_rx) = mpsc::channel::<(u32, i32, Vec<Setting>, Option<String>)>();
        let (end_tx, end_rx) = mpsc::channel::<u32>();
        let mut go = Vec::new();
        let mut handles = Vec::new();
        for (id, cmd_rx) in cmd_rxs.into_iter().enumerate() {
            let id = id as u32;
            let (handle, ack_tx, msrs, kvm) =
                (handle.clone(), ack_tx.clone(), msrs.clone(), kvm.clone());
            // the vCPU itself comes with the go: a restore writes its state
            // while the thread is set up and waiting
            let (go_tx, go_rx) = mpsc::channel::<Option<VcpuFd>>();
            go.push(go_tx);
            let host_cpu = spec.rt.cpus.as_ref().map(|c| c[id as usize]);
            let priority = spec.rt.priority.filter(|_| {
                spec.rt
                    .realtime_vcpus
                    .as_ref()
                    .is_none_or(|l| l.contains(&(id as usize)))
            });
            let (io, stop, ready_tx, end_tx) =
                (io.clone(), stop.clone(), ready_tx.clone(), end_tx.clone());
            let first_run = (id == 0).then(|| first_run.clone());
            let best_effort = spec.rt.best_effort;
            let mut stats = exit_stats.pop().expect("one ExitStats per vCPU");
            let handle = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let tid = rt::current_tid();
                    let mut applied = Vec::new();
                    let mut outcomes = Vec::new();
                    if let Some(cpu) = host_cpu {
                        let r =
                            rt::pin_current_thread(&[cpu]).map(|()| format!("pinned to CPU {cpu}"));
                        outcomes.push((format!("vcpu{id}.cpu"), r));
                    }
                    if let Some(p) = priority {
                        let r = rt::set_current_thread_fifo(p).map(|()| format!("SCHED_FIFO {p}"));
                        outcomes.push((format!("vcpu{id}.rt-priority"), r));
                    }
                    let mut failure = None;
                    // the filter goes in before the guest's first instruction
                    if let Err(e) = seccomp::enter(seccomp::Role::Vcpu) {
                        failure = Some(format!("vcpu{id}: {e}"));
                    }
                    seccomp::test_probe(seccomp::Role::Vcpu);
                    for (name, r) in outcomes {
                        if let Err(e) = Setting::record(
                            &mut applied,
                            &name,
                            r.map_err(|e| e.to_string()),
                            best_effort,
                        ) {
                            failure.get_or_insert(e.to_string());
                        }
                    }
                    let _ = ready_tx.send((id, tid, applied, failure));
                    let Ok(Some(mut vcpu)) = go_rx.recv() else {
                        return None;
                    };
                    let kvm_stats = KvmStats::open(&vcpu).ok().map(Arc::new);
                    if let (Some(k), Some(slot)) = (&kvm_stats, handle.kvm_stats.get(id as usize)) {
                        let _ = slot.set(k.clone());
                    }
                    let sched = rt::thread_sched(tid).ok();
                    let started = Instant::now();
                    // parked outside KVM_RUN until resumed; saves its state when asked
                    let mut on_pause = |vcpu: &mut VcpuFd| {
                        let _ = ack_tx.send(id);
                        while handle.pause.load(Ordering::Acquire) {
                            match cmd_rx.recv() {
                                Ok(VcpuCmd::Save(reply)) => {
                                    let list =
                                        msrs.get_or_init(|| crate::snapshot::msr_list(&kvm, vcpu));
                                    let _ = reply.send(crate::snapshot::save_vcpu(vcpu, id, list));
                                }
                                Ok(VcpuCmd::Resume) => {}
                                Err(_) => break,
                            }
                        }
                    };
                    let end = vcpu::run_loop(
                        &mut vcpu,
                        &io,
                        &stop,
                        &handle.pause,
                        &mut on_pause,
                        &mut stats,
                        first_run.as_deref(),
                    );
                    let wall_ms = started.elapsed().as_millis() as u64;
                    let state = match &end {
                        VcpuEnd::Flow(Flow::Shutdown) => describe_state(&vcpu),
                        VcpuEnd::Flow(Flow::InternalError) => {
                            format!("{}; {}", internal_error(&mut vcpu), describe_state(&vcpu))
                        }
                        _ => String::new(),
                    };
                    let (user_ms, system_ms, guest_ms) = thread_times(tid);
                    let _ = end_tx.send(id);
                    Some((
                        end,
                        state,
                        VcpuReport {
                            id,
                            tid,
                            host_cpu,
                            sched,
                            exits: stats.report(),
                            kvm_stats: kvm_stats.map(|s| s.read()).unwrap_or_default(),
                            user_ms,
                            system_ms,
                            guest_ms,
                            wall_ms,
                        },
                    ))
                })
                .map_err(|e| Error::Vcpu {
                    id,
                    why: format!("spawning its thread: {e}"),
                })?;
            handles.push(handle);
        }
        drop(ready_tx);
        drop(end_tx);

        let mut failure = None;
        let mut tids = vec![0; handles.len()];
        for _ in 0..handles.len() {
            match ready_rx.recv() {
                Ok((id, tid, applied, err)) => {
                    tids[id as usize] = tid;
                    settings.extend(applied);
                    if let Some(e) = err {
                        failure.get_or_insert(Error::Rt(e));
                    }
                }
                Err(_) => {
                    failure.get_or_insert(Error::Vcpu {
                        id: 0,
                        why: "a vCPU thread ended during set-up".into(),
                    });
                }
            }
        }
        *handle.pthreads.lock().unwrap_or_else(|e| e.into_inner()) =
            handles.iter().map(|h| h.as_pthread_t()).collect();
        let mut restored = Restored::default();
        let live = spec.restore_from.as_ref().is_some_and(|r| r.live);
        if failure.is_none() {
            if let Some(mut src) = spec.restore_from.take() {
                match apply_restore(&mut src, &vm, &mem, &vcpus, tsc_khz, &devices) {
                    Ok(r) => restored = r,
                    Err(e) => failure = Some(e),
                }
            }
        }
        if let Some(gate) = gate {
            let opened = gate(match &failure {
                None => Ok(&restored),
                Some(e) => Err(e),
            });
            if let (None, Err(e)) = (&failure, opened) {
                failure = Some(e);
            }
        }
        if failure.is_none() && live {
            // the hand-over is committed: the source let the images go
            // before it said GO
            for d in &disks {
                if let Err(e) = d.lock_within(Duration::from_secs(2)) {
                    tracing::warn!("{e}; the guest runs on without the image's lock");
                }
            }
        }
        if failure.is_none() {
            // restored devices start with the guest (not before the
            // hand-over is committed)
            devices.resume();
        }
        let mut vcpus = vcpus.into_iter();
        for g in &go {
            let _ = g.send(if failure.is_none() {
                vcpus.next()
            } else {
                None
            });
        }
        if failure.is_none() {
            if let Some(f) = on_start {
                f(entered_run_loop(&first_run), &handle);
            }
        }
        if let Some(e) = failure {
            for h in handles {
                let _ = h.join();
            }
            console_done.store(true, Ordering::Release);
            let _ = console_thread.join();
            return Err(e);
        }
        for (id, tid) in tids.iter().enumerate() {
            tracing::info!("vCPU {id} runs on host thread {tid}");
        }
        let _ = handle.vcpu_tids.set(tids.clone());
        for s in &settings {
            if s.applied {
                tracing::info!("applied {}: {}", s.name, s.detail);
            } else {
                tracing::warn!("NOT applied {}: {}", s.name, s.detail);
            }
        }

        let injector = match (irq, &spec.irq_bench) {
            (Some((evt, offset, from)), Some(bench)) => {
                let (mem, bench, stop) = (mem.clone(), bench.clone(), stop.clone());
                let result = crate::irq_bench::IrqBenchResult {
                    tsc_offset_from: from.to_string(),
                    ..Default::default()
                };
                Some(
                    seccomp::spawn("irq-injector".into(), seccomp::Role::Helper, move || {
                        crate::irq_bench::inject(mem, evt, offset, bench, stop, result)
                    })
                    .map_err(|e| Error::Device(format!("spawning the irq injector: {e}")))?,
                )
            }
            _ => None,
        };

        let doorbell_watch = doorbells.map(|d| d.watch(stop.clone()));
        if let Some(f) = spec.on_handle.take() {
            f(handle.clone());
        }
        let control = match &spec.control_socket {
            Some(path) => match crate::control::serve(path, handle.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!("{e}; the VM runs without it");
                    None
                }
            },
            None => None,
        };

        let metrics = match &spec.metrics_listen {
            Some(addr) => match crate::metrics::serve(addr, handle.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!("{e}; the VM runs without metrics");
                    None
                }
            },
            None => None,
        };

        // Wait for the first vCPU to end, then stop and kick the others
        // (waking any that are paused).
        let _ = end_rx.recv();
        stop.store(true, Ordering::Release);
        handle.pause.store(false, Ordering::Release);
        for c in &handle.cmds {
            let _ = c.send(VcpuCmd::Resume);
        }
        if let Some(t) = control {
            let _ = t.join();
        }
        if let Some(t) = metrics {
            let _ = t.join();
        }
        if let Some(t) = doorbell_watch {
            let _ = t.join();
        }
        // (a control connection still open may try to kick the vCPUs: its
        // list goes before any thread can be joined)
        handle
            .pthreads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let pthreads: Vec<_> = handles.iter().map(|h| h.as_pthread_t()).collect();
        while handles.iter().any(|h| !h.is_finished()) {
            for (h, &pt) in handles.iter().zip(&pthreads) {
                if !h.is_finished() {
                    // SAFETY: the thread is alive (not finished and not joined),
                    // and SIGRTMIN has a no-op handler: the signal only makes
                    // KVM_RUN return.
                    unsafe { libc::pthread_kill(pt, SIGRTMIN()) };
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
        let ended = Instant::now();

        let mut reports = Vec::new();
        let mut stop_reason = None;
        for h in handles {
            let Ok(Some((end, state, report))) = h.join() else {
                continue;
            };
            let id = report.id;
            let reason = match end {
                VcpuEnd::Stopped => None,
                VcpuEnd::Flow(Flow::GuestExit(status)) => Some(StopReason::GuestExit { status }),
                VcpuEnd::Flow(Flow::Shutdown) => Some(StopReason::Shutdown { vcpu: id, state }),
                VcpuEnd::Flow(Flow::InternalError) => {
                    Some(StopReason::InternalError { vcpu: id, state })
                }
                VcpuEnd::Flow(Flow::FailEntry(r)) => Some(StopReason::FailEntry {
                    vcpu: id,
                    hardware_reason: r,
                }),
                VcpuEnd::Flow(Flow::SystemEvent(event)) => {
                    Some(StopReason::SystemEvent { vcpu: id, event })
                }
                VcpuEnd::Flow(Flow::Unhandled(what)) => Some(StopReason::Error {
                    vcpu: id,
                    message: format!("unhandled exit {what}"),
                }),
                VcpuEnd::Flow(Flow::Resume) => None,
                VcpuEnd::Error(message) => Some(StopReason::Error { vcpu: id, message }),
            };
            if stop_reason.is_none() {
                stop_reason = reason;
            }
            reports.push(report);
        }
        let irq_bench = injector.map(|h| {
            h.join()
                .ok()
                .flatten()
                .unwrap_or_else(|| crate::irq_bench::IrqBenchResult {
                    error: Some("the irq injector panicked or its filter failed".into()),
                    ..Default::default()
                })
        });
        console_done.store(true, Ordering::Release);
        let transcript = console_thread
            .join()
            .ok()
            .flatten()
            .ok_or_else(|| Error::Device("the console thread panicked".into()))??;

        if let Some(to) = handle
            .migrated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            stop_reason = Some(StopReason::Migrated { to });
        }
        let mut warnings = Vec::new();
        if spec.rt.disable_exits.hlt
            && settings
                .iter()
                .any(|s| s.name == "disable-exits" && s.applied)
        {
            let halts: u64 = reports
                .iter()
                .filter_map(|r| r.kvm_stats.get("halt_exits"))
                .sum();
            if halts > 0 {
                warnings.push(format!(
                    "HLT exits were disabled, yet KVM counted {halts} halt exits: this host ({kvm_kind:?}) accepts the setting but it is not honoured"
                ));
            }
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let first = first_run
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(ended);
        let guest_resident = memory::resident_bytes(&mem);
        let process_rss = memory::process_rss_bytes();
        drop(vm);
        drop(mem);
        Ok(RunReport {
            stop: stop_reason.unwrap_or(StopReason::Error {
                vcpu: 0,
                message: "the VM stopped without a reason".into(),
            }),
            kernel: spec.kernel_name.clone(),
            boot,
            cmdline,
            memory_mib: spec.memory.size >> 20,
            tsc_khz,
            kvm_kind,
            cx16_hidden,
            settings,
            vcpus: reports,
            unknown_accesses: io.unknown.count(),
            irq_bench,
            devices: devices.counters(),
            device_threads: devices.threads(),
            warnings,
            console_bytes: transcript.1,
            console_dropped: console.dropped(),
            timings: Timings {
                setup_us: first.duration_since(created).as_micros() as u64,
                process_to_first_run_us: spec
                    .process_start
                    .map(|p| first.duration_since(p).as_micros() as u64),
                run_us: ended.duration_since(first).as_micros() as u64,
            },
            transcript: transcript.0,
            process_rss_kib: process_rss / 1024,
            open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
            guest_resident_kib: guest_resident / 1024,
        })
    }
}

/// What the console thread kept (up to the limit) and how many bytes it saw.
type ConsoleTranscript = (Vec<u8>, u64);

/// The housekeeping thread that moves guest console bytes to their sink.
fn spawn_console(
    spec: &VmSpec,
    buffer: Arc<ConsoleBuffer>,
    done: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<Option<Result<ConsoleTranscript>>>> {
    let mut sink: Box<dyn Write + Send> =
        match &spec.console {
            ConsoleSink::Stdout => Box::new(std::io::stdout()),
            ConsoleSink::Stderr => Box::new(std::io::stderr()),
            ConsoleSink::File(path) => Box::new(std::fs::File::create(path).map_err(|e| {
                Error::Device(format!("serial output file {}: {e}", path.display()))
            })?),
            ConsoleSink::None => Box::new(std::io::sink()),
        };
    let limit = spec.transcript_limit;
    seccomp::spawn("console".into(), seccomp::Role::Helper, move || {
        let mut transcript = Vec::new();
        let mut chunk = Vec::new();
        let mut total = 0u64;
        // whole lines go out in one write each, so the log lines that
        // share the terminal or stderr never land inside a console line;
        // a partial line waits for its end, 50 ms at most (a prompt)
        let mut partial: Vec<u8> = Vec::new();
        let mut partial_since = Instant::now();
        let emit = |bytes: &[u8], sink: &mut Box<dyn Write + Send>| {
            if let Err(e) = sink.write_all(bytes).and_then(|_| sink.flush()) {
                tracing::warn!("guest console output: {e}");
            }
        };
        loop {
            // read `done` first: a final pass after it drains everything
            let finished = done.load(Ordering::Acquire);
            buffer.take_into(&mut chunk);
            if !chunk.is_empty() {
                total += chunk.len() as u64;
                let room = limit.saturating_sub(transcript.len());
                transcript.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if partial.is_empty() {
                    partial_since = Instant::now();
                }
                partial.extend_from_slice(&chunk);
                if let Some(end) = partial.iter().rposition(|&b| b == b'\n') {
                    emit(&partial[..=end], &mut sink);
                    partial.drain(..=end);
                    partial_since = Instant::now();
                }
            }
            if !partial.is_empty()
                && (finished || partial_since.elapsed() > Duration::from_millis(50))
            {
                emit(&partial, &mut sink);
                partial.clear();
            }
            if finished {
                return Ok((transcript, total));
            }
            thread::sleep(Duration::from_millis(1));
        }
    })
    .map_err(|e| Error::Device(format!("spawning the console thread: {e}")))
}

/// utime, stime and guest time (ms) of thread `tid` of this process.
pub(crate) fn thread_times(tid: i32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    // fields after the parenthesised command name; utime is field 14
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ms = |i: usize| f.get(i).copied().unwrap_or(0) * 1000 / hz;
    // rest starts at field 3 (state): field n is index n - 3
    (ms(14 - 3), ms(15 - 3), ms(43 - 3))
}

/// KVM's reason for an internal-error exit.
fn internal_error(vcpu: &mut VcpuFd) -> String {
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is
    // the union member KVM filled in.
    let (sub, ndata, data) = unsafe {
        let i = &vcpu.get_kvm_run().__bindgen_anon_1.internal;
        (i.suberror, i.ndata, i.data)
    };
    let what = match sub {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => {
            "exception while delivering an exception (triple-fault class)"
        }
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => {
            "event delivery failed (broken IDT or GDT?)"
        }
        _ => "unexpected exit",
    };
    let words: Vec<String> = data
        .iter()
        .take(ndata.min(16) as usize)
        .map(|w| format!("{w:#x}"))
        .collect();
    format!(
        "KVM internal error {sub}: {what} (data: {})",
        words.join(" ")
    )
}

/// Registers and segments of a stopped vCPU, for shutdown reports.
fn describe_state(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}/{:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit
        ),
        (Err(e), _) | (_, Err(e)) => format!("state unreadable: {e}"),
    }
}

/// Whether this host's KVM supports what `Vm` needs (for early, clear errors).
pub fn check_kvm() -> Result<()> {
    let kvm = Kvm::new().map_err(|e| Error::Kvm(format!("opening /dev/kvm: {e}")))?;
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Pit2, "PIT2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::Kvm(format!("this host's KVM lacks {name}")));
        }
    }
    Ok(())
}
