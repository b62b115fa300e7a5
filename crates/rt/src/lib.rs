//! Host facts and real-time tuning: CPU lists, thread affinity, SCHED_FIFO,
//! NUMA placement, and what kind of KVM this host offers.

pub mod host;
pub mod sampler;

use std::fs;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum RtError {
    #[error("bad CPU list {list:?}: {why}")]
    BadCpuList { list: String, why: String },
    #[error("CPU {cpu} does not exist or is offline (online CPUs: {online})")]
    NoSuchCpu { cpu: usize, online: String },
    #[error("NUMA node {node} does not exist ({path}: {source})")]
    NoSuchNode {
        node: u32,
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Os {
        what: String,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, RtError>;

fn os_error(what: impl Into<String>) -> RtError {
    RtError::Os {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// Parses a Linux CPU list ("0-3,8,10-11") into CPU numbers in the order given.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>> {
    let bad = |why: &str| RtError::BadCpuList {
        list: list.to_string(),
        why: why.to_string(),
    };
    let mut cpus = Vec::new();
    if list.trim().is_empty() {
        return Err(bad("it is empty"));
    }
    for part in list.trim().split(',') {
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| bad(&format!("{s:?} is not a CPU number")))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(bad(&format!("range {a}-{b} runs backwards")));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    let mut seen = cpus.clone();
    seen.sort_unstable();
    if seen.windows(2).any(|w| w[0] == w[1]) {
        return Err(bad("a CPU is listed twice"));
    }
    Ok(cpus)
}

/// The online CPUs of this host.
pub fn online_cpus() -> Result<Vec<usize>> {
    let path = "/sys/devices/system/cpu/online";
    let text = fs::read_to_string(path).map_err(|source| RtError::Os {
        what: format!("reading {path}"),
        source,
    })?;
    parse_cpu_list(text.trim())
}

/// Checks that every CPU in `cpus` is online.
pub fn check_cpus_exist(cpus: &[usize]) -> Result<()> {
    let online = online_cpus()?;
    for &cpu in cpus {
        if !online.contains(&cpu) {
            let online = fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
            return Err(RtError::NoSuchCpu {
                cpu,
                online: online.trim().to_string(),
            });
        }
    }
    Ok(())
}

/// The kernel thread id of the calling thread.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Restricts the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(RtError::NoSuchCpu {
                cpu,
                online: "beyond CPU_SETSIZE".into(),
            });
        }
        // SAFETY: CPU_SET writes inside `set`; cpu < CPU_SETSIZE (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(os_error(format!(
            "pinning thread {} to CPUs {cpus:?}",
            current_tid()
        )));
    }
    Ok(())
}

/// Makes the calling thread SCHED_FIFO at `priority` (1-99).
pub fn set_current_thread_fifo(priority: i32) -> Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param; 0 is this thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        return Err(os_error(format!(
            "setting SCHED_FIFO priority {priority} on thread {} (needs root or CAP_SYS_NICE, and an RT budget)",
            current_tid()
        )));
    }
    Ok(())
}

/// Scheduling policy and priority of a thread, read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ThreadSched {
    pub policy: String,
    pub priority: i32,
    pub cpus_allowed: String,
}

/// Reads policy, priority and allowed CPUs of thread `tid` of this process.
pub fn thread_sched(tid: i32) -> Result<ThreadSched> {
    // SAFETY: sched_getscheduler only reads the thread's policy.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    if policy < 0 {
        return Err(os_error(format!("reading the policy of thread {tid}")));
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is valid for the write.
    if unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
        return Err(os_error(format!("reading the priority of thread {tid}")));
    }
    let status_path = format!("/proc/self/task/{tid}/status");
    let status = fs::read_to_string(&status_path).map_err(|source| RtError::Os {
        what: format!("reading {status_path}"),
        source,
    })?;
    let cpus_allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("")
        .trim()
        .to_string();
    let policy = policy_name(policy).to_string();
    Ok(ThreadSched {
        policy,
        priority: param.sched_priority,
        cpus_allowed,
    })
}

/// Where the calling thread runs: policy, priority and allowed CPUs, from
/// the scheduler's calls alone (no /proc: threads whose seccomp filter
/// opens no file use it).
pub fn current_thread_sched() -> Result<CurrentSched> {
    // SAFETY: sched_getscheduler only reads the calling thread's policy.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(os_error("reading this thread's policy".to_string()));
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is valid for the write.
    if unsafe { libc::sched_getparam(0, &mut param) } != 0 {
        return Err(os_error("reading this thread's priority".to_string()));
    }
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Err(os_error("reading this thread's CPUs".to_string()));
    }
    let cpus = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads inside `set`; the index is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    Ok(CurrentSched {
        policy: policy_name(policy).to_string(),
        priority: param.sched_priority,
        cpus,
    })
}

/// The calling thread's scheduling, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentSched {
    pub policy: String,
    pub priority: i32,
    pub cpus: Vec<usize>,
}

fn policy_name(policy: i32) -> &'static str {
    match policy {
        libc::SCHED_OTHER => "SCHED_OTHER",
        libc::SCHED_FIFO => "SCHED_FIFO",
        libc::SCHED_RR => "SCHED_RR",
        libc::SCHED_BATCH => "SCHED_BATCH",
        libc::SCHED_IDLE => "SCHED_IDLE",
        _ => "other",
    }
}

/// The CPUs of NUMA node `node`.
pub fn node_cpus(node: u32) -> Result<Vec<usize>> {
    let path = format!("/sys/devices/system/node/node{node}/cpulist");
    let text =
        fs::read_to_string(&path).map_err(|source| RtError::NoSuchNode { node, path, source })?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    parse_cpu_list(text.trim())
}

/// Binds the pages of `[addr, addr + len)` to NUMA node `node` (MPOL_BIND).
pub fn bind_memory_to_node(addr: usize, len: usize, node: u32) -> Result<()> {
    node_cpus(node)?;
    const MPOL_BIND: libc::c_long = 2;
    const MPOL_MF_STRICT: libc::c_long = 1;
    const MPOL_MF_MOVE: libc::c_long = 2;
    let mask: [u64; 16] = {
        let mut m = [0u64; 16];
        m[(node / 64) as usize % 16] = 1 << (node % 64);
        m
    };
    // SAFETY: mbind only changes the memory policy of [addr, addr + len) (it
    // fails on addresses that are not mapped); `mask` outlives the call and
    // maxnode matches its size in bits.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            MPOL_BIND,
            mask.as_ptr(),
            (mask.len() * 64) as libc::c_ulong,
            MPOL_MF_STRICT | MPOL_MF_MOVE,
        )
    };
    if rc != 0 {
        return Err(os_error(format!(
            "binding guest memory to NUMA node {node}"
        )));
    }
    Ok(())
}

/// What kind of KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmKind {
    /// VT-x or AMD-V visible: guest code runs on the CPU.
    Hardware,
    /// No vmx/svm but the paravirtual `kvm_pvm` module: guest code is emulated.
    NestedPvm,
    /// No vmx/svm and no known paravirtual KVM.
    Unknown,
}

impl KvmKind {
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/"))
    }

    /// Detects from a root directory (fixtures in tests).
    pub fn detect_in(root: &Path) -> Self {
        let cpuinfo = fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw {
            KvmKind::Hardware
        } else if root.join("sys/module/kvm_pvm").exists() {
            KvmKind::NestedPvm
        } else {
            KvmKind::Unknown
        }
    }

    /// True where guest instructions are emulated and `lock cmpxchg16b` is
    /// not handled (KVM-HERE.md): CX16 must be hidden from the guest.
    pub fn needs_cx16_hidden(self) -> bool {
        self != KvmKind::Hardware
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_bad_ones_are_named() {
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_cpu_list("3,1").unwrap(), vec![3, 1]);
        for bad in ["", "a", "3-1", "1,1", "1-"] {
            let e = parse_cpu_list(bad).unwrap_err().to_string();
            assert!(e.contains("bad CPU list"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_cpu_beyond_the_host_is_refused() {
        let e = check_cpus_exist(&[4096]).unwrap_err().to_string();
        assert!(e.contains("CPU 4096 does not exist"), "{e}");
        check_cpus_exist(&[0]).unwrap();
    }

    #[test]
    fn thread_sched_reads_this_thread() {
        let s = thread_sched(current_tid()).unwrap();
        assert!(!s.cpus_allowed.is_empty());
    }
}
