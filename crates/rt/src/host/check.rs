//! `nfvisor host check`: every KVM4NFV recommendation, checked, with the fix.

use std::collections::BTreeMap;

use super::{format_cpu_list, format_cpu_mask, parse_cpu_mask, read_opt, selected_choice, HostFs};
use crate::parse_cpu_list;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Info,
    Warn,
    Fail,
    /// Only firmware settings can decide it: never a pass.
    Firmware,
    /// The host answered something that cannot be read (a corrupt file).
    Error,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub group: &'static str,
    pub id: &'static str,
    pub status: Status,
    pub found: String,
    pub recommends: String,
    /// The exact fix, when there is one.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub root: String,
    pub rt_cpus: Vec<usize>,
    /// Where the RT CPU list came from: "--cpus", "isolated" or "none".
    pub rt_cpus_from: &'static str,
    pub kvm: &'static str,
    pub findings: Vec<Finding>,
}

impl CheckReport {
    pub fn count(&self, s: Status) -> usize {
        self.findings.iter().filter(|f| f.status == s).count()
    }

    pub fn get(&self, id: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.id == id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("--cpus: the CPU list is empty")]
    EmptyCpuList,
    #[error("--cpus: {0}")]
    BadCpuList(#[from] crate::RtError),
    #[error("--cpus: CPU {cpu} does not exist on this host (online: {online})")]
    NoSuchCpu { cpu: usize, online: String },
    #[error("{path}: {why}")]
    Corrupt { path: String, why: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

struct Findings(Vec<Finding>);

impl Findings {
    fn add(
        &mut self,
        group: &'static str,
        id: &'static str,
        status: Status,
        found: impl Into<String>,
        recommends: impl Into<String>,
        fix: Option<String>,
    ) {
        self.0.push(Finding {
            group,
            id,
            status,
            found: found.into(),
            recommends: recommends.into(),
            fix,
        });
    }
}

/// The kernel command line as key -> value ("" for bare flags).
fn cmdline(fs: &dyn HostFs) -> BTreeMap<String, String> {
    read_opt(fs, "/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (w.to_string(), String::new()),
        })
        .collect()
}

/// CPUs named by a parameter such as `isolcpus=managed_irq,domain,2-5`.
fn param_cpus(value: &str) -> Vec<usize> {
    let list: Vec<&str> = value
        .split(',')
        .filter(|t| t.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect();
    parse_cpu_list(&list.join(",")).unwrap_or_default()
}

fn covers(have: &[usize], want: &[usize]) -> bool {
    want.iter().all(|c| have.contains(c))
}

fn online(fs: &dyn HostFs) -> Vec<usize> {
    read_opt(fs, "/sys/devices/system/cpu/online")
        .and_then(|s| parse_cpu_list(&s).ok())
        .unwrap_or_default()
}

/// The RT CPUs: those given, else the isolated ones.
pub fn resolve_rt_cpus(
    fs: &dyn HostFs,
    cpus: Option<&str>,
) -> Result<(Vec<usize>, &'static str), HostError> {
    match cpus {
        Some(list) => {
            if list.trim().is_empty() {
                return Err(HostError::EmptyCpuList);
            }
            let cpus = parse_cpu_list(list)?;
            let on = online(fs);
            let possible = read_opt(fs, "/sys/devices/system/cpu/possible")
                .and_then(|s| parse_cpu_list(&s).ok())
                .unwrap_or_else(|| on.clone());
            if let Some(&cpu) = cpus.iter().find(|c| !possible.contains(c)) {
                return Err(HostError::NoSuchCpu {
                    cpu,
                    online: format_cpu_list(&on),
                });
            }
            Ok((cpus, "--cpus"))
        }
        None => {
            let isolated = read_opt(fs, "/sys/devices/system/cpu/isolated").unwrap_or_default();
            match parse_cpu_list(&isolated) {
                Ok(c) if !c.is_empty() => Ok((c, "isolated")),
                _ => Ok((Vec::new(), "none")),
            }
        }
    }
}

fn cpuinfo_flags(fs: &dyn HostFs) -> (Vec<String>, String) {
    let info = read_opt(fs, "/proc/cpuinfo").unwrap_or_default();
    let flags = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let vendor = info
        .lines()
        .find(|l| l.starts_with("vendor_id"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    (flags, vendor)
}

/// Runs every check. `cpus` is the user's `--cpus` (None: the isolated CPUs).
pub fn check(fs: &dyn HostFs, cpus: Option<&str>) -> Result<CheckReport, HostError> {
    let (rt, rt_from) = resolve_rt_cpus(fs, cpus)?;
    let rt_list = format_cpu_list(&rt);
    let cl = cmdline(fs);
    let (flags, vendor) = cpuinfo_flags(fs);
    let has = |f: &str| flags.iter().any(|x| x == f);
    let mut f = Findings(Vec::new());

    if rt.is_empty() {
        f.add(
            "cpus",
            "cpus.rt-cpus",
            Status::Fail,
            "no RT CPUs given and none isolated",
            "name the CPUs meant for real-time vCPUs",
            Some("nfvisor host check --cpus LIST (or isolate CPUs at boot)".into()),
        );
    }

    // ---------------------------------------------------------------- kernel
    let version = read_opt(fs, "/proc/sys/kernel/version").unwrap_or_default();
    if read_opt(fs, "/sys/kernel/realtime").as_deref() == Some("1")
        || version.contains("PREEMPT_RT")
    {
        f.add(
            "kernel",
            "kernel.preempt-rt",
            Status::Pass,
            "PREEMPT_RT kernel",
            "a PREEMPT_RT kernel",
            None,
        );
    } else {
        let model = read_opt(fs, "/sys/kernel/debug/sched/preempt")
            .and_then(|m| selected_choice(&m).map(str::to_string))
            .map(|m| format!(" (preemption model: {m})"))
            .unwrap_or_default();
        let kind = if version.contains("PREEMPT_DYNAMIC") {
            "PREEMPT_DYNAMIC"
        } else if version.contains("PREEMPT") {
            "PREEMPT"
        } else {
            "no forced preemption"
        };
        f.add("kernel", "kernel.preempt-rt", Status::Warn, format!("{kind}, not PREEMPT_RT{model}"), "a PREEMPT_RT host kernel for microsecond latencies", Some("install and boot a PREEMPT_RT kernel (Debian: apt-get install linux-image-rt-amd64)".into()));
    }
    let cover_param = |f: &mut Findings, id: &'static str, key: &str, why: &str| {
        let have = cl.get(key).map(|v| param_cpus(v)).unwrap_or_default();
        let fix = Some(format!(
            "add {key}={rt_list} to the kernel command line and reboot"
        ));
        if rt.is_empty() {
            f.add(
                "kernel",
                id,
                Status::Info,
                format!(
                    "{key}={}",
                    cl.get(key).map(String::as_str).unwrap_or("(unset)")
                ),
                why,
                None,
            );
        } else if covers(&have, &rt) {
            f.add(
                "kernel",
                id,
                Status::Pass,
                format!("{key} covers {rt_list}"),
                why,
                None,
            );
        } else {
            f.add(
                "kernel",
                id,
                Status::Warn,
                format!(
                    "{key}={} does not cover RT CPUs {rt_list}",
                    cl.get(key).map(String::as_str).unwrap_or("(unset)")
                ),
                why,
                fix,
            );
        }
    };
    cover_param(
        &mut f,
        "kernel.nohz_full",
        "nohz_full",
        "nohz_full on the RT CPUs: about one tick per second instead of HZ, each tick a VM exit",
    );
    cover_param(
        &mut f,
        "kernel.rcu_nocbs",
        "rcu_nocbs",
        "rcu_nocbs on the RT CPUs: RCU callbacks run elsewhere",
    );
    let idle_ok = cl.get("idle").map(String::as_str) == Some("poll")
        || cl.get("processor.max_cstate").map(String::as_str) == Some("1")
        || cl.get("intel_idle.max_cstate").map(String::as_str) == Some("0");
    f.add("kernel", "kernel.idle", if idle_ok { Status::Pass } else { Status::Warn },
        format!("idle={} processor.max_cstate={} intel_idle.max_cstate={}", cl.get("idle").map(String::as_str).unwrap_or("(unset)"), cl.get("processor.max_cstate").map(String::as_str).unwrap_or("(unset)"), cl.get("intel_idle.max_cstate").map(String::as_str).unwrap_or("(unset)")),
        "idle=poll or processor.max_cstate=1: no deep C-state exit latency on wake-up",
        (!idle_ok).then(|| "add idle=poll (or processor.max_cstate=1 intel_idle.max_cstate=0) to the kernel command line".to_string()));
    if vendor == "GenuineIntel" {
        let ok = cl.get("intel_pstate").map(String::as_str) == Some("disable");
        f.add(
            "kernel",
            "kernel.pstate",
            if ok { Status::Pass } else { Status::Warn },
            format!(
                "intel_pstate={}",
                cl.get("intel_pstate")
                    .map(String::as_str)
                    .unwrap_or("(unset)")
            ),
            "intel_pstate=disable: no P-state driver changing frequency under the RT CPUs",
            (!ok).then(|| "add intel_pstate=disable to the kernel command line".to_string()),
        );
    } else {
        f.add(
            "kernel",
            "kernel.pstate",
            Status::Info,
            format!(
                "{vendor}: amd_pstate={}",
                cl.get("amd_pstate")
                    .map(String::as_str)
                    .unwrap_or("(unset)")
            ),
            "a fixed frequency: the performance governor on the RT CPUs (checked under cpus)",
            None,
        );
    }
    let tsc_ok = cl.get("tsc").map(String::as_str) == Some("reliable");
    f.add("kernel", "kernel.tsc", if tsc_ok { Status::Pass } else { Status::Warn }, format!("tsc={}", cl.get("tsc").map(String::as_str).unwrap_or("(unset)")), "tsc=reliable: no clocksource watchdog re-checking a constant, invariant TSC", (!tsc_ok).then(|| "add tsc=reliable to the kernel command line (only where the TSC is constant and nonstop)".to_string()));
    let hps = cl
        .get("default_hugepagesz")
        .cloned()
        .unwrap_or_else(|| "(unset, 2M)".into());
    f.add(
        "kernel",
        "kernel.default_hugepagesz",
        if hps == "1G" {
            Status::Pass
        } else {
            Status::Info
        },
        format!("default_hugepagesz={hps}"),
        "default_hugepagesz=1G hugepagesz=1G for guest memory",
        (hps != "1G").then(|| {
            "add default_hugepagesz=1G hugepagesz=1G to the kernel command line".to_string()
        }),
    );
    let iommu_on = cl.get("intel_iommu").map(String::as_str) == Some("on")
        || cl.get("amd_iommu").map(String::as_str) == Some("on")
        || fs
            .list("/sys/class/iommu")
            .map(|l| !l.is_empty())
            .unwrap_or(false);
    let pt = cl.get("iommu").map(String::as_str) == Some("pt");
    f.add(
        "kernel",
        "kernel.iommu",
        if iommu_on && pt {
            Status::Pass
        } else {
            Status::Info
        },
        format!(
            "IOMMU {} iommu={}",
            if iommu_on { "on" } else { "off" },
            cl.get("iommu").map(String::as_str).unwrap_or("(unset)")
        ),
        "iommu=pt with the IOMMU on (intel_iommu=on / amd_iommu=on), for device passthrough",
        (!(iommu_on && pt)).then(|| {
            "add iommu=pt intel_iommu=on (or amd_iommu=on) to the kernel command line".to_string()
        }),
    );
    let mce_off = cl.get("mce").map(String::as_str) == Some("off");
    f.add("kernel", "kernel.mce", if mce_off { Status::Pass } else { Status::Info }, format!("mce={}", cl.get("mce").map(String::as_str).unwrap_or("(unset)")), "mce=off as in the KVM4NFV baseline (trades machine-check reporting for no periodic MCE polling)", (!mce_off).then(|| "add mce=off to the kernel command line, if losing MCE reporting is acceptable".to_string()));
    let nsl = cl.contains_key("nosoftlockup");
    f.add(
        "kernel",
        "kernel.nosoftlockup",
        if nsl { Status::Pass } else { Status::Warn },
        if nsl {
            "nosoftlockup set"
        } else {
            "nosoftlockup not set"
        },
        "nosoftlockup: no soft-lockup watchdog on CPUs a FIFO vCPU keeps busy",
        (!nsl).then(|| "add nosoftlockup to the kernel command line".to_string()),
    );

    // ------------------------------------------------------------- isolation
    let isolcpus = cl
        .get("isolcpus")
        .map(|v| param_cpus(v))
        .unwrap_or_default();
    let partitions = cpuset_partitions(fs);
    let part_cpus: Vec<usize> = partitions
        .iter()
        .filter(|p| p.1 == "isolated" || p.1 == "root")
        .flat_map(|p| p.2.clone())
        .collect();
    if !rt.is_empty() {
        let by_isolcpus = covers(&isolcpus, &rt);
        let by_partition = covers(&part_cpus, &rt);
        let status = if by_isolcpus || by_partition {
            Status::Pass
        } else {
            Status::Fail
        };
        let found = format!(
            "isolcpus={}; cgroup v2 cpuset partitions: {}",
            cl.get("isolcpus").map(String::as_str).unwrap_or("(unset)"),
            if partitions.is_empty() {
                "none".to_string()
            } else {
                partitions
                    .iter()
                    .map(|p| format!("{} {} [{}]", p.0, p.1, format_cpu_list(&p.2)))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        f.add("cgroups", "isolation.rt-cpus", status, found, "the RT CPUs isolated from the scheduler: isolcpus, or (modern) a cgroup v2 cpuset partition of type isolated", (status == Status::Fail).then(|| format!("mkdir /sys/fs/cgroup/rt && echo {rt_list} > /sys/fs/cgroup/rt/cpuset.cpus && echo isolated > /sys/fs/cgroup/rt/cpuset.cpus.partition (or boot with isolcpus=managed_irq,domain,{rt_list})")));
        let part_dirs: Vec<&String> = partitions
            .iter()
            .filter(|p| covers(&p.2, &rt))
            .map(|p| &p.0)
            .collect();
        let others: Vec<String> = cgroups_on(fs, &rt)
            .into_iter()
            .filter(|g| !part_dirs.iter().any(|p| g.starts_with(p.as_str())))
            .collect();
        if !fs.exists("/sys/fs/cgroup/cgroup.controllers") {
            f.add(
                "cgroups",
                "cgroups.others-on-rt-cpus",
                Status::Info,
                "no cgroup v2 hierarchy at /sys/fs/cgroup",
                "cgroup v2 with cpuset",
                None,
            );
        } else if others.is_empty() || by_isolcpus {
            f.add("cgroups", "cgroups.others-on-rt-cpus", Status::Pass, "no other cgroup restricts itself to, or is confined away from, the RT CPUs improperly", "only the RT partition schedules on the RT CPUs", None);
        } else {
            f.add(
                "cgroups",
                "cgroups.others-on-rt-cpus",
                Status::Warn,
                format!(
                    "{} cgroup(s) can still schedule on {rt_list}: {}",
                    others.len(),
                    others
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "only the RT partition schedules on the RT CPUs",
                Some(
                    "make the RT CPUs an isolated cpuset partition (other cgroups then lose them)"
                        .into(),
                ),
            );
        }
    }

    // ------------------------------------------------------------------ cpus
    let on = online(fs);
    for &c in &rt {
        if !on.contains(&c) {
            f.add(
                "cpus",
                "cpus.online",
                Status::Fail,
                format!("CPU {c} is offline"),
                "RT CPUs online",
                Some(format!("echo 1 > /sys/devices/system/cpu/cpu{c}/online")),
            );
        }
    }
    if !rt.is_empty() && rt.iter().all(|c| on.contains(c)) {
        f.add(
            "cpus",
            "cpus.online",
            Status::Pass,
            format!("RT CPUs {rt_list} online"),
            "RT CPUs online",
            None,
        );
    }
    let mut siblings = Vec::new();
    for &c in &rt {
        if let Some(s) = read_opt(
            fs,
            &format!("/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list"),
        )
        .and_then(|s| parse_cpu_list(&s).ok())
        {
            siblings.extend(s.into_iter().filter(|&x| x != c));
        }
    }
    if !rt.is_empty() {
        if siblings.is_empty() {
            f.add(
                "cpus",
                "cpus.smt",
                Status::Pass,
                "no SMT siblings share the RT CPUs' cores",
                "SMT off, or the siblings of RT CPUs idle",
                None,
            );
        } else {
            f.add("cpus", "cpus.smt", Status::Warn, format!("SMT siblings of the RT CPUs: {}", format_cpu_list(&siblings)), "SMT off, or the siblings of RT CPUs idle", Some(format!("disable SMT in firmware or `echo off > /sys/devices/system/cpu/smt/control`; or keep CPUs {} idle", format_cpu_list(&siblings))));
        }
    }
    let mut nodes: Vec<u32> = Vec::new();
    for &c in &rt {
        if let Ok(entries) = fs.list(&format!("/sys/devices/system/cpu/cpu{c}")) {
            for e in entries {
                if let Some(n) = e.strip_prefix("node").and_then(|n| n.parse().ok()) {
                    if !nodes.contains(&n) {
                        nodes.push(n);
                    }
                }
            }
        }
    }
    if !rt.is_empty() {
        let mut found = Vec::new();
        let mut reserved_on_rt_node = false;
        for &n in &nodes {
            let mut per_size = Vec::new();
            for size in fs
                .list(&format!("/sys/devices/system/node/node{n}/hugepages"))
                .unwrap_or_default()
            {
                let nr: u64 = read_opt(
                    fs,
                    &format!("/sys/devices/system/node/node{n}/hugepages/{size}/nr_hugepages"),
                )
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
                reserved_on_rt_node |= nr > 0;
                per_size.push(format!("{nr} x {}", size.trim_start_matches("hugepages-")));
            }
            found.push(format!("node {n}: hugepages {}", per_size.join(", ")));
        }
        let status = if nodes.len() > 1 {
            Status::Warn
        } else if reserved_on_rt_node {
            Status::Pass
        } else {
            Status::Warn
        };
        f.add("cpus", "cpus.numa", status, if found.is_empty() { "no NUMA information".to_string() } else { format!("RT CPUs on node(s) {nodes:?}; {}", found.join("; ")) }, "RT CPUs on one NUMA node, with the guest's hugepages reserved on that node", (status != Status::Pass).then(|| format!("echo N > /sys/devices/system/node/node{}/hugepages/hugepages-2048kB/nr_hugepages (or nfvisor host tune --hugepages N)", nodes.first().copied().unwrap_or(0))));
        let mut govs = BTreeMap::new();
        for &c in &rt {
            let g = read_opt(
                fs,
                &format!("/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor"),
            )
            .unwrap_or_else(|| "(no cpufreq)".into());
            govs.entry(g).or_insert_with(Vec::new).push(c);
        }
        let all_perf = govs.keys().all(|g| g == "performance");
        let no_cpufreq = govs.keys().all(|g| g == "(no cpufreq)");
        f.add("cpus", "cpus.governor", if all_perf { Status::Pass } else if no_cpufreq { Status::Info } else { Status::Warn }, govs.iter().map(|(g, c)| format!("{g} on {}", format_cpu_list(c))).collect::<Vec<_>>().join("; "), "the performance governor on the RT CPUs", (!all_perf && !no_cpufreq).then(|| format!("for c in {}; do echo performance > /sys/devices/system/cpu/cpu$c/cpufreq/scaling_governor; done (or nfvisor host tune --apply)", rt.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" "))));
        let mut deep = Vec::new();
        let mut any_idle = false;
        for &c in &rt {
            for s in fs
                .list(&format!("/sys/devices/system/cpu/cpu{c}/cpuidle"))
                .unwrap_or_default()
            {
                let base = format!("/sys/devices/system/cpu/cpu{c}/cpuidle/{s}");
                any_idle = true;
                let name = read_opt(fs, &format!("{base}/name")).unwrap_or_default();
                let latency: u64 = read_opt(fs, &format!("{base}/latency"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let disabled = read_opt(fs, &format!("{base}/disable")).as_deref() == Some("1");
                if !disabled && latency > 2 && name != "POLL" {
                    deep.push(format!("cpu{c} {name} ({latency} us exit)"));
                }
            }
        }
        f.add("cpus", "cpus.cpuidle", if !any_idle { Status::Info } else if deep.is_empty() { Status::Pass } else { Status::Warn }, if !any_idle { "no cpuidle states exposed".to_string() } else if deep.is_empty() { "no deep idle state enabled on the RT CPUs".to_string() } else { format!("deep idle states enabled: {}", deep.iter().take(6).cloned().collect::<Vec<_>>().join(", ")) }, "no idle state deeper than C1 on the RT CPUs", (!deep.is_empty()).then(|| "echo 1 > /sys/devices/system/cpu/cpuN/cpuidle/stateK/disable for each deep state, or boot with idle=poll".to_string()));
    }

    // ------------------------------------------------------------- scheduler
    match fs
        .read("/proc/sys/kernel/sched_rt_runtime_us")
        .map(|s| s.trim().to_string())
    {
        Ok(v) => match v.parse::<i64>() {
            Ok(-1) => f.add(
                "scheduler",
                "sched.rt-throttling",
                Status::Pass,
                "RT throttling off (sched_rt_runtime_us = -1)",
                "RT throttling off",
                None,
            ),
            Ok(n) => f.add(
                "scheduler",
                "sched.rt-throttling",
                Status::Warn,
                format!(
                    "sched_rt_runtime_us = {n}: a FIFO vCPU is stopped for the rest of each period"
                ),
                "RT throttling off",
                Some(
                    "echo -1 > /proc/sys/kernel/sched_rt_runtime_us (or nfvisor host tune --apply)"
                        .into(),
                ),
            ),
            Err(_) => f.add(
                "scheduler",
                "sched.rt-throttling",
                Status::Error,
                format!("cannot parse /proc/sys/kernel/sched_rt_runtime_us: {v:?}"),
                "RT throttling off",
                None,
            ),
        },
        Err(_) => f.add(
            "scheduler",
            "sched.rt-throttling",
            Status::Info,
            "/proc/sys/kernel/sched_rt_runtime_us unreadable",
            "RT throttling off",
            None,
        ),
    }
    match read_opt(fs, "/proc/sys/kernel/timer_migration").as_deref() {
        Some("0") => f.add(
            "scheduler",
            "sched.timer-migration",
            Status::Pass,
            "timer_migration = 0",
            "timers stay on the CPU that armed them",
            None,
        ),
        Some("1") => f.add(
            "scheduler",
            "sched.timer-migration",
            Status::Warn,
            "timer_migration = 1",
            "timers stay on the CPU that armed them",
            Some("echo 0 > /proc/sys/kernel/timer_migration".into()),
        ),
        Some(v) => f.add(
            "scheduler",
            "sched.timer-migration",
            Status::Error,
            format!("cannot parse /proc/sys/kernel/timer_migration: {v:?}"),
            "timer_migration = 0",
            None,
        ),
        None => f.add(
            "scheduler",
            "sched.timer-migration",
            Status::Info,
            "no timer_migration knob",
            "timer_migration = 0",
            None,
        ),
    }
    if !rt.is_empty() {
        match read_opt(fs, "/sys/devices/virtual/workqueue/cpumask") {
            Some(m) => match parse_cpu_mask(&m) {
                Some(wq) => {
                    let bad: Vec<usize> = rt.iter().copied().filter(|c| wq.contains(c)).collect();
                    let fix = format!(
                        "echo {} > /sys/devices/virtual/workqueue/cpumask",
                        format_cpu_mask(
                            &on.iter()
                                .copied()
                                .filter(|c| !rt.contains(c))
                                .collect::<Vec<_>>()
                        )
                    );
                    f.add(
                        "scheduler",
                        "sched.workqueue-cpumask",
                        if bad.is_empty() {
                            Status::Pass
                        } else {
                            Status::Warn
                        },
                        format!(
                            "unbound workqueues may run on CPUs {}",
                            format_cpu_list(&wq)
                        ),
                        "unbound workqueues kept off the RT CPUs",
                        (!bad.is_empty()).then_some(fix),
                    );
                }
                None => f.add(
                    "scheduler",
                    "sched.workqueue-cpumask",
                    Status::Error,
                    format!("cannot parse /sys/devices/virtual/workqueue/cpumask: {m:?}"),
                    "unbound workqueues kept off the RT CPUs",
                    None,
                ),
            },
            None => f.add(
                "scheduler",
                "sched.workqueue-cpumask",
                Status::Info,
                "no workqueue cpumask",
                "unbound workqueues kept off the RT CPUs",
                None,
            ),
        }
        let kthreads = unbound_kthreads_on(fs, &rt);
        f.add(
            "scheduler",
            "sched.kthreads",
            if kthreads.is_empty() {
                Status::Pass
            } else {
                Status::Warn
            },
            if kthreads.is_empty() {
                "no unbound kernel thread may run on the RT CPUs".to_string()
            } else {
                format!(
                    "{} unbound kernel threads may run on the RT CPUs: {}",
                    kthreads.len(),
                    kthreads
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            "kernel threads kept off the RT CPUs (isolcpus=domain or a cpuset partition does it)",
            (!kthreads.is_empty()).then(|| {
                format!(
                    "isolate {rt_list} (isolcpus=domain,{rt_list} or an isolated cpuset partition)"
                )
            }),
        );
    }
    let watchdog = read_opt(fs, "/proc/sys/kernel/watchdog");
    let nmi = read_opt(fs, "/proc/sys/kernel/nmi_watchdog");
    let wd_off = watchdog.as_deref() != Some("1") && nmi.as_deref() != Some("1");
    f.add("scheduler", "sched.watchdog", if wd_off { Status::Pass } else { Status::Warn }, format!("watchdog={} nmi_watchdog={}", watchdog.as_deref().unwrap_or("(none)"), nmi.as_deref().unwrap_or("(none)")), "lockup watchdogs off on RT hosts (their timers and NMIs interrupt the RT CPUs)", (!wd_off).then(|| "echo 0 > /proc/sys/kernel/watchdog; echo 0 > /proc/sys/kernel/nmi_watchdog (or nmi_watchdog=0 nowatchdog on the command line)".to_string()));

    // ------------------------------------------------------------ interrupts
    if !rt.is_empty() {
        let irqs = irqs_on(fs, &rt);
        f.add(
            "interrupts",
            "irq.affinity",
            if irqs.is_empty() {
                Status::Pass
            } else {
                Status::Warn
            },
            if irqs.is_empty() {
                "no IRQ may be delivered to the RT CPUs".to_string()
            } else {
                format!(
                    "{} IRQs may be delivered to the RT CPUs: {}",
                    irqs.len(),
                    irqs.iter()
                        .take(12)
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            },
            "device IRQs affinitised to housekeeping CPUs",
            (!irqs.is_empty()).then(|| {
                format!(
                    "echo {} > /proc/irq/N/smp_affinity for each (or nfvisor host tune --apply)",
                    format_cpu_mask(
                        &on.iter()
                            .copied()
                            .filter(|c| !rt.contains(c))
                            .collect::<Vec<_>>()
                    )
                )
            }),
        );
    }
    let running = process_running(fs, "irqbalance");
    let banned = irqbalance_banned(fs);
    let irqb_ok = !running || covers(&banned, &rt);
    f.add("interrupts", "irq.irqbalance", if irqb_ok { Status::Pass } else { Status::Warn }, if running { format!("irqbalance running, banned CPUs: {}", if banned.is_empty() { "none".to_string() } else { format_cpu_list(&banned) }) } else { "irqbalance not running".to_string() }, "irqbalance off, or with the RT CPUs banned", (!irqb_ok).then(|| format!("IRQBALANCE_BANNED_CPULIST={rt_list} in /etc/default/irqbalance and restart it (or nfvisor host tune --apply)")));

    // ---------------------------------------------------------------- memory
    let mut sizes = Vec::new();
    let mut any_hp = false;
    for size in fs.list("/sys/kernel/mm/hugepages").unwrap_or_default() {
        let nr: u64 = read_opt(fs, &format!("/sys/kernel/mm/hugepages/{size}/nr_hugepages"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let free: u64 = read_opt(
            fs,
            &format!("/sys/kernel/mm/hugepages/{size}/free_hugepages"),
        )
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
        any_hp |= nr > 0;
        sizes.push(format!(
            "{}: {nr} reserved, {free} free",
            size.trim_start_matches("hugepages-")
        ));
    }
    f.add("memory", "mem.hugepages", if any_hp { Status::Pass } else { Status::Warn }, if sizes.is_empty() { "no hugetlb support".to_string() } else { sizes.join("; ") }, "hugepages reserved for guest memory (nfvisor run --hugepages)", (!any_hp).then(|| "echo N > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages (or nfvisor host tune --hugepages N)".to_string()));
    match read_opt(fs, "/sys/kernel/mm/transparent_hugepage/enabled") {
        Some(t) => match selected_choice(&t) {
            Some("never") => f.add(
                "memory",
                "mem.thp",
                Status::Pass,
                "THP never",
                "THP off: no khugepaged collapsing or compaction stalls",
                None,
            ),
            Some(v) => f.add(
                "memory",
                "mem.thp",
                Status::Warn,
                format!("THP {v}"),
                "THP off: no khugepaged collapsing or compaction stalls",
                Some("echo never > /sys/kernel/mm/transparent_hugepage/enabled".into()),
            ),
            None => f.add(
                "memory",
                "mem.thp",
                Status::Error,
                format!("cannot parse /sys/kernel/mm/transparent_hugepage/enabled: {t:?}"),
                "THP never",
                None,
            ),
        },
        None => f.add(
            "memory",
            "mem.thp",
            Status::Info,
            "no THP",
            "THP never",
            None,
        ),
    }
    match read_opt(fs, "/sys/kernel/mm/ksm/run").as_deref() {
        Some("0") | None => f.add(
            "memory",
            "mem.ksm",
            Status::Pass,
            "KSM off",
            "KSM off: no page merging scans",
            None,
        ),
        Some(v) => f.add(
            "memory",
            "mem.ksm",
            Status::Warn,
            format!("KSM run = {v}"),
            "KSM off: no page merging scans",
            Some("echo 0 > /sys/kernel/mm/ksm/run".into()),
        ),
    }
    let swaps = read_opt(fs, "/proc/swaps").unwrap_or_default();
    let swap_lines: Vec<&str> = swaps
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    f.add(
        "memory",
        "mem.swap",
        if swap_lines.is_empty() {
            Status::Pass
        } else {
            Status::Warn
        },
        if swap_lines.is_empty() {
            "no swap".to_string()
        } else {
            format!(
                "swap on: {}",
                swap_lines
                    .iter()
                    .map(|l| l.split_whitespace().next().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        "no swap (and guest memory locked: nfvisor run --mlock)",
        (!swap_lines.is_empty()).then(|| "swapoff -a".to_string()),
    );
    match read_opt(fs, "/proc/sys/vm/zone_reclaim_mode").as_deref() {
        Some("0") | None => f.add(
            "memory",
            "mem.zone-reclaim",
            Status::Pass,
            "zone_reclaim_mode = 0",
            "no zone reclaim stalls",
            None,
        ),
        Some(v) => f.add(
            "memory",
            "mem.zone-reclaim",
            Status::Warn,
            format!("zone_reclaim_mode = {v}"),
            "no zone reclaim stalls",
            Some("echo 0 > /proc/sys/vm/zone_reclaim_mode".into()),
        ),
    }

    // ----------------------------------------------------------------- clock
    let cs = read_opt(
        fs,
        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
    )
    .unwrap_or_default();
    f.add("clock", "clock.source", if cs == "tsc" { Status::Pass } else { Status::Warn }, format!("clocksource {}", if cs.is_empty() { "(unknown)" } else { &cs }), "the TSC as clocksource", (cs != "tsc").then(|| "echo tsc > /sys/devices/system/clocksource/clocksource0/current_clocksource (with tsc=reliable)".to_string()));
    let tsc_flags = has("constant_tsc") && has("nonstop_tsc");
    f.add(
        "clock",
        "clock.tsc-flags",
        if tsc_flags {
            Status::Pass
        } else {
            Status::Warn
        },
        format!(
            "constant_tsc {} nonstop_tsc {}",
            if has("constant_tsc") { "yes" } else { "no" },
            if has("nonstop_tsc") { "yes" } else { "no" }
        ),
        "a constant, nonstop (invariant) TSC",
        None,
    );

    // ------------------------------------------------------------------- kvm
    let kvm = if has("vmx") || has("svm") {
        "hardware"
    } else if fs.exists("/sys/module/kvm_pvm") {
        "nested-pvm"
    } else {
        "none"
    };
    f.add(
        "kvm",
        "kvm.dev",
        if fs.exists("/dev/kvm") {
            Status::Pass
        } else {
            Status::Fail
        },
        if fs.exists("/dev/kvm") {
            "/dev/kvm present"
        } else {
            "/dev/kvm missing"
        },
        "/dev/kvm",
        (!fs.exists("/dev/kvm"))
            .then(|| "enable VT-x/AMD-V in firmware and load kvm_intel or kvm_amd".to_string()),
    );
    match kvm {
        "hardware" if has("hypervisor") => f.add("kvm", "kvm.virtualization", Status::Warn, "hardware virtualization (vmx/svm), but this host is itself a VM (nested KVM)", "bare-metal host with VT-x/AMD-V for representative latencies", None),
        "hardware" => f.add("kvm", "kvm.virtualization", Status::Pass, "hardware virtualization (vmx/svm) on bare metal", "VT-x/AMD-V", None),
        "nested-pvm" => f.add("kvm", "kvm.virtualization", Status::Warn, "nested, paravirtual KVM (kvm_pvm): guest code is emulated; absolute latency figures are not representative, only comparisons within one run are", "bare-metal host with VT-x/AMD-V", None),
        _ => f.add("kvm", "kvm.virtualization", Status::Fail, "no hardware virtualization (no vmx/svm) and no paravirtual KVM", "VT-x/AMD-V enabled in firmware", Some("enable VT-x/AMD-V in firmware".into())),
    }
    let param = |m: &str, p: &str| read_opt(fs, &format!("/sys/module/{m}/parameters/{p}"));
    let hp = param("kvm", "halt_poll_ns");
    let nx = param("kvm", "nx_huge_pages");
    let adv =
        param("kvm", "lapic_timer_advance_ns").or_else(|| param("kvm", "lapic_timer_advance"));
    f.add("kvm", "kvm.params", Status::Info, format!("halt_poll_ns={} lapic_timer_advance={} nx_huge_pages={}", hp.as_deref().unwrap_or("(n/a)"), adv.as_deref().unwrap_or("(n/a)"), nx.as_deref().unwrap_or("(n/a)")), "halt polling per VM for dedicated cores (nfvisor run --halt-poll-ns / --disable-exits hlt); LAPIC timer advance tuned; nx_huge_pages off where the CPU is not affected by iTLB multihit", None);
    let apicv = param("kvm_intel", "enable_apicv").or_else(|| param("kvm_amd", "avic"));
    let pi = matches!(apicv.as_deref(), Some("Y") | Some("1"));
    f.add(
        "kvm",
        "kvm.posted-interrupts",
        if pi { Status::Pass } else { Status::Info },
        format!(
            "APICv/AVIC: {}",
            apicv.as_deref().unwrap_or("(not visible)")
        ),
        "posted interrupts (APICv / AVIC) for interrupt delivery without exits",
        None,
    );

    // -------------------------------------------------------------- firmware
    let cstates = if any_cstate_beyond_c1(fs, &rt) {
        "deep C-states visible to the OS"
    } else {
        "no deep C-state visible to the OS"
    };
    f.add(
        "firmware",
        "firmware.c-states",
        Status::Firmware,
        cstates,
        "C-states (C1E, C3, C6) disabled in firmware",
        Some("check in firmware: CPU C-State / C1E Autopromote disabled".into()),
    );
    let turbo = read_opt(fs, "/sys/devices/system/cpu/intel_pstate/no_turbo")
        .map(|v| {
            if v == "1" {
                "turbo off (intel_pstate no_turbo)"
            } else {
                "turbo on (intel_pstate no_turbo = 0)"
            }
        })
        .or_else(|| {
            read_opt(fs, "/sys/devices/system/cpu/cpufreq/boost").map(|v| {
                if v == "0" {
                    "boost off"
                } else {
                    "boost on"
                }
            })
        })
        .unwrap_or("turbo state not visible");
    f.add(
        "firmware",
        "firmware.turbo",
        Status::Firmware,
        turbo,
        "Turbo Boost / Core Performance Boost disabled",
        Some("check in firmware: Turbo / CPB disabled".into()),
    );
    let smt = read_opt(fs, "/sys/devices/system/cpu/smt/active")
        .map(|v| {
            if v == "1" {
                "SMT active"
            } else {
                "SMT inactive"
            }
        })
        .unwrap_or("SMT state not visible");
    f.add(
        "firmware",
        "firmware.smt",
        Status::Firmware,
        smt,
        "Hyper-Threading / SMT disabled",
        Some("check in firmware: Hyper-Threading disabled".into()),
    );
    let smi = if vendor == "AuthenticAMD" {
        "AMD CPUs have no SMI count MSR: SMIs cannot be counted".to_string()
    } else {
        smi_count(fs)
            .map(|n| format!("SMI count MSR 0x34 on CPU 0: {n}"))
            .unwrap_or_else(|| {
                "SMI count MSR 0x34 not readable (load the msr module, run as root)".into()
            })
    };
    f.add(
        "firmware",
        "firmware.smi",
        Status::Firmware,
        smi,
        "no SMIs during RT work (legacy USB / port 60/64 emulation off)",
        Some("check in firmware: Legacy USB Support and Port 60/64 Emulation disabled".into()),
    );

    Ok(CheckReport {
        root: fs.root().display().to_string(),
        rt_cpus: rt,
        rt_cpus_from: rt_from,
        kvm,
        findings: f.0,
    })
}

/// cgroup v2 cpuset partitions: (path, type, effective CPUs), two levels deep.
fn cpuset_partitions(fs: &dyn HostFs) -> Vec<(String, String, Vec<usize>)> {
    let mut out = Vec::new();
    for dir in cgroup_dirs(fs) {
        if dir == "/sys/fs/cgroup" {
            continue;
        }
        if let Some(kind) = read_opt(fs, &format!("{dir}/cpuset.cpus.partition")) {
            if kind == "root" || kind == "isolated" {
                let cpus = read_opt(fs, &format!("{dir}/cpuset.cpus.effective"))
                    .and_then(|c| parse_cpu_list(&c).ok())
                    .unwrap_or_default();
                out.push((dir, kind, cpus));
            }
        }
    }
    out
}

fn cgroup_dirs(fs: &dyn HostFs) -> Vec<String> {
    let mut dirs = vec!["/sys/fs/cgroup".to_string()];
    let mut frontier = dirs.clone();
    for _ in 0..2 {
        let mut next = Vec::new();
        for d in &frontier {
            for name in fs.list(d).unwrap_or_default() {
                let p = format!("{d}/{name}");
                if fs.exists(&format!("{p}/cgroup.procs")) {
                    next.push(p);
                }
            }
        }
        dirs.extend(next.iter().cloned());
        frontier = next;
    }
    dirs
}

/// Cgroups (below the root) whose effective cpuset includes an RT CPU.
fn cgroups_on(fs: &dyn HostFs, rt: &[usize]) -> Vec<String> {
    cgroup_dirs(fs)
        .into_iter()
        .filter(|d| d != "/sys/fs/cgroup")
        .filter(|d| {
            read_opt(fs, &format!("{d}/cpuset.cpus.effective"))
                .and_then(|c| parse_cpu_list(&c).ok())
                .is_some_and(|c| c.iter().any(|x| rt.contains(x)))
        })
        .collect()
}

fn proc_pids(fs: &dyn HostFs) -> Vec<String> {
    fs.list("/proc")
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        .collect()
}

/// Kernel threads (children of kthreadd) allowed on more than one CPU,
/// including an RT CPU.
fn unbound_kthreads_on(fs: &dyn HostFs, rt: &[usize]) -> Vec<String> {
    let mut out = Vec::new();
    for pid in proc_pids(fs) {
        let Some(status) = read_opt(fs, &format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::trim)
        };
        if field("PPid:") != Some("2") {
            continue;
        }
        let Some(allowed) = field("Cpus_allowed_list:").and_then(|c| parse_cpu_list(c).ok()) else {
            continue;
        };
        if allowed.len() > 1 && allowed.iter().any(|c| rt.contains(c)) {
            out.push(field("Name:").unwrap_or("?").to_string());
        }
    }
    out
}

/// IRQs whose affinity includes an RT CPU.
pub fn irqs_on(fs: &dyn HostFs, rt: &[usize]) -> Vec<u32> {
    let mut out: Vec<u32> = fs
        .list("/proc/irq")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| n.parse().ok())
        .filter(|n: &u32| {
            read_opt(fs, &format!("/proc/irq/{n}/smp_affinity_list"))
                .and_then(|l| parse_cpu_list(&l).ok())
                .is_some_and(|cpus| cpus.iter().any(|c| rt.contains(c)))
        })
        .collect();
    out.sort_unstable();
    out
}

fn process_running(fs: &dyn HostFs, comm: &str) -> bool {
    proc_pids(fs)
        .iter()
        .any(|p| read_opt(fs, &format!("/proc/{p}/comm")).as_deref() == Some(comm))
}

/// CPUs banned from irqbalance by /etc/default/irqbalance.
pub fn irqbalance_banned(fs: &dyn HostFs) -> Vec<usize> {
    let conf = read_opt(fs, "/etc/default/irqbalance").unwrap_or_default();
    for line in conf.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("IRQBALANCE_BANNED_CPULIST=") {
            return parse_cpu_list(v.trim_matches('"')).unwrap_or_default();
        }
        if let Some(v) = line.strip_prefix("IRQBALANCE_BANNED_CPUS=") {
            return parse_cpu_mask(v.trim_matches('"')).unwrap_or_default();
        }
    }
    Vec::new()
}

fn any_cstate_beyond_c1(fs: &dyn HostFs, rt: &[usize]) -> bool {
    let cpus: Vec<usize> = if rt.is_empty() { vec![0] } else { rt.to_vec() };
    cpus.iter().any(|c| {
        fs.list(&format!("/sys/devices/system/cpu/cpu{c}/cpuidle"))
            .unwrap_or_default()
            .iter()
            .any(|s| {
                read_opt(
                    fs,
                    &format!("/sys/devices/system/cpu/cpu{c}/cpuidle/{s}/latency"),
                )
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                    > 2
            })
    })
}

/// MSR_SMI_COUNT (0x34) of CPU 0, where /dev/cpu/0/msr can be read.
fn smi_count(fs: &dyn HostFs) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let path = fs.root().join("dev/cpu/0/msr");
    let f = std::fs::File::open(path).ok()?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 0x34).ok()?;
    Some(u64::from_le_bytes(b) & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{build, FixtureFs, HostModel};
    use super::*;

    fn report(name: &str, model: HostModel, cpus: Option<&str>) -> CheckReport {
        let dir = std::env::temp_dir().join(format!("nfv-check-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        build(&dir, model).unwrap();
        let r = check(&FixtureFs::new(&dir).unwrap(), cpus).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        r
    }

    #[test]
    fn a_tuned_host_passes_everything_software_can_decide() {
        let r = report("tuned", HostModel::Tuned, None);
        assert_eq!(r.rt_cpus, vec![2, 3]);
        assert_eq!(r.rt_cpus_from, "isolated");
        for f in &r.findings {
            let ok = match f.group {
                "firmware" => f.status == Status::Firmware,
                _ => matches!(f.status, Status::Pass | Status::Info),
            };
            assert!(ok, "{f:?}");
        }
        assert_eq!(r.kvm, "hardware");
    }

    #[test]
    fn an_untuned_host_gets_the_fixes() {
        let r = report("untuned", HostModel::Untuned, Some("2-3"));
        for (id, status) in [
            ("kernel.preempt-rt", Status::Warn),
            ("kernel.nohz_full", Status::Warn),
            ("isolation.rt-cpus", Status::Fail),
            ("sched.rt-throttling", Status::Warn),
            ("sched.timer-migration", Status::Warn),
            ("sched.workqueue-cpumask", Status::Warn),
            ("sched.kthreads", Status::Warn),
            ("irq.affinity", Status::Warn),
            ("irq.irqbalance", Status::Warn),
            ("mem.thp", Status::Warn),
            ("mem.ksm", Status::Warn),
            ("mem.swap", Status::Warn),
            ("mem.hugepages", Status::Warn),
            ("cpus.governor", Status::Warn),
            ("cpus.cpuidle", Status::Warn),
            ("kvm.virtualization", Status::Pass),
        ] {
            let f = r.get(id).unwrap_or_else(|| panic!("no finding {id}"));
            assert_eq!(f.status, status, "{f:?}");
            if matches!(status, Status::Warn | Status::Fail) && id != "kernel.preempt-rt" {
                assert!(f.fix.is_some(), "{id} has no fix");
            }
        }
        assert!(r.get("irq.affinity").unwrap().found.contains("0 1 24 25"));
        assert!(r
            .get("sched.rt-throttling")
            .unwrap()
            .fix
            .as_ref()
            .unwrap()
            .contains("sched_rt_runtime_us"));
        // firmware items are never a pass
        assert!(r
            .findings
            .iter()
            .filter(|f| f.group == "firmware")
            .all(|f| f.status == Status::Firmware));
    }

    #[test]
    fn kvm_kinds_are_told_apart() {
        let r = report("nokvm", HostModel::NoKvm, Some("2"));
        assert_eq!(r.get("kvm.dev").unwrap().status, Status::Fail);
        assert_eq!(r.get("kvm.virtualization").unwrap().status, Status::Fail);
        let r = report("nested", HostModel::NestedPvm, Some("2"));
        assert_eq!(r.kvm, "nested-pvm");
        let v = r.get("kvm.virtualization").unwrap();
        assert_eq!(v.status, Status::Warn);
        assert!(v.found.contains("not representative"));
        assert!(r.get("firmware.smi").unwrap().found.contains("AMD"));
    }

    #[test]
    fn no_rt_cpus_is_a_finding_and_bad_lists_are_errors() {
        let r = report("none", HostModel::Untuned, None);
        assert_eq!(r.get("cpus.rt-cpus").unwrap().status, Status::Fail);
        let dir = std::env::temp_dir().join(format!("nfv-check-bad-{}", std::process::id()));
        build(&dir, HostModel::Untuned).unwrap();
        let fs = FixtureFs::new(&dir).unwrap();
        assert!(matches!(check(&fs, Some("")), Err(HostError::EmptyCpuList)));
        assert!(matches!(
            check(&fs, Some("7")),
            Err(HostError::NoSuchCpu { cpu: 7, .. })
        ));
        std::fs::write(dir.join("proc/sys/kernel/sched_rt_runtime_us"), "garbage\n").unwrap();
        let r = check(&fs, Some("2")).unwrap();
        let f = r.get("sched.rt-throttling").unwrap();
        assert_eq!(f.status, Status::Error);
        assert!(f.found.contains("sched_rt_runtime_us") && f.found.contains("garbage"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
