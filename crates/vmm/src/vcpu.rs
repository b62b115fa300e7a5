//! A vCPU: its initial state, and the run loop, which reads like the
//! hardware: exit -> device -> resume. `handle_exit` is a free function of
//! (I/O context, exit), so it is tested with synthetic exits, without KVM.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::{Bus, GuestExit};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::exits::{ExitReason, ExitStats};

/// How many distinct unknown addresses are remembered (and logged once
/// each); past that a guest sweeping the address space costs a counter,
/// not memory or log lines.
pub const REMEMBERED_UNKNOWN: usize = 256;

/// Unknown port or MMIO addresses: each of the first
/// [`REMEMBERED_UNKNOWN`] is logged once, then everything is only counted.
#[derive(Default)]
pub struct UnknownAccesses {
    seen: Mutex<HashSet<(bool, u64)>>,
    count: AtomicU64,
    /// Accesses to addresses that were not remembered (the set was full).
    beyond: AtomicU64,
}

impl UnknownAccesses {
    fn note(&self, pio: bool, addr: u64, write: bool, len: usize) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&(pio, addr)) {
            return;
        }
        if seen.len() >= REMEMBERED_UNKNOWN {
            drop(seen);
            if self.beyond.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    "the guest touched more than {REMEMBERED_UNKNOWN} distinct unknown addresses: further ones are counted, not logged"
                );
            }
            return;
        }
        seen.insert((pio, addr));
        let space = if pio { "port" } else { "MMIO address" };
        let dir = if write { "write to" } else { "read from" };
        tracing::warn!("guest {dir} unknown {space} {addr:#x} ({len} bytes) ignored; reads return all-ones (logged once)");
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Distinct unknown addresses remembered (at most
    /// [`REMEMBERED_UNKNOWN`]), for the report.
    pub fn distinct(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Accesses to addresses beyond the remembered ones.
    pub fn beyond(&self) -> u64 {
        self.beyond.load(Ordering::Relaxed)
    }
}

/// What the exit handler needs: the buses and the shared VM signals.
pub struct IoContext {
    pub pio: Bus,
    pub mmio: Bus,
    pub guest_exit: Arc<GuestExit>,
    pub unknown: UnknownAccesses,
    /// The VM's dirty rings (when it has them): a vCPU whose ring is full
    /// empties them itself.
    pub dirty_rings: std::sync::OnceLock<Arc<crate::dirty_ring::DirtyRings>>,
}

/// What to do after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    Resume,
    /// The guest asked to end (debug-exit port).
    GuestExit(u32),
    Shutdown,
    FailEntry(u64),
    InternalError,
    SystemEvent(u32),
    Unhandled(String),
}

/// Handles one exit; returns its reason, the bus index of the device that
/// served it (PIO/MMIO), and what to do next.
pub fn handle_exit(io: &IoContext, exit: VcpuExit) -> (ExitReason, Option<usize>, Flow) {
    match exit {
        VcpuExit::IoOut(port, data) => {
            let dev = access(&io.pio, &io.unknown, true, port as u64, Access::Write(data));
            let flow = match io.guest_exit.status() {
                Some(s) => Flow::GuestExit(s),
                None => Flow::Resume,
            };
            (ExitReason::PioOut, dev, flow)
        }
        VcpuExit::IoIn(port, data) => {
            let dev = access(&io.pio, &io.unknown, true, port as u64, Access::Read(data));
            (ExitReason::PioIn, dev, Flow::Resume)
        }
        VcpuExit::MmioWrite(addr, data) => {
            let dev = access(&io.mmio, &io.unknown, false, addr, Access::Write(data));
            (ExitReason::MmioWrite, dev, Flow::Resume)
        }
        VcpuExit::MmioRead(addr, data) => {
            let dev = access(&io.mmio, &io.unknown, false, addr, Access::Read(data));
            (ExitReason::MmioRead, dev, Flow::Resume)
        }
        VcpuExit::Hlt => (ExitReason::Hlt, None, Flow::Resume),
        VcpuExit::IrqWindowOpen => (ExitReason::IrqWindowOpen, None, Flow::Resume),
        VcpuExit::Intr => (ExitReason::Interrupted, None, Flow::Resume),
        VcpuExit::Shutdown => (ExitReason::Shutdown, None, Flow::Shutdown),
        VcpuExit::FailEntry(reason, _cpu) => (ExitReason::FailEntry, None, Flow::FailEntry(reason)),
        VcpuExit::InternalError => (ExitReason::InternalError, None, Flow::InternalError),
        VcpuExit::SystemEvent(kind, _) => (ExitReason::SystemEvent, None, Flow::SystemEvent(kind)),
        VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => {
            // emptied here and now, so the guest runs on (the migration
            // collects what was harvested at its next round)
            let emptied = io.dirty_rings.get().map(|r| r.on_full());
            if !matches!(emptied, Some(Ok(()))) {
                if let Some(Err(e)) = emptied {
                    tracing::warn!("emptying a full dirty ring: {e}");
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            (ExitReason::DirtyRingFull, None, Flow::Resume)
        }
        other => (
            ExitReason::Other,
            None,
            Flow::Unhandled(format!("{other:?}")),
        ),
    }
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

#[inline]
fn access(bus: &Bus, unknown: &UnknownAccesses, pio: bool, addr: u64, a: Access) -> Option<usize> {
    match bus.lookup(addr) {
        Some(hit) => {
            match a {
                Access::Read(data) => hit.device.read(hit.offset, data),
                Access::Write(data) => hit.device.write(hit.offset, data),
            }
            Some(hit.index)
        }
        None => {
            match a {
                Access::Read(data) => {
                    data.fill(0xff);
                    unknown.note(pio, addr, false, data.len());
                }
                Access::Write(data) => unknown.note(pio, addr, true, data.len()),
            }
            None
        }
    }
}

/// Serves one exit that came at `t0`, timed into `stats`; the flow it asks
/// for.
fn serve(io: &IoContext, stats: &mut ExitStats, exit: VcpuExit, t0: Instant) -> Flow {
    let (reason, device, flow) = handle_exit(io, exit);
    stats.record(reason, device, t0.elapsed().as_nanos() as u64);
    flow
}

/// How a vCPU's run loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEnd {
    /// Another vCPU ended the VM; this one was asked to stop.
    Stopped,
    Flow(Flow),
    Error(String),
}

/// Runs `vcpu` until the guest ends, an error, or `stop` is set; while
/// `pause` is set it calls `on_pause`, which parks the thread. The first
/// KVM_RUN of the BSP is timed into `first_run` (start-up benchmark).
#[allow(clippy::too_many_arguments)]
pub fn run_loop(
    vcpu: &mut VcpuFd,
    io: &IoContext,
    stop: &AtomicBool,
    pause: &AtomicBool,
    on_pause: &mut dyn FnMut(&mut VcpuFd),
    stats: &mut ExitStats,
    first_run: Option<&Mutex<Option<Instant>>>,
) -> VcpuEnd {
    if let Some(slot) = first_run {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
    // the last exit was handed to a device: KVM completes it (the port
    // read's value into a register, the instruction pointer past the
    // access) only on the next KVM_RUN
    let mut access_pending = false;
    loop {
        if stop.load(Ordering::Acquire) {
            return VcpuEnd::Stopped;
        }
        if pause.load(Ordering::Acquire) {
            if access_pending {
                // complete it before the state can be saved: a state saved
                // in the middle would repeat the access where it is
                // restored (the KVM API documentation's advice: re-enter
                // with immediate_exit set, which runs no further guest
                // instruction). The rest of an instruction may exit again
                // (a split MMIO access, string I/O): each such exit is
                // served, until KVM returns EINTR.
                vcpu.set_kvm_immediate_exit(1);
                let mut flow = Flow::Resume;
                for _ in 0..64 {
                    match vcpu.run() {
                        Ok(exit) => {
                            flow = serve(io, stats, exit, Instant::now());
                            if flow != Flow::Resume {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                vcpu.set_kvm_immediate_exit(0);
                access_pending = false;
                if flow != Flow::Resume {
                    return VcpuEnd::Flow(flow);
                }
            }
            on_pause(vcpu);
            continue;
        }
        let result = vcpu.run();
        let t0 = Instant::now();
        access_pending = false;
        match result {
            Ok(exit) => {
                access_pending = matches!(
                    exit,
                    VcpuExit::IoIn(..)
                        | VcpuExit::IoOut(..)
                        | VcpuExit::MmioRead(..)
                        | VcpuExit::MmioWrite(..)
                );
                let flow = serve(io, stats, exit, t0);
                if flow != Flow::Resume {
                    return VcpuEnd::Flow(flow);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                stats.record(
                    ExitReason::Interrupted,
                    None,
                    t0.elapsed().as_nanos() as u64,
                );
            }
            Err(e) => return VcpuEnd::Error(format!("KVM_RUN failed: {e}")),
        }
    }
}

/// The floor of the exit benchmark: a bare KVM_RUN loop that does nothing
/// but return to the guest. It keeps COM1 bytes (so the guest's results can
/// be read) and stops at the debug-exit port; no bus, no accounting, no lock.
pub fn run_loop_floor(vcpu: &mut VcpuFd, console: &mut Vec<u8>) -> Result<u32, String> {
    const COM1: u16 = 0x3f8;
    const LSR: u16 = COM1 + 5;
    const DEBUG_EXIT: u16 = 0xf4;
    loop {
        match vcpu.run() {
            // the guest's UART set-up writes a divisor (0x01) to this port
            // too: keep only text
            Ok(VcpuExit::IoOut(COM1, data)) if data[0] >= b'\t' => console.push(data[0]),
            Ok(VcpuExit::IoOut(DEBUG_EXIT, data)) => return Ok(data[0] as u32),
            Ok(VcpuExit::IoIn(LSR, data)) => data[0] = 0x60,
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(
                VcpuExit::IoOut(..)
                | VcpuExit::MmioWrite(..)
                | VcpuExit::Hlt
                | VcpuExit::IrqWindowOpen
                | VcpuExit::Intr,
            ) => {}
            Ok(other) => return Err(format!("floor loop: guest ended with {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("floor loop: KVM_RUN failed: {e}")),
        }
    }
}

/// MSRs every vCPU starts with (as a freshly reset CPU with fast strings
/// and MTRRs enabled, write-back by default).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_MISC_ENABLE, 1), // fast strings
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// Sets the boot MSRs one by one so a refused MSR is named, not guessed.
pub fn set_boot_msrs(vcpu: &VcpuFd, id: u32) -> Vec<u32> {
    let mut refused = Vec::new();
    for entry in boot_msrs() {
        let ok = Msrs::from_entries(&[entry])
            .ok()
            .and_then(|m| vcpu.set_msrs(&m).ok())
            .is_some_and(|n| n == 1);
        if !ok {
            tracing::warn!(
                "vCPU {id}: KVM refused MSR {:#x}; left at its reset value",
                entry.index
            );
            refused.push(entry.index);
        }
    }
    refused
}

/// x87/SSE state of a reset CPU.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// LINT0 as ExtINT and LINT1 as NMI, as firmware leaves a PC's LAPIC.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic()?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::{DebugExit, Sink};

    fn io() -> IoContext {
        let exit = Arc::new(GuestExit::default());
        let mut pio = Bus::new();
        pio.insert(0xf4, 4, Arc::new(DebugExit::new(exit.clone())))
            .unwrap();
        pio.insert(0x510, 4, Arc::new(Sink::new("bench-port")))
            .unwrap();
        IoContext {
            pio,
            mmio: Bus::new(),
            guest_exit: exit,
            unknown: UnknownAccesses::default(),
            dirty_rings: Default::default(),
        }
    }

    #[test]
    fn unknown_port_reads_all_ones_and_is_counted_once_logged() {
        let io = io();
        let mut data = [0u8; 2];
        let (reason, dev, flow) = handle_exit(&io, VcpuExit::IoIn(0x2f0, &mut data));
        assert_eq!((reason, dev, flow), (ExitReason::PioIn, None, Flow::Resume));
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0u8; 4];
        handle_exit(&io, VcpuExit::MmioRead(0xc000_0000, &mut data));
        assert_eq!(data, [0xff; 4]);
        handle_exit(&io, VcpuExit::IoOut(0x2f0, &[1]));
        assert_eq!(io.unknown.count(), 3);
        assert_eq!(io.unknown.distinct(), 2);
    }

    #[test]
    fn a_sweep_of_unknown_addresses_is_remembered_up_to_the_cap_then_counted() {
        let u = UnknownAccesses::default();
        for addr in 0..100_000u64 {
            u.note(false, 0xd000_0000 + addr * 8, true, 4);
        }
        assert_eq!(u.count(), 100_000);
        assert_eq!(u.distinct(), REMEMBERED_UNKNOWN);
        assert_eq!(u.beyond(), 100_000 - REMEMBERED_UNKNOWN as u64);
        // a remembered address is still only counted
        u.note(false, 0xd000_0000, false, 4);
        assert_eq!(
            (u.count(), u.beyond()),
            (100_001, 100_000 - REMEMBERED_UNKNOWN as u64)
        );
    }

    #[test]
    fn debug_exit_write_ends_the_guest_with_its_status() {
        let io = io();
        let (_, dev, flow) = handle_exit(&io, VcpuExit::IoOut(0x510, &[1, 0, 0, 0]));
        assert_eq!((dev, flow), (Some(1), Flow::Resume));
        let (reason, dev, flow) = handle_exit(&io, VcpuExit::IoOut(0xf4, &[9, 0, 0, 0]));
        assert_eq!(
            (reason, dev, flow),
            (ExitReason::PioOut, Some(0), Flow::GuestExit(9))
        );
    }

    #[test]
    fn shutdown_and_failed_entry_end_the_vcpu() {
        let io = io();
        assert_eq!(handle_exit(&io, VcpuExit::Shutdown).2, Flow::Shutdown);
        assert_eq!(
            handle_exit(&io, VcpuExit::FailEntry(7, 0)).2,
            Flow::FailEntry(7)
        );
    }
}
