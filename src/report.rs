//! What `nfvisor run` shows: plain text by default, one JSON document with --json.

use anyhow::Result;
use guests::protocol::{GuestOutput, ProtocolError};
use vmm::{RunReport, StopReason};

use crate::exit_code;

/// The process exit code for how the VM ended.
pub fn exit_code_of(stop: &StopReason) -> u8 {
    match stop {
        StopReason::GuestExit { status } if *status <= exit_code::GUEST_STATUS_MAX => *status as u8,
        StopReason::GuestExit { .. } => exit_code::GUEST_STATUS_HIGH,
        StopReason::Shutdown { .. }
        | StopReason::InternalError { .. }
        | StopReason::FailEntry { .. } => exit_code::GUEST_CRASH,
        StopReason::SystemEvent { .. } => exit_code::GUEST_NO_STATUS,
        StopReason::Migrated { .. } => 0,
        StopReason::Error { .. } => exit_code::VMM_RUNTIME,
    }
}

fn describe(stop: &StopReason) -> String {
    match stop {
        StopReason::GuestExit { status } => format!("guest exited with status {status}"),
        StopReason::Shutdown { vcpu, state } => {
            format!(
                "guest CRASHED: vCPU {vcpu} shut down (triple fault or shutdown request); {state}"
            )
        }
        StopReason::InternalError { vcpu, state } => {
            format!("guest CRASHED: KVM cannot continue vCPU {vcpu}: {state}")
        }
        StopReason::FailEntry {
            vcpu,
            hardware_reason,
        } => {
            format!("vCPU {vcpu} failed to enter the guest (hardware reason {hardware_reason:#x})")
        }
        StopReason::Migrated { to } => format!("guest migrated to {to}; it runs there now"),
        StopReason::SystemEvent { vcpu, event } => {
            format!("guest requested system event {event} on vCPU {vcpu}")
        }
        StopReason::Error { vcpu, message } => format!("VMM error on vCPU {vcpu}: {message}"),
    }
}

pub fn print_text(r: &RunReport, guest: &Result<GuestOutput, ProtocolError>, exit_stats: bool) {
    println!();
    println!("nfvisor: {}", describe(&r.stop));
    println!(
        "nfvisor: {} via {:?}, {} MiB, {} vCPU(s), host KVM {:?}{}, set-up {} us, ran {} ms",
        r.kernel,
        r.boot.protocol,
        r.memory_mib,
        r.vcpus.len(),
        r.kvm_kind,
        if r.cx16_hidden { " (CX16 hidden)" } else { "" },
        r.timings.setup_us,
        r.timings.run_us / 1000
    );
    println!(
        "nfvisor: seccomp {}, {} thread(s) filtered",
        seccomp::mode(),
        seccomp::filtered_threads()
    );
    match guest {
        Ok(g) => {
            for h in g.histograms() {
                let (div, unit) = if h.unit == "ns" {
                    (1000.0, "us")
                } else {
                    (1.0, h.unit.as_str())
                };
                let f = |v: u64| format!("{:.1}", v as f64 / div);
                println!(
                    "nfvisor: {} {}: n={} min {} avg {} p50 {} p99 {} p99.9 {} max {} {unit}{}",
                    g.guest.as_deref().unwrap_or("guest"),
                    h.series,
                    h.count,
                    f(h.min),
                    f(h.avg),
                    f(h.p50),
                    f(h.p99),
                    f(h.p999),
                    f(h.max),
                    if h.overflow > 0 {
                        format!(" ({} beyond the histogram)", h.overflow)
                    } else {
                        String::new()
                    }
                );
            }
        }
        Err(e) => println!("nfvisor: guest output not understood: {e}"),
    }
    for w in &r.warnings {
        println!("nfvisor: warning: {w}");
    }
    if r.unknown_accesses > 0 {
        println!(
            "nfvisor: {} guest accesses to unknown ports/MMIO ignored",
            r.unknown_accesses
        );
    }
    if r.console_dropped > 0 {
        println!(
            "nfvisor: {} console bytes dropped (console thread fell behind)",
            r.console_dropped
        );
    }
    for s in r.settings.iter().filter(|s| !s.applied) {
        println!("nfvisor: setting {} NOT applied: {}", s.name, s.detail);
    }
    for (dev, threads) in &r.device_threads {
        for t in threads.iter().filter(|t| !t.settings.is_empty()) {
            println!(
                "{dev} {} tid {} cpus {:?} {} {}",
                t.thread, t.tid, t.cpus, t.policy, t.priority
            );
            for s in t.settings.iter().filter(|s| !s.applied) {
                println!(
                    "nfvisor: setting {dev} {}.{} NOT applied: {}",
                    t.thread, s.name, s.detail
                );
            }
        }
    }
    if exit_stats {
        for v in &r.vcpus {
            println!(
                "vcpu{} tid {} cpu {:?} {}: {} exits to the VMM; thread user {} ms, system {} ms, guest {} ms of {} ms",
                v.id,
                v.tid,
                v.host_cpu,
                v.sched.as_ref().map(|s| format!("{} {}", s.policy, s.priority)).unwrap_or_default(),
                v.exits.total,
                v.user_ms,
                v.system_ms,
                v.guest_ms,
                v.wall_ms
            );
            for (name, t) in &v.exits.by_reason {
                println!(
                    "  {name:<16} {:>9}  handled in min {} avg {} p99 {} max {} ns",
                    t.count, t.min_ns, t.avg_ns, t.p99_ns, t.max_ns
                );
            }
            for (kind, map) in [
                ("pio", &v.exits.pio_by_device),
                ("mmio", &v.exits.mmio_by_device),
            ] {
                for (dev, t) in map {
                    println!("  {kind} {dev:<14} {:>9}  avg {} ns", t.count, t.avg_ns);
                }
            }
            let interesting = [
                "exits",
                "halt_exits",
                "io_exits",
                "mmio_exits",
                "irq_exits",
                "signal_exits",
                "halt_successful_poll",
                "halt_wakeup",
                "insn_emulation",
                "irq_injections",
            ];
            let kvm: Vec<String> = interesting
                .iter()
                .filter_map(|k| v.kvm_stats.get(*k).map(|n| format!("{k}={n}")))
                .collect();
            if !kvm.is_empty() {
                println!("  kvm: {}", kvm.join(" "));
            }
        }
    }
}

pub fn print_json(
    r: &RunReport,
    bundled: Option<&str>,
    guest: &Result<GuestOutput, ProtocolError>,
    code: u8,
) -> Result<()> {
    let guest_json = match guest {
        Ok(g) => serde_json::json!({
            "name": g.guest,
            "bundled": bundled,
            "end_status": g.end_status,
            "header": g.header,
            "histograms": g.histograms(),
            "records": g.records.iter().filter(|r| r.kind != "hist").collect::<Vec<_>>(),
            "text": g.text,
        }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let doc = serde_json::json!({
        "nfvisor": env!("CARGO_PKG_VERSION"),
        "exit_code": code,
        "vm": r,
        "vcpu_threads": r.vcpus.iter().map(|v| serde_json::json!({"vcpu": v.id, "tid": v.tid})).collect::<Vec<_>>(),
        "device_threads": r.device_threads,
        "guest": guest_json,
        "seccomp": {
            "mode": seccomp::mode().to_string(),
            "filtered_threads": seccomp::filtered_threads(),
        },
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

pub fn print_exits(r: &bench::exits::ExitsReport) {
    println!(
        "exit round trips, as the guest measures them (RDTSC), {} per op, {} interleaved runs each; TSC {} kHz; KVM {:?}",
        r.n, r.rounds, r.tsc_khz, r.kvm_kind
    );
    println!(
        "{:<8} {:<6} {:>12} {:>22} {:>10} {:>9}",
        "variant", "op", "p50 cycles", "spread (min..max)", "p50 us", "x floor"
    );
    for (v, ops) in &r.results {
        for (op, o) in ops {
            let ratio = r.ratio_to_floor[op][v];
            println!(
                "{:<8} {:<6} {:>12.0} {:>22} {:>10.2} {:>9.3}",
                format!("{v:?}").to_lowercase(),
                op,
                o.p50_cycles.median,
                format!("{:.0}..{:.0}", o.p50_cycles.min, o.p50_cycles.max),
                o.p50_ns.median / 1000.0,
                ratio
            );
        }
    }
    if let Some(q) = &r.qemu_version {
        println!("qemu: {q}");
    }
}

pub fn print_startup(r: &bench::startup::StartupReport) {
    let f = |s: &bench::Spread| {
        format!(
            "median {:.0} (min {:.0}, max {:.0})",
            s.median, s.min, s.max
        )
    };
    println!(
        "{} runs of `nfvisor run --guest hello` ({} MiB guest)",
        r.runs, r.guest_memory_mib
    );
    println!(
        "  main() to first guest instruction: {} us",
        f(&r.to_first_instruction_us)
    );
    println!(
        "  spawn to hello exit:               {} us",
        f(&r.to_hello_exit_us)
    );
    println!(
        "  VMM resident memory (less guest):  {} KiB",
        f(&r.vmm_overhead_kib)
    );
    println!(
        "  guest resident memory:             {} KiB",
        f(&r.guest_resident_kib)
    );
}

pub fn print_latency(r: &bench::latency::LatencyReport) {
    let e = &r.environment;
    println!(
        "host: {} | kernel {} | PREEMPT_RT {} | isolated CPUs: {}",
        e.cpu_model,
        e.kernel,
        if e.preempt_rt { "yes" } else { "no" },
        if e.isolated_cpus.is_empty() {
            "none"
        } else {
            &e.isolated_cpus
        }
    );
    println!("KVM: {:?}: {}", e.kvm, e.note);
    if e.sched_rt_runtime_us != "-1" {
        println!(
            "RT throttling is on (sched_rt_runtime_us = {}): a busy SCHED_FIFO thread is stopped for the rest of each period; `nfvisor host tune --apply` turns it off",
            e.sched_rt_runtime_us
        );
    }
    for m in &r.results {
        println!();
        println!(
            "{} latency, {} profile{}",
            m.metric.name(),
            m.profile,
            match m.metric {
                bench::latency::Metric::Timer => format!(", period {} us", r.period_us),
                bench::latency::Metric::Irq => format!(
                    ", one interrupt every {} us through an irqfd, host injector beside the vCPU",
                    r.period_us
                ),
                bench::latency::Metric::Preempt => format!(
                    ", lost time per 1 ms window, gaps above {} ns",
                    m.threshold_ns.unwrap_or(0)
                ),
            }
        );
        println!(
            "  {:<12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "us", "samples", "min", "avg", "p50", "p99", "p99.9", "p99.99", "max"
        );
        let row = |name: &str, s: &bench::latency::Series| {
            println!(
                "  {:<12} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name,
                s.samples,
                s.min_us,
                s.avg_us,
                s.p50_us,
                s.p99_us,
                s.p999_us,
                s.p9999_us,
                s.max_us
            )
        };
        row("guest", &m.guest);
        if let Some(h) = &m.host {
            row("host", h);
        }
        if let Some(g) = &m.guest_gaps {
            row("guest gaps", g);
        }
        if let Some(g) = &m.host_gaps {
            row("host gaps", g);
        }
        if let Some(added) = &m.vmm_added_us {
            println!(
                "  VMM+KVM add: avg {:+.1} us, p99 {:+.1} us, max {:+.1} us",
                added["avg"], added["p99"], added["max"]
            );
        }
        for v in &m.verdicts {
            println!(
                "  {} {}: {}",
                if v.pass { "PASS" } else { "FAIL" },
                v.target,
                v.figure
            );
        }
    }
}

/// A migration's downtime steps (`downtime_phases`, ms after the pause) in
/// one line.
pub fn downtime_steps(phases: &serde_json::Value) -> String {
    let step = |k: &str| phases[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "vCPUs parked {:.2}, last pages {:.2}, state {:.2}, stream read there {:.2}, READY {:.2}, GO there {:.2}, running {:.2}",
        step("paused_ms"),
        step("last_pages_ms"),
        step("state_ms"),
        step("dest_stream_end_ms"),
        step("ready_ms"),
        step("dest_go_ms"),
        step("dest_resumed_ms"),
    )
}
