//! The injector of the external-interrupt latency measurement: a host
//! thread (pinned, SCHED_FIFO) sends interrupts to the latency-probe guest
//! through an irqfd, one at a time, each stamped with its send time in the
//! guest's TSC, and waits for the guest's acknowledgement before the next
//! (two interrupts on one vector would merge).

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::memory::GuestRam;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// IOAPIC pin the guest routes to its vector.
pub const IRQ_GSI: u32 = 10;
/// The shared ring: seq, ack, send_tsc, ready (u64 each).
pub const RING_GPA: u64 = 0x30_0000;
const READY: u64 = 0x6e66_7672;

#[derive(Debug, Clone)]
pub struct IrqBenchSpec {
    pub count: u64,
    /// Pause before each interrupt, so the guest is halted when it comes.
    pub interval: Duration,
    pub cpu: Option<usize>,
    pub priority: Option<i32>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IrqBenchResult {
    pub sent: u64,
    pub acked: u64,
    /// How the guest TSC offset was learned.
    pub tsc_offset_from: String,
    pub error: Option<String>,
}

fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// guest TSC = host TSC + offset (wrapping). From the KVM_VCPU_TSC_OFFSET
/// attribute where the host has it, else from reading the guest's TSC MSR
/// beside the host's (off by the ioctl's duration).
pub fn tsc_offset(vcpu: &VcpuFd) -> (u64, &'static str) {
    if let Some(offset) = crate::clock::tsc_offset(vcpu) {
        return (offset, "KVM_VCPU_TSC_OFFSET");
    }
    let before = host_tsc();
    if let Ok(tsc) = crate::clock::guest_tsc(vcpu) {
        let after = host_tsc();
        let mid = before + (after - before) / 2;
        return (tsc.wrapping_sub(mid), "IA32_TSC read beside the host TSC");
    }
    (0, "unknown (assumed 0)")
}

fn read(mem: &GuestRam, off: u64) -> u64 {
    mem.read_obj(GuestAddress(RING_GPA + off)).unwrap_or(0)
}

/// Runs the injector until `count` interrupts are acknowledged, the VM
/// stops, or the guest stops answering.
pub fn inject(
    mem: GuestRam,
    evt: EventFd,
    offset: u64,
    spec: IrqBenchSpec,
    stop: Arc<AtomicBool>,
    mut result: IrqBenchResult,
) -> IrqBenchResult {
    if let Some(cpu) = spec.cpu {
        if let Err(e) = rt::pin_current_thread(&[cpu]) {
            tracing::warn!("irq injector: {e}");
        }
    }
    if let Some(p) = spec.priority {
        if let Err(e) = rt::set_current_thread_fifo(p) {
            tracing::warn!("irq injector: {e}");
        }
    }
    let wait = |cond: &dyn Fn() -> bool, what: &str| -> Result<(), String> {
        let t = Instant::now();
        while !cond() {
            if stop.load(Ordering::Acquire) {
                return Err(format!("the VM stopped while {what}"));
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("no answer from the guest for 10 s while {what}"));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    };
    if let Err(e) = wait(
        &|| read(&mem, 24) == READY,
        "waiting for the guest to be ready",
    ) {
        result.error = Some(e);
        return result;
    }
    for seq in 1..=spec.count {
        if let Err(e) = wait(
            &|| read(&mem, 8) == seq - 1,
            &format!("waiting for the ack of {}", seq - 1),
        ) {
            result.error = Some(e);
            break;
        }
        result.acked = seq - 1;
        std::thread::sleep(spec.interval);
        let send = host_tsc().wrapping_add(offset);
        let ok = mem.write_obj(send, GuestAddress(RING_GPA + 16)).is_ok();
        fence(Ordering::SeqCst);
        if !ok || mem.write_obj(seq, GuestAddress(RING_GPA)).is_err() {
            result.error = Some("writing the ring in guest memory failed".into());
            break;
        }
        if let Err(e) = evt.write(1) {
            result.error = Some(format!("irqfd write: {e}"));
            break;
        }
        result.sent = seq;
    }
    if result.error.is_none()
        && wait(&|| read(&mem, 8) == spec.count, "waiting for the last ack").is_ok()
    {
        result.acked = spec.count;
    }
    result
}
