//! nfvisor: a virtual machine monitor on Linux KVM for network functions.

mod api_server;
mod bench_blk;
mod bench_doorbell;
mod bench_migration;
mod bench_net;
mod bench_switch;
mod bench_vmm;
mod config;
mod flavor;
mod host;
mod latency;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use config::RunArgs;
use std::os::unix::fs::OpenOptionsExt;
use vmm::api::Request;

#[derive(Parser)]
#[command(
    name = "nfvisor",
    version,
    about = "A VMM on KVM for network functions: real-time vCPUs, measured"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The seccomp filters of the threads that run a guest (run, restore,
    /// receive): `on` stops the VMM at a call outside a thread's list and
    /// says which; `log` lets it run and the kernel's audit log records
    /// it; `off` installs none.
    #[arg(long, global = true, default_value = "on", value_name = "on|log|off")]
    seccomp: seccomp::Mode,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM (the bundled latency-probe guest when no kernel is given).
    Run {
        #[command(flatten)]
        args: Box<RunArgs>,
        /// Print exactly one JSON document (the run report) on stdout; the
        /// guest console goes to stderr or --serial.
        #[arg(long)]
        json: bool,
        /// Print per-vCPU exit accounting when the VM ends.
        #[arg(long)]
        exit_stats: bool,
    },
    /// A polling L2 learning switch whose ports are vhost-user backends
    /// (VMs' vhost-user NICs, DPDK's virtio-user): one socket per port in
    /// --socket-dir, or NAME=client:PATH to connect to a frontend.
    /// Runs until SIGINT/SIGTERM (or --duration-s), then prints each
    /// port's counters and the MAC table.
    Switch(SwitchArgs),
    /// Asks a running switch (its --control-socket): ports, fdb, stats,
    /// add-port, del-port.
    SwitchCtl(SwitchCtlArgs),
    /// Serve ivshmem peers (QEMU's ivshmem-server protocol): the shared
    /// memory and every peer's doorbell eventfds.
    IvshmemServer {
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The shared memory: a name in /dev/shm or a path (as QEMU's
        /// ivshmem-server's -m). Without it, a memfd sealed against
        /// shrinking and growing: no process can pull the pages out from
        /// under the peers' mappings, and nothing is left behind.
        #[arg(long)]
        shm: Option<String>,
        #[arg(long, default_value = "4M")]
        size: String,
        #[arg(long, default_value_t = 1)]
        vectors: u32,
    },
    /// Restore a snapshot and run it (where it was paused, it continues).
    Restore {
        /// The snapshot directory (or its snapshot.nfv).
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        #[command(flatten)]
        local: LocalFlags,
    },
    /// Wait for one incoming migration, then run the guest it brings.
    Receive {
        /// unix:PATH or tcp:ADDR:PORT
        #[arg(long)]
        listen: String,
        /// Only a source that proves it knows this file's token is accepted.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Listen on TCP without a token (anyone who reaches the port can
        /// send a VM, and nobody proves the stream): refused without it.
        #[arg(long)]
        insecure: bool,
        /// Seconds one read of the stream may wait for the source (a source
        /// that stops sending fails the migration here).
        #[arg(long, default_value_t = vmm::migrate::DEFAULT_IO_TIMEOUT_S, value_name = "SECONDS")]
        io_timeout: f64,
        #[command(flatten)]
        local: LocalFlags,
    },
    /// Live-migrate a running VM (through its control socket) to a receiver.
    Migrate {
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// unix:PATH or tcp:HOST:PORT of `nfvisor receive`
        #[arg(long)]
        to: String,
        /// Downtime budget: pre-copy stops when the rest fits in it.
        #[arg(long, default_value_t = 10.0)]
        downtime_ms: f64,
        /// Give up pre-copy after this many seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// Hold pre-copy to this many bytes per second (e.g. 500M, 5G).
        #[arg(long, value_name = "RATE")]
        bandwidth_limit: Option<String>,
        /// Streams in parallel (1-16): each carries its share of memory,
        /// read and written by a thread of its own.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
        connections: u64,
        /// A file holding the receiver's token (challenge-response).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Migrate over TCP without a token (guest memory goes to whoever
        /// answers, unauthenticated): refused without it.
        #[arg(long)]
        insecure: bool,
        /// Seconds one write of the stream may wait for the destination to
        /// read: one that stops reading fails the migration, and before GO
        /// the guest runs on here.
        #[arg(long, default_value_t = vmm::migrate::DEFAULT_IO_TIMEOUT_S, value_name = "SECONDS")]
        io_timeout: f64,
        /// On timeout: abort (the guest runs on here) or force (stop and complete).
        #[arg(long, default_value = "abort", value_parser = ["abort", "force"])]
        on_timeout: String,
        #[arg(long)]
        json: bool,
    },
    /// Pause, save to DIR and resume a running VM (through its control socket).
    Snapshot {
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Open (map) or close (unmap) a running VM's ivshmem window.
    IvshmemWindow {
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(value_parser = ["map", "unmap"])]
        action: String,
        #[arg(long)]
        json: bool,
    },
    /// Take a running VM's NIC link down or bring it up.
    NetLink {
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(value_parser = ["up", "down"])]
        action: String,
        /// Which NIC (net0, net1, ...); the only one when omitted.
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Pause a running VM's vCPUs.
    Pause {
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused VM.
    Resume {
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// A running VM's state.
    Status {
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The measurement suite (prints JSON with --json).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Host readiness for real-time VMs: check, and tune what can be tuned at run time.
    Host {
        #[command(subcommand)]
        cmd: host::HostCmd,
    },
    /// Turn an OpenStack Nova flavor's extra specs and a compute node's CPU
    /// sets into an nfvisor VM configuration (TOML, or JSON with --json).
    Flavor(flavor::FlavorArgs),
    /// List the bundled guests, or export their images.
    Guests {
        #[command(subcommand)]
        action: Option<GuestsAction>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// PIO and MMIO exit round trips: nfvisor beside the bare KVM_RUN floor
    /// and QEMU on the same exit-bench guest, interleaved.
    Exits {
        /// Round trips per op in each run.
        #[arg(long, default_value_t = 2000)]
        n: u64,
        /// Runs of each variant.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Leave QEMU out.
        #[arg(long)]
        no_qemu: bool,
        #[arg(long)]
        json: bool,
    },
    /// Latency inside the VM (timer wake-ups, vCPU preemption) beside the
    /// same measurement on the host, against the KVM4NFV targets.
    Latency {
        /// timer, irq, preempt or all.
        #[arg(long, default_value = "all")]
        metric: String,
        #[arg(long, default_value_t = 200)]
        period_us: u64,
        /// Samples per metric: timer wake-ups, or 1 ms preemption windows.
        #[arg(long, default_value_t = 2000, conflicts_with = "duration")]
        samples: u64,
        /// Instead of --samples: how long each metric runs (e.g. 60s, 2m).
        #[arg(long)]
        duration: Option<String>,
        /// Blocks the samples are split into; the host baseline runs between them.
        #[arg(long, default_value_t = 10)]
        blocks: u64,
        /// Preemption: gaps above this count (raised to 4x the loop's own cost).
        #[arg(long, default_value_t = 1000)]
        threshold_ns: u64,
        /// Leave the host baseline out.
        #[arg(long)]
        no_host_baseline: bool,
        /// Run a default profile and an RT profile (pinned, FIFO, mlock,
        /// prefault, exits disabled where possible), alternating.
        #[arg(long)]
        compare_profiles: bool,
        /// Also run the same guest under QEMU (-enable-kvm), placed like the
        /// last profile (taskset/chrt), interleaved with the others.
        #[arg(long)]
        qemu: bool,
        /// Runs each profile's samples are split into with --compare-profiles or --qemu.
        #[arg(long, default_value_t = 4)]
        rounds: u64,
        /// Write the histogram in cyclictest's -h format.
        #[arg(long, value_name = "FILE")]
        histogram: Option<PathBuf>,
        /// Write the histogram chart as SVG.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        rt: Box<config::RtArgs>,
    },
    /// Live migration on this host, both ends: total time, downtime, rounds.
    Migration(bench_migration::Options),
    /// virtio-blk: blk-probe's random 4 KiB reads and writes under nfvisor
    /// (O_DIRECT, io_uring) and QEMU (cache=none, aio=io_uring) on one
    /// image: IOPS, latency, the VMM's CPU per request.
    Blk(bench_blk::Options),
    /// virtio-net: the net-probe echo guest under nfvisor and QEMU on a
    /// TAP: VMM CPU and exits per frame, ping-pong round trip.
    Net(bench_net::Options),
    /// DPDK's PVP loop (testpmd, two virtio-user ports) through nfvisor's
    /// switch beside testpmd's own vhost PMD in io-forward mode.
    Switch(bench_switch::Options),
    /// The inter-VM packet ring between two processes pinned to two CPUs
    /// over shared memory: Mpps at batch 1/8/32 beside the streaming limit.
    Ivshmem {
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        batch: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
    /// ivshmem doorbell round trip between two VMs on one ivshmem server:
    /// nfvisor pair, QEMU pair (baseline), nfvisor pinging a QEMU VM.
    Doorbell {
        #[arg(long, default_value_t = 2000)]
        count: u64,
        /// Which pairs to measure, in this order.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "nfvisor,qemu,mixed"
        )]
        pairs: Vec<bench_doorbell::Pair>,
        #[arg(long)]
        json: bool,
    },
    /// One side of `bench ivshmem` (run by it, not by hand).
    #[command(hide = true)]
    RingWorker(bench::ring_bench::WorkerSpec),
    /// The zero-page scan of snapshots and migration: GB/s per
    /// implementation (scalar, AVX2, AVX-512 where the CPU has them).
    ZeroScan {
        /// Buffer size (larger than the caches).
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
    /// Start-up time and VMM memory over repeated runs of the hello guest.
    Startup {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GuestsAction {
    /// List the bundled guests.
    List,
    /// Write each bundled guest as DIR/NAME.elf (PVH ELF, runs under QEMU too).
    Export { dir: PathBuf },
}

static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

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
    let process_start = std::time::Instant::now();
    PROCESS_START.get_or_init(|| process_start);
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
    use rt::host::check::HostError;
    if let Some(HostError::Refused(_) | HostError::Io { .. }) = e.downcast_ref::<HostError>() {
        return exit_code::HOST;
    }
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

/// The commands that run a guest in this process: they set the seccomp
/// mode and put the main thread under the VMM role's filter before
/// anything else starts.
fn sandbox(command: &Command, mode: seccomp::Mode) -> Result<()> {
    if !matches!(
        command,
        Command::Run { .. }
            | Command::Restore { .. }
            | Command::Receive { .. }
            | Command::Switch(_)
    ) {
        return Ok(());
    }
    seccomp::set_mode(mode)?;
    seccomp::enter(seccomp::Role::Vmm)?;
    Ok(())
}

fn dispatch(cli: Cli) -> Result<u8> {
    sandbox(&cli.command, cli.seccomp)?;
    match cli.command {
        Command::Run {
            args,
            json,
            exit_stats,
        } => run(&args, json, exit_stats),
        Command::Bench { what } => bench_cmd(what),
        Command::Switch(args) => run_switch(&args),
        Command::SwitchCtl(args) => run_switch_ctl(&args),
        Command::IvshmemServer {
            socket,
            shm,
            size,
            vectors,
        } => {
            let size = config::parse_size(&size)?;
            anyhow::ensure!(
                size.is_power_of_two() && size >= 4096,
                "--size {size}: a power of two, at least 4 KiB"
            );
            anyhow::ensure!((1..=8).contains(&vectors), "--vectors {vectors}: 1 to 8");
            let (file, what) = match &shm {
                Some(shm) => {
                    let path = if shm.contains('/') {
                        PathBuf::from(shm)
                    } else {
                        PathBuf::from("/dev/shm").join(shm)
                    };
                    let file = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .mode(0o600)
                        .open(&path)
                        .with_context(|| format!("--shm {}", path.display()))?;
                    file.set_len(size)
                        .with_context(|| format!("--shm {}", path.display()))?;
                    (file, path.display().to_string())
                }
                None => (
                    devices::ivshmem_proto::sealed_region(size)
                        .context("the region (a sealed memfd)")?,
                    "a sealed memfd".to_string(),
                ),
            };
            tracing::info!(
                "ivshmem-server on {}: {what} ({} KiB), {vectors} vector(s)",
                socket.display(),
                size >> 10
            );
            let stop = std::sync::atomic::AtomicBool::new(false);
            devices::ivshmem_proto::serve(&socket, &file, vectors, &stop)
                .with_context(|| format!("--socket {}", socket.display()))?;
            Ok(0)
        }
        Command::Restore { from, local } => restore(&from, local),
        Command::Receive {
            listen,
            local,
            token_file,
            insecure,
            io_timeout,
        } => {
            if listen.starts_with("tcp:") && token_file.is_none() && !insecure {
                anyhow::bail!(
                    "--listen {listen}: TCP without --token-file lets anyone who reaches the port send a VM; give --token-file (both ends), or --insecure"
                );
            }
            let token = token_file
                .as_deref()
                .map(vmm::migrate::read_token)
                .transpose()?;
            anyhow::ensure!(
                io_timeout.is_finite() && io_timeout > 0.0 && io_timeout < 1e9,
                "--io-timeout {io_timeout}: a positive number of seconds"
            );
            receive(
                &listen,
                token,
                std::time::Duration::from_secs_f64(io_timeout),
                local,
            )
        }
        Command::Migrate {
            control_socket,
            to,
            downtime_ms,
            timeout,
            on_timeout,
            token_file,
            insecure,
            io_timeout,
            bandwidth_limit,
            connections,
            json,
        } => {
            let bandwidth_limit = match bandwidth_limit {
                Some(b) => {
                    let bytes = config::parse_size(&b)
                        .map_err(|e| anyhow::anyhow!("--bandwidth-limit: {e:#}"))?;
                    anyhow::ensure!(bytes > 0, "--bandwidth-limit must be > 0");
                    Some(bytes)
                }
                None => None,
            };
            vmm::migrate::Endpoint::parse(&to).map_err(|e| anyhow::anyhow!("--to {e}"))?;
            let token_file = match token_file {
                Some(f) => {
                    vmm::migrate::read_token(&f)?;
                    Some(std::path::absolute(&f)?)
                }
                None => None,
            };
            let req = Request::Migrate(vmm::api::MigrateRequest {
                to,
                downtime_ms,
                timeout_s: timeout,
                on_timeout: if on_timeout == "force" {
                    vmm::api::OnTimeout::Force
                } else {
                    vmm::api::OnTimeout::Abort
                },
                token_file,
                bandwidth_limit,
                connections: connections as u32,
                insecure,
                io_timeout_s: io_timeout,
            });
            if let Request::Migrate(m) = &req {
                m.check_transport()?;
            }
            migrate_with_progress(&control_socket, &req, json)
        }
        Command::Snapshot {
            control_socket,
            to,
            json,
        } => {
            let to = std::path::absolute(&to).with_context(|| format!("--to {}", to.display()))?;
            control(&control_socket, &Request::Snapshot { to }, json)
        }
        Command::IvshmemWindow {
            control_socket,
            action,
            json,
        } => control(
            &control_socket,
            &Request::Ivshmem {
                window: if action == "map" {
                    vmm::api::WindowAction::Map
                } else {
                    vmm::api::WindowAction::Unmap
                },
                id: None,
            },
            json,
        ),
        Command::NetLink {
            control_socket,
            action,
            id,
            json,
        } => control(
            &control_socket,
            &Request::Net {
                link: if action == "up" {
                    vmm::api::LinkAction::Up
                } else {
                    vmm::api::LinkAction::Down
                },
                id,
            },
            json,
        ),
        Command::Pause {
            control_socket,
            json,
        } => control(&control_socket, &Request::Pause, json),
        Command::Resume {
            control_socket,
            json,
        } => control(&control_socket, &Request::Resume, json),
        Command::Status {
            control_socket,
            json,
        } => control(&control_socket, &Request::Status, json),
        Command::Host { cmd } => host::run(cmd),
        Command::Flavor(args) => flavor::run(&args),
        Command::Guests { action } => guests_cmd(action.unwrap_or(GuestsAction::List)),
    }
}

fn run(args: &RunArgs, json: bool, exit_stats: bool) -> Result<u8> {
    if let Some(api) = &args.api_socket {
        // alone: an empty VMM waiting for vm.create; with a VM's flags:
        // that VM, booted, and the API for it
        let flags = (args.guest.is_some() || args.kernel.is_some() || args.config.is_some())
            .then(|| args.config_over_file())
            .transpose()?;
        return api_server::serve(api, flags, json);
    }
    let mut resolved = args.resolve(json)?;
    resolved.spec.process_start = PROCESS_START.get().copied();
    let bundled = resolved.bundled;
    run_and_report(vmm::Vm::create(resolved.spec)?, bundled, json, exit_stats)
}

/// Runs a created VM to its end, shows the report, returns the exit code.
fn run_and_report(vm: vmm::Vm, bundled: Option<&str>, json: bool, exit_stats: bool) -> Result<u8> {
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

fn bench_cmd(what: BenchCmd) -> Result<u8> {
    match what {
        BenchCmd::Exits {
            n,
            rounds,
            no_qemu,
            json,
        } => {
            anyhow::ensure!(n > 0 && rounds > 0, "--n and --rounds must be at least 1");
            let opts = bench::exits::ExitsOptions {
                n,
                rounds,
                qemu: !no_qemu,
            };
            let r = bench::exits::run(&opts, |round, v| {
                tracing::info!("round {}: {v:?} done", round + 1)
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                report::print_exits(&r);
            }
        }
        BenchCmd::Latency {
            metric,
            period_us,
            samples,
            duration,
            blocks,
            threshold_ns,
            no_host_baseline,
            compare_profiles,
            qemu,
            rounds,
            histogram,
            plot,
            json,
            rt,
        } => {
            let opts = latency::options(
                &metric,
                period_us,
                samples,
                duration.as_deref(),
                blocks,
                threshold_ns,
                !no_host_baseline,
                compare_profiles,
                qemu,
                rounds,
                &rt,
            )?;
            bench::latency::validate(&opts)?;
            let outputs = latency::Outputs::reserve(histogram.as_deref(), plot.as_deref())?;
            let r = match bench::latency::run(&opts) {
                Ok(r) => r,
                Err(e) => {
                    outputs.discard();
                    return Err(e.into());
                }
            };
            outputs.commit(&r)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                report::print_latency(&r);
            }
        }
        BenchCmd::Net(o) => return bench_net::run(&o),
        BenchCmd::Switch(o) => return bench_switch::run(&o),
        BenchCmd::Blk(o) => return bench_blk::run(&o),
        BenchCmd::Migration(o) => {
            anyhow::ensure!(o.runs > 0, "--runs must be at least 1");
            return bench_migration::run(&o);
        }
        BenchCmd::Ivshmem {
            seconds,
            batch,
            json,
        } => {
            anyhow::ensure!(seconds > 0.0, "--seconds must be > 0");
            anyhow::ensure!(batch.iter().all(|&b| b > 0), "--batch sizes must be > 0");
            let exe = std::env::current_exe().context("locating the nfvisor binary")?;
            let r = bench::ring_bench::run(&exe, seconds, &batch)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "ring of {} x {} B slots, producer CPU {}, consumer CPU {}, {} s per run",
                    r.ring_slots, r.slot_bytes, r.producer_cpu, r.consumer_cpu, r.seconds_per_run
                );
                println!(
                    "streaming limit between the two CPUs: {:.1} GB/s = {:.0} M cache lines/s",
                    r.streaming_gb_s,
                    r.streaming_lines_per_s / 1e6
                );
                for b in &r.results {
                    println!(
                        "batch {:>3}: {:>7.2} Mpps ({:.0}% of the streaming limit), one-way latency p50 {} ns p99 {} ns, payloads {}",
                        b.batch,
                        b.mpps,
                        b.share_of_streaming_limit * 100.0,
                        b.latency_p50_ns,
                        b.latency_p99_ns,
                        if b.verified { "verified" } else { "CORRUPT" }
                    );
                }
            }
        }
        BenchCmd::Doorbell { count, pairs, json } => {
            anyhow::ensure!(count > 0, "--count must be at least 1");
            return bench_doorbell::run(count, &pairs, json);
        }
        BenchCmd::RingWorker(spec) => {
            let r = bench::ring_bench::worker(&spec)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        BenchCmd::ZeroScan { mib, rounds, json } => {
            anyhow::ensure!(
                mib > 0 && rounds > 0,
                "--mib and --rounds must be at least 1"
            );
            let r = bench::zero_scan::run(mib, rounds);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for f in &r.figures {
                    println!(
                        "zero scan {:<7} {:6.2} GB/s  x{:.2} vs scalar{}{}",
                        f.implementation,
                        f.gb_per_s,
                        f.vs_scalar,
                        if f.used { "  (used)" } else { "" },
                        if f.verified {
                            ""
                        } else {
                            "  WRONG: missed zero pages"
                        }
                    );
                }
            }
            anyhow::ensure!(
                r.figures.iter().all(|f| f.verified),
                "a zero-scan implementation gave a wrong answer"
            );
        }
        BenchCmd::Startup { runs, json } => {
            anyhow::ensure!(runs > 0, "--runs must be at least 1");
            let exe = std::env::current_exe().context("locating the nfvisor binary")?;
            let r = bench::startup::run(&exe, runs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                report::print_startup(&r);
            }
        }
    }
    Ok(0)
}

/// `nfvisor migrate`: the request, a progress line per pre-copy round (a
/// spinner on a terminal), then the outcome.
fn migrate_with_progress(path: &std::path::Path, req: &Request, json: bool) -> Result<u8> {
    use std::io::IsTerminal;
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(std::time::Duration::from_millis(100));
        b
    });
    let mut show = |p: &serde_json::Value| {
        let msg = format!(
            "round {}: {:.1} MiB sent, {} pages dirty, estimated downtime {:.2} ms{}",
            p["round"],
            p["bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
            p["dirty_pages"],
            p["estimated_downtime_ms"].as_f64().unwrap_or(0.0),
            if p["synced"] == true {
                " (the destination has caught up)"
            } else {
                ""
            }
        );
        match &bar {
            Some(b) => b.set_message(msg),
            None => tracing::info!("migration: {msg}"),
        }
    };
    let reply = vmm::control::send(path, req, &mut show).map_err(anyhow::Error::msg);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let reply = reply?;
    if json {
        println!("{reply}");
    } else if reply["ok"] == true {
        let m = &reply["migration"];
        println!(
            "migrated: total {:.1} ms, downtime {:.2} ms, {} rounds, {:.1} MiB sent ({} pages, {} zero, {} never touched)",
            m["total_ms"].as_f64().unwrap_or(0.0),
            m["downtime_ms"].as_f64().unwrap_or(0.0),
            m["rounds"],
            m["bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
            m["pages_sent"],
            m["zero_pages"],
            m["untouched_pages"]
        );
        println!(
            "downtime, ms after the pause: {}",
            report::downtime_steps(&m["downtime_phases"])
        );
    }
    if reply["ok"] == true {
        Ok(0)
    } else {
        anyhow::bail!(
            "{}",
            reply["error"]
                .as_str()
                .unwrap_or("the VM refused the request")
        )
    }
}

/// Sends one request to a control socket and shows the reply.
fn control(path: &std::path::Path, req: &Request, json: bool) -> Result<u8> {
    let reply = vmm::control::send(path, req, &mut |_| {}).map_err(anyhow::Error::msg)?;
    if json {
        println!("{reply}");
    } else {
        let plain = |v: &serde_json::Value| match v.as_str() {
            Some(s) => s.to_string(),
            None => v.to_string(),
        };
        let mut fields: Vec<String> = reply
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| {
                        !matches!(k.as_str(), "v" | "ok" | "exits" | "migration" | "devices")
                    })
                    .map(|(k, v)| format!("{k}: {}", plain(v)))
                    .collect()
            })
            .unwrap_or_default();
        fields.sort();
        // per-vCPU exit counts, one line each
        for e in reply["exits"].as_array().into_iter().flatten() {
            let reasons: Vec<String> = e["by_reason"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            fields.push(format!(
                "vcpu {} exits: {} ({})",
                e["vcpu"],
                e["total"],
                reasons.join(", ")
            ));
        }
        // each device's counters, one line each
        for (id, counters) in reply["devices"].as_object().into_iter().flatten() {
            let c: Vec<String> = counters
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            fields.push(format!("device {id}: {}", c.join(", ")));
        }
        if let Some(m) = reply
            .get("migration")
            .filter(|m| m.get("progress").is_some())
        {
            let p = &m["progress"];
            fields.push(format!(
                "migration to {}: round {}, {:.1} MiB sent, {} pages dirty, estimated downtime {:.2} ms",
                plain(&m["to"]),
                p["round"],
                p["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                p["dirty_pages"],
                p["estimated_downtime_ms"].as_f64().unwrap_or(0.0)
            ));
        }
        println!("{}", fields.join("\n"));
    }
    if reply["ok"] == true {
        Ok(0)
    } else {
        anyhow::bail!(
            "{}",
            reply["error"]
                .as_str()
                .unwrap_or("the VM refused the request")
        )
    }
}

/// `--ivshmem` on `receive`/`restore`: a plain region only, refused before
/// anything listens or loads.
fn plain_ivshmem(spec: &str) -> Result<String> {
    let parsed = config::parse_ivshmem(spec)?;
    anyhow::ensure!(
        parsed.server.is_none(),
        "doorbell mode cannot be restored or received (peer ids belong to the server connection); use a plain region"
    );
    Ok(spec.to_string())
}

/// What a restored or received guest takes from this side's flags (the
/// rest comes from the stream).
#[derive(clap::Args)]
struct LocalFlags {
    /// Write the guest's console to this file.
    #[arg(long, value_name = "FILE")]
    serial: Option<PathBuf>,
    /// Serve a control socket here (status, pause, resume, snapshot, migrate).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// One JSON report on stdout (the console goes to stderr or --serial).
    #[arg(long)]
    json: bool,
    /// Show per-vCPU exit statistics in the report.
    #[arg(long)]
    exit_stats: bool,
    /// The shared ivshmem region the guest was attached to (plain mode:
    /// path=...,size=...): the stream names it, and this must be the same
    /// region.
    #[arg(long, value_name = "SPEC", value_parser = plain_ivshmem)]
    ivshmem: Option<String>,
    /// The NICs the guest had (tap=NAME|fd=N[,mac=..][,mtu=N], one per NIC,
    /// in order): this host's TAPs carry them on.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// The disks the guest had (path=FILE[,...] as `run --disk`, one per
    /// disk, in order): without it the images the stream names are opened
    /// (shared storage: the same paths on this host).
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// The guest's vsock device on this host (cid=N,socket=PATH): a
    /// destination on the same host as its source needs its own socket.
    #[arg(long, value_name = "SPEC")]
    vsock: Option<String>,
    #[command(flatten)]
    dirty: config::DirtyTracking,
    #[command(flatten)]
    rt: Box<config::RtArgs>,
}

fn restore(from: &std::path::Path, local: LocalFlags) -> Result<u8> {
    let (source, cfg) = vmm::snapshot::RestoreSource::open(&vmm::snapshot::stream_path(from))?;
    let (json, exit_stats) = (local.json, local.exit_stats);
    let vm = restored_vm(source, cfg, local, None)?;
    run_and_report(vm, None, json, exit_stats)
}

/// Waits for one migration on `listen` (vmm::receive does the protocol),
/// runs the guest it brings and reports.
fn receive(
    listen: &str,
    token: Option<Vec<u8>>,
    io_timeout: std::time::Duration,
    local: LocalFlags,
) -> Result<u8> {
    let (json, exit_stats) = (local.json, local.exit_stats);
    vmm::migrate::Endpoint::parse(listen).map_err(|e| anyhow::anyhow!("--listen {e}"))?;
    let incoming = vmm::receive::receive(
        listen,
        token.as_deref(),
        io_timeout,
        |source, cfg, on_prepared| {
            restored_vm(source, cfg, local, Some(on_prepared))
                .map_err(|e| vmm::Error::Config(format!("{e:#}")))
        },
    )
    .map_err(|e| {
        anyhow::Error::from(e).context("the incoming migration was refused; nothing ran")
    })?;
    let started = incoming.started.clone();
    run_and_report(incoming.vm, None, json, exit_stats).map_err(|e| {
        if started.load(std::sync::atomic::Ordering::Acquire) {
            e
        } else {
            e.context("the incoming migration was refused; nothing ran")
        }
    })
}

/// The VM a stream brings: what the guest is from the stream, this side's
/// own settings (console, placement, control socket, tracking) from its
/// flags.
fn restored_vm(
    source: vmm::snapshot::RestoreSource,
    cfg: vmm::snapshot::SnapshotConfig,
    local: LocalFlags,
    on_prepared: Option<Box<dyn FnOnce(u64) + Send>>,
) -> Result<vmm::Vm> {
    let here = vmm::VmConfig {
        serial: local.serial,
        control_socket: local.control_socket,
        ivshmem: local.ivshmem,
        net: (!local.net.is_empty()).then_some(local.net),
        disk: (!local.disk.is_empty()).then_some(local.disk),
        vsock: local.vsock,
        rt: local.rt.to_config(),
        // a received or restored guest can migrate on
        ..local.dirty.to_config()
    };
    let spec = restored_spec(source, cfg, here, local.json, on_prepared)?;
    Ok(vmm::Vm::create(spec)?)
}

/// The spec of the VM a stream brings, this side's own settings from
/// `here` (see guest_part): the CLI's restore and receive and the REST
/// API's vm.restore and vm.receive-migration.
pub(crate) fn restored_spec(
    source: vmm::snapshot::RestoreSource,
    cfg: vmm::snapshot::SnapshotConfig,
    here: vmm::VmConfig,
    json: bool,
    on_prepared: Option<Box<dyn FnOnce(u64) + Send>>,
) -> Result<vmm::VmSpec> {
    // (only what the guest is comes from the stream: see guest_part)
    let theirs = cfg.vm.guest_part();
    if theirs != cfg.vm {
        tracing::warn!(
            "the stream also sets this side's own settings (console, control socket, placement, ...): ignored"
        );
    }
    let mut spec = vmm::VmSpec::from_stream_config(&here.over(theirs), json)?;
    spec.process_start = PROCESS_START.get().copied();
    spec.restore_from = Some(source);
    spec.on_prepared = on_prepared;
    Ok(spec)
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

#[derive(clap::Args, Debug)]
struct SwitchArgs {
    /// Where each server port's socket goes (`<dir>/<name>.sock`).
    #[arg(long, value_name = "DIR")]
    socket_dir: PathBuf,
    /// The ports: NAME[,NAME=client:PATH][,NAME=tap:DEVICE]...
    #[arg(long)]
    ports: String,
    /// A TAP port to the host's stack (named after the device).
    #[arg(long, value_name = "DEVICE")]
    tap: Vec<String>,
    /// The PMDs' CPUs: one polling thread per CPU, ports shared out.
    #[arg(long)]
    cpus: Option<String>,
    /// SCHED_FIFO priority of the polling threads (needs --cpus).
    #[arg(long)]
    rt_priority: Option<u8>,
    /// How long a learnt MAC address is kept without a frame from it.
    #[arg(long, default_value_t = 300)]
    ageing_s: u64,
    /// A socket that takes `switch-ctl` requests (ports, fdb, stats,
    /// add-port, del-port).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Stop after this many seconds (0: at SIGINT or SIGTERM).
    #[arg(long, default_value_t = 0)]
    duration_s: u64,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct SwitchCtlArgs {
    /// The switch's --control-socket.
    #[arg(long, value_name = "PATH")]
    control_socket: PathBuf,
    #[command(subcommand)]
    what: SwitchCtlCmd,
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand, Debug)]
enum SwitchCtlCmd {
    /// Each port: kind, socket, PMD, whether a frontend is connected.
    Ports,
    /// The MAC table.
    Fdb,
    /// Every port's counters, the table, the PMDs' placement.
    Stats,
    /// Adds a port: NAME, NAME=client:PATH or NAME=tap:DEVICE.
    AddPort { port: String },
    /// Removes a port (its frontend is cut off).
    DelPort { name: String },
}

static SWITCH_STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn switch_signal(_: libc::c_int) {
    SWITCH_STOP.store(true, std::sync::atomic::Ordering::Release);
}

fn run_switch(a: &SwitchArgs) -> Result<u8> {
    let mut ports = switch::parse_ports(&a.ports)?;
    for t in &a.tap {
        let spec = switch::parse_port(&format!("{t}=tap:{t}"))
            .map_err(|e| anyhow::anyhow!("--tap {t:?}: {e}"))?;
        anyhow::ensure!(
            !ports.iter().any(|p| p.name == spec.name),
            "--tap {t:?}: a port of that name is in --ports"
        );
        ports.push(spec);
    }
    let cpus = match &a.cpus {
        None => Vec::new(),
        Some(list) => rt::parse_cpu_list(&list.replace('+', ","))
            .with_context(|| format!("--cpus {list:?}"))?,
    };
    if let Some(p) = a.rt_priority {
        anyhow::ensure!((1..=99).contains(&p), "--rt-priority {p}: 1 to 99");
    }
    anyhow::ensure!(
        (1..=86400).contains(&a.ageing_s),
        "--ageing-s {}: 1 to 86400 seconds",
        a.ageing_s
    );
    let mut sw = switch::Switch::start(switch::SwitchConfig {
        socket_dir: a.socket_dir.clone(),
        ports,
        cpus,
        rt_priority: a.rt_priority,
        ageing: std::time::Duration::from_secs(a.ageing_s),
    })?;
    if let Some(path) = &a.control_socket {
        switch::control::serve(sw.state.clone(), path)?;
    }
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, switch_signal as *const () as usize);
        libc::signal(libc::SIGTERM, switch_signal as *const () as usize);
    }
    let ports = sw.state.ports();
    for (_, p) in &ports {
        tracing::info!(
            "switch port {} ({}): {}",
            p.name,
            switch::kind_text(&p.kind),
            p.socket
                .as_ref()
                .map(|s| s.display().to_string())
                .unwrap_or_default()
        );
    }
    eprintln!("nfvisor switch: {} ports, serving", ports.len());
    let t0 = std::time::Instant::now();
    while !SWITCH_STOP.load(std::sync::atomic::Ordering::Acquire)
        && (a.duration_s == 0 || t0.elapsed().as_secs() < a.duration_s)
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // the report before the ports end (their counters stay)
    let mut report = sw.state.report();
    sw.stop();
    if let Some(path) = &a.control_socket {
        let _ = std::fs::remove_file(path);
    }
    report["seconds"] = t0.elapsed().as_secs_f64().into();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", switch_text(&report));
    }
    Ok(0)
}

/// A switch report (or part of one) as plain text.
fn switch_text(v: &serde_json::Value) -> String {
    let mut out = String::new();
    if let Some(ports) = v["ports"].as_object() {
        for (name, c) in ports {
            let c = c
                .as_object()
                .map(|c| {
                    c.iter()
                        .map(|(k, v)| {
                            format!(
                                "{k}={}",
                                v.as_str().map(String::from).unwrap_or(v.to_string())
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            out += &format!("port {name}: {c}\n");
        }
    }
    let fdb = v["fdb"].as_array().or(v
        .as_array()
        .filter(|a| a.iter().all(|e| e.get("mac").is_some())));
    for e in fdb.into_iter().flatten() {
        out += &format!(
            "fdb {} port {} age {:.1} s\n",
            e["mac"].as_str().unwrap_or(""),
            e["port"].as_str().unwrap_or(""),
            e["age_s"].as_f64().unwrap_or(0.0)
        );
    }
    for p in v["pmds"].as_array().into_iter().flatten() {
        out += &format!(
            "pmd {} tid {} cpus {} {} {}\n",
            p["index"],
            p["tid"],
            p["cpus"],
            p["policy"].as_str().unwrap_or(""),
            p["priority"]
        );
    }
    out
}

fn run_switch_ctl(a: &SwitchCtlArgs) -> Result<u8> {
    use switch::Request;
    let req = match &a.what {
        SwitchCtlCmd::Ports => Request::Ports,
        SwitchCtlCmd::Fdb => Request::Fdb,
        SwitchCtlCmd::Stats => Request::Stats,
        SwitchCtlCmd::AddPort { port } => Request::AddPort { port: port.clone() },
        SwitchCtlCmd::DelPort { name } => Request::DelPort { name: name.clone() },
    };
    let v =
        switch::control::request(&a.control_socket, &req).map_err(|e| anyhow::anyhow!("{e}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    match &a.what {
        SwitchCtlCmd::Ports => {
            for p in v.as_array().into_iter().flatten() {
                println!(
                    "{} {} pmd {} {} {}",
                    p["name"].as_str().unwrap_or(""),
                    p["kind"].as_str().unwrap_or(""),
                    p["pmd"],
                    if p["connected"] == true {
                        "connected"
                    } else {
                        "waiting"
                    },
                    p["socket"].as_str().unwrap_or("")
                );
            }
        }
        SwitchCtlCmd::Fdb | SwitchCtlCmd::Stats => print!("{}", switch_text(&v)),
        SwitchCtlCmd::AddPort { port } => println!("added {port}"),
        SwitchCtlCmd::DelPort { name } => println!("removed {name}"),
    }
    Ok(0)
}
