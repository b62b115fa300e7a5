//! Fixture roots: fake /proc and /sys trees laid out as on real hosts, whose
//! writes follow the kernel's rules (a plain file cannot: THP reads back as
//! `always madvise [never]`, `smp_affinity` takes a mask and updates
//! `smp_affinity_list`, managed IRQs refuse with EIO, `nr_hugepages` may be
//! granted in part). A root holding a `.fixture/` directory is opened as one
//! by [`super::open_root`]; tests and demos use them, hosts never have one.
//!
//! `.fixture/managed_irqs`: IRQ numbers whose affinity the kernel manages.
//! `.fixture/hugepage_limit`: most hugepages a node grants.
//! `.fixture/deny`: paths whose writes fail with EACCES (an unwritable file).

use std::io;
use std::path::Path;

use super::{format_cpu_list, parse_cpu_mask, read_opt, HostFs, RealFs};

pub struct FixtureFs {
    inner: RealFs,
}

impl FixtureFs {
    pub fn new(root: &Path) -> io::Result<FixtureFs> {
        Ok(FixtureFs {
            inner: RealFs::new(root)?,
        })
    }

    fn listed(&self, file: &str, item: &str) -> bool {
        read_opt(&self.inner, &format!("/.fixture/{file}"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.trim() == item)
    }
}

fn einval(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl HostFs for FixtureFs {
    fn root(&self) -> &Path {
        self.inner.root()
    }

    fn read(&self, path: &str) -> io::Result<String> {
        self.inner.read(path)
    }

    fn exists(&self, path: &str) -> bool {
        self.inner.exists(path)
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }

    fn write(&self, path: &str, value: &str) -> io::Result<()> {
        let v = value.trim();
        if self.listed("deny", path) {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        if path.starts_with("/etc/") {
            return self.inner.write(path, value);
        }
        if !path.starts_with("/etc/") && !self.inner.exists(path) {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        if path.ends_with("transparent_hugepage/enabled") {
            let choices = ["always", "madvise", "never"];
            if !choices.contains(&v) {
                return Err(einval(format!("THP mode {v:?}")));
            }
            let shown: Vec<String> = choices
                .iter()
                .map(|c| {
                    if *c == v {
                        format!("[{c}]")
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            return self.inner.write(path, &format!("{}\n", shown.join(" ")));
        }
        if let Some(irq) = path
            .strip_prefix("/proc/irq/")
            .and_then(|p| p.strip_suffix("/smp_affinity"))
        {
            if self.listed("managed_irqs", irq) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let cpus = parse_cpu_mask(v)
                .filter(|c| !c.is_empty())
                .ok_or_else(|| einval(format!("mask {v:?}")))?;
            self.inner.write(path, &format!("{v}\n"))?;
            return self.inner.write(
                &format!("/proc/irq/{irq}/smp_affinity_list"),
                &format!("{}\n", format_cpu_list(&cpus)),
            );
        }
        if path.ends_with("/nr_hugepages") {
            let want: u64 = v.parse().map_err(|_| einval(format!("count {v:?}")))?;
            let limit: u64 = read_opt(&self.inner, "/.fixture/hugepage_limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(u64::MAX);
            return self.inner.write(path, &format!("{}\n", want.min(limit)));
        }
        if path.ends_with("/cpumask") && parse_cpu_mask(v).is_none() {
            return Err(einval(format!("mask {v:?}")));
        }
        self.inner.write(path, &format!("{v}\n"))
    }
}

/// What kind of host a fixture tree models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostModel {
    /// 4 CPUs, RT CPUs 2-3 isolated, everything per KVM4NFV.
    Tuned,
    /// 4 CPUs, defaults of a general-purpose distribution.
    Untuned,
    /// Untuned, and no KVM at all.
    NoKvm,
    /// Untuned, KVM nested and paravirtual (kvm_pvm), as the CI machines.
    NestedPvm,
}

/// Writes a fixture tree modelling `model` under `root`.
pub fn build(root: &Path, model: HostModel) -> io::Result<()> {
    let tuned = model == HostModel::Tuned;
    let w = |p: &str, v: &str| -> io::Result<()> {
        let path = root.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(path, format!("{v}\n"))
    };
    std::fs::create_dir_all(root.join(".fixture"))?;
    w("/.fixture/managed_irqs", "24")?;
    w("/.fixture/hugepage_limit", "100")?;
    let cmdline = if tuned {
        "BOOT_IMAGE=/vmlinuz root=/dev/sda1 isolcpus=managed_irq,domain,2-3 nohz_full=2-3 rcu_nocbs=2-3 iommu=pt intel_iommu=on default_hugepagesz=1G hugepagesz=1G mce=off idle=poll intel_pstate=disable processor.max_cstate=1 tsc=reliable nosoftlockup nmi_watchdog=0"
    } else {
        "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet"
    };
    w("/proc/cmdline", cmdline)?;
    w(
        "/proc/sys/kernel/version",
        if tuned {
            "#1 SMP PREEMPT_RT Debian 6.12.57-1"
        } else {
            "#1 SMP PREEMPT_DYNAMIC Debian 6.12.57-1"
        },
    )?;
    if tuned {
        w("/sys/kernel/realtime", "1")?;
    }
    let vendor = if model == HostModel::NestedPvm {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    };
    let virt = match model {
        HostModel::NoKvm | HostModel::NestedPvm => "",
        _ => " vmx",
    };
    let hypervisor = if model == HostModel::NestedPvm {
        " hypervisor"
    } else {
        ""
    };
    let cpuinfo: String = (0..4)
        .map(|i| format!("processor\t: {i}\nvendor_id\t: {vendor}\nflags\t\t: fpu tsc msr pae constant_tsc nonstop_tsc{virt}{hypervisor}\n\n"))
        .collect();
    w("/proc/cpuinfo", &cpuinfo)?;
    if model != HostModel::NoKvm {
        w("/dev/kvm", "")?;
        w("/sys/module/kvm/parameters/halt_poll_ns", "200000")?;
        w("/sys/module/kvm/parameters/nx_huge_pages", "N")?;
    }
    if model == HostModel::NestedPvm {
        w("/sys/module/kvm_pvm/refcnt", "1")?;
    } else if model != HostModel::NoKvm {
        w("/sys/module/kvm_intel/parameters/enable_apicv", "Y")?;
    }
    w("/sys/devices/system/cpu/online", "0-3")?;
    w("/sys/devices/system/cpu/possible", "0-3")?;
    w(
        "/sys/devices/system/cpu/isolated",
        if tuned { "2-3" } else { "" },
    )?;
    w("/sys/devices/system/cpu/smt/active", "0")?;
    for c in 0..4 {
        let base = format!("/sys/devices/system/cpu/cpu{c}");
        w(
            &format!("{base}/topology/thread_siblings_list"),
            &c.to_string(),
        )?;
        w(&format!("{base}/node0/cpulist"), "0-3")?;
        w(
            &format!("{base}/cpufreq/scaling_governor"),
            if tuned && c >= 2 {
                "performance"
            } else {
                "schedutil"
            },
        )?;
        w(
            &format!("{base}/cpufreq/scaling_available_governors"),
            "performance schedutil powersave",
        )?;
        for (s, name, lat) in [(0, "POLL", 0), (1, "C1", 1), (2, "C6", 133)] {
            w(&format!("{base}/cpuidle/state{s}/name"), name)?;
            w(
                &format!("{base}/cpuidle/state{s}/latency"),
                &lat.to_string(),
            )?;
            w(
                &format!("{base}/cpuidle/state{s}/disable"),
                if tuned && s == 2 { "1" } else { "0" },
            )?;
        }
    }
    w("/sys/devices/system/node/node0/cpulist", "0-3")?;
    w(
        "/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages",
        if tuned { "512" } else { "0" },
    )?;
    w(
        "/sys/devices/system/node/node0/hugepages/hugepages-1048576kB/nr_hugepages",
        if tuned { "4" } else { "0" },
    )?;
    for (size, nr) in [
        ("hugepages-2048kB", if tuned { "512" } else { "0" }),
        ("hugepages-1048576kB", if tuned { "4" } else { "0" }),
    ] {
        w(&format!("/sys/kernel/mm/hugepages/{size}/nr_hugepages"), nr)?;
        w(
            &format!("/sys/kernel/mm/hugepages/{size}/free_hugepages"),
            nr,
        )?;
    }
    w(
        "/sys/kernel/mm/transparent_hugepage/enabled",
        if tuned {
            "always madvise [never]"
        } else {
            "always [madvise] never"
        },
    )?;
    w("/sys/kernel/mm/ksm/run", if tuned { "0" } else { "1" })?;
    w(
        "/proc/swaps",
        if tuned {
            "Filename\tType\tSize\tUsed\tPriority"
        } else {
            "Filename\tType\tSize\tUsed\tPriority\n/dev/sda2\tpartition\t1048572\t0\t-2"
        },
    )?;
    w("/proc/sys/vm/zone_reclaim_mode", "0")?;
    w(
        "/proc/sys/kernel/sched_rt_runtime_us",
        if tuned { "-1" } else { "950000" },
    )?;
    w(
        "/proc/sys/kernel/timer_migration",
        if tuned { "0" } else { "1" },
    )?;
    w("/proc/sys/kernel/watchdog", if tuned { "0" } else { "1" })?;
    w(
        "/proc/sys/kernel/nmi_watchdog",
        if tuned { "0" } else { "1" },
    )?;
    w(
        "/sys/devices/virtual/workqueue/cpumask",
        if tuned { "3" } else { "f" },
    )?;
    w(
        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        if model == HostModel::NestedPvm {
            "kvm-clock"
        } else {
            "tsc"
        },
    )?;
    // IRQs: 0 timer, 1 i8042, 24/25 NIC queues (24 managed)
    for (irq, list, mask) in [
        (
            0,
            if tuned { "0-1" } else { "0-3" },
            if tuned { "3" } else { "f" },
        ),
        (1, "0-3", "f"),
        (
            24,
            if tuned { "0" } else { "2" },
            if tuned { "1" } else { "4" },
        ),
        (
            25,
            if tuned { "0" } else { "3" },
            if tuned { "1" } else { "8" },
        ),
    ] {
        let list = if tuned && irq == 1 { "0-1" } else { list };
        let mask = if tuned && irq == 1 { "3" } else { mask };
        w(&format!("/proc/irq/{irq}/smp_affinity_list"), list)?;
        w(&format!("/proc/irq/{irq}/smp_affinity"), mask)?;
    }
    w(
        "/proc/irq/default_smp_affinity",
        if tuned { "3" } else { "f" },
    )?;
    // processes: kthreadd, an unbound kworker, irqbalance (untuned)
    w(
        "/proc/2/status",
        "Name:\tkthreadd\nPPid:\t0\nCpus_allowed_list:\t0-3",
    )?;
    w("/proc/2/comm", "kthreadd")?;
    w(
        "/proc/40/status",
        &format!(
            "Name:\tkworker/u8:1\nPPid:\t2\nCpus_allowed_list:\t{}",
            if tuned { "0-1" } else { "0-3" }
        ),
    )?;
    w("/proc/40/comm", "kworker/u8:1")?;
    if !tuned {
        w(
            "/proc/700/status",
            "Name:\tirqbalance\nPPid:\t1\nCpus_allowed_list:\t0-3",
        )?;
        w("/proc/700/comm", "irqbalance")?;
        w("/etc/default/irqbalance", "#IRQBALANCE_ONESHOT=\n")?;
    }
    // cgroup v2
    w("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu memory")?;
    w("/sys/fs/cgroup/cgroup.procs", "1")?;
    w("/sys/fs/cgroup/system.slice/cgroup.procs", "")?;
    w(
        "/sys/fs/cgroup/system.slice/cpuset.cpus.effective",
        if tuned { "0-1" } else { "0-3" },
    )?;
    if tuned {
        w("/sys/fs/cgroup/rt/cgroup.procs", "")?;
        w("/sys/fs/cgroup/rt/cpuset.cpus.partition", "isolated")?;
        w("/sys/fs/cgroup/rt/cpuset.cpus.effective", "2-3")?;
    }
    Ok(())
}
