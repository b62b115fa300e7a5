//! nfvisor: a virtual machine monitor on Linux KVM for network functions.

mod config;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use config::RunArgs;

#[derive(Parser)]
#[command(
    name = "nfvisor",
    version,
    about = "A VMM on KVM for network functions: real-time vCPUs, measured"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM (the bundled latency-probe guest when no kernel is given).
    Run {
        #[command(flatten)]
        args: RunArgs,
        /// Print exactly one JSON document (the run report) on stdout; the
        /// guest console goes to stderr or --serial.
        #[arg(long)]
        json: bool,
        /// Print per-vCPU exit accounting when the VM ends.
        #[arg(long)]
        exit_stats: bool,
    },
    /// List the bundled guests, or export their images.
    Guests {
        #[command(subcommand)]
        action: Option<GuestsAction>,
    },
}

#[derive(Subcommand)]
enum GuestsAction {
    /// List the bundled guests.
    List,
    /// Write each bundled guest as DIR/NAME.elf (PVH ELF, runs under QEMU too).
    Export { dir: PathBuf },
}

/// Exit codes of `nfvisor run` (documented in the README).
pub mod exit_code {
    /// 0-63: the guest's own status from the debug-exit port.
    pub const GUEST_STATUS_MAX: u32 = 63;
    /// The guest wrote a status above 63 (the value is in the report).
    pub const GUEST_STATUS_HIGH: u8 = 64;
    /// The guest crashed: triple fault / shutdown, internal error, failed entry.
    pub const GUEST_CRASH: u8 = 65;
    /// The guest stopped without a status (reset or power-off request).
    pub const GUEST_NO_STATUS: u8 = 66;
    /// Command-line usage error (clap).
    pub const USAGE: u8 = 2;
    /// The VMM failed while the guest ran.
    pub const VMM_RUNTIME: u8 = 70;
    /// The host cannot provide what was asked (KVM, memory, RT settings).
    pub const HOST: u8 = 71;
    /// Bad input: files, images, sizes, CPU lists, TOML.
    pub const BAD_INPUT: u8 = 78;
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NFVISOR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit_code::USAGE } else { 0 });
        }
    };
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("nfvisor: error: {e:#}");
            ExitCode::from(error_code(&e))
        }
    }
}

fn error_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<vmm::Error>() {
        Some(
            vmm::Error::Kvm(_)
            | vmm::Error::Memory(_)
            | vmm::Error::Rt(_)
            | vmm::Error::Device(_)
            | vmm::Error::Vcpu { .. },
        ) => exit_code::HOST,
        _ => exit_code::BAD_INPUT,
    }
}

fn dispatch(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Run {
            args,
            json,
            exit_stats,
        } => run(&args, json, exit_stats),
        Command::Guests { action } => guests_cmd(action.unwrap_or(GuestsAction::List)),
    }
}

fn run(args: &RunArgs, json: bool, exit_stats: bool) -> Result<u8> {
    let resolved = args.resolve(json)?;
    let bundled = resolved.bundled;
    let vm = vmm::Vm::create(resolved.spec)?;
    let report = vm.run()?;
    let transcript = String::from_utf8_lossy(&report.transcript).into_owned();
    let guest = guests::protocol::parse(&transcript);
    let code = report::exit_code_of(&report.stop);
    if json {
        report::print_json(&report, bundled, &guest, code)?;
    } else {
        report::print_text(&report, &guest, exit_stats);
    }
    Ok(code)
}

fn guests_cmd(action: GuestsAction) -> Result<u8> {
    match action {
        GuestsAction::List => {
            for g in guests::ALL {
                println!("{:<14} {}", g.name, g.summary);
            }
        }
        GuestsAction::Export { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for g in guests::ALL {
                let path = dir.join(format!("{}.elf", g.name));
                std::fs::write(&path, g.image)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("{}", path.display());
            }
        }
    }
    Ok(0)
}
