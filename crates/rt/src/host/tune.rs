//! `nfvisor host tune`: the run-time fixes for the RT CPUs, planned from what
//! the host says now, applied all or none (rolled back on failure), with an
//! undo file that restores every previous value. Changes that need a reboot
//! are printed as the kernel command-line words to add.

use std::io;

use super::check::{irqbalance_banned, irqs_on, resolve_rt_cpus, HostError};
use super::{format_cpu_list, format_cpu_mask, parse_cpu_mask, read_opt, selected_choice, HostFs};
use crate::parse_cpu_list;

/// How a value is compared after writing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The file reads back what was written.
    Plain,
    /// A choice file: `always madvise [never]`.
    Choice,
    /// A CPU mask.
    Mask,
    /// A count the kernel may grant only in part (nr_hugepages).
    Count,
    /// A whole configuration file.
    File,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Change {
    pub what: String,
    pub path: String,
    pub old: String,
    pub new: String,
    pub kind: Kind,
}

impl Change {
    /// The shell command that makes this change.
    pub fn command(&self) -> String {
        match self.kind {
            Kind::File => format!("write {} with:\n{}", self.path, self.new.trim_end()),
            _ => format!("echo {} > {}", self.new, self.path),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub rt_cpus: Vec<usize>,
    pub housekeeping_cpus: Vec<usize>,
    pub changes: Vec<Change>,
    /// Kernel command-line words to add (need a reboot).
    pub reboot: Vec<String>,
    pub notes: Vec<String>,
}

/// A change the kernel would not take, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Refused {
    pub change: Change,
    pub reason: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    pub applied: Vec<Change>,
    /// Not changeable here (managed IRQs): reported, not fatal.
    pub refused: Vec<Refused>,
    /// Granted only in part: (change, value the kernel granted).
    pub partial: Vec<(Change, String)>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct UndoFile {
    pub nfvisor_undo: u32,
    pub root: String,
    /// Restored in reverse order.
    pub changes: Vec<Change>,
}

fn corrupt(path: &str, value: &str, what: &str) -> HostError {
    HostError::Corrupt {
        path: path.to_string(),
        why: format!("cannot read {what} from {value:?}"),
    }
}

/// Plans the fixes for `cpus`; `hugepages` reserves that many 2 MiB pages on
/// the RT CPUs' NUMA node. Reads everything first: a file that cannot be
/// understood stops the plan before anything changes.
pub fn plan(fs: &dyn HostFs, cpus: &str, hugepages: Option<u64>) -> Result<Plan, HostError> {
    let (rt, _) = resolve_rt_cpus(fs, Some(cpus))?;
    let online = read_opt(fs, "/sys/devices/system/cpu/online")
        .and_then(|s| parse_cpu_list(&s).ok())
        .unwrap_or_default();
    let hk: Vec<usize> = online.iter().copied().filter(|c| !rt.contains(c)).collect();
    if hk.is_empty() {
        return Err(HostError::Refused(format!(
            "--cpus {} leaves no housekeeping CPU (online: {})",
            format_cpu_list(&rt),
            format_cpu_list(&online)
        )));
    }
    let hk_mask = format_cpu_mask(&hk);
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    let mut push = |what: String, path: &str, old: String, new: String, kind: Kind| {
        changes.push(Change {
            what,
            path: path.to_string(),
            old,
            new,
            kind,
        })
    };

    let p = "/proc/sys/kernel/sched_rt_runtime_us";
    if let Some(v) = read_opt(fs, p) {
        let n: i64 = v.parse().map_err(|_| corrupt(p, &v, "a number"))?;
        if n != -1 {
            push("RT throttling off".into(), p, v, "-1".into(), Kind::Plain);
        }
    }
    let p = "/proc/sys/kernel/timer_migration";
    if let Some(v) = read_opt(fs, p) {
        v.parse::<u8>().map_err(|_| corrupt(p, &v, "0 or 1"))?;
        if v != "0" {
            push("timer migration off".into(), p, v, "0".into(), Kind::Plain);
        }
    }
    let p = "/sys/kernel/mm/transparent_hugepage/enabled";
    if let Some(v) = read_opt(fs, p) {
        let sel = selected_choice(&v).ok_or_else(|| corrupt(p, &v, "the selected mode"))?;
        if sel != "never" {
            push(
                "THP off".into(),
                p,
                sel.to_string(),
                "never".into(),
                Kind::Choice,
            );
        }
    }
    let p = "/sys/kernel/mm/ksm/run";
    if let Some(v) = read_opt(fs, p) {
        v.parse::<u8>().map_err(|_| corrupt(p, &v, "a number"))?;
        if v != "0" {
            push("KSM off".into(), p, v, "0".into(), Kind::Plain);
        }
    }
    for &c in &rt {
        let p = format!("/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor");
        if let Some(v) = read_opt(fs, &p) {
            let avail = read_opt(
                fs,
                &format!("/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_available_governors"),
            )
            .unwrap_or_default();
            if v != "performance" {
                if avail.split_whitespace().any(|g| g == "performance") {
                    push(
                        format!("CPU {c} governor performance"),
                        &p,
                        v,
                        "performance".into(),
                        Kind::Plain,
                    );
                } else {
                    notes.push(format!(
                        "CPU {c}: no performance governor offered ({avail})"
                    ));
                }
            }
        }
    }
    let p = "/sys/devices/virtual/workqueue/cpumask";
    if let Some(v) = read_opt(fs, p) {
        let wq = parse_cpu_mask(&v).ok_or_else(|| corrupt(p, &v, "a CPU mask"))?;
        if wq.iter().any(|c| rt.contains(c)) {
            push(
                "unbound workqueues off the RT CPUs".into(),
                p,
                v,
                hk_mask.clone(),
                Kind::Mask,
            );
        }
    }
    let p = "/proc/irq/default_smp_affinity";
    if let Some(v) = read_opt(fs, p) {
        let m = parse_cpu_mask(&v).ok_or_else(|| corrupt(p, &v, "a CPU mask"))?;
        if m.iter().any(|c| rt.contains(c)) {
            push(
                "new IRQs on housekeeping CPUs".into(),
                p,
                v,
                hk_mask.clone(),
                Kind::Mask,
            );
        }
    }
    for irq in irqs_on(fs, &rt) {
        let p = format!("/proc/irq/{irq}/smp_affinity");
        let v = read_opt(fs, &p).unwrap_or_default();
        parse_cpu_mask(&v).ok_or_else(|| corrupt(&p, &v, "a CPU mask"))?;
        push(
            format!("IRQ {irq} off the RT CPUs"),
            &p,
            v,
            hk_mask.clone(),
            Kind::Mask,
        );
    }
    let conf = "/etc/default/irqbalance";
    let running = fs
        .list("/proc")
        .unwrap_or_default()
        .iter()
        .any(|pid| read_opt(fs, &format!("/proc/{pid}/comm")).as_deref() == Some("irqbalance"));
    if (running || fs.exists(conf)) && !rt.iter().all(|c| irqbalance_banned(fs).contains(c)) {
        let old = fs.read(conf).unwrap_or_default();
        let mut lines: Vec<String> = old
            .lines()
            .filter(|l| !l.trim_start().starts_with("IRQBALANCE_BANNED_CPU"))
            .map(str::to_string)
            .collect();
        lines.push(format!(
            "IRQBALANCE_BANNED_CPULIST={}",
            format_cpu_list(&rt)
        ));
        push(
            "irqbalance bans the RT CPUs".into(),
            conf,
            old,
            lines.join("\n") + "\n",
            Kind::File,
        );
        notes.push("restart irqbalance for its new banned CPU list to take effect (systemctl restart irqbalance)".into());
    }
    if let Some(n) = hugepages {
        let node = fs
            .list(&format!("/sys/devices/system/cpu/cpu{}", rt[0]))
            .unwrap_or_default()
            .iter()
            .find_map(|e| e.strip_prefix("node").and_then(|n| n.parse::<u32>().ok()))
            .unwrap_or(0);
        let p =
            format!("/sys/devices/system/node/node{node}/hugepages/hugepages-2048kB/nr_hugepages");
        match read_opt(fs, &p) {
            Some(v) => {
                let have: u64 = v.parse().map_err(|_| corrupt(&p, &v, "a count"))?;
                if have < n {
                    push(
                        format!("{n} x 2 MiB hugepages on node {node}"),
                        &p,
                        v,
                        n.to_string(),
                        Kind::Count,
                    );
                }
            }
            None => notes.push(format!("no 2 MiB hugepage pool on node {node} ({p})")),
        }
    }

    let cl = read_opt(fs, "/proc/cmdline").unwrap_or_default();
    let rt_list = format_cpu_list(&rt);
    let words: Vec<String> = [
        format!("isolcpus=managed_irq,domain,{rt_list}"),
        format!("nohz_full={rt_list}"),
        format!("rcu_nocbs={rt_list}"),
        "idle=poll".into(),
        "tsc=reliable".into(),
        "nosoftlockup".into(),
        "nmi_watchdog=0".into(),
    ]
    .into_iter()
    .filter(|w| {
        let key = w.split('=').next().unwrap_or(w);
        !cl.split_whitespace().any(|x| {
            x == w
                || (x.starts_with(&format!("{key}="))
                    && key != "isolcpus"
                    && key != "nohz_full"
                    && key != "rcu_nocbs")
        })
    })
    .collect();
    Ok(Plan {
        rt_cpus: rt,
        housekeeping_cpus: hk,
        changes,
        reboot: words,
        notes,
    })
}

/// The value a file holds now, in the form its change compares.
fn effective(fs: &dyn HostFs, c: &Change) -> io::Result<String> {
    if c.kind == Kind::File {
        return fs.read(&c.path);
    }
    let v = fs.read(&c.path)?.trim().to_string();
    Ok(match c.kind {
        Kind::Choice => selected_choice(&v).unwrap_or(&v).to_string(),
        Kind::Mask => parse_cpu_mask(&v).map(|m| format_cpu_list(&m)).unwrap_or(v),
        _ => v,
    })
}

fn wanted(c: &Change, value: &str) -> String {
    match c.kind {
        Kind::Mask => parse_cpu_mask(value)
            .map(|m| format_cpu_list(&m))
            .unwrap_or_else(|| value.to_string()),
        Kind::File => value.to_string(),
        _ => value.trim().to_string(),
    }
}

/// Whether `path` is one the plan can produce: an undo file naming any
/// other is refused, so `--undo` (run as root) cannot be made to write an
/// arbitrary file.
pub fn plan_can_write(path: &str) -> bool {
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = path.split('/').collect();
    if parts.iter().any(|p| *p == ".." || *p == ".") {
        return false;
    }
    matches!(
        path,
        "/proc/sys/kernel/sched_rt_runtime_us"
            | "/proc/sys/kernel/timer_migration"
            | "/sys/kernel/mm/transparent_hugepage/enabled"
            | "/sys/kernel/mm/ksm/run"
            | "/sys/devices/virtual/workqueue/cpumask"
            | "/proc/irq/default_smp_affinity"
            | "/etc/default/irqbalance"
    ) || matches!(
        parts.as_slice(),
        ["", "sys", "devices", "system", "cpu", cpu, "cpufreq", "scaling_governor"]
            if cpu.strip_prefix("cpu").is_some_and(number)
    ) || matches!(
        parts.as_slice(),
        ["", "proc", "irq", irq, "smp_affinity"] if number(irq)
    ) || matches!(
        parts.as_slice(),
        ["", "sys", "devices", "system", "node", node, "hugepages", "hugepages-2048kB", "nr_hugepages"]
            if node.strip_prefix("node").is_some_and(number)
    )
}

/// Test hook: `NFVISOR_TEST_TUNE_KILL_AFTER=N` ends the process at once
/// after the Nth write of an apply, as a kill would, so the suite checks
/// that the journal written before the first change undoes it.
fn test_kill_after(writes: usize) {
    // (read only in a build with the `test-hooks` feature: the suite's)
    if cfg!(feature = "test-hooks")
        && std::env::var("NFVISOR_TEST_TUNE_KILL_AFTER")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            == Some(writes)
    {
        eprintln!("nfvisor: NFVISOR_TEST_TUNE_KILL_AFTER: killed after write {writes}");
        // SAFETY: ends the process without clean-up, as SIGKILL would.
        unsafe { libc::_exit(86) };
    }
}

/// Applies the plan, all or none: on an unexpected failure every change made
/// so far is restored, and the error says what failed and that it was
/// rolled back. Managed IRQs (EIO) are reported as refused, partial hugepage
/// grants as partial; neither undoes the rest.
pub fn apply(fs: &dyn HostFs, plan: &Plan) -> Result<Applied, HostError> {
    let mut done: Vec<Change> = Vec::new();
    let mut refused = Vec::new();
    let mut partial = Vec::new();
    for (n, c) in plan.changes.iter().enumerate() {
        let result = fs.write(&c.path, &c.new).and_then(|_| effective(fs, c));
        test_kill_after(n + 1);
        match result {
            Ok(now) if now == wanted(c, &c.new) => done.push(c.clone()),
            Ok(now) if c.kind == Kind::Count => {
                partial.push((c.clone(), now));
                done.push(c.clone());
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) && c.path.starts_with("/proc/irq/") => {
                refused.push(Refused {
                    change: c.clone(),
                    reason: "the kernel manages this IRQ's affinity (EIO)".into(),
                })
            }
            other => {
                let why = match other {
                    Ok(now) => format!("wrote {:?}, the kernel reads back {now:?}", c.new),
                    Err(e) => e.to_string(),
                };
                let rollback = undo_changes(fs, &done);
                let rolled = match rollback {
                    Ok(()) => format!(
                        "the {} change(s) made before it were rolled back",
                        done.len()
                    ),
                    Err(e) => format!(
                        "rolling back the {} change(s) before it ALSO FAILED: {e}",
                        done.len()
                    ),
                };
                return Err(HostError::Refused(format!(
                    "{} ({}): {why}; {rolled}",
                    c.path, c.what
                )));
            }
        }
    }
    Ok(Applied {
        applied: done,
        refused,
        partial,
    })
}

/// Restores `changes` in reverse order; reports every restore that failed.
/// A value already at its old one is left alone: a journal written before
/// an apply that was killed names changes never made (a managed IRQ's
/// refused write among them).
pub fn undo_changes(fs: &dyn HostFs, changes: &[Change]) -> Result<(), String> {
    let mut failed = Vec::new();
    for c in changes.iter().rev() {
        if effective(fs, c).is_ok_and(|now| now == wanted(c, &c.old)) {
            continue;
        }
        let ok = fs
            .write(&c.path, &c.old)
            .and_then(|_| effective(fs, c))
            .map(|now| now == wanted(c, &c.old));
        match ok {
            Ok(true) => {}
            Ok(false) => failed.push(format!(
                "{} did not take its old value {:?} back",
                c.path, c.old
            )),
            Err(e) => failed.push(format!("{}: {e}", c.path)),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

impl UndoFile {
    pub fn new(fs: &dyn HostFs, changes: &[Change]) -> UndoFile {
        UndoFile {
            nfvisor_undo: 1,
            root: fs.root().display().to_string(),
            changes: changes.to_vec(),
        }
    }

    /// Writes the file for root's eyes only (0600), durably, replacing
    /// what is at `path` by a rename (never writing through a link there).
    pub fn write(&self, path: &std::path::Path) -> Result<(), HostError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| HostError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_file_name(format!(
            ".{}.{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("undo"),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let text = serde_json::to_string_pretty(self).expect("serialisable");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .and_then(|_| std::fs::rename(&tmp, path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .map_err(err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// Reads an undo file; a file that is not one is an error naming it.
pub fn read_undo(path: &std::path::Path) -> Result<UndoFile, HostError> {
    let text = std::fs::read_to_string(path).map_err(|source| HostError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let u: UndoFile = serde_json::from_str(&text).map_err(|e| HostError::Corrupt {
        path: path.display().to_string(),
        why: format!("not an nfvisor undo file: {e}"),
    })?;
    if u.nfvisor_undo != 1 {
        return Err(HostError::Corrupt {
            path: path.display().to_string(),
            why: format!("undo file version {} is not supported", u.nfvisor_undo),
        });
    }
    if let Some(c) = u.changes.iter().find(|c| !plan_can_write(&c.path)) {
        return Err(HostError::Corrupt {
            path: path.display().to_string(),
            why: format!(
                "it names {}, which `host tune` never changes: refused, nothing restored",
                c.path
            ),
        });
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::super::check::{check, Status};
    use super::super::fixture::{build, FixtureFs, HostModel};
    use super::*;

    fn root(name: &str, model: HostModel) -> (std::path::PathBuf, FixtureFs) {
        let dir = std::env::temp_dir().join(format!("nfv-host-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        build(&dir, model).unwrap();
        let fs = FixtureFs::new(&dir).unwrap();
        (dir, fs)
    }

    /// Every path the plan touches, with its effective value.
    fn snapshot(fs: &dyn HostFs, plan: &Plan) -> Vec<(String, String)> {
        plan.changes
            .iter()
            .map(|c| (c.path.clone(), effective(fs, c).unwrap_or_default()))
            .collect()
    }

    #[test]
    fn apply_then_undo_restores_every_effective_value() {
        let (dir, fs) = root("undo", HostModel::Untuned);
        let plan = plan(&fs, "2-3", Some(256)).unwrap();
        let before = snapshot(&fs, &plan);
        let applied = apply(&fs, &plan).unwrap();
        // the managed IRQ 24 is refused and reported, the rest applied
        assert_eq!(applied.refused.len(), 1, "{:?}", applied.refused);
        assert!(applied.refused[0].change.path.contains("/irq/24/"));
        // 256 hugepages asked, the node grants 100
        assert_eq!(applied.partial.len(), 1);
        assert_eq!(applied.partial[0].1, "100");
        assert_eq!(
            read_opt(&fs, "/sys/kernel/mm/transparent_hugepage/enabled").unwrap(),
            "always madvise [never]"
        );
        assert_eq!(
            read_opt(&fs, "/proc/irq/25/smp_affinity_list").unwrap(),
            "0-1"
        );
        let r = check(&fs, Some("2-3")).unwrap();
        assert_eq!(r.get("sched.rt-throttling").unwrap().status, Status::Pass);
        assert_eq!(r.get("mem.thp").unwrap().status, Status::Pass);
        assert_eq!(r.get("irq.irqbalance").unwrap().status, Status::Pass);

        undo_changes(&fs, &applied.applied).unwrap();
        assert_eq!(snapshot(&fs, &plan), before);
        assert_eq!(
            read_opt(&fs, "/sys/kernel/mm/transparent_hugepage/enabled").unwrap(),
            "always [madvise] never"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failing_write_rolls_everything_back() {
        let (dir, fs) = root("rollback", HostModel::Untuned);
        let plan = plan(&fs, "2-3", None).unwrap();
        let before = snapshot(&fs, &plan);
        // the workqueue mask comes after several other changes in the plan
        std::fs::write(
            dir.join(".fixture/deny"),
            "/sys/devices/virtual/workqueue/cpumask\n",
        )
        .unwrap();
        let e = apply(&fs, &plan).unwrap_err().to_string();
        assert!(
            e.contains("workqueue/cpumask") && e.contains("rolled back"),
            "{e}"
        );
        assert_eq!(snapshot(&fs, &plan), before);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_cpu_lists_and_corrupt_files_are_refused_before_any_change() {
        let (dir, fs) = root("bad", HostModel::Untuned);
        assert!(plan(&fs, "", None)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(plan(&fs, "9", None)
            .unwrap_err()
            .to_string()
            .contains("CPU 9 does not exist"));
        assert!(plan(&fs, "0-3", None)
            .unwrap_err()
            .to_string()
            .contains("no housekeeping CPU"));
        std::fs::write(dir.join("proc/sys/kernel/sched_rt_runtime_us"), "lots\n").unwrap();
        let e = plan(&fs, "2-3", None).unwrap_err().to_string();
        assert!(
            e.contains("sched_rt_runtime_us") && e.contains("lots"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_tuned_host_needs_nothing() {
        let (dir, fs) = root("tuned", HostModel::Tuned);
        let p = plan(&fs, "2-3", None).unwrap();
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        assert!(p.reboot.is_empty(), "{:?}", p.reboot);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
