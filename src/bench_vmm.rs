//! What the benchmarks that set nfvisor beside QEMU share: QEMU's machine
//! for the bundled guests, finding a program, and a VMM's own CPU time.

use std::process::Command;

/// QEMU's arguments for a bundled guest on a q35 machine with nothing but
/// what the guest needs (no firmware devices, the exit port of the guests'
/// protocol); `serial` is QEMU's -serial value. Its threads are named
/// (debug-threads: the vCPU's is "CPU 0/KVM"), or `vmm_cpu_ns` could not
/// tell the vCPU from the VMM's own threads.
pub fn qemu_q35<'a>(c: &'a mut Command, serial: &str) -> &'a mut Command {
    c.args(["-name", "nfvbench,debug-threads=on"])
        .args(["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64"])
        .args(["-M", "q35", "-nodefaults", "-nographic", "-no-reboot"])
        .args(["-serial", serial])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
}

/// The VMM's own CPU so far, in ns: all of its non-vCPU threads' time
/// (user and system, /proc/PID/task/TID/schedstat, ns precision) plus its
/// vCPU threads' user time (`stat`, clock ticks: exit handling in the VMM;
/// their system time is the guest's, emulated on a nested host).
pub fn vmm_cpu_ns(pid: u32, vcpu: &dyn Fn(&str) -> bool) -> u64 {
    thread_cpu_ns(pid, vcpu).iter().map(|t| t.1).sum()
}

/// `vmm_cpu_ns` by thread (TID, ns): a thread's time leaves the sum when
/// it ends, so a caller that watches a VMM to its end keeps each thread's
/// last figure.
pub fn thread_cpu_ns(pid: u32, vcpu: &dyn Fn(&str) -> bool) -> Vec<(u32, u64)> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let ns = if vcpu(comm.trim()) {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            // utime is field 14; `rest` starts at field 3
            let utime: u64 = rest
                .split_whitespace()
                .nth(11)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            utime * 1_000_000_000 / hz
        } else {
            let sched = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            sched
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.push((tid, ns));
    }
    out
}

/// `program`'s path on PATH.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.is_file())
}
