//! `nfvisor flavor`: an OpenStack Nova flavor's extra specs and a compute
//! node's CPU sets turned into an nfvisor VM configuration (`vmm::VmConfig`,
//! printed as the TOML file `nfvisor run --config` takes, or as JSON).
//!
//! Each `hw:` key keeps Nova's meaning and Nova's refusals (the messages are
//! Nova's own where it has one); what nfvisor cannot do is refused by name,
//! never dropped. Keys outside `hw:` (aggregate, quota, trait, ...) only
//! steer Nova's scheduler or another driver: they are listed, not used.
//! The host's SMT siblings and NUMA nodes are read from sysfs under a root
//! (`--root`, `/` by default), so a test or a planning run can lay out
//! another host's tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::Serialize;
use vmm::config::{RtConfig, Size};
use vmm::VmConfig;

/// Flags of `nfvisor flavor`.
#[derive(Debug, clap::Args)]
pub struct FlavorArgs {
    /// The flavor: what `openstack flavor show -f json` prints (its
    /// "properties" hold the extra specs), or a JSON object of extra specs;
    /// `-` reads stdin.
    #[arg(long, value_name = "FILE.json")]
    pub extra_specs: PathBuf,
    /// vCPUs (default: the flavor document's "vcpus").
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Guest memory: MiB as a flavor's RAM (2048), or 2G, 512M (default:
    /// the flavor document's "ram").
    #[arg(long, value_name = "M")]
    pub memory: Option<String>,
    /// The compute node's `[compute] cpu_dedicated_set` (Nova syntax:
    /// "2-7,^4"): pinned vCPUs take these, in the order listed.
    #[arg(long, value_name = "LIST")]
    pub cpu_dedicated_set: Option<String>,
    /// The compute node's `[compute] cpu_shared_set`: the VMM's threads
    /// (hw:emulator_threads_policy=share) and a mixed flavor's shared vCPUs.
    #[arg(long, value_name = "LIST")]
    pub cpu_shared_set: Option<String>,
    /// SCHED_FIFO priority of the realtime vCPUs (1-99; default 80; Nova's
    /// `[libvirt] realtime_scheduler_priority`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=99))]
    pub realtime_priority: Option<i32>,
    /// Print one JSON document (the configuration, the placement, the
    /// notes) instead of TOML.
    #[arg(long)]
    pub json: bool,
    /// Read the host's SMT siblings and NUMA nodes under this root.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
}

/// The realtime priority when --realtime-priority is not given (the
/// README's RT profile).
pub const DEFAULT_RT_PRIORITY: i32 = 80;

/// The `hw:` keys nfvisor maps (any other `hw:` key is refused).
pub const KNOWN_KEYS: &[&str] = &[
    "hw:cpu_policy",
    "hw:cpu_thread_policy",
    "hw:cpu_dedicated_mask",
    "hw:cpu_realtime",
    "hw:cpu_realtime_mask",
    "hw:emulator_threads_policy",
    "hw:mem_page_size",
    "hw:locked_memory",
    "hw:numa_nodes",
    "hw:vif_multiqueue_enabled",
    "hw:pmu",
];

/// A flavor as read from its JSON document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flavor {
    pub name: Option<String>,
    /// The document's "vcpus" and "ram" (MiB), when it is a flavor.
    pub vcpus: Option<u32>,
    pub ram_mib: Option<u64>,
    pub extra_specs: BTreeMap<String, String>,
}

/// An extra spec's value as text (Nova keeps them as strings; a plain
/// JSON object may give numbers and booleans).
fn spec_text(key: &str, v: &serde_json::Value) -> Result<String> {
    Ok(match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => n.to_string(),
        other => bail!("extra spec {key}: {other} is not a string, number or boolean"),
    })
}

fn specs_of_object(
    m: &serde_json::Map<String, serde_json::Value>,
) -> Result<BTreeMap<String, String>> {
    m.iter()
        .map(|(k, v)| Ok((k.clone(), spec_text(k, v)?)))
        .collect()
}

/// Reads `openstack flavor show -f json` output (properties as an object
/// or as Nova's `key='value', ...` string) or a plain object of extra specs.
pub fn parse_document(text: &str) -> Result<Flavor> {
    let doc: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    let obj = doc
        .as_object()
        .ok_or_else(|| anyhow!("expected one JSON object (a flavor or its extra specs)"))?;
    let is_flavor = obj.contains_key("properties")
        || (obj.contains_key("vcpus") && obj.contains_key("ram"))
        || obj.contains_key("os-flavor-access:is_public");
    if !is_flavor {
        return Ok(Flavor {
            extra_specs: specs_of_object(obj)?,
            ..Default::default()
        });
    }
    let extra_specs = match obj.get("properties") {
        None | Some(serde_json::Value::Null) => BTreeMap::new(),
        Some(serde_json::Value::Object(m)) => specs_of_object(m)?,
        Some(serde_json::Value::String(s)) => parse_properties(s)?,
        Some(other) => {
            bail!("\"properties\": {other} is neither an object nor Nova's key='value' list")
        }
    };
    let vcpus = match obj.get("vcpus") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| anyhow!("\"vcpus\": {v} is not a number of vCPUs"))?,
        ),
    };
    let ram_mib = match obj.get("ram") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| anyhow!("\"ram\": {v} is not a number of MiB"))?,
        ),
    };
    Ok(Flavor {
        name: obj.get("name").and_then(|n| n.as_str()).map(str::to_string),
        vcpus,
        ram_mib,
        extra_specs,
    })
}

/// Parses the string form older clients print for a flavor's properties:
/// `hw:cpu_policy='dedicated', hw:mem_page_size='1GB'` (a value may hold
/// commas: `hw:cpu_realtime_mask='^0,^1'`).
pub fn parse_properties(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .ok_or_else(|| anyhow!("properties {s:?}: {rest:?} is not key='value'"))?;
        let key = key.trim().to_string();
        ensure!(!key.is_empty(), "properties {s:?}: a value without a key");
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('\'') {
            // the closing quote is the one followed by the end or ", "
            let end = q
                .match_indices('\'')
                .map(|(i, _)| i)
                .find(|&i| {
                    let t = q[i + 1..].trim_start();
                    t.is_empty() || t.starts_with(',')
                })
                .ok_or_else(|| {
                    anyhow!("properties {s:?}: the value of {key} has no closing quote")
                })?;
            (q[..end].to_string(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        ensure!(
            out.insert(key.clone(), value).is_none(),
            "properties {s:?}: {key} is given twice"
        );
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Ok(out)
}

/// Parses Nova's CPU set syntax ("1-4,^3,6": numbers, ranges, `^` to
/// exclude a number or a range) into CPU numbers in the order first
/// listed, exclusions removed (nova.virt.hardware.parse_cpu_spec).
pub fn parse_cpu_spec(spec: &str) -> Result<Vec<usize>> {
    let num = |s: &str, rule: &str, what: &str| -> Result<usize> {
        s.trim()
            .parse::<usize>()
            .map_err(|_| anyhow!("Invalid {what} expression {rule:?}"))
    };
    let mut include: Vec<usize> = Vec::new();
    let mut reject = BTreeSet::new();
    for rule in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let (excl, body) = match rule.strip_prefix('^') {
            Some(b) => (true, b),
            None => (false, rule),
        };
        let cpus: Vec<usize> = match body.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a, rule, "range")?, num(b, rule, "range")?);
                ensure!(a <= b, "Invalid range expression {rule:?}");
                (a..=b).collect()
            }
            None => vec![num(
                body,
                rule,
                if excl { "exclusion" } else { "inclusion" },
            )?],
        };
        if excl {
            reject.extend(cpus);
        } else {
            for c in cpus {
                if !include.contains(&c) {
                    include.push(c);
                }
            }
        }
    }
    include.retain(|c| !reject.contains(c));
    Ok(include)
}

/// A vCPU mask as Nova reads `hw:cpu_realtime_mask` and
/// `hw:cpu_dedicated_mask`: a mask starting with `^` excludes from all
/// vCPUs ("^0": all but vCPU 0), any other names the vCPUs.
pub fn parse_vcpu_mask(mask: &str, vcpus: u32) -> Result<BTreeSet<u32>> {
    let spec = if mask.trim().starts_with('^') {
        format!("0-{},{mask}", vcpus.saturating_sub(1))
    } else {
        mask.to_string()
    };
    parse_cpu_spec(&spec)?
        .into_iter()
        .map(|c| u32::try_from(c).map_err(|_| anyhow!("vCPU {c} is out of range")))
        .collect()
}

/// A CPU list in the kernel's form, order kept ("4-7", "1,3", "8,2-3").
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", cpus[i], cpus[j])
        } else {
            cpus[i].to_string()
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Nova's booleans (oslo strutils.bool_from_string, strict, as Nova's
/// extra spec validation takes them).
fn nova_bool(key: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" | "on" | "y" | "yes" => Ok(true),
        "0" | "f" | "false" | "off" | "n" | "no" => Ok(false),
        _ => bail!("{key}='{v}': not a boolean (true/false, yes/no, 1/0, on/off)"),
    }
}

/// A NUMA node and its CPUs.
pub type Node = (u32, Vec<usize>);

/// The host facts under a root: SMT siblings and NUMA nodes.
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    pub fn new(root: &Path) -> Result<Sysfs> {
        ensure!(root.is_dir(), "--root {}: not a directory", root.display());
        Ok(Sysfs {
            root: root.to_path_buf(),
        })
    }

    fn read_list(&self, rel: &str) -> Result<Vec<usize>> {
        let path = self.root.join(rel);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        rt::parse_cpu_list(text.trim()).with_context(|| format!("{}", path.display()))
    }

    /// CPU `cpu` and its SMT siblings (itself alone without SMT).
    pub fn siblings(&self, cpu: usize) -> Result<Vec<usize>> {
        let s = self
            .read_list(&format!(
                "sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
            ))
            .with_context(|| format!("CPU {cpu}'s SMT siblings"))?;
        Ok(if s.contains(&cpu) { s } else { vec![cpu] })
    }

    /// Every NUMA node with its CPUs; None when the host shows no nodes.
    pub fn nodes(&self) -> Result<Option<Vec<Node>>> {
        let dir = self.root.join("sys/devices/system/node");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(None);
        };
        let mut nodes = Vec::new();
        for e in entries {
            let e = e.with_context(|| format!("reading {}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(n) = name
                .strip_prefix("node")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let cpus = self.read_list(&format!("sys/devices/system/node/{name}/cpulist"))?;
            nodes.push((n, cpus));
        }
        nodes.sort();
        Ok((!nodes.is_empty()).then_some(nodes))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuPolicy {
    Shared,
    Dedicated,
    Mixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThreadPolicy {
    Prefer,
    Isolate,
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EmulatorPolicy {
    Share,
    Isolate,
}

/// What a vCPU is placed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuPlace {
    pub vcpu: u32,
    pub cpu: usize,
    /// "dedicated" or "shared": the set the CPU comes from.
    pub set: &'static str,
    /// SCHED_FIFO at the realtime priority.
    pub realtime: bool,
}

/// The flavor as nfvisor runs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mapping {
    pub flavor: Option<String>,
    pub config: VmConfig,
    /// One entry per vCPU; empty when the vCPUs float (shared policy).
    pub placement: Vec<VcpuPlace>,
    /// SMT siblings kept idle (hw:cpu_thread_policy=isolate).
    pub reserved_cpus: Vec<usize>,
    /// What each setting comes from, and what nfvisor does differently.
    pub notes: Vec<String>,
    /// Extra specs outside `hw:` (not used).
    pub ignored: Vec<String>,
}

/// The host side of a mapping.
pub struct Host<'a> {
    pub dedicated: Option<Vec<usize>>,
    pub shared: Option<Vec<usize>>,
    pub sysfs: &'a Sysfs,
}

/// How many CPUs a set must give, and what it gives: a refusal otherwise.
fn need(what: &str, set_flag: &str, needed: usize, have: &[usize]) -> Result<()> {
    ensure!(
        have.len() >= needed,
        "{what}: needs {needed} CPU(s) from {set_flag}, it has {} ({})",
        have.len(),
        if have.is_empty() {
            "none given".to_string()
        } else {
            format_cpu_list(have)
        }
    );
    Ok(())
}

/// The dedicated CPUs picked: one per dedicated vCPU, the emulator
/// threads' own CPU, and the siblings kept idle.
struct Picked {
    cpus: Vec<usize>,
    emulator: Option<usize>,
    reserved: Vec<usize>,
}

/// Takes `n` CPUs (+1 for isolated emulator threads) from the dedicated
/// set under a thread policy.
fn pick_dedicated(
    set: &[usize],
    n: usize,
    extra: bool,
    policy: ThreadPolicy,
    why: &str,
    sysfs: &Sysfs,
    notes: &mut Vec<String>,
) -> Result<Picked> {
    let want = n + usize::from(extra);
    let what = if extra {
        format!("{why} ({n} vCPU(s) + 1 for hw:emulator_threads_policy=isolate)")
    } else {
        format!("{why} ({n} vCPU(s))")
    };
    let split = |mut v: Vec<usize>| {
        let emulator = if extra { v.pop() } else { None };
        (v, emulator)
    };
    match policy {
        ThreadPolicy::Prefer => {
            need(&what, "--cpu-dedicated-set", want, set)?;
            let (cpus, emulator) = split(set[..want].to_vec());
            Ok(Picked {
                cpus,
                emulator,
                reserved: Vec::new(),
            })
        }
        ThreadPolicy::Isolate => {
            // one thread per core; the core's other threads stay idle. Only
            // cores wholly inside the set qualify (a sibling outside it runs
            // other work).
            let mut taken = Vec::new();
            let mut reserved = Vec::new();
            let mut whole_cores = Vec::new();
            let mut partial = Vec::new();
            for &c in set {
                if taken.contains(&c) || reserved.contains(&c) {
                    continue;
                }
                let sib = sysfs.siblings(c)?;
                if let Some(out) = sib.iter().find(|s| !set.contains(s)) {
                    partial.push(format!("{c} (sibling {out} is not in the set)"));
                    continue;
                }
                whole_cores.push(c);
                if taken.len() < want {
                    taken.push(c);
                    reserved.extend(sib.into_iter().filter(|&s| s != c));
                }
            }
            ensure!(
                taken.len() == want,
                "hw:cpu_thread_policy='isolate': {what} needs {want} whole core(s) in --cpu-dedicated-set, it has {}{}",
                whole_cores.len(),
                if partial.is_empty() {
                    String::new()
                } else {
                    format!("; not whole: CPU {}", partial.join(", "))
                }
            );
            if !reserved.is_empty() {
                notes.push(format!(
                    "hw:cpu_thread_policy=isolate: one thread per core; SMT sibling(s) {} kept idle (nothing else may run there)",
                    format_cpu_list(&reserved)
                ));
            }
            let (cpus, emulator) = split(taken);
            Ok(Picked {
                cpus,
                emulator,
                reserved,
            })
        }
        ThreadPolicy::Require => {
            // vCPUs on thread siblings: whole cores of the set with 2+
            // threads in it, filled thread by thread
            let mut groups: Vec<Vec<usize>> = Vec::new();
            let mut smt = false;
            for &c in set {
                if groups.iter().any(|g| g.contains(&c)) {
                    continue;
                }
                let sib = sysfs.siblings(c)?;
                smt |= sib.len() > 1;
                let mut g = vec![c];
                g.extend(set.iter().copied().filter(|s| *s != c && sib.contains(s)));
                groups.push(g);
            }
            ensure!(
                smt,
                "hw:cpu_thread_policy='require': Host does not support hyperthreading or hyperthreading is disabled, but 'require' threads policy was requested (no CPU of --cpu-dedicated-set {} has an SMT sibling)",
                format_cpu_list(set)
            );
            let paired: Vec<usize> = groups
                .iter()
                .filter(|g| g.len() > 1)
                .flatten()
                .copied()
                .collect();
            ensure!(
                paired.len() >= n,
                "hw:cpu_thread_policy='require': {why} ({n} vCPU(s)) needs {n} CPU(s) in sibling pairs from --cpu-dedicated-set, it has {} ({})",
                paired.len(),
                if paired.is_empty() {
                    "no pair of siblings".to_string()
                } else {
                    format_cpu_list(&paired)
                }
            );
            let cpus = paired[..n].to_vec();
            let emulator = if extra {
                let e = paired[n..]
                    .iter()
                    .chain(set.iter())
                    .find(|c| !cpus.contains(c))
                    .copied();
                ensure!(
                    e.is_some(),
                    "hw:emulator_threads_policy='isolate': needs {} CPU(s) from --cpu-dedicated-set, it has {} ({})",
                    n + 1,
                    set.len(),
                    format_cpu_list(set)
                );
                e
            } else {
                None
            };
            notes.push(format!(
                "hw:cpu_thread_policy=require: vCPUs on thread siblings ({})",
                groups
                    .iter()
                    .filter(|g| g.iter().any(|c| cpus.contains(c)))
                    .map(|g| format_cpu_list(g))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
            Ok(Picked {
                cpus,
                emulator,
                reserved: Vec::new(),
            })
        }
    }
}

/// The flavor on this host: `vcpus` and `memory` as given (flags over the
/// document), the CPU sets, the realtime priority.
pub fn map(
    flavor: &Flavor,
    vcpus: u32,
    memory: Size,
    host: &Host,
    rt_priority: Option<i32>,
) -> Result<Mapping> {
    ensure!(vcpus >= 1, "--vcpus {vcpus}: at least 1");
    let memory_bytes = memory.bytes().context("--memory")?;
    let specs = &flavor.extra_specs;
    let mut notes = Vec::new();

    // every hw: key is one nfvisor maps; others are only listed
    let unknown: Vec<String> = specs
        .iter()
        .filter(|(k, _)| k.starts_with("hw:") && !KNOWN_KEYS.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}='{v}'"))
        .collect();
    ensure!(
        unknown.is_empty(),
        "extra spec(s) {}: nfvisor does not map {} (it maps {})",
        unknown.join(", "),
        if unknown.len() == 1 {
            "this key"
        } else {
            "these keys"
        },
        KNOWN_KEYS.join(", ")
    );
    let ignored: Vec<String> = specs
        .iter()
        .filter(|(k, _)| !k.starts_with("hw:"))
        .map(|(k, v)| format!("{k}='{v}'"))
        .collect();
    for k in specs.keys() {
        if k.starts_with("resources") && (k.ends_with(":PCPU") || k.ends_with(":VCPU")) {
            notes.push(format!(
                "{k} is Nova's placement request for {} CPUs; nfvisor pins by hw:cpu_policy only",
                if k.ends_with(":PCPU") {
                    "dedicated"
                } else {
                    "shared"
                }
            ));
        }
        if k.starts_with("trait") && k.ends_with(":HW_CPU_HYPERTHREADING") {
            notes.push(format!(
                "{k} is Nova's scheduling trait for SMT hosts; nfvisor reads hw:cpu_thread_policy only"
            ));
        }
    }
    let get = |k: &str| specs.get(k).map(String::as_str);

    // --- the policies, as nova.virt.hardware reads them
    let policy = match get("hw:cpu_policy") {
        None => None,
        Some("shared") => Some(CpuPolicy::Shared),
        Some("dedicated") => Some(CpuPolicy::Dedicated),
        Some("mixed") => Some(CpuPolicy::Mixed),
        Some(v) => bail!(
            "hw:cpu_policy='{v}': CPU policy requested from 'flavor extra specs' is invalid, given: '{v}', available: 'dedicated, shared, mixed'."
        ),
    };
    let thread_policy = match get("hw:cpu_thread_policy") {
        None => None,
        Some("prefer") => Some(ThreadPolicy::Prefer),
        Some("isolate") => Some(ThreadPolicy::Isolate),
        Some("require") => Some(ThreadPolicy::Require),
        Some(v) => bail!(
            "hw:cpu_thread_policy='{v}': CPU thread policy requested from 'flavor extra specs' is invalid, given: '{v}', available: 'prefer, isolate, require'."
        ),
    };
    let emulator = match get("hw:emulator_threads_policy") {
        None => None,
        Some("share") => Some(EmulatorPolicy::Share),
        Some("isolate") => Some(EmulatorPolicy::Isolate),
        Some(v) => bail!(
            "hw:emulator_threads_policy='{v}': CPU emulator threads option requested is invalid, given: '{v}', available: 'share, isolate'."
        ),
    };
    let all_vcpus: BTreeSet<u32> = (0..vcpus).collect();

    // hw:cpu_realtime and its mask (get_realtime_cpu_constraint)
    let realtime = match get("hw:cpu_realtime") {
        Some(v) => nova_bool("hw:cpu_realtime", v)?,
        None => false,
    };
    let rt_vcpus: Option<BTreeSet<u32>> = if realtime {
        let mask = get("hw:cpu_realtime_mask");
        let set = match mask {
            Some(m) => {
                parse_vcpu_mask(m, vcpus).with_context(|| format!("hw:cpu_realtime_mask='{m}'"))?
            }
            None => all_vcpus.clone(),
        };
        let shown = match mask {
            Some(m) => format!("hw:cpu_realtime_mask='{m}'"),
            None => "hw:cpu_realtime='yes' without hw:cpu_realtime_mask (every vCPU)".to_string(),
        };
        let nova_mask_reason = "Realtime policy needs vCPU(s) mask configured with at least 1 RT vCPU and 1 ordinary vCPU. See hw:cpu_realtime_mask";
        ensure!(
            !set.is_empty(),
            "{shown}: {nova_mask_reason} (this mask leaves no RT vCPU)"
        );
        ensure!(
            set != all_vcpus || emulator.is_some(),
            "{shown}: {nova_mask_reason} (or offload the VMM's threads with hw:emulator_threads_policy)"
        );
        ensure!(
            set.is_subset(&all_vcpus),
            "{shown}: Realtime policy vCPU(s) mask is configured with RT vCPUs that are not a subset of the vCPUs in the flavor ({vcpus} vCPUs: 0-{})",
            vcpus - 1
        );
        Some(set)
    } else {
        if let Some(m) = get("hw:cpu_realtime_mask") {
            notes.push(format!(
                "hw:cpu_realtime_mask='{m}' has no effect: hw:cpu_realtime is not set to true"
            ));
        }
        None
    };

    // hw:cpu_dedicated_mask (get_dedicated_cpu_constraint)
    let dedicated_mask: Option<BTreeSet<u32>> = match get("hw:cpu_dedicated_mask")
        .filter(|m| !m.is_empty())
    {
        None => None,
        Some(m) => {
            let p = parse_vcpu_mask(m, vcpus)
                .with_context(|| format!("hw:cpu_dedicated_mask='{m}'"))?;
            ensure!(
                !p.is_empty() && !all_vcpus.is_subset(&p),
                "hw:cpu_dedicated_mask='{m}': Mixed instance must have at least 1 pinned vCPU and 1 unpinned vCPU. See 'hw:cpu_dedicated_mask'."
            );
            ensure!(
                p.is_subset(&all_vcpus),
                "hw:cpu_dedicated_mask='{m}': Mixed instance dedicated vCPU(s) mask is not a subset of vCPUs in the flavor ({vcpus} vCPUs: 0-{}). See \"hw:cpu_dedicated_mask\"",
                vcpus - 1
            );
            Some(p)
        }
    };

    // the sanity checks of numa_get_constraints
    let policy_shown = match get("hw:cpu_policy") {
        Some(v) => format!("hw:cpu_policy='{v}'"),
        None => "hw:cpu_policy unset (shared)".to_string(),
    };
    match policy {
        None | Some(CpuPolicy::Shared) => {
            if let Some(t) = get("hw:cpu_thread_policy") {
                bail!("hw:cpu_thread_policy='{t}' with {policy_shown}: Cannot set cpu thread pinning policy in a non dedicated cpu pinning policy");
            }
            if emulator == Some(EmulatorPolicy::Isolate) {
                bail!("hw:emulator_threads_policy='isolate' with {policy_shown}: An isolated CPU emulator threads option requires a dedicated CPU policy option.");
            }
            if dedicated_mask.is_some() {
                bail!(
                    "hw:cpu_dedicated_mask='{}' with {policy_shown}: Cannot specify 'hw:cpu_dedicated_mask' without the 'mixed' policy.",
                    get("hw:cpu_dedicated_mask").unwrap_or("")
                );
            }
            if realtime {
                bail!(
                    "hw:cpu_realtime='{}' with {policy_shown}: Cannot set realtime policy in a non dedicated cpu pinning policy",
                    get("hw:cpu_realtime").unwrap_or("")
                );
            }
        }
        Some(CpuPolicy::Dedicated) => {
            if dedicated_mask.is_some() {
                bail!(
                    "hw:cpu_dedicated_mask='{}' with {policy_shown}: Cannot specify 'hw:cpu_dedicated_mask' without the 'mixed' policy.",
                    get("hw:cpu_dedicated_mask").unwrap_or("")
                );
            }
        }
        Some(CpuPolicy::Mixed) => {
            let both_or_none = rt_vcpus.is_some() == dedicated_mask.is_some();
            ensure!(
                !both_or_none,
                "{policy_shown} with {}: Dedicated CPU set can be specified from either 'hw:cpu_dedicated_mask' or 'hw:cpu_realtime_mask' when using 'mixed' CPU policy. 'hw:cpu_dedicated_mask' and 'hw:cpu_realtime_mask' can not be specified at the same time, or be specified with none of them.",
                if dedicated_mask.is_some() {
                    "both masks"
                } else {
                    "neither hw:cpu_dedicated_mask nor hw:cpu_realtime (with its mask)"
                }
            );
            if let Some(rt) = &rt_vcpus {
                // the realtime vCPUs are the dedicated ones; the rest shared
                ensure!(
                    !all_vcpus.is_subset(rt),
                    "{policy_shown} with hw:cpu_realtime_mask='{}': Mixed instance must have at least 1 pinned vCPU and 1 unpinned vCPU. See 'hw:cpu_dedicated_mask'.",
                    get("hw:cpu_realtime_mask").unwrap_or("")
                );
            }
        }
    }
    let policy = policy.unwrap_or(CpuPolicy::Shared);
    let dedicated_vcpus: BTreeSet<u32> = match policy {
        CpuPolicy::Shared => BTreeSet::new(),
        CpuPolicy::Dedicated => all_vcpus.clone(),
        CpuPolicy::Mixed => dedicated_mask
            .clone()
            .or_else(|| rt_vcpus.clone())
            .unwrap_or_default(),
    };

    // --- memory: page size and locking
    let page_size = get("hw:mem_page_size");
    let hugepages = match page_size {
        None => None,
        Some(v) => page_size_setting(v, &mut notes)?,
    };
    if let Some(hp) = &hugepages {
        let bytes = vmm::config::parse_size(hp)?;
        ensure!(
            memory_bytes % bytes == 0,
            "hw:mem_page_size='{}': --memory {} MiB is not a whole number of {hp} pages",
            page_size.unwrap_or(""),
            memory_bytes >> 20
        );
    }
    let locked = match get("hw:locked_memory") {
        Some(v) => {
            let b = nova_bool("hw:locked_memory", v)?;
            ensure!(
                !b || page_size.is_some(),
                "hw:locked_memory='{v}': locked_memory value in image or flavor is forbidden when mem_page_size is not set."
            );
            b
        }
        None => false,
    };
    if realtime {
        notes.push(
            "hw:cpu_realtime: guest memory locked (mlock), as Nova locks a realtime guest's memory"
                .into(),
        );
    }

    // --- the host's CPU sets
    if let (Some(d), Some(s)) = (&host.dedicated, &host.shared) {
        let both: Vec<usize> = d.iter().copied().filter(|c| s.contains(c)).collect();
        ensure!(
            both.is_empty(),
            "--cpu-dedicated-set and --cpu-shared-set share CPU(s) {}: The '[compute] cpu_dedicated_set' and '[compute] cpu_shared_set' configuration options must be disjoint.",
            format_cpu_list(&both)
        );
    }
    let empty = Vec::new();
    let dedicated_set = host.dedicated.as_ref().unwrap_or(&empty);
    let shared_set = host.shared.as_ref();

    // --- placement
    let mut placement = Vec::new();
    let mut reserved = Vec::new();
    let mut emulator_cpu = None;
    let is_rt = |v: u32| rt_vcpus.as_ref().is_some_and(|s| s.contains(&v));
    if policy == CpuPolicy::Shared {
        notes.push(format!(
            "{}: vCPUs are not pinned (they float over the host's CPUs{})",
            if get("hw:cpu_policy").is_some() {
                "hw:cpu_policy=shared"
            } else {
                "hw:cpu_policy unset (shared)"
            },
            if shared_set.is_some() {
                "; Nova would keep them on cpu_shared_set, nfvisor pins a vCPU to one CPU or to none"
            } else {
                ""
            }
        ));
    } else {
        let extra = emulator == Some(EmulatorPolicy::Isolate);
        let picked = pick_dedicated(
            dedicated_set,
            dedicated_vcpus.len(),
            extra,
            thread_policy.unwrap_or(ThreadPolicy::Prefer),
            &policy_shown,
            host.sysfs,
            &mut notes,
        )?;
        reserved = picked.reserved;
        emulator_cpu = picked.emulator;
        let shared_vcpus: Vec<u32> = all_vcpus.difference(&dedicated_vcpus).copied().collect();
        if !shared_vcpus.is_empty() {
            let s = shared_set.map(Vec::as_slice).unwrap_or(&[]);
            need(
                &format!("{policy_shown}: the {} shared vCPU(s)", shared_vcpus.len()),
                "--cpu-shared-set",
                shared_vcpus.len(),
                s,
            )?;
            notes.push(
                "hw:cpu_policy=mixed: Nova lets the shared vCPUs float over cpu_shared_set; nfvisor pins each vCPU, so each shared vCPU gets a CPU of --cpu-shared-set of its own".into(),
            );
        }
        let (mut d, mut s) = (
            picked.cpus.into_iter(),
            shared_set.into_iter().flatten().copied(),
        );
        for v in 0..vcpus {
            let (cpu, set) = if dedicated_vcpus.contains(&v) {
                (
                    d.next().expect("picked one per dedicated vCPU"),
                    "dedicated",
                )
            } else {
                (s.next().expect("checked one per shared vCPU"), "shared")
            };
            placement.push(VcpuPlace {
                vcpu: v,
                cpu,
                set,
                realtime: is_rt(v),
            });
        }
    }

    // --- the VMM's own threads (libvirt's emulatorpin, as Nova sets it)
    let housekeeping: Option<Vec<usize>> = match (emulator, shared_set) {
        (Some(EmulatorPolicy::Isolate), _) => {
            let c = emulator_cpu.expect("picked with the vCPUs");
            notes.push(format!(
                "hw:emulator_threads_policy=isolate: the VMM's threads on CPU {c} of their own"
            ));
            Some(vec![c])
        }
        (Some(EmulatorPolicy::Share), Some(s)) => {
            notes.push(format!(
                "hw:emulator_threads_policy=share: the VMM's threads on --cpu-shared-set {}",
                format_cpu_list(s)
            ));
            Some(s.clone())
        }
        (_, shared) if policy == CpuPolicy::Shared => {
            if let Some(s) = shared {
                notes.push(format!(
                    "the VMM's threads on --cpu-shared-set {} (where Nova runs an unpinned guest)",
                    format_cpu_list(s)
                ));
            }
            shared.cloned()
        }
        (e, _) => {
            // with the vCPUs: on the CPUs of the non-realtime ones
            let cpus: Vec<usize> = placement
                .iter()
                .filter(|p| !p.realtime)
                .map(|p| p.cpu)
                .collect();
            ensure!(
                !cpus.is_empty(),
                "hw:emulator_threads_policy='share' without --cpu-shared-set: Use of realtime CPUs requires either one or more non-realtime CPU(s) or offloaded emulator threads (every vCPU is realtime and no shared CPU set is given for the VMM's threads)"
            );
            notes.push(format!(
                "{}: the VMM's threads float over the {}vCPUs' CPUs {}",
                if e.is_some() {
                    "hw:emulator_threads_policy=share without --cpu-shared-set"
                } else {
                    "hw:emulator_threads_policy unset"
                },
                if realtime { "non-realtime " } else { "" },
                format_cpu_list(&cpus)
            ));
            Some(cpus)
        }
    };

    // --- NUMA: one node, when asked (or implied, as Nova implies it for
    // pinned or hugepage guests)
    let numa_nodes = match get("hw:numa_nodes") {
        None => None,
        Some(v) => {
            let n: u64 = v.trim().parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                anyhow!("hw:numa_nodes='{v}': The property 'numa_nodes' cannot be '{v}'. It must be a number greater than 0")
            })?;
            ensure!(
                n == 1,
                "hw:numa_nodes='{v}': nfvisor does not model NUMA guests yet"
            );
            Some(n)
        }
    };
    let implied = numa_nodes.is_none() && (policy != CpuPolicy::Shared || hugepages.is_some());
    let mut numa_node = None;
    if numa_nodes.is_some() || implied {
        let why = if implied {
            "Nova gives a pinned or hugepage guest one NUMA node"
        } else {
            "hw:numa_nodes=1"
        };
        let cpus: Vec<usize> = placement.iter().map(|p| p.cpu).collect();
        if cpus.is_empty() {
            notes.push(format!(
                "{why}: the vCPUs are not pinned, so memory is not bound to a node"
            ));
        } else {
            match host.sysfs.nodes()? {
                None => notes.push(format!(
                    "{why}: the host shows no NUMA nodes (sys/devices/system/node): memory not bound"
                )),
                Some(nodes) => {
                    let on: BTreeSet<u32> = cpus
                        .iter()
                        .filter_map(|c| nodes.iter().find(|(_, l)| l.contains(c)).map(|(n, _)| *n))
                        .collect();
                    let unknown: Vec<usize> = cpus
                        .iter()
                        .copied()
                        .filter(|c| !nodes.iter().any(|(_, l)| l.contains(c)))
                        .collect();
                    if on.len() == 1 && unknown.is_empty() {
                        let n = *on.first().expect("one node");
                        notes.push(format!("{why}: memory bound to node {n}, where the vCPUs' CPUs are"));
                        numa_node = Some(n);
                    } else {
                        let nodes_txt = on.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
                        let detail = if unknown.is_empty() {
                            format!("the vCPUs' CPUs {} lie on nodes {nodes_txt}", format_cpu_list(&cpus))
                        } else {
                            format!(
                                "CPU(s) {} are on no NUMA node of this host (sys/devices/system/node/node*/cpulist under --root)",
                                format_cpu_list(&unknown)
                            )
                        };
                        ensure!(
                            implied,
                            "hw:numa_nodes='1': {detail}; give CPU sets on one node"
                        );
                        notes.push(format!("{why}, but {detail}: memory not bound to a node"));
                    }
                }
            }
        }
    }

    // --- accepted, with what nfvisor does today
    if let Some(v) = get("hw:vif_multiqueue_enabled") {
        let on = nova_bool("hw:vif_multiqueue_enabled", v)?;
        notes.push(format!(
            "hw:vif_multiqueue_enabled={on}: {}",
            if on {
                "a NIC's queue pairs are the port's: give each --net queues=N (Nova gives one pair per vCPU, nfvisor takes up to 16; a TAP made multi_queue)"
            } else {
                "each NIC has one queue pair unless its --net says queues="
            }
        ));
    }
    if let Some(v) = get("hw:pmu") {
        let on = nova_bool("hw:pmu", v)?;
        notes.push(format!(
            "hw:pmu={on}: the guest sees KVM's CPUID PMU leaf (0xa) as is{}",
            if on {
                ""
            } else {
                " (nfvisor does not hide the vPMU)"
            }
        ));
    }
    if rt_priority.is_some() && !realtime {
        notes.push(
            "--realtime-priority has no effect: the flavor does not ask for hw:cpu_realtime".into(),
        );
    }
    let priority = realtime.then(|| rt_priority.unwrap_or(DEFAULT_RT_PRIORITY));
    if let (Some(p), Some(rt)) = (priority, &rt_vcpus) {
        let list: Vec<usize> = rt.iter().map(|&v| v as usize).collect();
        notes.push(format!(
            "hw:cpu_realtime: vCPU(s) {} SCHED_FIFO {p}{}",
            format_cpu_list(&list),
            if rt_priority.is_none() {
                " (--realtime-priority; Nova's [libvirt] realtime_scheduler_priority defaults to 1)"
            } else {
                ""
            }
        ));
    }

    let config = VmConfig {
        memory: Some(memory),
        vcpus: Some(vcpus),
        rt: RtConfig {
            cpus: (!placement.is_empty())
                .then(|| format_cpu_list(&placement.iter().map(|p| p.cpu).collect::<Vec<_>>())),
            housekeeping_cpus: housekeeping.map(|h| format_cpu_list(&h)),
            rt_priority: priority,
            realtime_vcpus: rt_vcpus
                .as_ref()
                .map(|s| format_cpu_list(&s.iter().map(|&v| v as usize).collect::<Vec<_>>())),
            mlock: (realtime || locked).then_some(true),
            hugepages,
            numa_node,
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(Mapping {
        flavor: flavor.name.clone(),
        config,
        placement,
        reserved_cpus: reserved,
        notes,
        ignored,
    })
}

/// `hw:mem_page_size` as nfvisor's `rt.hugepages` (Nova reads a bare
/// number as KiB; sizes as "2MB", "1GiB"...).
fn page_size_setting(v: &str, notes: &mut Vec<String>) -> Result<Option<String>> {
    let invalid = || anyhow!("hw:mem_page_size='{v}': Invalid memory page size '{v}'");
    let kib: u64 = match v {
        "small" => {
            notes.push("hw:mem_page_size=small: ordinary 4 KiB pages".into());
            return Ok(None);
        }
        "any" => {
            notes.push(
                "hw:mem_page_size=any: nfvisor takes small pages (give 2MB or 1GB for hugepages)"
                    .into(),
            );
            return Ok(None);
        }
        "large" => {
            notes.push("hw:mem_page_size=large: 2M hugepages (Nova takes the largest size the host has free; give 1GB for 1G pages)".into());
            return Ok(Some("2M".into()));
        }
        _ if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
            v.parse().map_err(|_| invalid())?
        }
        _ => {
            let digits = v.bytes().take_while(u8::is_ascii_digit).count();
            let (n, unit) = v.split_at(digits);
            let n: u64 = n.parse().map_err(|_| invalid())?;
            let unit = unit.strip_suffix('B').unwrap_or(unit);
            let unit = unit.strip_suffix('i').unwrap_or(unit);
            let shift = match unit {
                "k" | "K" => 0,
                "M" => 10,
                "G" => 20,
                "T" => 30,
                _ => return Err(invalid()),
            };
            n.checked_mul(1 << shift).ok_or_else(invalid)?
        }
    };
    match kib {
        4 => {
            notes.push(format!("hw:mem_page_size={v}: ordinary 4 KiB pages"));
            Ok(None)
        }
        2048 => Ok(Some("2M".into())),
        1048576 => Ok(Some("1G".into())),
        _ => bail!(
            "hw:mem_page_size='{v}': a {kib} KiB page is not one nfvisor backs memory with (4KB, 2MB or 1GB)"
        ),
    }
}

/// The mapping as the TOML file `nfvisor run --config` takes, the notes as
/// comments above it.
pub fn to_toml(m: &Mapping) -> Result<String> {
    let mut out = String::new();
    out.push_str(&format!(
        "# nfvisor configuration from OpenStack flavor{} (nfvisor flavor)\n",
        m.flavor
            .as_deref()
            .map(|n| format!(" {n:?}"))
            .unwrap_or_default()
    ));
    if m.placement.is_empty() {
        out.push_str("#\n# vCPUs float: not pinned (hw:cpu_policy=shared)\n");
    } else {
        out.push_str("#\n# vCPU  host CPU  from               FIFO\n");
        for p in &m.placement {
            let from = match p.set {
                "dedicated" => "cpu_dedicated_set",
                _ => "cpu_shared_set (1 per vCPU)",
            };
            let fifo = if p.realtime {
                m.config
                    .rt
                    .rt_priority
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            } else {
                "-".into()
            };
            out.push_str(&format!("# {:<5} {:<9} {from:<18} {fifo}\n", p.vcpu, p.cpu));
        }
    }
    if let Some(h) = &m.config.rt.housekeeping_cpus {
        out.push_str(&format!("# VMM threads (housekeeping): {h}\n"));
    }
    if !m.reserved_cpus.is_empty() {
        out.push_str(&format!(
            "# kept idle (SMT siblings): {}\n",
            format_cpu_list(&m.reserved_cpus)
        ));
    }
    if !m.notes.is_empty() {
        out.push_str("#\n# notes:\n");
        for n in &m.notes {
            out.push_str(&format!("# - {n}\n"));
        }
    }
    if !m.ignored.is_empty() {
        out.push_str(&format!(
            "#\n# ignored (not hw: keys): {}\n",
            m.ignored.join(", ")
        ));
    }
    out.push('\n');
    out.push_str(&toml::to_string(&m.config).context("writing the configuration as TOML")?);
    Ok(out)
}

/// `nfvisor flavor`.
pub fn run(args: &FlavorArgs) -> Result<u8> {
    let shown = args.extra_specs.display();
    let text = if args.extra_specs.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("--extra-specs -: reading stdin")?
    } else {
        std::fs::read_to_string(&args.extra_specs)
            .with_context(|| format!("--extra-specs {shown}: cannot read it"))?
    };
    let flavor = parse_document(&text).with_context(|| format!("--extra-specs {shown}"))?;
    let mut notes = Vec::new();
    let vcpus = match (args.vcpus, flavor.vcpus) {
        (Some(v), f) => {
            if let Some(f) = f.filter(|f| *f != v) {
                notes.push(format!("--vcpus {v} over the flavor's vcpus {f}"));
            }
            v
        }
        (None, Some(f)) => f,
        (None, None) => bail!("--vcpus: not given, and {shown} has no \"vcpus\""),
    };
    let memory = match (&args.memory, flavor.ram_mib) {
        (Some(m), f) => {
            let size = match m.trim().parse::<u64>() {
                Ok(n) => Size::MiB(n),
                Err(_) => Size::Text(m.trim().to_string()),
            };
            let bytes = size.bytes().with_context(|| format!("--memory {m}"))?;
            if let Some(f) = f.filter(|f| f.checked_mul(1 << 20) != Some(bytes)) {
                notes.push(format!("--memory {m} over the flavor's ram {f} MiB"));
            }
            size
        }
        (None, Some(f)) => Size::MiB(f),
        (None, None) => bail!("--memory: not given, and {shown} has no \"ram\""),
    };
    let set = |flag: &str, v: &Option<String>| -> Result<Option<Vec<usize>>> {
        v.as_deref()
            .map(|s| {
                let l = parse_cpu_spec(s).with_context(|| format!("{flag} {s:?}"))?;
                ensure!(!l.is_empty(), "{flag} {s:?}: no CPU left in it");
                Ok(l)
            })
            .transpose()
    };
    let sysfs = Sysfs::new(&args.root)?;
    let host = Host {
        dedicated: set("--cpu-dedicated-set", &args.cpu_dedicated_set)?,
        shared: set("--cpu-shared-set", &args.cpu_shared_set)?,
        sysfs: &sysfs,
    };
    let mut m = map(&flavor, vcpus, memory, &host, args.realtime_priority).with_context(|| {
        format!(
            "flavor {}",
            flavor.name.as_deref().unwrap_or(&shown.to_string())
        )
    })?;
    notes.append(&mut m.notes);
    m.notes = notes;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        print!("{}", to_toml(&m)?);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake host tree: `cores` lists each core's threads, `nodes` each
    /// node's CPUs.
    struct FakeHost {
        dir: PathBuf,
    }

    impl FakeHost {
        fn new(name: &str, cores: &[&[usize]], nodes: &[&[usize]]) -> FakeHost {
            let dir =
                std::env::temp_dir().join(format!("nfvisor-flavor-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            for core in cores {
                for &c in *core {
                    let t = dir.join(format!("sys/devices/system/cpu/cpu{c}/topology"));
                    std::fs::create_dir_all(&t).unwrap();
                    std::fs::write(
                        t.join("thread_siblings_list"),
                        format!("{}\n", format_cpu_list(core)),
                    )
                    .unwrap();
                }
            }
            for (i, cpus) in nodes.iter().enumerate() {
                let n = dir.join(format!("sys/devices/system/node/node{i}"));
                std::fs::create_dir_all(&n).unwrap();
                std::fs::write(n.join("cpulist"), format!("{}\n", format_cpu_list(cpus))).unwrap();
            }
            std::fs::create_dir_all(&dir).unwrap();
            FakeHost { dir }
        }

        fn sysfs(&self) -> Sysfs {
            Sysfs::new(&self.dir).unwrap()
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// 8 cores of 2 threads (n, n+8), node 0: cores 0-3, node 1: cores 4-7.
    fn smt_host(name: &str) -> FakeHost {
        let cores: Vec<Vec<usize>> = (0..8).map(|c| vec![c, c + 8]).collect();
        let cores: Vec<&[usize]> = cores.iter().map(Vec::as_slice).collect();
        FakeHost::new(
            name,
            &cores,
            &[&[0, 1, 2, 3, 8, 9, 10, 11], &[4, 5, 6, 7, 12, 13, 14, 15]],
        )
    }

    /// 8 CPUs without SMT, one node.
    fn flat_host(name: &str) -> FakeHost {
        let cores: Vec<Vec<usize>> = (0..8).map(|c| vec![c]).collect();
        let cores: Vec<&[usize]> = cores.iter().map(Vec::as_slice).collect();
        FakeHost::new(name, &cores, &[&[0, 1, 2, 3, 4, 5, 6, 7]])
    }

    fn specs(kv: &[(&str, &str)]) -> Flavor {
        Flavor {
            name: Some("test".into()),
            extra_specs: kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn map_on(
        h: &FakeHost,
        kv: &[(&str, &str)],
        vcpus: u32,
        dedicated: Option<&str>,
        shared: Option<&str>,
    ) -> Result<Mapping> {
        let sysfs = h.sysfs();
        let host = Host {
            dedicated: dedicated.map(|s| parse_cpu_spec(s).unwrap()),
            shared: shared.map(|s| parse_cpu_spec(s).unwrap()),
            sysfs: &sysfs,
        };
        map(&specs(kv), vcpus, Size::MiB(2048), &host, None)
    }

    fn refused(r: Result<Mapping>) -> String {
        format!("{:#}", r.expect_err("should be refused"))
    }

    #[test]
    fn nova_cpu_specs_and_masks_parse() {
        assert_eq!(parse_cpu_spec("1-4,^3,6").unwrap(), vec![1, 2, 4, 6]);
        assert_eq!(parse_cpu_spec("7,4-5").unwrap(), vec![7, 4, 5]);
        assert_eq!(parse_cpu_spec("0-7,^2-4").unwrap(), vec![0, 1, 5, 6, 7]);
        assert_eq!(parse_cpu_spec(" 1, ,2 ").unwrap(), vec![1, 2]);
        assert!(format!("{:#}", parse_cpu_spec("5-3").unwrap_err())
            .contains("Invalid range expression"));
        assert!(format!("{:#}", parse_cpu_spec("^x").unwrap_err()).contains("Invalid exclusion"));
        assert!(format!("{:#}", parse_cpu_spec("a").unwrap_err()).contains("Invalid inclusion"));
        // a mask starting with ^ excludes from all vCPUs
        assert_eq!(parse_vcpu_mask("^0", 4).unwrap(), BTreeSet::from([1, 2, 3]));
        assert_eq!(parse_vcpu_mask("^0-1", 4).unwrap(), BTreeSet::from([2, 3]));
        assert_eq!(parse_vcpu_mask("1,^2", 4).unwrap(), BTreeSet::from([1]));
        assert_eq!(
            parse_vcpu_mask("0-3", 4).unwrap(),
            BTreeSet::from([0, 1, 2, 3])
        );
        assert_eq!(format_cpu_list(&[4, 5, 6, 7, 2, 9, 10]), "4-7,2,9-10");
        assert_eq!(format_cpu_list(&[1, 3]), "1,3");
    }

    #[test]
    fn documents_in_each_form() {
        let obj = parse_document(
            r#"{"name":"vnf","vcpus":4,"ram":8192,"disk":20,"properties":{"hw:cpu_policy":"dedicated","hw:numa_nodes":1}}"#,
        )
        .unwrap();
        assert_eq!(
            (obj.name.as_deref(), obj.vcpus, obj.ram_mib),
            (Some("vnf"), Some(4), Some(8192))
        );
        assert_eq!(obj.extra_specs["hw:numa_nodes"], "1");
        let s = parse_document(
            r#"{"name":"vnf","vcpus":4,"ram":8192,"properties":"hw:cpu_policy='dedicated', hw:cpu_realtime_mask='^0,^1', quota:cpu_quota='10000'"}"#,
        )
        .unwrap();
        assert_eq!(s.extra_specs["hw:cpu_realtime_mask"], "^0,^1");
        assert_eq!(s.extra_specs["quota:cpu_quota"], "10000");
        assert_eq!(s.extra_specs.len(), 3);
        let plain = parse_document(r#"{"hw:cpu_policy":"dedicated","hw:pmu":false}"#).unwrap();
        assert_eq!(plain.vcpus, None);
        assert_eq!(plain.extra_specs["hw:pmu"], "false");
        let none =
            parse_document(r#"{"name":"m1.small","vcpus":1,"ram":2048,"properties":""}"#).unwrap();
        assert!(none.extra_specs.is_empty());
        assert!(parse_document("[1]").is_err());
        assert!(parse_document(r#"{"hw:cpu_policy":["x"]}"#).is_err());
        assert!(parse_properties("hw:cpu_policy='dedicated").is_err());
        assert_eq!(parse_properties("a=b, c='d,e'").unwrap()["c"], "d,e");
    }

    #[test]
    fn shared_policy_floats() {
        let h = flat_host("shared");
        for kv in [&[][..], &[("hw:cpu_policy", "shared")][..]] {
            let m = map_on(&h, kv, 2, Some("4-7"), None).unwrap();
            assert!(m.placement.is_empty());
            assert_eq!(m.config.rt.cpus, None);
            assert_eq!(m.config.rt.housekeeping_cpus, None);
            assert!(
                m.notes.iter().any(|n| n.contains("not pinned")),
                "{:?}",
                m.notes
            );
            assert!(to_toml(&m).unwrap().contains("vCPUs float"));
        }
        // with a shared set, the VMM's threads go there
        let m = map_on(
            &h,
            &[("hw:emulator_threads_policy", "share")],
            2,
            None,
            Some("0-1"),
        )
        .unwrap();
        assert_eq!(m.config.rt.housekeeping_cpus.as_deref(), Some("0-1"));
    }

    #[test]
    fn dedicated_pins_in_list_order() {
        let h = flat_host("dedicated");
        let m = map_on(
            &h,
            &[("hw:cpu_policy", "dedicated")],
            3,
            Some("6,2-5"),
            None,
        )
        .unwrap();
        assert_eq!(m.config.rt.cpus.as_deref(), Some("6,2-3"));
        assert_eq!(m.config.vcpus, Some(3));
        assert_eq!(m.config.memory, Some(Size::MiB(2048)));
        // the VMM's threads float over the vCPUs' CPUs (no emulator policy)
        assert_eq!(m.config.rt.housekeeping_cpus.as_deref(), Some("6,2-3"));
        assert_eq!(m.config.rt.rt_priority, None);
        assert_eq!(m.config.rt.realtime_vcpus, None);
        // implied NUMA: all on node 0
        assert_eq!(m.config.rt.numa_node, Some(0));
        let e = refused(map_on(
            &h,
            &[("hw:cpu_policy", "dedicated")],
            4,
            Some("2-4"),
            None,
        ));
        assert!(
            e.contains("needs 4 CPU(s) from --cpu-dedicated-set, it has 3 (2-4)"),
            "{e}"
        );
        let e = refused(map_on(&h, &[("hw:cpu_policy", "dedicated")], 1, None, None));
        assert!(e.contains("it has 0 (none given)"), "{e}");
        let e = refused(map_on(
            &h,
            &[("hw:cpu_policy", "exclusive")],
            1,
            Some("1"),
            None,
        ));
        assert!(
            e.contains("hw:cpu_policy='exclusive'") && e.contains("is invalid"),
            "{e}"
        );
        let e = refused(map_on(
            &h,
            &[("hw:cpu_policy", "dedicated")],
            1,
            Some("1-2"),
            Some("2-3"),
        ));
        assert!(
            e.contains("must be disjoint") && e.contains("share CPU(s) 2"),
            "{e}"
        );
    }

    #[test]
    fn mixed_pins_dedicated_and_shared_vcpus() {
        let h = flat_host("mixed");
        let m = map_on(
            &h,
            &[("hw:cpu_policy", "mixed"), ("hw:cpu_dedicated_mask", "^0")],
            4,
            Some("4-7"),
            Some("0-1"),
        )
        .unwrap();
        let sets: Vec<(usize, &str)> = m.placement.iter().map(|p| (p.cpu, p.set)).collect();
        assert_eq!(
            sets,
            vec![
                (0, "shared"),
                (4, "dedicated"),
                (5, "dedicated"),
                (6, "dedicated")
            ]
        );
        assert_eq!(m.config.rt.cpus.as_deref(), Some("0,4-6"));
        assert!(to_toml(&m).unwrap().contains("cpu_shared_set (1 per vCPU)"));
        // too few shared CPUs for the shared vCPUs
        let e = refused(map_on(
            &h,
            &[("hw:cpu_policy", "mixed"), ("hw:cpu_dedicated_mask", "0")],
            3,
            Some("4-7"),
            Some("1"),
        ));
        assert!(
            e.contains("2 shared vCPU(s)")
                && e.contains("needs 2 CPU(s) from --cpu-shared-set, it has 1"),
            "{e}"
        );
        // Nova's refusals
        for (kv, why) in [
            (
                &[("hw:cpu_policy", "mixed")][..],
                "can not be specified at the same time, or be specified with none",
            ),
            (
                &[("hw:cpu_policy", "mixed"), ("hw:cpu_dedicated_mask", "0-3")][..],
                "at least 1 pinned vCPU and 1 unpinned",
            ),
            (
                &[
                    ("hw:cpu_policy", "mixed"),
                    ("hw:cpu_dedicated_mask", "^0-3"),
                ][..],
                "at least 1 pinned vCPU and 1 unpinned",
            ),
            (
                &[("hw:cpu_policy", "mixed"), ("hw:cpu_dedicated_mask", "2,7")][..],
                "not a subset of vCPUs",
            ),
            (
                &[
                    ("hw:cpu_policy", "dedicated"),
                    ("hw:cpu_dedicated_mask", "0"),
                ][..],
                "Cannot specify 'hw:cpu_dedicated_mask' without the 'mixed' policy.",
            ),
            (
                &[("hw:cpu_dedicated_mask", "0")][..],
                "without the 'mixed' policy",
            ),
            (
                &[
                    ("hw:cpu_policy", "mixed"),
                    ("hw:cpu_dedicated_mask", "0"),
                    ("hw:cpu_realtime", "yes"),
                    ("hw:cpu_realtime_mask", "0"),
                ][..],
                "can not be specified at the same time",
            ),
        ] {
            let e = refused(map_on(&h, kv, 4, Some("4-7"), Some("0-3")));
            assert!(e.contains(why), "{kv:?}: {e}");
        }
        // mixed with realtime: the realtime vCPUs are the dedicated ones
        let m = map_on(
            &h,
            &[
                ("hw:cpu_policy", "mixed"),
                ("hw:cpu_realtime", "yes"),
                ("hw:cpu_realtime_mask", "^0"),
            ],
            3,
            Some("4-7"),
            Some("0-1"),
        )
        .unwrap();
        assert_eq!(m.config.rt.cpus.as_deref(), Some("0,4-5"));
        assert_eq!(m.config.rt.realtime_vcpus.as_deref(), Some("1-2"));
    }

    #[test]
    fn realtime_masks_priority_and_mlock() {
        let h = flat_host("realtime");
        let rt = [
            ("hw:cpu_policy", "dedicated"),
            ("hw:cpu_realtime", "yes"),
            ("hw:cpu_realtime_mask", "^0"),
        ];
        let m = map_on(&h, &rt, 4, Some("2-5"), None).unwrap();
        assert_eq!(m.config.rt.realtime_vcpus.as_deref(), Some("1-3"));
        assert_eq!(m.config.rt.rt_priority, Some(DEFAULT_RT_PRIORITY));
        assert_eq!(m.config.rt.mlock, Some(true));
        // the VMM's threads on the non-realtime vCPU's CPU, as Nova pins them
        assert_eq!(m.config.rt.housekeeping_cpus.as_deref(), Some("2"));
        assert_eq!(
            m.placement.iter().map(|p| p.realtime).collect::<Vec<_>>(),
            vec![false, true, true, true]
        );
        // the priority from the flag
        let sysfs = h.sysfs();
        let host = Host {
            dedicated: Some(vec![2, 3, 4, 5]),
            shared: None,
            sysfs: &sysfs,
        };
        let m = map(&specs(&rt), 4, Size::MiB(64), &host, Some(95)).unwrap();
        assert_eq!(m.config.rt.rt_priority, Some(95));
        // a mask naming the vCPUs
        let m = map_on(
            &h,
            &[
                ("hw:cpu_policy", "dedicated"),
                ("hw:cpu_realtime", "true"),
                ("hw:cpu_realtime_mask", "1,3"),
            ],
            4,
            Some("2-5"),
            None,
        )
        .unwrap();
        assert_eq!(m.config.rt.realtime_vcpus.as_deref(), Some("1,3"));
        // all vCPUs realtime: only with the VMM's threads elsewhere
        let all = [("hw:cpu_policy", "dedicated"), ("hw:cpu_realtime", "yes")];
        let e = refused(map_on(&h, &all, 2, Some("2-5"), None));
        assert!(e.contains("at least 1 RT vCPU and 1 ordinary vCPU"), "{e}");
        let iso = [
            ("hw:cpu_policy", "dedicated"),
            ("hw:cpu_realtime", "yes"),
            ("hw:emulator_threads_policy", "isolate"),
        ];
        let m = map_on(&h, &iso, 2, Some("2-5"), None).unwrap();
        assert_eq!(m.config.rt.realtime_vcpus.as_deref(), Some("0-1"));
        assert_eq!(m.config.rt.housekeeping_cpus.as_deref(), Some("4"));
        let share = [
            ("hw:cpu_policy", "dedicated"),
            ("hw:cpu_realtime", "yes"),
            ("hw:emulator_threads_policy", "share"),
        ];
        let e = refused(map_on(&h, &share, 2, Some("2-5"), None));
        assert!(
            e.contains("non-realtime CPU(s) or offloaded emulator threads"),
            "{e}"
        );
        assert!(map_on(&h, &share, 2, Some("2-5"), Some("0")).is_ok());
        // Nova's refusals
        for (kv, why) in [
            (
                &[("hw:cpu_realtime", "yes"), ("hw:cpu_realtime_mask", "^0")][..],
                "Cannot set realtime policy in a non dedicated cpu pinning policy",
            ),
            (
                &[
                    ("hw:cpu_policy", "shared"),
                    ("hw:cpu_realtime", "yes"),
                    ("hw:cpu_realtime_mask", "^0"),
                ][..],
                "Cannot set realtime policy in a non dedicated cpu pinning policy",
            ),
            (
                &[
                    ("hw:cpu_policy", "dedicated"),
                    ("hw:cpu_realtime", "yes"),
                    ("hw:cpu_realtime_mask", "^0-3"),
                ][..],
                "at least 1 RT vCPU and 1 ordinary vCPU",
            ),
            (
                &[
                    ("hw:cpu_policy", "dedicated"),
                    ("hw:cpu_realtime", "yes"),
                    ("hw:cpu_realtime_mask", "0-3"),
                ][..],
                "at least 1 RT vCPU and 1 ordinary vCPU",
            ),
            (
                &[
                    ("hw:cpu_policy", "dedicated"),
                    ("hw:cpu_realtime", "yes"),
                    ("hw:cpu_realtime_mask", "1,9"),
                ][..],
                "not a subset of the vCPUs in the flavor",
            ),
            (
                &[("hw:cpu_policy", "dedicated"), ("hw:cpu_realtime", "maybe")][..],
                "hw:cpu_realtime='maybe': not a boolean",
            ),
        ] {
            let e = refused(map_on(&h, kv, 4, Some("2-5"), None));
            assert!(e.contains(why), "{kv:?}: {e}");
        }
        // realtime off: the mask does nothing
        let m = map_on(
            &h,
            &[
                ("hw:cpu_policy", "dedicated"),
                ("hw:cpu_realtime", "no"),
                ("hw:cpu_realtime_mask", "^0"),
            ],
            2,
            Some("2-5"),
            None,
        )
        .unwrap();
        assert_eq!((m.config.rt.rt_priority, m.config.rt.mlock), (None, None));
    }

    #[test]
    fn emulator_threads() {
        let h = flat_host("emulator");
        let d = [
            ("hw:cpu_policy", "dedicated"),
            ("hw:emulator_threads_policy", "isolate"),
        ];
        let m = map_on(&h, &d, 2, Some("2-5"), Some("0-1")).unwrap();
        assert_eq!(m.config.rt.cpus.as_deref(), Some("2-3"));
        assert_eq!(m.config.rt.housekeeping_cpus.as_deref(), Some("4"));
        let e = refused(map_on(&h, &d, 2, Some("2-3"), None));
        assert!(
            e.contains("+ 1 for hw:emulator_threads_policy=isolate")
                && e.contains("needs 3 CPU(s)")
                && e.contains("it has 2"),
            "{e}"
        );
        let m = map_on(
            &h,
            &[
                ("hw:cpu_policy", "dedicated"),
                ("hw:emulator_threads_policy", "share"),
            ],
            2,
            Some("2-5"),
            Some("0-1"),
        )
        .unwrap();
        assert_eq!(m.config.rt.housekeeping_cpus.as_deref(), Some("0-1"));
        let e = refused(map_on(
            &h,
            &[("hw:emulator_threads_policy", "isolate")],
            2,
            Some("2-5"),
            None,
        ));
        assert!(
            e.contains(
                "An isolated CPU emulator threads option requires a dedicated CPU policy option."
            ),
            "{e}"
        );
        let e = refused(map_on(
            &h,
            &[
                ("hw:cpu_policy", "dedicated"),
                ("hw:emulator_threads_policy", "own"),
            ],
            2,
            Some("2-5"),
            None,
        ));
        assert!(e.contains("hw:emulator_threads_policy='own'"), "{e}");
    }

    #[test]
    fn thread_policies_read_the_siblings() {
        let h = smt_host("smt");
        // isolate: one thread per core, the siblings kept idle
        let iso = [
            ("hw:cpu_policy", "dedicated"),
            ("hw:cpu_thread_policy", "isolate"),
        ];
        let m = map_on(&h, &iso, 2, Some("2-3,10-11"), None).unwrap();
        assert_eq!(m.config.rt.cpus.as_deref(), Some("2-3"));
        assert_eq!(m.reserved_cpus, vec![10, 11]);
        assert!(to_toml(&m)
            .unwrap()
            .contains("kept idle (SMT siblings): 10-11"));
        // a core not wholly in the set does not count
        let e = refused(map_on(&h, &iso, 2, Some("2-3,10"), None));
        assert!(
            e.contains("needs 2 whole core(s)")
                && e.contains("it has 1")
                && e.contains("sibling 11 is not in the set"),
            "{e}"
        );
        // isolate with the emulator's own core
        let m = map_on(
            &h,
            &[
                ("hw:cpu_policy", "dedicated"),
                ("hw:cpu_thread_policy", "isolate"),
                ("hw:emulator_threads_policy", "isolate"),
            ],
            2,
            Some("1-3,9-11"),
            None,
        )
        .unwrap();
        assert_eq!(m.config.rt.cpus.as_deref(), Some("1-2"));
        assert_eq!(m.config.rt.housekeeping_cpus.as_deref(), Some("3"));
        assert_eq!(m.reserved_cpus, vec![9, 10, 11]);
        // require: vCPUs on sibling pairs
        let req = [
            ("hw:cpu_policy", "dedicated"),
            ("hw:cpu_thread_policy", "require"),
        ];
        let m = map_on(&h, &req, 3, Some("1-2,9-10,4"), None).unwrap();
        assert_eq!(m.config.rt.cpus.as_deref(), Some("1,9,2"));
        let e = refused(map_on(&h, &req, 4, Some("1-2,9,4"), None));
        assert!(
            e.contains("needs 4 CPU(s) in sibling pairs") && e.contains("it has 2 (1,9)"),
            "{e}"
        );
        // prefer (and unset): the set in order
        let m = map_on(
            &h,
            &[
                ("hw:cpu_policy", "dedicated"),
                ("hw:cpu_thread_policy", "prefer"),
            ],
            2,
            Some("1-2"),
            None,
        )
        .unwrap();
        assert_eq!(m.config.rt.cpus.as_deref(), Some("1-2"));
        // a thread policy needs pinning
        let e = refused(map_on(
            &h,
            &[("hw:cpu_thread_policy", "isolate")],
            2,
            None,
            None,
        ));
        assert!(
            e.contains(
                "Cannot set cpu thread pinning policy in a non dedicated cpu pinning policy"
            ),
            "{e}"
        );
        let e = refused(map_on(
            &h,
            &[
                ("hw:cpu_policy", "dedicated"),
                ("hw:cpu_thread_policy", "sometimes"),
            ],
            2,
            Some("1-2"),
            None,
        ));
        assert!(e.contains("hw:cpu_thread_policy='sometimes'"), "{e}");
        // without SMT: require is refused with Nova's reason, isolate is plain
        let flat = flat_host("nosmt");
        let e = refused(map_on(&flat, &req, 2, Some("2-5"), None));
        assert!(e.contains("Host does not support hyperthreading or hyperthreading is disabled, but 'require' threads policy was requested"), "{e}");
        let m = map_on(&flat, &iso, 2, Some("2-5"), None).unwrap();
        assert_eq!(m.config.rt.cpus.as_deref(), Some("2-3"));
        assert!(m.reserved_cpus.is_empty());
        // a CPU the host does not have
        let e = refused(map_on(&flat, &req, 2, Some("2,40"), None));
        assert!(e.contains("cpu40/topology/thread_siblings_list"), "{e}");
    }

    #[test]
    fn numa_from_the_nodes() {
        let h = smt_host("numa");
        let one = [("hw:cpu_policy", "dedicated"), ("hw:numa_nodes", "1")];
        let m = map_on(&h, &one, 2, Some("4-5"), None).unwrap();
        assert_eq!(m.config.rt.numa_node, Some(1));
        let e = refused(map_on(&h, &one, 2, Some("3-4"), None));
        assert!(
            e.contains("hw:numa_nodes='1'") && e.contains("lie on nodes 0, 1"),
            "{e}"
        );
        // implied (pinned, no hw:numa_nodes): noted, not refused
        let m = map_on(&h, &[("hw:cpu_policy", "dedicated")], 2, Some("3-4"), None).unwrap();
        assert_eq!(m.config.rt.numa_node, None);
        assert!(
            m.notes.iter().any(|n| n.contains("memory not bound")),
            "{:?}",
            m.notes
        );
        let e = refused(map_on(
            &h,
            &[("hw:cpu_policy", "dedicated"), ("hw:numa_nodes", "2")],
            2,
            Some("3-4"),
            None,
        ));
        assert!(
            e.contains("hw:numa_nodes='2': nfvisor does not model NUMA guests yet"),
            "{e}"
        );
        let e = refused(map_on(&h, &[("hw:numa_nodes", "0")], 2, None, None));
        assert!(e.contains("It must be a number greater than 0"), "{e}");
        // unpinned: nothing to bind
        let m = map_on(&h, &[("hw:numa_nodes", "1")], 2, None, None).unwrap();
        assert_eq!(m.config.rt.numa_node, None);
        // a host tree without nodes
        let bare = FakeHost::new("nonodes", &[&[0], &[1]], &[]);
        let m = map_on(&bare, &one, 2, Some("0-1"), None).unwrap();
        assert_eq!(m.config.rt.numa_node, None);
        assert!(
            m.notes.iter().any(|n| n.contains("shows no NUMA nodes")),
            "{:?}",
            m.notes
        );
    }

    #[test]
    fn memory_pages_and_locking() {
        let h = flat_host("memory");
        for (v, want) in [
            ("2MB", Some("2M")),
            ("2048", Some("2M")),
            ("2MiB", Some("2M")),
            ("1GB", Some("1G")),
            ("1048576", Some("1G")),
            ("large", Some("2M")),
            ("small", None),
            ("any", None),
            ("4KB", None),
        ] {
            let m = map_on(&h, &[("hw:mem_page_size", v)], 1, None, None).unwrap();
            assert_eq!(m.config.rt.hugepages.as_deref(), want, "{v}");
        }
        for v in ["huge", "3MB", "2Q"] {
            let e = refused(map_on(&h, &[("hw:mem_page_size", v)], 1, None, None));
            assert!(e.contains(&format!("hw:mem_page_size='{v}'")), "{e}");
        }
        let sysfs = h.sysfs();
        let host = Host {
            dedicated: None,
            shared: None,
            sysfs: &sysfs,
        };
        let e = format!(
            "{:#}",
            map(
                &specs(&[("hw:mem_page_size", "1GB")]),
                1,
                Size::MiB(1536),
                &host,
                None
            )
            .unwrap_err()
        );
        assert!(
            e.contains("1536 MiB is not a whole number of 1G pages"),
            "{e}"
        );
        let m = map_on(
            &h,
            &[("hw:mem_page_size", "2MB"), ("hw:locked_memory", "true")],
            1,
            None,
            None,
        )
        .unwrap();
        assert_eq!(m.config.rt.mlock, Some(true));
        let e = refused(map_on(&h, &[("hw:locked_memory", "true")], 1, None, None));
        assert!(e.contains("locked_memory value in image or flavor is forbidden when mem_page_size is not set."), "{e}");
        let m = map_on(&h, &[("hw:locked_memory", "false")], 1, None, None).unwrap();
        assert_eq!(m.config.rt.mlock, None);
    }

    #[test]
    fn accepted_unknown_and_ignored_keys() {
        let h = flat_host("keys");
        let m = map_on(
            &h,
            &[
                ("hw:vif_multiqueue_enabled", "true"),
                ("hw:pmu", "false"),
                ("aggregate_instance_extra_specs:pinned", "true"),
                ("quota:cpu_quota", "10000"),
            ],
            2,
            None,
            None,
        )
        .unwrap();
        assert!(
            m.notes
                .iter()
                .any(|n| n.contains("multiqueue") || n.contains("one queue pair")),
            "{:?}",
            m.notes
        );
        assert!(
            m.notes.iter().any(|n| n.contains("PMU leaf")),
            "{:?}",
            m.notes
        );
        assert_eq!(
            m.ignored,
            vec![
                "aggregate_instance_extra_specs:pinned='true'",
                "quota:cpu_quota='10000'"
            ]
        );
        let t = to_toml(&m).unwrap();
        assert!(
            t.contains("# ignored (not hw: keys): aggregate_instance_extra_specs:pinned='true'"),
            "{t}"
        );
        let e = refused(map_on(
            &h,
            &[("hw:cpu_sockets", "2"), ("hw:watchdog_action", "reset")],
            2,
            None,
            None,
        ));
        assert!(
            e.contains("hw:cpu_sockets='2'")
                && e.contains("hw:watchdog_action='reset'")
                && e.contains("does not map"),
            "{e}"
        );
        let e = refused(map_on(&h, &[("hw:pmu", "perhaps")], 2, None, None));
        assert!(e.contains("hw:pmu='perhaps'"), "{e}");
    }

    #[test]
    fn the_toml_is_a_vm_config() {
        let h = smt_host("toml");
        let m = map_on(
            &h,
            &[
                ("hw:cpu_policy", "dedicated"),
                ("hw:cpu_thread_policy", "isolate"),
                ("hw:cpu_realtime", "yes"),
                ("hw:cpu_realtime_mask", "^0"),
                ("hw:emulator_threads_policy", "isolate"),
                ("hw:mem_page_size", "1GB"),
                ("hw:numa_nodes", "1"),
            ],
            3,
            Some("4-7,12-15"),
            Some("0,8"),
        )
        .unwrap();
        let text = to_toml(&m).unwrap();
        let back: VmConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, m.config);
        assert_eq!(back.rt.cpus.as_deref(), Some("4-6"));
        assert_eq!(back.rt.housekeeping_cpus.as_deref(), Some("7"));
        assert_eq!(back.rt.realtime_vcpus.as_deref(), Some("1-2"));
        assert_eq!(back.rt.numa_node, Some(1));
        assert_eq!(back.rt.hugepages.as_deref(), Some("1G"));
        assert_eq!(m.reserved_cpus, vec![12, 13, 14, 15]);
        let (spec, mem) = back.rt.resolve().unwrap();
        assert_eq!(spec.cpus, Some(vec![4, 5, 6]));
        assert!(mem.mlock);
        // and as JSON
        let j: serde_json::Value = serde_json::to_value(&m).unwrap();
        assert_eq!(j["config"]["rt"]["cpus"], "4-6");
        assert_eq!(j["placement"][1]["realtime"], true);
    }
}
