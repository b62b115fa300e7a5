//! Saving and restoring a VM: every vCPU's architectural state, the VM's
//! own KVM state (irqchip, PIT, kvmclock), every device's state (keyed by
//! device id, owned by the devices) and guest memory, written as a
//! migration stream (`migration` crate). A snapshot is that stream in a
//! file; only non-zero pages are written, so untouched and zero memory
//! takes no space.

use std::path::{Path, PathBuf};

use crate::memory::GuestRam;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migration::{Kind, Reader, Writer, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

use crate::clock::{guest_tsc, ns_to_cycles, tsc_msr, IA32_TSC};
use crate::{Error, Result};

/// What the destination needs before it can create the VM.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotConfig {
    /// What the guest is: kernel, command line, memory, vCPUs (the VM
    /// configuration type, holding only what travels with the guest).
    pub vm: crate::config::VmConfig,
    pub tsc_khz: u32,
    /// The CPU feature words the guest was given (leaves 1 and 7): a
    /// destination whose host lacks any of them refuses the guest.
    #[serde(default)]
    pub cpu_features: Vec<crate::cpuid::FeatureWord>,
    /// The shared ivshmem region the guest is attached to (plain mode): not
    /// carried (its peers share it), so the destination must be attached to
    /// this same region.
    #[serde(default)]
    pub ivshmem: Option<crate::shared_region::IvshmemIdentity>,
    /// Streams a migration uses (the pages of the others are applied in
    /// parallel); 1 for a snapshot.
    #[serde(default = "one")]
    pub connections: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub id: u32,
    /// When the state was read (CLOCK_REALTIME ns): a migration's
    /// destination moves the guest's clocks on by the time until restore.
    #[serde(default)]
    pub saved_at_ns: u128,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// The guest TSC's offset from the host's (KVM_VCPU_TSC_OFFSET), where
    /// KVM has the attribute: a migration's destination then moves the
    /// clocks on as the kernel's KVM documentation describes.
    #[serde(default)]
    pub tsc_offset: Option<u64>,
}

/// The VM's own KVM state: the in-kernel irqchip, the PIT and kvmclock.
/// It stands beside the devices' states, which the devices own.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// What the state frame carries: the VM's own state and every device's,
/// keyed by device id (the stream never names a device type).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub vm: VmState,
    pub devices: devices::DeviceStates,
}

impl MachineState {
    /// A state frame's payload, decoded (`name`: the stream, for errors).
    pub fn decode(payload: &[u8], name: &str) -> Result<MachineState> {
        decode_state(payload, name, "machine")
    }
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(format!("{what}: {e}"))
}

/// The MSRs worth saving: KVM's list, less those this vCPU refuses to read.
/// IA32_TSC comes first and the TSC deadline last, as they must be restored.
pub fn msr_list(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    let t = std::time::Instant::now();
    let Ok(list) = kvm_fd.get_msr_index_list() else {
        return Vec::new();
    };
    let candidates = list.as_slice().len();
    let mut ok: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .ok()
            .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
                == Some(1)
        })
        .collect();
    const TSC: u32 = 0x10;
    const TSC_DEADLINE: u32 = 0x6e0;
    ok.sort_by_key(|&i| match i {
        TSC => 0,
        TSC_DEADLINE => 2,
        _ => 1,
    });
    tracing::debug!(
        "MSR list: {} of {candidates} readable, probed in {:?}",
        ok.len(),
        t.elapsed()
    );
    ok
}

pub fn save_vcpu(vcpu: &VcpuFd, id: u32, msrs: &[u32]) -> Result<VcpuState> {
    let mut entries = Vec::new();
    for chunk in msrs.chunks(64) {
        let mut m = Msrs::from_entries(
            &chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|e| Error::Kvm(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut m).map_err(kvm("KVM_GET_MSRS"))?;
        entries.extend_from_slice(&m.as_slice()[..n]);
    }
    Ok(VcpuState {
        id,
        saved_at_ns: crate::clock::now_ns(),
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        msrs: entries,
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        tsc_offset: crate::clock::tsc_offset(vcpu),
    })
}

/// Reads every vCPU's and device's state and writes it back, on a VM that
/// has not run yet (a migration's destination, before the stream comes);
/// returns how long that took (ns): about what saving the state at the
/// source and restoring it here will cost inside the downtime.
pub fn time_state_round_trip(vm: &VmFd, vcpus: &[VcpuFd], msrs: &[u32]) -> Result<u64> {
    let t = std::time::Instant::now();
    for (id, vcpu) in vcpus.iter().enumerate() {
        let mut s = save_vcpu(vcpu, id as u32, msrs)?;
        // not the TSC: KVM would take the real restore's TSC write, if
        // within a second of this one, as meant to match it, and keep this
        // one's offset instead
        s.msrs.retain(|m| m.index != IA32_TSC);
        restore_vcpu(vcpu, &s, None)?;
    }
    let d = save_vm_state(vm)?;
    restore_vm_state(vm, &d)?;
    Ok(t.elapsed().as_nanos() as u64)
}

/// How far vCPU 0's TSC now is from where it should be (its saved value
/// plus the real time since, at the guest's rate), for the log: a wrong
/// offset shows as an error the size of the stall.
fn tsc_continuity(vcpu: &VcpuFd, saved: &Option<(u64, u128)>, tsc_khz: u64) -> String {
    let Some((tsc, at)) = *saved else {
        return String::new();
    };
    let Ok(now) = guest_tsc(vcpu) else {
        return String::new();
    };
    if tsc_khz == 0 {
        return String::new();
    }
    let elapsed_ns = crate::clock::now_ns().saturating_sub(at) as f64;
    let expected = tsc as f64 + elapsed_ns * tsc_khz as f64 / 1e6;
    let error_us = (now as f64 - expected) / tsc_khz as f64 * 1e3;
    format!("; vCPU 0 TSC continuity error {error_us:.0} us")
}

/// Both clocks KVM_GET_CLOCK must have read for the documented migration
/// of the TSC: host CLOCK_REALTIME and host TSC, paired with kvmclock.
const CLOCK_PAIRS: u32 = kvm_bindings::KVM_CLOCK_REALTIME | kvm_bindings::KVM_CLOCK_HOST_TSC;

/// Moves kvmclock and every vCPU's TSC on by the real time since the
/// source read them, as the kernel's KVM documentation (vcpu attribute
/// KVM_VCPU_TSC_OFFSET) describes: KVM_SET_CLOCK with KVM_CLOCK_REALTIME
/// advances kvmclock by the CLOCK_REALTIME that passed; then each offset
/// becomes ofs_src - (guest_src - guest_dst) * freq + (tsc_src - tsc_dst), so
/// the guest TSC keeps its relation to kvmclock. Returns the time moved on
/// (ns).
fn move_clocks_on(
    vm: &VmFd,
    vcpus: &[VcpuFd],
    offsets: &[u64],
    src: &kvm_clock_data,
    tsc_khz: u64,
) -> Result<u64> {
    let mut clock = kvm_clock_data {
        clock: src.clock,
        realtime: src.realtime,
        flags: kvm_bindings::KVM_CLOCK_REALTIME,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(kvm("KVM_SET_CLOCK (realtime)"))?;
    clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    if clock.flags & kvm_bindings::KVM_CLOCK_HOST_TSC == 0 {
        return Err(Error::Kvm("KVM_GET_CLOCK gave no host TSC".into()));
    }
    let advanced_ns = clock.clock.wrapping_sub(src.clock);
    let advanced_cycles = ns_to_cycles(advanced_ns, tsc_khz);
    for (id, (vcpu, &ofs)) in vcpus.iter().zip(offsets).enumerate() {
        let moved = ofs
            .wrapping_add(advanced_cycles)
            .wrapping_add(src.host_tsc.wrapping_sub(clock.host_tsc));
        crate::clock::set_tsc_offset(vcpu, id as u32, moved)?;
    }
    Ok(advanced_ns)
}

/// Restores a vCPU in the order KVM needs: MP state, registers, FPU/XSAVE,
/// then the LAPIC, then the MSRs (TSC first, TSC deadline last), then events.
/// With `live` (the TSC's kHz), the guest's TSC moves on by the real time
/// since the state was read, in the same KVM_SET_MSRS (an ioctl is slow
/// on a nested host, and this is inside the downtime); returns that time
/// in ns.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState, live: Option<u64>) -> Result<u64> {
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: the kvm_xsave came from KVM_GET_XSAVE of the same size; KVM
    // reads no more than the struct holds.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let mut gap = 0;
    let mut msrs = std::borrow::Cow::Borrowed(&s.msrs);
    if let Some(tsc_khz) = live.filter(|_| s.saved_at_ns > 0) {
        gap = crate::clock::now_ns().saturating_sub(s.saved_at_ns) as u64;
        let cycles = ns_to_cycles(gap, tsc_khz);
        match msrs.to_mut().iter_mut().find(|m| m.index == IA32_TSC) {
            Some(tsc) => tsc.data = tsc.data.wrapping_add(cycles),
            // a list without the TSC (not KVM's): moved on once restored
            None => gap = 0,
        }
    }
    for chunk in msrs.chunks(64) {
        let m = Msrs::from_entries(chunk).map_err(|e| Error::Kvm(format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&m).map_err(kvm("KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(Error::Kvm(format!(
                "vCPU {}: KVM_SET_MSRS refused MSR {:#x}",
                s.id, chunk[n].index
            )));
        }
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    if gap == 0 && live.is_some() && s.saved_at_ns > 0 {
        gap = crate::clock::now_ns().saturating_sub(s.saved_at_ns) as u64;
        advance_tsc(vcpu, gap, live.unwrap_or(0))?;
    }
    Ok(gap)
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

pub fn save_vm_state(vm: &VmFd) -> Result<VmState> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

pub fn restore_vm_state(vm: &VmFd, d: &VmState) -> Result<()> {
    for chip in [&d.pic_master, &d.pic_slave, &d.ioapic] {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&d.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let mut clock = d.clock;
    // only the clock value is restored; the flags describe the source host
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

/// Moves a restored vCPU's TSC on by `elapsed`.
fn advance_tsc(vcpu: &VcpuFd, elapsed_ns: u64, tsc_khz: u64) -> Result<()> {
    let msrs = tsc_msr(guest_tsc(vcpu)?.wrapping_add(ns_to_cycles(elapsed_ns, tsc_khz)))?;
    vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS IA32_TSC"))?;
    Ok(())
}

/// What a snapshot wrote.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SnapshotReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub pages_written: u64,
    pub pages_zero: u64,
    /// From the pause to the end of writing.
    pub paused_ms: f64,
}

/// Writes the stream for a paused VM to `dir/snapshot.nfv` (through a
/// temporary file: a failed snapshot leaves nothing behind). The guest's
/// memory is in there: the directory is made 0700, the files 0600, and
/// the temporary is created new (O_EXCL, O_NOFOLLOW: a link planted at
/// its name is refused, never followed).
pub fn write(
    dir: &Path,
    config: &SnapshotConfig,
    mem: &GuestRam,
    vcpus: &[VcpuState],
    machine: &MachineState,
) -> Result<(PathBuf, u64, u64, u64)> {
    let err = |e: std::io::Error| Error::Device(format!("snapshot {}: {e}", dir.display()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    let path = dir.join("snapshot.nfv");
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".snapshot.nfv.{}.{nonce}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<(u64, u64, u64)> {
        use std::os::unix::fs::OpenOptionsExt;
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        let file = std::io::BufWriter::with_capacity(1 << 20, created);
        let mut w = Writer::new(file)?;
        w.frame(
            Kind::Config,
            &serde_json::to_vec(config).expect("serialisable"),
        )?;
        // the pages a migration's first round sends (the guest is paused):
        // only pages ever touched are read (reading a hole of the memfd
        // would allocate it), zero ones found in place and left out
        let scan = crate::page_walk::first_round_pages(mem);
        let pages = crate::page_walk::send_part(
            mem,
            &mut w,
            &scan.bitmaps,
            (0, 1),
            false,
            None,
            &std::sync::atomic::AtomicU64::new(0),
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        // (not written: found zero, or never touched)
        let (written, zero) = (
            pages.sent,
            pages.zero + scan.zero_pages + scan.untouched_pages,
        );
        w.frame(Kind::DeviceState, &encode_state(machine))?;
        for v in vcpus {
            w.frame(Kind::VcpuState, &encode_state(v))?;
        }
        let (file, bytes) = w.finish()?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok((bytes, written, zero))
    })();
    match result {
        Ok((bytes, written, zero)) => {
            if let Err(e) = std::fs::rename(&tmp, &path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(err(e));
            }
            // the rename is durable once the directory is
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok((path, bytes, written, zero))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(err(e))
        }
    }
}

/// State frames are postcard (serde, binary), as devices' states are: the
/// kvm-bindings structures serialise as byte strings, which JSON spelled
/// out as numbers, several times larger and slower to parse inside the
/// downtime (BENCHMARKS.md). The configuration frame stays JSON (read
/// once, before).
pub fn encode_state<T: serde::Serialize>(state: &T) -> Vec<u8> {
    devices::state::encode(state)
}

fn decode_state<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    name: &str,
    what: &str,
) -> Result<T> {
    postcard::from_bytes(payload).map_err(|e| stream_error(name, format!("{what} state: {e}")))
}

fn stream_error(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("snapshot {name}: {e}"))
}

/// The snapshot stream of `dir` (a directory, or the stream file itself).
pub fn stream_path(from: &Path) -> PathBuf {
    if from.is_dir() {
        from.join("snapshot.nfv")
    } else {
        from.to_path_buf()
    }
}

/// A stream being restored (a snapshot file or a migration connection),
/// positioned after its Config frame.
pub struct RestoreSource {
    pub name: String,
    reader: Reader<Box<dyn std::io::Read + Send>>,
    /// A migration's other streams: pages only, applied in parallel.
    extra: Vec<Reader<Box<dyn std::io::Read + Send>>>,
    /// The guest's CPU features, from the stream's configuration.
    pub cpu_features: Vec<crate::cpuid::FeatureWord>,
    /// The ivshmem region the guest is attached to, from the configuration.
    pub ivshmem: Option<crate::shared_region::IvshmemIdentity>,
    /// A live migration: the guest's clocks advance by the real time that
    /// passed between reading its state and restoring it. A snapshot
    /// restores the clocks as they were: the guest continues exactly there.
    pub live: bool,
    /// A migration's destination answers each Sync frame through this
    /// (stream index, sequence number) once it has applied what came
    /// before it; without one (a file) Sync frames are skipped.
    pub on_sync: Option<SyncAnswer>,
}

/// See `RestoreSource::on_sync`.
pub type SyncAnswer = std::sync::Arc<dyn Fn(usize, u64) + Send + Sync>;

/// A Sync frame's sequence number.
fn sync_seq(f: &migration::Frame, name: &str) -> Result<u64> {
    f.payload
        .as_slice()
        .try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| stream_error(name, format!("frame {}: malformed Sync frame", f.index)))
}

impl RestoreSource {
    /// Starts reading `input` (a keyed stream with `key`: a migration's
    /// with a token); returns the source and its configuration.
    pub fn new(
        name: &str,
        input: Box<dyn std::io::Read + Send>,
        key: Option<migration::StreamKey>,
    ) -> Result<(RestoreSource, SnapshotConfig)> {
        let mut reader = match key {
            Some(k) => Reader::keyed(input, k),
            None => Reader::new(input),
        }
        .map_err(|e| stream_error(name, e))?;
        let config: SnapshotConfig = match reader.next_frame().map_err(|e| stream_error(name, e))? {
            Some(f) if f.kind == Kind::Config => serde_json::from_slice(&f.payload)
                .map_err(|e| stream_error(name, format!("config frame: {e}")))?,
            _ => {
                return Err(stream_error(
                    name,
                    "the stream does not start with its configuration",
                ))
            }
        };
        Ok((
            RestoreSource {
                name: name.to_string(),
                reader,
                extra: Vec::new(),
                live: false,
                on_sync: None,
                cpu_features: config.cpu_features.clone(),
                ivshmem: config.ivshmem.clone(),
            },
            config,
        ))
    }

    /// Adds one of a migration's other streams (pages only).
    pub fn add_stream(
        &mut self,
        input: Box<dyn std::io::Read + Send>,
        key: Option<migration::StreamKey>,
    ) -> Result<()> {
        let n = self.extra.len() + 1;
        let reader = match key {
            Some(k) => Reader::keyed(input, k),
            None => Reader::new(input),
        }
        .map_err(|e| stream_error(&format!("{} stream {n}", self.name), e))?;
        self.extra.push(reader);
        Ok(())
    }

    /// Opens a snapshot file.
    pub fn open(path: &Path) -> Result<(RestoreSource, SnapshotConfig)> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| stream_error(&name, e))?;
        RestoreSource::new(
            &name,
            Box::new(std::io::BufReader::with_capacity(1 << 20, file)),
            None,
        )
    }
}

/// Applies the rest of a stream to a freshly created, not yet running VM.
/// Writes a Pages or ZeroPages frame's pages into guest memory.
fn apply_pages(f: &migration::Frame, mem: &GuestRam, name: &str) -> Result<()> {
    if f.kind == Kind::Pages {
        for (gpa, data) in f.pages().map_err(|e| stream_error(name, e))? {
            mem.write_slice(data, GuestAddress(gpa))
                .map_err(|e| stream_error(name, format!("page {gpa:#x}: {e}")))?;
        }
    } else {
        let zero = [0u8; PAGE_SIZE];
        for gpa in f.zero_pages().map_err(|e| stream_error(name, e))? {
            mem.write_slice(&zero, GuestAddress(gpa))
                .map_err(|e| stream_error(name, format!("page {gpa:#x}: {e}")))?;
        }
    }
    Ok(())
}

/// Every frame is verified before it is used and the VM runs only if the
/// whole stream was read, so a corrupt or cut stream never runs; the
/// devices' states are checked (`check_devices`) as soon as they are read.
/// Returns
/// the devices' states (for the devices to check and take) and when the
/// stream's end was read (CLOCK_REALTIME ns).
pub fn apply(
    src: &mut RestoreSource,
    vm: &VmFd,
    mem: &GuestRam,
    vcpus: &[VcpuFd],
    tsc_khz: u64,
    check_devices: &dyn Fn(&devices::DeviceStates) -> Result<()>,
) -> Result<(devices::DeviceStates, u128)> {
    let name = src.name.clone();
    let name = name.as_str();
    tracing::debug!("restore: applying {name}");
    let mut devices = None;
    let mut restored = vec![false; vcpus.len()];
    let mut offsets: Vec<Option<u64>> = vec![None; vcpus.len()];
    // vCPU 0's TSC as saved, and when: the continuity check after
    let mut saved_tsc = None;
    let mut clock_gap = 0u64;
    let extra = std::mem::take(&mut src.extra);
    let live = src.live;
    let on_sync = src.on_sync.clone();
    let on_sync = on_sync.as_deref();
    std::thread::scope(|scope| -> Result<()> {
        // the other streams' pages, each on a thread of its own (they hold
        // disjoint pages, so the order between streams does not matter)
        let workers: Vec<_> = extra
            .into_iter()
            .enumerate()
            .map(|(i, mut reader)| {
                let what = format!("{name} stream {}", i + 1);
                scope.spawn(move || -> Result<()> {
                    while let Some(f) = reader.next_frame().map_err(|e| stream_error(&what, e))? {
                        match f.kind {
                            Kind::Pages | Kind::ZeroPages => {
                                apply_pages(&f, mem, &what)?;
                                reader.recycle(f.payload);
                            }
                            Kind::Sync => {
                                let seq = sync_seq(&f, &what)?;
                                if let Some(answer) = on_sync {
                                    answer(i + 1, seq);
                                }
                            }
                            Kind::End => {}
                            other => {
                                return Err(stream_error(
                                    &what,
                                    format!("a {other:?} frame in a pages-only stream"),
                                ))
                            }
                        }
                    }
                    tracing::debug!("restore: {what} read to its end");
                    Ok(())
                })
            })
            .collect();
        let main = (|| -> Result<()> {
            while let Some(f) = src.reader.next_frame().map_err(|e| stream_error(name, e))? {
                match f.kind {
                    Kind::Config => {}
                    Kind::Pages | Kind::ZeroPages => {
                        if live && f.kind == Kind::Pages {
                            crate::fault::at(crate::fault::Phase::FirstRound);
                        }
                        apply_pages(&f, mem, name)?;
                        src.reader.recycle(f.payload);
                    }
                    Kind::DeviceState => {
                        if src.live {
                            crate::fault::at(crate::fault::Phase::StopAndCopy);
                        }
                        let m = decode_state::<MachineState>(&f.payload, name, "machine")?;
                        // every device checks its state as soon as it
                        // comes (the devices take it once all is read)
                        check_devices(&m.devices)?;
                        devices = Some(m);
                    }
                    Kind::VcpuState => {
                        let s: VcpuState = decode_state(&f.payload, name, "vCPU")?;
                        let vcpu = vcpus.get(s.id as usize).ok_or_else(|| {
                            stream_error(
                                name,
                                format!("state of vCPU {} for a VM of {}", s.id, vcpus.len()),
                            )
                        })?;
                        // the documented way when both hosts can (the
                        // clocks move on once all is restored), else the
                        // TSC moves on in its own MSR write
                        let by_offset = live
                            && s.tsc_offset.is_some()
                            && devices
                                .as_ref()
                                .is_some_and(|d| d.vm.clock.flags & CLOCK_PAIRS == CLOCK_PAIRS)
                            && crate::clock::tsc_offset(vcpu).is_some();
                        let gap = restore_vcpu(vcpu, &s, (live && !by_offset).then_some(tsc_khz))?;
                        clock_gap = clock_gap.max(gap);
                        if let (true, Some(ofs)) = (by_offset, s.tsc_offset) {
                            offsets[s.id as usize] = Some(ofs);
                        }
                        if s.id == 0 {
                            saved_tsc = s
                                .msrs
                                .iter()
                                .find(|m| m.index == IA32_TSC)
                                .map(|m| (m.data, s.saved_at_ns));
                        }
                        restored[s.id as usize] = true;
                    }
                    Kind::Sync => {
                        let seq = sync_seq(&f, name)?;
                        if let Some(answer) = on_sync {
                            answer(0, seq);
                        }
                    }
                    Kind::End => {}
                }
            }
            Ok(())
        })();
        // every stream read to its end, or the first failure
        let mut outcome = main;
        for w in workers {
            let r = w
                .join()
                .unwrap_or_else(|_| Err(stream_error(name, "a stream thread panicked")));
            if outcome.is_ok() {
                outcome = r;
            }
        }
        outcome
    })?;
    let stream_end_ns = crate::clock::now_ns();
    tracing::debug!("restore: stream {name} read to its end");
    let MachineState {
        vm: mut vm_state,
        devices,
    } = devices.ok_or_else(|| stream_error(name, "no device state"))?;
    if let Some(id) = restored.iter().position(|r| !r) {
        return Err(stream_error(name, format!("no state for vCPU {id}")));
    }
    let offsets: Option<Vec<u64>> = offsets.into_iter().collect();
    match offsets {
        Some(offsets) if live => {
            restore_vm_state(vm, &vm_state)?;
            let moved = move_clocks_on(vm, vcpus, &offsets, &vm_state.clock, tsc_khz)?;
            tracing::info!(
                "guest clocks moved on by {:.3} ms across the hand-over (KVM_CLOCK_REALTIME, KVM_VCPU_TSC_OFFSET){}",
                moved as f64 / 1e6,
                tsc_continuity(&vcpus[0], &saved_tsc, tsc_khz)
            );
        }
        _ => {
            // kvmclock too, by the same stall
            vm_state.clock.clock += clock_gap;
            restore_vm_state(vm, &vm_state)?;
            if live {
                tracing::info!(
                    "guest clocks moved on by {:.3} ms across the hand-over (TSC by KVM_SET_MSRS, kvmclock by KVM_SET_CLOCK){}",
                    clock_gap as f64 / 1e6,
                    tsc_continuity(&vcpus[0], &saved_tsc, tsc_khz)
                );
            }
        }
    }
    Ok((devices, stream_end_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineState {
        let mut devices = devices::DeviceStates::new();
        devices.insert(
            "com1".into(),
            devices::DeviceBlob {
                kind: "uart-16550".into(),
                version: 1,
                data: b"queued".to_vec(),
            },
        );
        MachineState {
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: kvm_clock_data {
                    clock: 123_456_789,
                    ..Default::default()
                },
            },
            devices,
        }
    }

    #[test]
    fn state_frames_round_trip_and_every_truncation_is_refused() {
        let bytes = encode_state(&machine());
        let back: MachineState = decode_state(&bytes, "test", "machine").unwrap();
        assert_eq!(back.vm.clock.clock, 123_456_789);
        assert_eq!(back.devices["com1"].data, b"queued");
        for cut in 0..bytes.len() {
            let e = decode_state::<MachineState>(&bytes[..cut], "test", "machine");
            assert!(e.is_err(), "cut at {cut} of {}", bytes.len());
        }
    }

    #[test]
    fn garbage_state_frames_never_panic() {
        // (a checksummed frame from a source that knows the token: decoding
        // may refuse it or not, but must not panic)
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in [0usize, 1, 7, 64, 300, 5000] {
            for _ in 0..200 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let _ = decode_state::<VcpuState>(&bytes, "test", "vCPU");
                let _ = decode_state::<MachineState>(&bytes, "test", "machine");
            }
        }
    }
}
