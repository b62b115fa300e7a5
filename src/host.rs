//! `nfvisor host check` and `nfvisor host tune`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use rt::host::check::{self, CheckReport, Status};
use rt::host::tune;

#[derive(Subcommand)]
pub enum HostCmd {
    /// Is this host tuned for real-time VMs? Read-only; each finding with its fix.
    Check {
        /// CPUs meant for real-time vCPUs (default: the isolated CPUs).
        #[arg(long, value_name = "LIST")]
        cpus: Option<String>,
        #[arg(long)]
        json: bool,
        /// Check the tree under DIR instead of / (fixtures, a mounted image).
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
    /// Apply the run-time fixes for the RT CPUs (a dry run unless --apply).
    Tune {
        #[arg(long, value_name = "LIST", required_unless_present = "undo")]
        cpus: Option<String>,
        /// Make the changes (all or none) and write an undo file.
        #[arg(long)]
        apply: bool,
        /// Where --apply writes the undo file.
        #[arg(long, value_name = "FILE", default_value = "nfvisor-tune-undo.json")]
        undo_file: PathBuf,
        /// Restore every value an undo file recorded.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["apply", "cpus"])]
        undo: Option<PathBuf>,
        /// Reserve this many 2 MiB hugepages on the RT CPUs' NUMA node.
        #[arg(long, value_name = "N")]
        hugepages: Option<u64>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
}

/// Exit codes of `host check` / `host tune`.
const FINDINGS_FAIL: u8 = 1;

fn open(root: &Path) -> Result<Box<dyn rt::host::HostFs>> {
    rt::host::open_root(root).with_context(|| format!("--root {}", root.display()))
}

pub fn run(cmd: HostCmd) -> Result<u8> {
    match cmd {
        HostCmd::Check { cpus, json, root } => {
            let fs = open(&root)?;
            let r = check::check(fs.as_ref(), cpus.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_check(&r, std::io::stdout().is_terminal());
            }
            Ok(if r.count(Status::Fail) + r.count(Status::Error) > 0 {
                FINDINGS_FAIL
            } else {
                0
            })
        }
        HostCmd::Tune {
            cpus,
            apply,
            undo_file,
            undo,
            hugepages,
            json,
            root,
        } => {
            let fs = open(&root)?;
            if let Some(file) = undo {
                let u = tune::read_undo(&file)?;
                if let Err(e) = tune::undo_changes(fs.as_ref(), &u.changes) {
                    anyhow::bail!("undo from {}: {e}", file.display());
                }
                if json {
                    println!("{}", serde_json::json!({ "restored": u.changes }));
                } else {
                    for c in &u.changes {
                        println!("restored {} = {}", c.path, c.old.trim_end());
                    }
                }
                return Ok(0);
            }
            let cpus = cpus.context("--cpus is required")?;
            let plan = tune::plan(fs.as_ref(), &cpus, hugepages)?;
            if !apply {
                if json {
                    println!("{}", serde_json::json!({ "dry_run": true, "plan": plan }));
                } else {
                    print_plan(&plan);
                }
                return Ok(0);
            }
            // the journal goes down before the first change: a process
            // killed after any write leaves what undoes it (values not yet
            // changed are left alone by the undo)
            tune::UndoFile::new(fs.as_ref(), &plan.changes)
                .write(&undo_file)
                .with_context(|| "the undo journal: nothing was changed")?;
            let applied = match tune::apply(fs.as_ref(), &plan) {
                Ok(a) => a,
                Err(e) => {
                    // rolled back: the journal goes once every value is
                    // back (checked again here); otherwise it stays, for
                    // `--undo`
                    if tune::undo_changes(fs.as_ref(), &plan.changes).is_ok() {
                        let _ = std::fs::remove_file(&undo_file);
                    }
                    return Err(e.into());
                }
            };
            let undo_doc = tune::UndoFile::new(fs.as_ref(), &applied.applied);
            if let Err(e) = undo_doc.write(&undo_file) {
                let rolled = tune::undo_changes(fs.as_ref(), &applied.applied);
                anyhow::bail!(
                    "writing the undo file {}: {e}; the changes were rolled back{}",
                    undo_file.display(),
                    rolled
                        .err()
                        .map(|r| format!(" (except: {r})"))
                        .unwrap_or_default()
                );
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "applied": applied, "undo_file": undo_file, "reboot": plan.reboot, "notes": plan.notes })
                );
            } else {
                for c in &applied.applied {
                    println!(
                        "changed  {}: {} -> {}  ({})",
                        c.path,
                        c.old.lines().next().unwrap_or(""),
                        c.new.lines().last().unwrap_or(""),
                        c.what
                    );
                }
                for (c, got) in &applied.partial {
                    println!(
                        "PARTIAL  {}: asked {}, the kernel granted {got}",
                        c.path, c.new
                    );
                }
                for r in &applied.refused {
                    println!("REFUSED  {}: {}", r.change.path, r.reason);
                }
                println!(
                    "undo with: nfvisor host tune --undo {}",
                    undo_file.display()
                );
                print_reboot(&plan);
            }
            Ok(0)
        }
    }
}

fn print_plan(plan: &tune::Plan) {
    println!(
        "dry run for RT CPUs {} (housekeeping CPUs {}); --apply makes these changes:",
        rt::host::format_cpu_list(&plan.rt_cpus),
        rt::host::format_cpu_list(&plan.housekeeping_cpus)
    );
    if plan.changes.is_empty() {
        println!("  nothing to change at run time");
    }
    for c in &plan.changes {
        println!("  # {}", c.what);
        println!("  {}", c.command());
    }
    print_reboot(plan);
}

fn print_reboot(plan: &tune::Plan) {
    if !plan.reboot.is_empty() {
        println!(
            "needs a reboot: add to the kernel command line:\n  {}",
            plan.reboot.join(" ")
        );
    }
    for n in &plan.notes {
        println!("note: {n}");
    }
}

fn print_check(r: &CheckReport, color: bool) {
    let paint = |s: Status| -> (&str, &str) {
        let (label, code) = match s {
            Status::Pass => ("PASS", "32"),
            Status::Info => ("INFO", "36"),
            Status::Warn => ("WARN", "33"),
            Status::Fail => ("FAIL", "31"),
            Status::Firmware => ("FIRMWARE", "35"),
            Status::Error => ("ERROR", "31;1"),
        };
        (label, code)
    };
    println!(
        "host check of {} for RT CPUs {} (from {}); KVM: {}",
        r.root,
        if r.rt_cpus.is_empty() {
            "(none)".to_string()
        } else {
            rt::host::format_cpu_list(&r.rt_cpus)
        },
        r.rt_cpus_from,
        r.kvm
    );
    let mut group = "";
    for f in &r.findings {
        if f.group != group {
            group = f.group;
            println!("\n{group}");
        }
        let (label, code) = paint(f.status);
        let label = if color {
            format!("\x1b[{code}m{label:<8}\x1b[0m")
        } else {
            format!("{label:<8}")
        };
        println!("  {label} {:<28} {}", f.id, f.found);
        if !matches!(f.status, Status::Pass) {
            println!("  {:<8} {:<28} wants: {}", "", "", f.recommends);
        }
        if let Some(fix) = &f.fix {
            if !matches!(f.status, Status::Pass | Status::Info) {
                println!("  {:<8} {:<28} fix: {fix}", "", "");
            }
        }
    }
    println!(
        "\n{} pass, {} warn, {} fail, {} error, {} to check in firmware, {} info",
        r.count(Status::Pass),
        r.count(Status::Warn),
        r.count(Status::Fail),
        r.count(Status::Error),
        r.count(Status::Firmware),
        r.count(Status::Info)
    );
}
